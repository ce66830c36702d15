"""The ONNX rungs' stages of ``edgequant run``: build the profile's ``[onnx]`` variants, measure them on the
host with onnxruntime, run the eval suite on them.  Rows use ``runtime = "onnxruntime"`` and the same
metric names and units as the GGUF rungs, so both sit in one table against the same bf16 reference.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from edgequant.devices.host import host_device, host_device_id
from edgequant.core.errors import BadInput
from edgequant.pipeline.host import BenchOutcome, RungOutcome, artifact_measurements, quality_measurements
from edgequant.pipeline.prepare import ResolvedModel
from edgequant.pipeline.scope import Reporter, RunScope
from edgequant.profiles import Profile
from edgequant.quantize.ladder import Artifact, ArtifactChanged
from edgequant.results.store import Measurement, RowKey, Store

RUNTIME = "onnxruntime"


def build_onnx(resolved: ResolvedModel, profile: Profile, cache_root: Path, reporter: Reporter) -> list:
    """The profile's ONNX variants (exported and quantized once, cached); [] when it lists none."""
    if not profile.onnx:
        return []
    from edgequant.quantize.onnx_export import OnnxLadder

    ladder = OnnxLadder.for_profile(resolved.checkpoint, resolved.model_hash, profile, cache_root,
                                    notice=reporter.step)
    return ladder.build(reporter.bytes_progress)


def record_onnx_stages(store: Store, run_id: str, artifacts: list, device_id: str | None = None) -> None:
    """The ONNX export and the making of each variant as ``stage_resources`` rows of the run that built or
    reused them (as ``host.record_build_stages`` for the GGUF ladder): the export once, as rung ``ONNX``
    (stage ``onnx-export``; the fp32 variant is that export), then one ``onnx-quantize`` row per variant made
    from it.  Each figure is its worker process's (``OnnxLadder``); a reused one's is from its manifest."""
    from edgequant.estimate import stage_row

    device_id = device_id or host_device_id()
    have = {(r["stage"], r["quant"]) for r in store.stage_resources(run_id)}     # a resumed run has them
    rows = []
    export = next((a.export_build for a in artifacts if getattr(a, "export_build", None)), None)
    if export and ("onnx-export", "ONNX") not in have:
        n_params = next(a.n_params for a in artifacts)
        rows.append(stage_row("onnx-export", "ONNX", device_id, n_params, export.get("seconds"),
                              export.get("peak_rss_bytes"), "ok", export.get("reused", False), export.get("detail")))
    for art in artifacts:
        build = art.build or {}
        if build.get("stage") != "onnx-quantize" or ("onnx-quantize", art.quant) in have:
            continue
        rows.append(stage_row("onnx-quantize", art.quant, device_id, art.n_params, build.get("seconds"),
                              build.get("peak_rss_bytes"), "ok", art.reused, build.get("detail")))
    store.record_stages(run_id, rows)


def cached_onnx(resolved: ResolvedModel, profile: Profile, cache_root: Path, reporter: Reporter) -> list:
    """The profile's ONNX variants if all are already built (as ``host.cached_ladder`` for GGUF);
    BadInput naming the missing ones otherwise."""
    if not profile.onnx:
        return []
    from edgequant.quantize.onnx_export import OnnxLadder, rung_name

    ladder = OnnxLadder.for_profile(resolved.checkpoint, resolved.model_hash, profile, cache_root,
                                    notice=reporter.step)
    missing = ladder.missing()
    if missing:
        names = sorted({rung_name(p.variant.name) for p in missing})
        raise BadInput(f"{len(missing)} ONNX rung(s) of profile {profile.name} are not built yet "
                       f"({', '.join(names)}); run `edgequant quantize` first")
    return ladder.build(reporter.bytes_progress)


def _params(profile: Profile) -> dict:
    s = profile.bench
    return {"runner": "host", "threads": s.resolved_threads(), "n_prompt": s.n_prompt, "n_gen": s.n_gen,
            "repetitions": s.repetitions, "warmup": s.warmup, "execution_provider": "CPUExecutionProvider",
            "inter_op_threads": 1}


def bench_onnx_rungs(scope: RunScope, artifacts: list[Artifact], profile: Profile) -> BenchOutcome:
    """Measure every ONNX rung on the host (one process each, ``bench.onnx_host``), as ``pipeline.bench_rungs``
    measures the GGUF rungs: the same rows, one transaction per rung."""
    from edgequant.bench.onnx_host import measure_onnx
    from edgequant.pipeline.host import bench_rungs

    return bench_rungs(scope, artifacts, profile, measure=measure_onnx, runtime=RUNTIME, params=_params(profile))


def quality_onnx_rungs(scope: RunScope, gguf_artifacts: list[Artifact], onnx_artifacts: list[Artifact],
                       profile: Profile, suite, cache_root: Path, prompting: str = "auto",
                       extra_params: dict | None = None) -> dict[str, str]:
    """The eval suite on every ONNX rung, against the GGUF reference's cached outputs and logits."""
    from edgequant.bench.onnx_eval import evaluate_onnx_rung
    from edgequant.bench.quality import EvalError, reference_outputs

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    settings = profile.bench
    threads = settings.resolved_threads()
    repack = settings.resolved_repack()
    ref_art = next(a for a in gguf_artifacts if a.is_reference)
    ref = reference_outputs(ref_art.path, ref_art.sha256, ref_art.quant, suite, cache_root, threads, repack,
                            prompting, settings.timeout, lambda p: reporter.rung_phase(ref_art.quant, p))
    params = {"runner": "host", "stage": "quality", "suite": suite.name, "suite_sha256": suite.sha256,
              "prompting": ref.prompting, "threads": threads, "decoding": "greedy", "n_cases": len(suite.cases),
              "reference": ref_art.quant, "execution_provider": "CPUExecutionProvider", **(extra_params or {})}
    device, device_id = host_device(), host_device_id()
    statuses: dict[str, str] = {}
    for art in onnx_artifacts:
        key = scope.key(art, is_reference=False, device_id=device_id, device=device, runtime=RUNTIME,
                        runtime_version=metadata.version("onnxruntime"), params=params)
        reporter.rung_started(art.quant)
        try:
            art.verify()           # the files evaluated hold the bytes whose sha256 the rows record
            q = evaluate_onnx_rung(art.path, art.quant, suite, ref, threads, settings.timeout,
                                   lambda p, quant=art.quant: reporter.rung_phase(quant, p))
        except (EvalError, ArtifactChanged) as exc:
            status = getattr(exc, "status", "failed")
            store.record_rung(run_id, key, [], status=status, detail=f"quality: {exc}")
            statuses[art.quant] = status
            reporter.rung_done(art.quant, status)
            continue
        stored = store.record_rung(run_id, key, quality_measurements(q.metrics, q.gates), status=None,
                                   cases=[c.record() for c in q.cases], suite=suite.name)
        statuses[art.quant] = stored or "ok"        # "failed": a figure was not finite (the store says which)
        reporter.rung_done(art.quant, stored or "ok")
    return statuses


def device_key(scope: RunScope, art: Artifact, profile: Profile, device_id: str, device: dict,
               threads: int) -> RowKey:
    """The key of an ONNX rung's rows measured on a device with onnxruntime_perf_test."""
    s = profile.bench
    params = {"runner": "device", "tool": "onnxruntime_perf_test", "threads": threads,
              "n_prompt": s.n_prompt, "n_cached": s.n_prompt, "repetitions": s.repetitions, "warmup": 1,
              "execution_provider": "CPUExecutionProvider", "inter_op_threads": 1}
    return scope.key(art, is_reference=False, device_id=device_id, device=device, runtime=RUNTIME,
                     runtime_version=metadata.version("onnxruntime"), params=params)


def skip_onnx_rungs_on_device(scope: RunScope, artifacts: list[Artifact], profile: Profile, device_id: str,
                              device: dict, reason: str, threads: int) -> BenchOutcome:
    """Store every ONNX rung of one device as ``skipped`` with ``reason`` (e.g. no onnxruntime_perf_test for
    it), so the run says why those rows have no figures instead of leaving them out."""
    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    outcome = BenchOutcome(run_id)
    for art in artifacts:
        store.record_artifact(art.record())
        reporter.rung_started(art.quant)
        key = device_key(scope, art, profile, device_id, device, threads)
        store.record_rung(run_id, key, artifact_measurements(art), status="skipped", detail=reason)
        outcome.outcomes.append(RungOutcome(art, "skipped", reason))
        reporter.rung_done(art.quant, "skipped")
    return outcome


def device_measurements(res) -> list[Measurement]:
    """The performance rows of one ONNX rung measured on a device (a ``bench.onnx_device.OnnxDeviceResult``),
    with the host rows' metric names (pp_tps = prefill, tg_tps = decode, ttft = prefill latency); the rung's
    loop, with the RAM fit, cool-down and health rows, is ``device_run.bench_onnx_rungs_on_device``."""
    return [
        Measurement("load_time", res.load_s, "s", None, 1, {"source": "Session creation time cost"}),
        Measurement("pp_tps", res.pp.mean, "t/s", res.pp.stddev, res.pp.n,
                    {"method": f"prefill: {res.n_prompt} tokens / latency"}),
        Measurement("tg_tps", res.tg.mean, "t/s", res.tg.stddev, res.tg.n,
                    {"method": f"decode: 1 / latency of one token after {res.n_cached} cached"}),
        Measurement("ttft", res.ttft_ms.mean, "ms", res.ttft_ms.stddev, res.ttft_ms.n),
        Measurement("peak_rss", res.peak_rss_bytes, "bytes", None, None,
                    {"source": "time -v Max RSS", "tool_peak_working_set": res.peak_working_set_bytes}),
        Measurement("peak_rss_anon", res.peak_rss_anon_bytes, "bytes"),
        Measurement("peak_rss_file", res.peak_rss_file_bytes, "bytes"),
    ]
