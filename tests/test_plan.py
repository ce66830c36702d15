"""The run as a plan of cells (edgequant.pipeline.plan) run by one executor through a registry of runtimes:
a toy runtime registered for a new artifact format runs through the executor into a real SQLite store; the
plan of the built-in runtimes over host and phones; resume = the plan minus what is stored; `run --dry-run`;
a place's measured command on this host."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from edgequant.core.errors import BadInput
from edgequant.pipeline import registry
from edgequant.pipeline.executor import RunInputs, execute
from edgequant.pipeline.host import RungOutcome
from edgequant.pipeline.plan import PlaceSpec, Rung, Stored, build, rungs_of
from edgequant.pipeline.registry import Runtime
from edgequant.pipeline.scope import NullReporter, RunScope
from edgequant.profiles import load_profile
from edgequant.results.store import Measurement, Store


@dataclass
class ToyArtifact:
    """An artifact of a format edgequant does not know (a fake of our Artifact interface)."""

    quant: str
    size_bytes: int
    is_reference: bool = False
    sha256: str = field(default="")

    def __post_init__(self):
        self.sha256 = self.sha256 or (self.quant.lower().encode().hex() * 8)[:64]

    def record(self) -> dict:
        return {"sha256": self.sha256, "quant": self.quant, "format": "toy", "size_bytes": self.size_bytes}


@pytest.fixture
def toy_runtime():
    """A runtime for the format "toy": speed on the host only; its "tg" is 1e9 / size (so each rung's
    figure is known here), a rung of size 0 fails."""

    class Toy(Runtime, format="toy"):
        name = "toyrt"
        stages = {"host": ("bench",)}
        calls: list[list[str]] = []

        def bench(self, scope, inputs, place, arts):
            Toy.calls.append([a.quant for a in arts])
            out = []
            for a in arts:
                key = scope.key(a, device_id=place.device_id, device=place.device(), runtime=self.name,
                                runtime_version="0.1", params={"runner": place.kind, "threads": 1})
                if a.size_bytes == 0:
                    scope.record(key, [], status="failed", detail="empty model")
                    out.append(RungOutcome(a, "failed", "empty model"))
                    continue
                scope.record(key, [Measurement("size", a.size_bytes, "bytes"),
                                   Measurement("tg_tps", 1e9 / a.size_bytes, "t/s")])
                out.append(RungOutcome(a, "ok"))
            return out

    yield Toy
    registry.RUNTIMES.pop("toy", None)


def test_a_new_runtime_is_one_class_and_runs_through_the_executor(tmp_path, toy_runtime):
    profile = load_profile("quick")
    arts = [ToyArtifact("TOY-A", 500_000_000, True), ToyArtifact("TOY-B", 250_000_000),
            ToyArtifact("TOY-EMPTY", 0)]
    host = PlaceSpec.host()
    plan = build(profile, rungs_of(arts), [host], suite=None)
    assert [(c.stage, c.quant, c.runtime, c.place.kind) for c in plan.cells] == [
        ("bench", "TOY-A", "toyrt", "host"), ("bench", "TOY-B", "toyrt", "host"),
        ("bench", "TOY-EMPTY", "toyrt", "host")]
    with Store(tmp_path / "r.db") as store:
        run_id = store.start_run("edgequant run", "quick", "org/toy", "t" * 64)
        scope = RunScope(store, run_id, "org/toy", "t" * 64, NullReporter())
        done = execute(plan, scope, RunInputs(profile, arts, tmp_path))
        assert toy_runtime.calls == [["TOY-A", "TOY-B", "TOY-EMPTY"]]    # one batch: one stage, one format
        assert done.failed == ["TOY-EMPTY failed"] and done.lost == []
        rows = {(r["quant"], r["metric"]): r for r in store.measurements(run_id)}
        assert set(rows) == {("TOY-A", "size"), ("TOY-A", "tg_tps"), ("TOY-B", "size"), ("TOY-B", "tg_tps")}
        assert rows[("TOY-A", "tg_tps")]["value"] == pytest.approx(2.0)
        assert rows[("TOY-B", "tg_tps")]["value"] == pytest.approx(4.0)
        for r in rows.values():
            assert (r["runtime"], r["stage"], r["place"], r["device_id"]) == ("toyrt", "bench", "host",
                                                                             host.device_id)
            assert r["model_id"] == "org/toy" and r["run_id"] == run_id
        assert rows[("TOY-A", "size")]["is_reference"] and not rows[("TOY-B", "size")]["is_reference"]
        statuses = {s["quant"]: (s["status"], s["detail"]) for s in store.rung_statuses(run_id)}
        assert statuses == {"TOY-A": ("ok", None), "TOY-B": ("ok", None), "TOY-EMPTY": ("failed", "empty model")}
        # resumed: the same plan minus what is stored (a failed rung has its status: not measured again)
        again = build(profile, rungs_of(arts), [host], stored=Stored.read(store, run_id))
        assert again.cells == [] and len(again.stored) == 3
        execute(again, scope, RunInputs(profile, arts, tmp_path))
        assert toy_runtime.calls == [["TOY-A", "TOY-B", "TOY-EMPTY"]]
        assert len(store.measurements(run_id)) == 4


def test_a_format_without_a_runtime_is_bad_input():
    with pytest.raises(BadInput, match="no runtime registered for artifact format 'safetensors'"):
        build(load_profile("quick"), [Rung("X", "safetensors")], [PlaceSpec.host()])


def _profile(tmp_path: Path, extra: str = "") -> object:
    path = tmp_path / "p.toml"
    path.write_text('[profile]\nname = "p"\n[quantize]\ntypes = ["Q8_0", "Q4_0"]\n'
                    '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nwarmup = 0\n' + extra)
    return load_profile(path)


class FakeSuite:
    name = "triage"
    cases = [object()] * 5


RUNGS = [Rung("BF16", "gguf", True), Rung("Q8_0", "gguf"), Rung("Q4_0", "gguf"), Rung("ONNX-INT8", "onnx")]


def _cells(plan):
    return [(c.stage, c.quant, c.place.name) for c in plan.cells]


def test_the_plan_on_the_host_measures_speed_then_sustained_then_the_eval(tmp_path):
    profile = _profile(tmp_path, '[sustained]\nruns = 3\nrung = "Q8_0"\n')
    plan = build(profile, RUNGS, [PlaceSpec.host()], FakeSuite())
    assert _cells(plan) == [("bench", "BF16", "host"), ("bench", "Q8_0", "host"), ("bench", "Q4_0", "host"),
                            ("bench", "ONNX-INT8", "host"), ("sustained", "Q8_0", "host"),
                            ("quality", "BF16", "host"), ("quality", "Q8_0", "host"), ("quality", "Q4_0", "host"),
                            ("quality", "ONNX-INT8", "host")]
    assert [c.runtime for c in plan.cells if c.quant == "ONNX-INT8"] == ["onnxruntime", "onnxruntime"]
    bench = dict(plan.cells[0].params)
    assert (bench["n_prompt"], bench["n_gen"], bench["reps"], bench["warmup"]) == (16, 4, 3, 0)
    assert dict(plan.cells[4].params)["runs"] == 3
    assert dict(plan.cells[-1].params) == {"suite": "triage", "cases": 5}
    lines = plan.lines(annotate=lambda c: f"~{len(c.quant)} s")     # where per-cell estimates go
    assert len(lines) == 9 and lines[0].endswith("~4 s") and lines[3].endswith("~9 s")


def test_the_plan_on_phones_goes_rung_by_rung_and_quality_on_device_stays_with_llama_cpp(tmp_path):
    profile = _profile(tmp_path, '[sustained]\nruns = 2\nrung = "Q8_0"\n')
    a, b = PlaceSpec.phone("p1"), PlaceSpec.phone("10.0.0.2:5555")
    plan = build(profile, RUNGS, [a, b], FakeSuite(), quality_on_device=True)
    per_phone = [("bench", "BF16"), ("sustained", "Q8_0"), ("quality", "BF16"), ("bench", "Q8_0"),
                 ("quality", "Q8_0"), ("bench", "Q4_0"), ("quality", "Q4_0"), ("bench", "ONNX-INT8")]
    assert _cells(plan) == ([(s, q, "p1") for s, q in per_phone] + [(s, q, "10.0.0.2:5555") for s, q in per_phone]
                            + [("quality", "ONNX-INT8", "host")])     # onnxruntime evaluates on the host only
    assert {c.place.device_id for c in plan.cells if c.place.kind == "device"} == {"adb:p1", "adb:10.0.0.2:5555"}
    # without --quality-on-device the phones measure speed and the host evaluates every rung
    plan = build(profile, RUNGS, [a], FakeSuite())
    assert [(s, q) for s, q, p in _cells(plan) if p == "host"] == [("quality", r.quant) for r in RUNGS]


def test_resume_leaves_out_exactly_what_the_store_holds(tmp_path):
    profile = _profile(tmp_path, '[sustained]\nruns = 2\nrung = "Q8_0"\n')
    phone, host = PlaceSpec.phone("p1"), PlaceSpec.host()
    stored = Stored(benched={("BF16", "adb:p1"), ("Q8_0", host.device_id)}, sustained={"adb:p1"},
                    quality_host={"BF16"}, quality_device={("BF16", "adb:p1")})
    plan = build(profile, RUNGS, [host, phone], FakeSuite(), quality_on_device=True, stored=stored)
    assert _cells(plan) == [
        ("bench", "BF16", "host"), ("bench", "Q4_0", "host"), ("bench", "ONNX-INT8", "host"),
        ("sustained", "Q8_0", "host"),
        ("bench", "Q8_0", "p1"), ("quality", "Q8_0", "p1"), ("bench", "Q4_0", "p1"), ("quality", "Q4_0", "p1"),
        ("bench", "ONNX-INT8", "p1"),
        ("quality", "Q8_0", "host"), ("quality", "Q4_0", "host"), ("quality", "ONNX-INT8", "host")]
    assert sorted(_cells(type(plan)(plan.stored))) == sorted([
        ("bench", "Q8_0", "host"), ("bench", "BF16", "p1"), ("sustained", "Q8_0", "p1"), ("quality", "BF16", "p1"),
        ("quality", "BF16", "host")])


def test_stored_reads_the_run_from_the_store(tmp_path):
    from edgequant.results.store import RowKey

    def key(quant, device_id, params):
        return RowKey("m", "h", quant, "a", False, device_id, {}, "llama.cpp", "0", params)

    with Store(tmp_path / "r.db") as s:
        run_id = s.start_run("edgequant run", "p", "m", "h")
        s.record_rungs(run_id, [(key("Q8_0@d512", "host:x", {"runner": "host"}), [Measurement("tg_tps", 1, "t/s")],
                                 "ok", None)])
        s.record_rung(run_id, key("Q4_0", "adb:p", {"runner": "device"}), [], status="oom")
        s.record_rung(run_id, key("Q8_0", "adb:p", {"runner": "device", "stage": "sustained"}),
                      [Measurement("sustained_drop", 3, "%")], status=None)
        s.record_rung(run_id, key("Q8_0", "host:x", {"runner": "host", "stage": "quality"}),
                      [Measurement("xml_parse_rate", 1, "ratio")], status=None)
        s.record_rung(run_id, key("Q4_0", "adb:p", {"runner": "device", "stage": "quality", "where": "device"}),
                      [Measurement("xml_parse_rate", 0, "ratio")], status=None)
        got = Stored.read(s, run_id)
    # a variant (Q8_0@d512) counts for its rung; a rung stored as oom is done
    assert got == Stored(benched={("Q8_0", "host:x"), ("Q4_0", "adb:p")}, sustained={"adb:p"},
                         quality_host={"Q8_0"}, quality_device={("Q4_0", "adb:p")})


def test_a_runs_plan_and_places_come_from_the_library_without_the_cli(tmp_path):
    """``pipeline.run``: what ``run`` (and ``--dry-run``) would measure, from a ``RunRequest`` alone: the host by
    default, resumed = minus what the store holds, and energy on the host refused before anything is written."""
    from dataclasses import replace

    from edgequant.pipeline import run as runs
    from edgequant.results.store import RowKey

    request = runs.RunRequest(None, _profile(tmp_path), None, "triage", "auto", tmp_path / "cache", "edgequant run")
    run_plan, where = runs.plan(request)
    assert (where.on_host, where.phones) == (True, [])
    assert _cells(run_plan) == [("bench", "BF16", "host"), ("bench", "Q8_0", "host"), ("bench", "Q4_0", "host")]
    host_id = PlaceSpec.host().device_id
    with Store(tmp_path / "r.db") as s:
        run_id = s.start_run("edgequant run", "p", "m", "h")
        s.record_rung(run_id, RowKey("m", "h", "Q8_0", "a", False, host_id, {}, "llama.cpp", "0", {"runner": "host"}),
                      [], status="oom")
        resumed, _ = runs.plan(replace(request, resume_id=run_id), s)
    assert _cells(resumed) == [("bench", "BF16", "host"), ("bench", "Q4_0", "host")]
    energetic = replace(request, profile=_profile(tmp_path, "[device]\nenergy = true\n"))
    with pytest.raises(BadInput, match="field 'device.energy' needs a phone's battery current"):
        runs.plan(energetic)
    assert not (tmp_path / "cache").exists()


def _cell_lines(stdout: str) -> list[str]:
    """The dry run's cell lines: after its first line, up to the estimate of what they need."""
    lines = stdout.splitlines()[1:]
    return lines[:next(i for i, ln in enumerate(lines) if ln.startswith("estimate for "))]


def test_run_dry_run_prints_the_cells_and_writes_nothing(tmp_path, tiny_checkpoint):
    env = cli_env(tmp_path)
    r = run_cli("run", "--dry-run", "--model", str(tiny_checkpoint), "--profile", "quick", "--device", "host",
                "--db", str(tmp_path / "r.db"), env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("plan of profile quick: 8 cell(s)")
    lines = _cell_lines(r.stdout)
    assert [ln.split()[:4] for ln in lines] == (
        [["bench", q, "llama.cpp", "host"] for q in ("BF16", "Q8_0", "Q4_K_M", "Q4_0")]
        + [["quality", q, "llama.cpp", "host"] for q in ("BF16", "Q8_0", "Q4_K_M", "Q4_0")])
    assert "n_prompt=128, n_gen=32, reps=3, warmup=1" in lines[0]
    assert "disk:" in r.stdout and "time: about" in r.stdout
    assert not (tmp_path / "r.db").exists() and not list((tmp_path / "cache").rglob("*.gguf"))
    r = run_cli("run", "--dry-run", "--model", str(tiny_checkpoint), "--profile", "quick", "--no-quality",
                "--db", str(tmp_path / "r.db"), env=env, timeout=120)
    assert r.returncode == 0 and "4 cell(s)" in r.stdout
    assert not any(ln.split()[0] == "quality" for ln in _cell_lines(r.stdout))


def test_the_host_place_runs_a_measured_command():
    from edgequant.pipeline.places import HostPlace

    mib = 96
    run = HostPlace().run_measured([sys.executable, "-c", f"b = bytearray({mib} << 20); b[::4096] = b'x' * "
                                    f"len(b[::4096]); print(len(b)); raise SystemExit(3)"], timeout=60)
    assert run.exit_code == 3 and not run.timed_out
    assert run.stdout.strip() == str(mib << 20)
    assert run.peak_rss_kib >= mib * 1024      # the buffer, touched page by page, was resident


def test_a_new_transport_registers_for_its_device_spec(monkeypatch):
    from edgequant.devices import select
    from edgequant.devices.transport import ShellResult

    monkeypatch.setattr(select, "TRANSPORTS", dict(select.TRANSPORTS))   # the registration ends with the test

    class Loopback:
        kind = "loop"

        def __init__(self, serial):
            self.serial = serial

        def shell(self, command, timeout):
            return ShellResult(0, command)

    def loop_target(addr, spec):
        if not addr.isalnum():
            raise BadInput(f"--device {spec!r}: expected loop:NAME")
        return select.Target(addr, "loop")

    select.register_transport("loop", prefix="loop", parse=loop_target)(lambda t: Loopback(t.serial))
    target = select.parse_spec("loop:bench1")
    assert target == select.Target("bench1", "loop")
    transport = select.open_transport(target)
    assert isinstance(transport, Loopback) and transport.shell("echo hi", 5).stdout == "echo hi"
    with pytest.raises(BadInput, match="expected loop:NAME"):
        select.parse_spec("loop:a b")
    # the built-in prefixes still name their transports
    assert select.parse_spec("tcp:10.0.0.2:5555") == select.Target("10.0.0.2:5555", "direct")
    assert select.parse_spec("server:10.0.0.2:5555") == select.Target("10.0.0.2:5555", "server", connect=True)


def test_run_dry_run_of_a_resumed_run_shows_what_is_left(tmp_path, tiny_checkpoint):
    from edgequant.devices.host import host_device_id
    from edgequant.results.store import RowKey

    db = tmp_path / "r.db"
    with Store(db) as s:
        run_id = s.start_run(f"edgequant run --model {tiny_checkpoint} --profile quick --no-quality", "quick", "m",
                             "h")
        key = RowKey("m", "h", "Q8_0", "a", False, host_device_id(), {}, "llama.cpp", "0", {"runner": "host"})
        s.record_rung(run_id, key, [Measurement("tg_tps", 1.0, "t/s")])
        s.finish_run(run_id, "partial", "interrupted")
        before = s.measurements(run_id)
    r = run_cli("run", "--resume", run_id, "--dry-run", "--db", str(db), env=cli_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    cells = [ln.split()[:2] for ln in _cell_lines(r.stdout) if not ln.strip().startswith("(")]
    assert cells == [["bench", "BF16"], ["bench", "Q4_K_M"], ["bench", "Q4_0"]]
    assert "(1 cell(s) already stored in the run are not measured again)" in r.stdout
    with Store(db) as s:      # nothing was written
        assert s.run(run_id)["status"] == "partial" and s.measurements(run_id) == before
