"""Speed figures that say when they cannot be trusted.

* ``measure_until_quiet``: measure a rung, and while the other load on the
  machine during its measurement (``edgequant.devices.contention``) is above the
  profile's ``contention_threshold``, wait for quiet and measure it again, up to
  ``contention_retries`` times; a rung still contended is ``noisy``.
* ``noise_floor``: the A/A noise floor of a place: one rung measured several
  times in a row, each time in a fresh process; from the spread of the
  measurements' medians, the drop two runs of the same artifact can show by
  chance (``floor_pct``) is stored per place, rung and metric, and ``edgequant
  compare`` needs a drop beyond it before it calls one run against another a
  regression.
* ``recheck``: a flagged speed change measured again, baseline and candidate
  artifacts alternately (A, B, A, B ...) on the same place, which cancels drift
  such as heat; the verdict comes from the per-round medians of both sides (each
  round a fresh load, so the test sees the run-to-run spread, not only the
  repetitions within one run).

A *place* is this host or a phone, a ``pipeline.registry.Place`` opened through the
registry by ``Places`` (a phone like ``edgequant run --device`` opens it: lease,
facts, runner); both measure a GGUF the way a run measures a rung there.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from edgequant.devices.contention import Contention, host_top, wait_for_quiet
from edgequant.core.errors import BadInput, RunFailed
from edgequant.devices.host import host_device_id
from edgequant.pipeline.registry import place_class
from edgequant.profiles import BenchSettings
from edgequant.results.compare import judge_speed
from edgequant.results.store import Measurement

NOISY = "noisy"
SPEED_METRICS = ("pp_tps", "tg_tps")


@dataclass
class QuietResult:
    """The attempt kept (the least contended one) and every attempt's other load."""

    result: Any                      # HostBenchResult
    attempts: list[float]            # other cores of each attempt, in order
    threshold: float
    waited: list[float] = field(default_factory=list)   # other cores at the end of each wait for quiet
    top_other: list[dict] = field(default_factory=list)  # the busiest other processes, read when it stayed noisy

    @property
    def contention(self) -> Contention | None:
        return getattr(self.result, "contention", None)   # runtimes that do not measure it: None

    @property
    def noisy(self) -> bool:
        c = self.contention
        return c is not None and c.other_cores > self.threshold

    def detail(self) -> str:
        c = self.contention
        assert c is not None
        busiest = ", ".join(f"{p['name']} {p['cores']:.2f}" for p in self.top_other[:3])
        return (f"noisy: {c.other_cores:.2f} other cores busy while it was measured (threshold "
                f"{self.threshold:g}) in each of {len(self.attempts)} attempt(s); its speed figures are likely "
                f"low; re-run it on a quiet machine" + (f" (busiest then: {busiest})" if busiest else ""))

    def measurement(self) -> Measurement | None:
        """The ``contention`` row stored beside the figures (other load, in cores)."""
        c = self.contention
        if c is None:
            return None
        return Measurement("contention", c.other_cores, "cores", None, len(self.attempts),
                           {**c.as_dict(), "threshold": self.threshold, "attempts": self.attempts,
                            "waited_other_cores": self.waited, "top_other": self.top_other})


def measure_until_quiet(measure: Callable[..., Any], path: Path | str, settings: BenchSettings,
                        on_phase: Callable[[str], None] | None = None,
                        read_load: Callable[[float], Contention] | None = None,
                        read_top: Callable[[], list[dict]] | None = None, **kwargs) -> QuietResult:
    """``measure(path, settings, **kwargs)`` again while its window was contended (see the module docstring).
    ``read_load(seconds)``: the place's load over an interval while we wait for quiet (default: this host's);
    ``read_top()``: its busiest processes, read once when the rung stays noisy (default: this host's)."""
    threshold = settings.contention_threshold
    res = measure(path, settings, **kwargs)
    out = QuietResult(res, [], threshold)
    if out.contention is not None:
        out.attempts.append(out.contention.other_cores)
    for _ in range(settings.contention_retries):
        if not out.noisy:
            break
        if on_phase is not None:
            on_phase(f"contended ({out.contention.other_cores:.2f} cores): waiting for quiet")
        load = (wait_for_quiet(threshold, settings.contention_wait, read=read_load) if read_load is not None
                else wait_for_quiet(threshold, settings.contention_wait))
        if load is not None:
            out.waited.append(load.other_cores)
        again = measure(path, settings, **kwargs)
        c = getattr(again, "contention", None)
        if c is None:
            break
        out.attempts.append(c.other_cores)
        if c.other_cores < out.contention.other_cores:
            out.result = again
    if out.noisy:
        try:
            out.top_other = (read_top or host_top)()
        except (OSError, RunFailed):       # who it was is a hint; the measurement stands without it
            out.top_other = []
    return out


def sample_detail(summary) -> dict[str, Any]:
    """The stability of one figure: raw samples, coefficient of variation, min, max, median."""
    return {"samples": list(summary.samples), "cv": summary.cv, "min": summary.min, "max": summary.max,
            "median": summary.median}


# ---------------------------------------------------------------------------
# places: this host, or a phone


class _Steps:
    """The reporter a phone's opening talks to (``farm.open_phones``): its steps only."""

    def __init__(self, say: Callable[[str], None]):
        self.step = say


UNREACHABLE = frozenset({"offline", "timeout", "refused"})


class Places:
    """The places a command measures on, by device id: this host, and phones (``adb:SERIAL``) reached as
    ``edgequant run --device SERIAL`` reaches them: the lease taken (``farm``), the facts read, the runner
    installed in ``workdir``.  Each is opened on first use and all are closed (leases released) together.

    A phone that cannot be reached, or a device id that is neither, is ``BadInput`` naming it."""

    def __init__(self, cache_root: Path, workdir: str | None = None, runner_dir: str | None = None,
                 say: Callable[[str], None] = lambda m: None, cooldown=None, lease_wait: float | None = None,
                 folder: str = "measure"):
        self.cache_root, self.workdir, self.runner_dir = cache_root, workdir, runner_dir
        self.say, self.cooldown, self.lease_wait, self.folder = say, cooldown, lease_wait, folder
        self._phones: dict[str, Any] = {}      # device id -> farm.Phone
        self._places: dict[str, Any] = {}

    @property
    def host_id(self) -> str:
        return host_device_id()

    def reachable(self, device_id: str) -> bool:
        """Whether ``device_id`` is a place this host can measure on (itself, or a phone)."""
        return device_id == self.host_id or device_id.startswith("adb:")

    def get(self, device_id: str, why: str) -> Any:
        """The opened place of ``device_id``; ``why`` names it in errors (e.g. ``--device X``)."""
        if device_id in self._places:
            return self._places[device_id]
        if device_id == self.host_id:
            place = self._places[device_id] = place_class("host")()
            return place
        if not device_id.startswith("adb:"):
            raise BadInput(f"{why}: {device_id} is neither this host ({self.host_id}) nor a phone; measure it "
                           f"on the host that ran it")
        place = self._places[device_id] = self._open_phone(device_id[4:], why)
        return place

    def _open_phone(self, serial: str, why: str):
        from edgequant import farm
        from edgequant.devices import select
        from edgequant.devices.transport import DeviceError

        targets = [t for t in select.resolve([serial]) if isinstance(t, select.Target)]
        if len(targets) != 1:
            raise BadInput(f"{why}: {serial} names {len(targets)} phones; name one phone")
        workdir = select.device_dir(self.workdir)
        try:
            opened = farm.open_phones(targets, workdir, self.runner_dir, self.cache_root, _Steps(self.say),
                                      self.lease_wait if self.lease_wait is not None else farm.LEASE_WAIT_S,
                                      retry_delays=())
        except DeviceError as exc:
            if exc.kind not in UNREACHABLE:
                raise
            raise BadInput(f"{why}: phone {serial} cannot be reached ({exc}); connect it (`edgequant devices` "
                           f"lists the reachable ones) and run again") from None
        phone = opened[0]
        self._phones[serial] = phone
        return place_class("device")(phone.ctx, phone.lease, self.cooldown, self.folder)

    def close(self) -> None:
        from edgequant import farm

        farm.close_phones(list(self._phones.values()))
        self._phones.clear()
        self._places.clear()

    def __enter__(self) -> "Places":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def place_id(spec: str | None) -> str:
    """The device id ``--device SPEC`` names for a one-place command: this host's for none or ``host``,
    ``adb:SERIAL`` for one phone (SERIAL, HOST:PORT, tcp:HOST:PORT, server:SERIAL); BadInput otherwise."""
    from edgequant.devices import select

    here = host_device_id()
    if spec is None or spec.strip() in ("host", here):
        return here
    if spec.strip().startswith("pool:") or spec.strip() == "all":
        raise BadInput(f"--device {spec}: a noise floor is measured on one place; name one phone (SERIAL, "
                       f"HOST:PORT, server:SERIAL) or host")
    targets = select.resolve([spec])
    phones = [t for t in targets if isinstance(t, select.Target)]
    if len(phones) != 1 or len(targets) != 1:
        raise BadInput(f"--device {spec}: name one phone (SERIAL, HOST:PORT, server:SERIAL) or host")
    return f"adb:{phones[0].serial}"


# ---------------------------------------------------------------------------
# the A/A noise floor of a place


# one-sided chance that two runs of the same artifact differ by more than the floor, were their medians
# normally distributed with the spread the A/A measurements show: 1 in 1000 per rung and metric
FLOOR_FALSE_ALARM = 0.001


def floor_pct(medians: list[float]) -> float:
    """The drop between two single runs of the same artifact that run-to-run noise alone explains, in % of
    the median: the larger of the measurements' range ((largest - smallest) / median) and
    z * sqrt(2) * their relative standard deviation, z the normal quantile of ``FLOOR_FALSE_ALARM``
    (the difference of two runs' medians spreads sqrt(2) times as wide as one run's median)."""
    mid = statistics.median(medians)
    if not mid:
        return 0.0
    spread = 100.0 * (max(medians) - min(medians)) / mid
    if len(medians) < 2:
        return spread
    z = statistics.NormalDist().inv_cdf(1.0 - FLOOR_FALSE_ALARM)
    return max(spread, z * math.sqrt(2.0) * 100.0 * statistics.stdev(medians) / mid)


@dataclass
class NoiseFloor:
    quant: str
    device_id: str
    params: dict[str, Any]
    floors: dict[str, tuple[float, list[float]]]     # metric -> (floor %, medians of each measurement)
    contention: list[float]                          # other cores of each kept measurement


def measure_noise_floor(art, settings: BenchSettings, repeat: int, measure: Callable[..., Any] | None = None,
                        on_phase: Callable[[str], None] | None = None, repack: bool | None = None,
                        place=None) -> NoiseFloor:
    """Measure ``art`` (an Artifact) ``repeat`` times on ``place`` (default: this host), each quiet (see
    ``measure_until_quiet``: on a phone its own load is read and waited for); the floor is keyed by the
    place's device id, as its runs' rows are."""
    if repeat < 2:
        raise BadInput(f"--repeat {repeat}: a noise floor needs at least 2 measurements of the rung (5 is a "
                       f"good start)")
    place = place or place_class("host")()
    measure = measure or place.measure
    handle = place.prepare(art.path, art.sha256, art.quant, on_progress=on_phase)
    kept, contention = [], []
    for i in range(repeat):
        def phase(p: str, i=i) -> None:
            if on_phase is not None:
                on_phase(f"{i + 1}/{repeat} {p}")

        q = measure_until_quiet(measure, handle, settings, on_phase=phase, read_load=place.read_load,
                                read_top=place.read_top, on_progress=phase,
                                repack=place.repack(settings) if repack is None else repack)
        if q.noisy:
            raise RunFailed(f"measurement {i + 1} of {repeat} of {art.quant} ran while {q.contention.other_cores:.2f} "
                            f"other cores were busy (threshold {settings.contention_threshold:g}), even after "
                            f"{len(q.attempts)} attempt(s); no floor was stored: run `edgequant noise` again when "
                            f"the machine is quiet")
        kept.append(q.result)
        if q.contention is not None:
            contention.append(q.contention.other_cores)
    floors = {}
    for metric, attr in (("pp_tps", "pp"), ("tg_tps", "tg")):
        medians = [getattr(r, attr).median for r in kept]
        floors[metric] = (floor_pct(medians), medians)
    params = place.params(settings)
    if repack is not None:
        params["repack"] = bool(repack)
    return NoiseFloor(art.quant, place.device_id, params, floors, contention)


# ---------------------------------------------------------------------------
# re-checking a flagged speed change: A, B, A, B ... on one place


# a rank test on the rounds' medians needs 3 against 3 to reach p <= 0.05 (1 / C(6, 3) = 0.05)
MIN_ROUNDS = 3


def rounds_too_few(rounds: int) -> str:
    return (f"--rounds {rounds}: a re-check judges the medians of alternated rounds (A, B, A, B, A, B) with a rank "
            f"test, which needs at least {MIN_ROUNDS} rounds to reach p ≤ 0.05; pass --rounds {MIN_ROUNDS} or more")


@dataclass
class Recheck:
    quant: str
    device_id: str
    metric: str
    status: str          # fail (confirmed) | pass (not confirmed) | skip (too few samples, noisy, not here)
    message: str
    rounds: list[tuple[float, float]] = field(default_factory=list)   # (baseline, candidate) median per round


def _settings_from(params: dict[str, Any], contention: BenchSettings) -> BenchSettings:
    """The bench settings a stored pair was measured with; the contention rules of ``contention``."""
    names = ("threads", "n_prompt", "n_gen", "repetitions", "warmup", "n_batch", "n_ubatch", "flash_attn", "mmap")
    given = {k: params[k] for k in names if k in params}
    stored = params.get("repack", True)          # a bool; "default" on a phone: llama.cpp's own choice
    repack = "auto" if stored == "default" else ("on" if stored else "off")
    return replace(contention, **given, repack=repack)


def flagged_pairs(cmp) -> list:
    """The bench pairs of a comparison worth re-checking: a speed regression, a speed drop within the noise
    floor (inconclusive), or a side stored noisy."""
    failed = {(r.model_id, r.quant, r.device_id) for r in cmp.results
              if r.gate.startswith("speed:") and r.status in ("fail", "inconclusive")}
    return [p for p in cmp.pairs if p.stage == "bench" and ((p.model_id, p.quant, p.device_id) in failed or p.noisy)]


def recheck(store, cmp, rounds: int, contention: BenchSettings,
            measure_baseline: Callable[..., Any] | None = None, measure_candidate: Callable[..., Any] | None = None,
            on_phase: Callable[[str, str], None] | None = None, pairs: list | None = None,
            places: Places | None = None) -> list[Recheck]:
    """Measure each flagged pair's baseline and candidate artifacts alternately, ``rounds`` times each, on the
    place the runs measured it on (this host, or a phone through ``places``), and judge every speed gate
    metric on the pooled samples (``edgequant.results.compare.judge_speed``).  ``places``: where to measure
    (default: this host only; a pair measured elsewhere is skipped, saying so).

    BadInput (before anything is measured) for fewer than 2 rounds, an artifact no longer on disk or a phone
    that cannot be reached."""
    if rounds < MIN_ROUNDS:
        raise BadInput(rounds_too_few(rounds))
    pairs = flagged_pairs(cmp) if pairs is None else pairs
    own = places is None
    places = places or Places(Path("."))
    here = places.host_id
    out: list[Recheck] = []
    todo = []
    for p in pairs:
        reach = places.reachable(p.device_id) and (not own or p.device_id == here)
        onnx = "tool" in p.params or "execution_provider" in p.params
        if not reach or onnx:
            why = ("the re-check measures GGUF rungs (llama.cpp) only" if reach
                   else f"the re-check measures on this host ({here})" + (" only" if own else
                                                                        " and on phones reachable from it"))
            out += [Recheck(p.quant, p.device_id, m, "skip", f"measured on {p.device_id}; {why}")
                    for m in cmp.gates.speed_metrics]
            continue
        paths = []
        for side, sha, run in zip(("baseline", "candidate"), p.artifacts, (cmp.baseline, cmp.candidate)):
            art = store.artifact(sha)
            if art is None or not Path(art["path"]).is_file():
                where = f"no longer at {art['path']}" if art else "not recorded in the store"
                raise BadInput(f"re-check of {p.quant}: the {side}'s artifact ({sha[:12]}, run {run['run_id']}) is "
                               f"{where}; rebuild it with `edgequant quantize` (same model and profile) or "
                               f"compare without --recheck")
            paths.append((Path(art["path"]), sha))
        todo.append((p, paths))
    try:
        return out + _measure_alternately(store, cmp, rounds, contention, todo, places, measure_baseline,
                                          measure_candidate, on_phase)
    finally:
        if own:
            places.close()


def _measure_alternately(store, cmp, rounds, contention, todo, places, measure_baseline, measure_candidate,
                         on_phase) -> list[Recheck]:

    for p, _ in todo:       # every place first: a phone that cannot be reached stops nothing half-measured
        places.get(p.device_id, f"re-check of {p.quant}")
    out: list[Recheck] = []
    for p, local in todo:
        place = places.get(p.device_id, f"re-check of {p.quant}")
        measures = (measure_baseline or place.measure, measure_candidate or place.measure)
        paths = [place.prepare(path, sha, p.quant, on_progress=lambda t, q=p.quant: on_phase and on_phase(q, t))
                 for path, sha in local]
        settings = _settings_from(p.params, contention)
        rounds_by_metric: dict[str, list[tuple[float, float]]] = {m: [] for m in SPEED_METRICS}
        noisy = []
        for i in range(rounds):
            medians = []
            for side, path, measure in zip((0, 1), paths, measures):
                label = ("A", "B")[side]

                def phase(text: str, label=label, i=i) -> None:
                    if on_phase is not None:
                        on_phase(p.quant, f"round {i + 1}/{rounds} {label}: {text}")

                q = measure_until_quiet(measure, path, settings, on_phase=phase, on_progress=phase,
                                        repack=place.repack(settings), read_load=place.read_load,
                                        read_top=place.read_top)
                if q.noisy:
                    noisy.append(f"round {i + 1} {label} ({q.contention.other_cores:.2f} other cores)")
                medians.append({m: getattr(q.result, a).median for m, a in (("pp_tps", "pp"), ("tg_tps", "tg"))})
            for m in SPEED_METRICS:
                rounds_by_metric[m].append((medians[0][m], medians[1][m]))
        for m in cmp.gates.speed_metrics:
            if m not in rounds_by_metric:
                continue
            ratios = ", ".join(f"{100.0 * (c - b) / b:+.1f} %" if b else "—" for b, c in rounds_by_metric[m])
            if noisy:
                out.append(Recheck(p.quant, p.device_id, m, "skip", f"re-check noisy: {'; '.join(noisy)}; not "
                                                                    f"judged", rounds_by_metric[m]))
                continue
            # each round is a fresh load of each side, so the rounds' medians carry the run-to-run spread into
            # the test; alternating cancels the slow drift a noise floor allows for: the gates' percentage judges
            base = [b for b, _ in rounds_by_metric[m]]
            cand = [c for _, c in rounds_by_metric[m]]
            v = judge_speed(m, "t/s", base, cand, cmp.gates.max_drop_pct, "gates", cmp.gates.speed_alpha)
            out.append(Recheck(p.quant, p.device_id, m, v.status,
                               f"re-check, {rounds} alternated rounds (candidate vs baseline per round: {ratios}), "
                               f"judged on the rounds' medians: {v.message}", rounds_by_metric[m]))
    return out


def apply_recheck(cmp, rechecks: list[Recheck]) -> None:
    """Let the re-check's paired verdicts decide the speed gates they re-measured."""
    by_gate = {(r.quant, r.device_id, f"speed:{r.metric}"): r for r in rechecks}
    for g in cmp.results:
        r = by_gate.get((g.quant, g.device_id, g.gate))
        if r is None:
            continue
        if r.status in ("pass", "fail"):
            g.status = r.status
        g.message = f"{g.message} · {'CONFIRMED by the ' if r.status == 'fail' else ''}{r.message}"
