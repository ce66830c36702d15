"""One place abstraction (edgequant.pipeline.registry.Place): a place registered by kind serves a run's cells
and `edgequant noise` / `compare --recheck` alike.  A toy place (a fake of our own Place interface) is one
class; the noise floor is measured on it and waits on its own load; ``noise.Places`` opens this host through
the registry; a class missing part of the contract cannot be opened."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from edgequant import noise
from edgequant.bench.stats import Summary
from edgequant.core.errors import BadInput
from edgequant.devices.contention import Contention
from edgequant.devices.host import host_device_id
from edgequant.pipeline import places, registry
from edgequant.pipeline.registry import Place, place_class
from edgequant.profiles import BenchSettings


@pytest.fixture
def own_registry(monkeypatch):
    """The place registry as it is, copied: what a test registers is gone after it."""
    registry.place_class("host")               # the built-in places loaded first
    monkeypatch.setattr(registry, "PLACES", dict(registry.PLACES))


def _load(other: float) -> Contention:
    return Contention(other_cores=other, machine_busy_cores=other + 1.0, own_cores=1.0, steal_cores=0.0,
                      window_s=1.0, n_cpus=8)


@dataclass
class ToyResult:
    pp: Summary
    tg: Summary
    contention: Contention


def _toy_place_class():
    class ToyPlace(Place, kind="toy"):
        """A place whose measurements are given: (pp samples, tg samples, other cores) in order."""

        name = "toy"

        def __init__(self, measurements):
            self.device_id = "toy:1"
            self.measurements = list(measurements)
            self.calls: list[tuple] = []

        def device(self) -> dict:
            return {"model": "toy"}

        def facts(self):
            return {"cores": 8}

        def push(self, local, sha256: str, name: str) -> str:
            return f"/toy/{name}"

        def run_measured(self, argv, *, timeout: float):
            raise AssertionError("not used here")

        def repack(self, settings) -> bool:
            return False

        def params(self, settings) -> dict:
            return {"runner": "toy", "threads": 3}

        def prepare(self, path, sha256: str, quant: str, on_progress=None) -> str:
            self.calls.append(("prepare", quant))
            return self.push(path, sha256, f"{quant}.gguf")

        def measure(self, handle, settings, repack=None, on_progress=None):
            self.calls.append(("measure", handle, repack))
            pp, tg, other = self.measurements.pop(0)
            return ToyResult(Summary.from_values(pp), Summary.from_values(tg), _load(other))

        def read_load(self, seconds: float) -> Contention:
            self.calls.append(("read_load",))
            return _load(0.0)

        def read_top(self) -> list[dict]:
            return [{"pid": 1, "name": "toy-app", "cores": 1.0}]

    return ToyPlace


@dataclass
class FakeArtifact:
    path: Path
    sha256: str = "ab" * 32
    quant: str = "Q4_0"


def test_a_new_place_is_one_class_and_noise_measures_its_floor_on_it(own_registry):
    ToyPlace = _toy_place_class()
    assert place_class("toy") is ToyPlace
    # pp medians 90, 110, 100 (the second measurement contended once: measured again after its own quiet)
    toy = ToyPlace([([89, 90, 91], [10, 10, 10], 0.0),
                    ([50, 50, 50], [5, 5, 5], 3.0),          # contended: 3 other cores > 0.5
                    ([110, 111, 109], [12, 12, 12], 0.1),
                    ([100, 99, 101], [11, 11, 11], 0.0)])
    settings = BenchSettings(contention_threshold=0.5, contention_retries=1, contention_wait=5.0)
    floor = noise.measure_noise_floor(FakeArtifact(Path("/models/q4.gguf")), settings, 3, place=toy)
    assert floor.device_id == "toy:1" and floor.quant == "Q4_0"
    assert floor.params == {"runner": "toy", "threads": 3}
    pct, medians = floor.floors["pp_tps"]
    assert medians == [90.0, 110.0, 100.0]
    # range 20 %; sd of 90, 110, 100 is 10, so 3.0902 * sqrt(2) * 10 / 100 = 43.70 % is the wider, the floor
    assert pct == pytest.approx(43.70, abs=0.01)
    tg_pct, tg_medians = floor.floors["tg_tps"]
    # range 2 / 11 = 18.2 %; sd 1, so 3.0902 * sqrt(2) * 1 / 11 = 39.73 %
    assert tg_medians == [10.0, 12.0, 11.0] and tg_pct == pytest.approx(39.73, abs=0.01)
    assert floor.contention == [0.0, 0.1, 0.0]
    # pushed once, measured where it was pushed, with the place's repack, waited on the place's own load
    assert toy.calls[0] == ("prepare", "Q4_0")
    measured = [c for c in toy.calls if c[0] == "measure"]
    assert len(measured) == 4 and all(c[1:] == ("/toy/Q4_0.gguf", False) for c in measured)
    assert toy.calls.index(("read_load",)) == 3                      # after the contended second measurement


def test_noise_places_open_this_host_through_the_registry(own_registry, tmp_path):
    opened = []

    class CountedHost(places.HostPlace, kind="host"):
        def __init__(self):
            super().__init__()
            opened.append(self)

    with noise.Places(tmp_path) as where:
        here = where.get(host_device_id(), "--device host")
        assert isinstance(here, CountedHost) and opened == [here]
        assert where.get(host_device_id(), "--device host") is here          # opened once
        with pytest.raises(BadInput, match="pixel-9 is neither this host"):
            where.get("pixel-9", "--device pixel-9")


def test_a_place_missing_part_of_the_contract_cannot_be_opened(own_registry):
    class RunOnly(Place, kind="run-only"):
        """What a run's executor alone needs: not enough for noise and recheck."""

        name = "run-only"
        device_id = "x"

        def device(self):
            return {}

        def facts(self):
            return {}

        def push(self, local, sha256, name):
            return str(local)

        def run_measured(self, argv, *, timeout):
            return None

    with pytest.raises(TypeError) as err:
        place_class("run-only")()
    for method in ("measure", "params", "prepare", "read_load", "read_top", "repack"):
        assert method in str(err.value)


def test_the_built_in_places_are_registered_and_complete():
    assert place_class("host") is places.HostPlace and place_class("device") is places.PhonePlace
    assert not places.HostPlace.__abstractmethods__ and not places.PhonePlace.__abstractmethods__
    host = place_class("host")()
    assert host.device_id == host_device_id()
    load = host.read_load(0.2)                   # this host's own /proc/stat
    assert isinstance(load, Contention) and load.other_cores >= 0 and load.window_s > 0
