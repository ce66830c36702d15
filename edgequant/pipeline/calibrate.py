"""Calibration glue: the suite's importance matrix for a ladder, and the split recorded in the store.

``quantize.imatrix`` holds the split, the calibration text, the file cache and
the hand-over to llama.cpp; this module wires it to the reference's outputs
(``bench.quality``) and to the ``llama-imatrix`` build (``bench.llamacpp_tools``),
which the quantize stage must not import itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgequant.bench.llamacpp_tools import build_llama_tool, locked
from edgequant.profiles import Profile
from edgequant.profiles.suite_records import Suite
from edgequant.quantize.imatrix import (ImatrixFile, Split, cache_folder, cache_key, calibration_text,
                                        compute_imatrix, open_cached, split_suite, subset_suite)
from edgequant.quantize.ladder import Artifact, ImatrixProvider

IMATRIX_TOOL = "llama-imatrix"


@dataclass
class Calibration:
    """A suite split into the cases an imatrix learns from and the cases that judge the result."""

    suite: Suite
    split: Split
    prompting: str = "auto"

    @classmethod
    def of(cls, suite: Suite, prompting: str = "auto") -> "Calibration":
        return cls(suite, split_suite(suite), prompting)

    @property
    def calibration_suite(self) -> Suite:
        return subset_suite(self.suite, self.split, "calibration")

    @property
    def evaluation_suite(self) -> Suite:
        return subset_suite(self.suite, self.split, "evaluation")

    def params(self) -> dict:
        """What quality rows measured on the evaluation half carry in their params."""
        return {"split": self.split.sha256, "split_side": "evaluation", "suite_full_sha256": self.suite.sha256,
                "n_calibration": len(self.split.calibration)}


class SuiteImatrix(ImatrixProvider):
    """Computes (once, cached) the importance matrix of a reference artifact on a calibration split."""

    def __init__(self, calibration: Calibration, profile: Profile, model_hash: str, cache_root: Path,
                 say: Callable[[str], None] = lambda _m: None, jobs: int = 2):
        self.cal = calibration
        self.profile = profile
        self.model_hash = model_hash
        self.cache_root = cache_root
        self.say = say
        self.jobs = jobs
        self.identity = f"{calibration.suite.sha256}|{calibration.split.sha256}|{calibration.prompting}"
        self.last: ImatrixFile | None = None

    def get(self, reference: Artifact, report=None) -> ImatrixFile:
        from edgequant.bench.quality import reference_outputs

        cal = self.cal
        key = cache_key(reference.sha256, cal.suite.sha256, cal.split.sha256, cal.prompting)
        folder = cache_folder(self.cache_root, key)
        with locked(folder.parent, key):
            cached = open_cached(folder)
            if cached is not None:
                self.last = cached
                return cached
            settings = self.profile.bench
            threads, repack = settings.resolved_threads(), settings.resolved_repack()
            calib = cal.calibration_suite
            self.say(f"reference outputs on {len(calib.cases)} calibration cases of {cal.suite.name}")
            ref = reference_outputs(reference.path, reference.sha256, reference.quant, calib, self.cache_root,
                                    threads, repack, cal.prompting, settings.timeout, lambda _p: None)
            outputs = {cid: c.output.decode("utf-8", "replace") for cid, c in ref.cases.items()}
            text = calibration_text(calib, outputs, ref.prompting)
            tool = build_llama_tool(IMATRIX_TOOL, jobs=self.jobs, on_progress=self.say)
            meta = {"suite": cal.suite.name, "suite_sha256": cal.suite.sha256, "split": cal.split.record(),
                    "prompting": ref.prompting, "reference_quant": reference.quant,
                    "reference_path": str(reference.path), "tool": IMATRIX_TOOL}
            self.last = compute_imatrix(tool, reference.path, reference.sha256, self.model_hash, text, folder,
                                        meta, threads, repack, self.say, settings.timeout)
            return self.last


def record_split(store, cal: Calibration) -> None:
    """Keep the split in the results store (table calibration_splits)."""
    store.record_split(cal.suite.name, cal.split.record())


# ---------------------------------------------------------------------------
# edgequant tune: on the host, or with its speed measured on a phone


def tune(store, run_id: str, resolved, profile: Profile, suite: Suite, prompting: str, gates: list,
         cache_root: Path, reporter, min_tg: float | None = None, max_size: int | None = None,
         types: tuple[str, ...] | None = None, variants: tuple[str, ...] | None = None, phone=None):
    """Search the candidates, measuring each on the suite's evaluation half; store every figure.

    ``phone``: an opened ``farm.Phone`` (lease held, runner installed).  Speed and memory are then measured
    on it by the on-device llama-bench, exactly as ``edgequant run --device`` measures a rung
    (``device_run.bench_rungs_on_device``), and ``min_tg`` applies to its figures; quality is still
    computed on the host from the same GGUF bytes.  ``None``: everything on this host.  A phone that
    stops answering raises ``device_run.DeviceLost`` (what was measured stays stored).

    Returns ``(TuneResult, reference_failures)``; the second lists the gates the reference itself fails.
    """
    from dataclasses import replace
    from importlib import metadata

    from edgequant.bench import tune as tuning
    from edgequant.devices.host import host_device, host_device_id
    from edgequant.devices.transport import DeviceError
    from edgequant.pipeline import device_run
    from edgequant.pipeline import prepare
    from edgequant.pipeline.executor import RunInputs, run_cells
    from edgequant.pipeline.plan import Cell, PlaceSpec
    from edgequant.pipeline.registry import place_class
    from edgequant.pipeline.scope import RunScope
    from edgequant.quantize.ladder import Ladder
    from edgequant.results.store import Measurement

    cal = Calibration.of(suite, prompting)
    record_split(store, cal)
    eval_suite = cal.evaluation_suite
    extra = {**cal.params(), "stage_of": "tune"}
    provider = SuiteImatrix(cal, profile, resolved.model_hash, cache_root, reporter.step)
    model_id, model_hash = resolved.checkpoint.model_id, resolved.model_hash
    only_ref = replace(profile, quant=replace(profile.quant, types=()))
    ref_art = prepare.build_ladder(resolved, only_ref, cache_root, reporter)[0]
    store.record_artifact(ref_art.record())
    built: dict[str, Artifact] = {}
    # every candidate is asked for as cells (its speed where it ships, its quality on the host), run by the
    # run's executor through the llama.cpp runtime; the reference and each candidate join the inputs when built
    scope = RunScope(store, run_id, model_id, model_hash, reporter)
    inputs = RunInputs(profile, [ref_art], cache_root, eval_suite, prompting, extra)
    host = place_class("host")()

    if phone is None:
        device, device_id, runner = host_device(), host_device_id(), "host"
        place, where_spec = host, PlaceSpec.host()
    else:
        device, device_id, runner = phone.ctx.device_record(), phone.ctx.device_id, "device"
        place, where_spec = place_class("device")(phone.ctx), PlaceSpec.phone(phone.serial)

    def cell(art: Artifact, stage: str, spec: PlaceSpec) -> Cell:
        return Cell(art.quant, "gguf", "llama.cpp", spec, stage)

    def bench(art: Artifact) -> list:
        if phone is not None:
            try:
                phone.lease.renew()     # held across the whole search, which can outlast a stale lease
            except DeviceError as exc:
                raise device_run.DeviceLost(phone.serial, "renewing its lease", exc) from None
        return [o for o in run_cells(scope, inputs, [cell(art, "bench", where_spec)], place)
                if o.status not in ("ok", "noisy")]

    def values(quant: str) -> tuple[dict[str, float], float | None, float | None]:
        metrics = {r["metric"]: r["value"] for r in store.measurements(run_id, stage="quality") if r["quant"] == quant}
        speed = {r["metric"]: r["value"] for r in store.measurements(run_id, stage=("bench", "sustained"),
                                                                     device_id=device_id) if r["quant"] == quant}
        return metrics, speed.get("tg_tps"), speed.get("pp_tps")

    # a resumed search (``edgequant tune --resume``) measures again only what the run does not hold yet
    benched = {s["quant"]: s for s in store.rung_statuses(run_id) if s["device_id"] == device_id}
    evaluated = {q for q, _ in store.measured(run_id, "quality")}

    def measure_art(art: Artifact) -> str | None:
        """Speed where it ships, quality on the host; why speed was not measured, or None."""
        failure = None
        if art.quant in benched:
            if values(art.quant)[1] is None:
                s = benched[art.quant]
                failure = (s["status"], s["detail"])
        else:
            reporter.start_bench(1, "tune" if phone is None else f"tune on {phone.serial}")
            failed = bench(art)
            failure = (failed[0].status, failed[0].detail) if failed else None
        if art.quant not in evaluated:
            reporter.start_bench(1, f"eval {eval_suite.name} (evaluation half)")
            run_cells(scope, inputs, [cell(art, "quality", PlaceSpec.host())], host)
        if failure is None:
            return None
        status, detail = failure
        return f"speed not measured on {device_id}: {status}" + (f" ({detail})" if detail else "")

    where = "on this host" if phone is None else f"on {phone.serial}"
    reporter.step(f"measuring the reference {ref_art.quant} (speed {where}) on {len(eval_suite.cases)} evaluation "
                  f"cases ({len(cal.split.calibration)} calibrate the imatrix)")
    measure_art(ref_art)
    ref_metrics, _, _ = values(ref_art.quant)
    ref_failures = [f"{g} ({ref_metrics[g.metric]:.3f})" for g in gates if not g.relative
                    and g.metric in ref_metrics and tuning.gate_margin(g, ref_metrics[g.metric]) < 0]

    def paired(quant: str) -> dict[str, list[int]]:
        """Per metric, the rung's paired table against the reference (for relative gates)."""
        return {r["metric"]: r["detail"]["paired"] for r in store.measurements(run_id, stage="quality")
                if r["quant"] == quant
                and isinstance(r.get("detail"), dict) and "paired" in r["detail"]}

    def build(spec):
        ladder = Ladder(resolved.checkpoint, model_hash, profile, cache_root, imatrix=provider, types=[spec.name])
        art = ladder.build(reporter.bytes_progress)[1]
        built[spec.name] = art
        inputs.artifacts.append(art)
        return art

    def measure(spec, art):
        store.record_artifact(art.record())
        speed_failure = measure_art(art)
        metrics, tg, pp = values(art.quant)
        return tuning.Measured(art.size_bytes, metrics, tg, pp, speed_failure, paired(art.quant))

    levels = tuning.candidates(types or tuning.DEFAULT_TYPES, variants or tuning.DEFAULT_VARIANTS)
    result = tuning.search(levels, gates, build, measure, min_tg, max_size, reporter.step)

    runtime_version = metadata.version("llama-cpp-python")
    params = {"runner": runner, "stage": "tune", "gates": [str(g) for g in gates], "min_tg": min_tg,
              "max_size": max_size, **cal.params()}
    for t in result.tried:
        art = built.get(t.name)
        key = scope.key(art, quant=t.name, is_reference=False, device_id=device_id, device=device,
                        runtime="llama.cpp", runtime_version=runtime_version, params=params)
        chosen = result.best is not None and t.name == result.best.name
        rows = [Measurement("tune_pass", 1.0 if t.verdict == "pass" else 0.0, "bool", None, None,
                            {"verdict": t.verdict, "reasons": t.reasons, "chosen": chosen})]
        if t.measured is None and art is not None:
            rows += [Measurement("size", art.size_bytes, "bytes"), Measurement("bpw", art.bits_per_weight,
                                                                              "bits/weight")]
        status = {"pass": "ok", "fail": "rejected", "skipped": "skipped"}[t.verdict]
        scope.record(key, rows, status=status, detail="; ".join(t.reasons) or None)
    return result, ref_failures


def for_profile(profile: Profile, suite: Suite | None, suite_name: str, prompting: str, model_hash: str,
                cache_root: Path, store, say: Callable[[str], None]):
    """For a profile with ``+imatrix`` rungs: the provider, the suite to judge with (its evaluation half)
    and the params quality rows carry.  Profiles without them get ``(None, suite, {})``."""
    if not profile.needs_imatrix:
        return None, suite, {}
    from edgequant.profiles.suites import load_suite

    cal = Calibration.of(suite if suite is not None else load_suite(suite_name), prompting)
    if store is not None:
        record_split(store, cal)
    judge = cal.evaluation_suite if suite is not None else None
    return SuiteImatrix(cal, profile, model_hash, cache_root, say), judge, cal.params()
