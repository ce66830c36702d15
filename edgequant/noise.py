"""Speed figures that say when they cannot be trusted.

* ``measure_until_quiet``: measure a rung, and while the other load on the
  machine during its measurement (``edgequant.devices.contention``) is above the
  profile's ``contention_threshold``, wait for quiet and measure it again, up to
  ``contention_retries`` times; a rung still contended is ``noisy``.
* ``noise_floor``: the A/A noise floor of a place: one rung measured several
  times in a row; the spread of the measurements' medians is stored per place
  and metric and ``edgequant compare`` uses it as the practical threshold.
* ``recheck``: a flagged speed change measured again, baseline and candidate
  artifacts alternately (A, B, A, B ...) on the same place, which cancels drift
  such as heat; the verdict comes from the pooled samples of both sides.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from edgequant.devices.contention import Contention, host_top, wait_for_quiet
from edgequant.bench.host import measure_gguf
from edgequant.core.errors import BadInput, RunFailed
from edgequant.devices.host import host_device_id
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
# the A/A noise floor of a place


def floor_pct(medians: list[float]) -> float:
    """The run-to-run spread of repeated measurements: (largest - smallest median) / their median, in %."""
    mid = statistics.median(medians)
    return 100.0 * (max(medians) - min(medians)) / mid if mid else 0.0


@dataclass
class NoiseFloor:
    quant: str
    device_id: str
    params: dict[str, Any]
    floors: dict[str, tuple[float, list[float]]]     # metric -> (floor %, medians of each measurement)
    contention: list[float]                          # other cores of each kept measurement


def measure_noise_floor(art, settings: BenchSettings, repeat: int, measure: Callable[..., Any] | None = None,
                        on_phase: Callable[[str], None] | None = None, repack: bool | None = None) -> NoiseFloor:
    """Measure ``art`` (an Artifact) ``repeat`` times on this host, each quiet (see ``measure_until_quiet``)."""
    if repeat < 2:
        raise BadInput(f"--repeat {repeat}: a noise floor needs at least 2 measurements of the rung (5 is a "
                       f"good start)")
    measure = measure or measure_gguf
    kept, contention = [], []
    for i in range(repeat):
        def phase(p: str, i=i) -> None:
            if on_phase is not None:
                on_phase(f"{i + 1}/{repeat} {p}")

        q = measure_until_quiet(measure, art.path, settings, on_phase=phase, repack=repack, on_progress=phase)
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
    params = {"runner": "host", **settings.as_params()}
    if repack is not None:
        params["repack"] = bool(repack)
    return NoiseFloor(art.quant, host_device_id(), params, floors, contention)


# ---------------------------------------------------------------------------
# re-checking a flagged speed change: A, B, A, B ... on one place


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
    return replace(contention, **given, repack="on" if params.get("repack", True) else "off")


def flagged_pairs(cmp) -> list:
    """The bench pairs of a comparison worth re-checking: a speed regression, or a side stored noisy."""
    failed = {(r.model_id, r.quant, r.device_id) for r in cmp.results
              if r.gate.startswith("speed:") and r.status == "fail"}
    return [p for p in cmp.pairs if p.stage == "bench" and ((p.model_id, p.quant, p.device_id) in failed or p.noisy)]


def recheck(store, cmp, rounds: int, contention: BenchSettings,
            measure_baseline: Callable[..., Any] | None = None, measure_candidate: Callable[..., Any] | None = None,
            on_phase: Callable[[str, str], None] | None = None, pairs: list | None = None) -> list[Recheck]:
    """Measure each flagged pair's baseline and candidate artifacts alternately, ``rounds`` times each, on this
    host, and judge every speed gate metric on the pooled samples (``edgequant.results.compare.judge_speed``).

    BadInput (before anything is measured) for fewer than 2 rounds or an artifact no longer on disk."""
    if rounds < 2:
        raise BadInput(f"--rounds {rounds}: a re-check alternates baseline and candidate at least twice "
                       f"(A, B, A, B); pass --rounds 2 or more")
    pairs = flagged_pairs(cmp) if pairs is None else pairs
    here = host_device_id()
    out: list[Recheck] = []
    todo = []
    for p in pairs:
        if p.device_id != here:
            out += [Recheck(p.quant, p.device_id, m, "skip", f"measured on {p.device_id}; the re-check measures "
                                                             f"on this host ({here}) only") for m in cmp.gates.speed_metrics]
            continue
        paths = []
        for side, sha, run in zip(("baseline", "candidate"), p.artifacts, (cmp.baseline, cmp.candidate)):
            art = store.artifact(sha)
            if art is None or not Path(art["path"]).is_file():
                where = f"no longer at {art['path']}" if art else "not recorded in the store"
                raise BadInput(f"re-check of {p.quant}: the {side}'s artifact ({sha[:12]}, run {run['run_id']}) is "
                               f"{where}; rebuild it with `edgequant quantize` (same model and profile) or "
                               f"compare without --recheck")
            paths.append(Path(art["path"]))
        todo.append((p, paths))
    measures = (measure_baseline or measure_gguf, measure_candidate or measure_gguf)
    floors = store.noise_floors()
    for p, paths in todo:
        settings = _settings_from(p.params, contention)
        samples: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in SPEED_METRICS}
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
                                        repack=settings.resolved_repack())
                if q.noisy:
                    noisy.append(f"round {i + 1} {label} ({q.contention.other_cores:.2f} other cores)")
                for m, attr in (("pp_tps", "pp"), ("tg_tps", "tg")):
                    samples[m][side].extend(getattr(q.result, attr).samples)
                medians.append({m: getattr(q.result, a).median for m, a in (("pp_tps", "pp"), ("tg_tps", "tg"))})
            for m in SPEED_METRICS:
                rounds_by_metric[m].append((medians[0][m], medians[1][m]))
        for m in cmp.gates.speed_metrics:
            if m not in samples:
                continue
            ratios = ", ".join(f"{100.0 * (c - b) / b:+.1f} %" if b else "—" for b, c in rounds_by_metric[m])
            if noisy:
                out.append(Recheck(p.quant, p.device_id, m, "skip", f"re-check noisy: {'; '.join(noisy)}; not "
                                                                    f"judged", rounds_by_metric[m]))
                continue
            floor = floors.get((p.device_id, m))
            threshold, source = ((floor["floor_pct"], f"A/A noise floor of {p.device_id}") if floor
                                 else (cmp.gates.max_drop_pct, "gates"))
            base, cand = samples[m]
            v = judge_speed(m, "t/s", base, cand, threshold, source, cmp.gates.speed_alpha)
            out.append(Recheck(p.quant, p.device_id, m, v.status,
                               f"re-check, {rounds} alternated rounds (candidate vs baseline per round: {ratios}): "
                               f"{v.message}", rounds_by_metric[m]))
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
