"""The library API behind the CLI: resolve a model, build its ladder, benchmark
every rung on the host, store the rows.  Each stage is a function; ``run``
chains them.  Nothing here prints: progress goes through a ``Reporter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from edgequant.devices.host import host_device, host_device_id
from edgequant.errors import BadInput, RunFailed
from edgequant.profiles import Profile
from edgequant.quantize.checkpoint import (Checkpoint, checkpoint_hash, download_from_hub, looks_like_hub_id,
                                           open_checkpoint)
from edgequant.quantize.ladder import Artifact, Ladder, stat_signature
from edgequant.results.store import Measurement, RowKey, Store


class Reporter(Protocol):
    def step(self, message: str) -> None: ...
    def bytes_progress(self, task: str, done: float, total: float | None) -> None: ...
    def rung_started(self, quant: str) -> None: ...
    def rung_phase(self, quant: str, phase: str) -> None: ...
    def rung_done(self, quant: str, status: str) -> None: ...


class NullReporter:
    def step(self, message: str) -> None:
        pass

    def bytes_progress(self, task: str, done: float, total: float | None) -> None:
        pass

    def rung_started(self, quant: str) -> None:
        pass

    def rung_phase(self, quant: str, phase: str) -> None:
        pass

    def rung_done(self, quant: str, status: str) -> None:
        pass


@dataclass
class ResolvedModel:
    checkpoint: Checkpoint
    model_hash: str


def resolve_model(model: str | None, cache_root: Path, reporter: Reporter) -> ResolvedModel:
    """``None`` is the embedded default; a folder is a local checkpoint; ``org/name`` is a hub id."""
    from edgequant.quantize.default_model import DEFAULT_MODEL_ID, materialize_default

    if model is None:
        path = materialize_default(cache_root, step=reporter.step)
        ckpt = open_checkpoint(path, model_id=DEFAULT_MODEL_ID)
    elif Path(model).exists() or not looks_like_hub_id(model):
        ckpt = open_checkpoint(model)
    else:
        reporter.step(f"downloading {model} from the Hugging Face hub")
        ckpt = open_checkpoint(download_from_hub(model, cache_root), model_id=model)
    reporter.step(f"fingerprinting {ckpt.path}")
    digest = checkpoint_hash(ckpt, cache_root / "checkpoint-hashes.json")
    return ResolvedModel(ckpt, digest)


def build_ladder(resolved: ResolvedModel, profile: Profile, cache_root: Path,
                 reporter: Reporter, imatrix=None) -> list[Artifact]:
    """``imatrix``: an ImatrixProvider (edgequant.calibrate.SuiteImatrix) for ``+imatrix`` rungs."""
    ladder = Ladder(resolved.checkpoint, resolved.model_hash, profile, cache_root, imatrix=imatrix,
                    notice=reporter.step)
    return ladder.build(reporter.bytes_progress)


def cached_ladder(resolved: ResolvedModel, profile: Profile, cache_root: Path,
                  reporter: Reporter, imatrix=None) -> list[Artifact]:
    """The ladder's artifacts if all are already built; BadInput naming the missing ones otherwise."""
    ladder = Ladder(resolved.checkpoint, resolved.model_hash, profile, cache_root, imatrix=imatrix,
                    notice=reporter.step)
    missing = ladder.missing()
    if missing:
        raise BadInput(f"{len(missing)} rung(s) of profile {profile.name} are not built yet "
                       f"({', '.join(r.quant for r in missing)}); run `edgequant quantize` first")
    return ladder.build(reporter.bytes_progress)


@dataclass
class RungOutcome:
    artifact: Artifact
    status: str
    detail: str | None = None


@dataclass
class BenchOutcome:
    run_id: str
    outcomes: list[RungOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RungOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]


def _artifact_measurements(art: Artifact) -> list[Measurement]:
    return [Measurement("size", art.size_bytes, "bytes"),
            Measurement("bpw", art.bits_per_weight, "bits/weight"),
            Measurement("n_params", art.n_params, "count")]


def bench_rungs(store: Store, run_id: str, model_id: str, model_hash: str, artifacts: list[Artifact],
                profile: Profile, reporter: Reporter, measure: Callable | None = None,
                runtime: str = "llama.cpp", params: dict | None = None) -> BenchOutcome:
    """Benchmark every artifact on the host, each in its own process; one transaction per rung.

    ``measure`` (default ``bench.host.measure_gguf``) returns a ``HostBenchResult``; ``runtime`` names
    the package whose version the rows record, ``params`` the settings they were measured with."""
    from importlib import metadata

    from edgequant.bench.host import measure_gguf

    measure = measure or measure_gguf
    settings = profile.bench
    params = params or {"runner": "host", **settings.as_params()}
    device, device_id = host_device(), host_device_id()
    runtime_version = metadata.version("llama-cpp-python" if runtime == "llama.cpp" else runtime)
    outcome = BenchOutcome(run_id)
    for art in artifacts:
        store.record_artifact(art.record())
        key = RowKey(model_id=model_id, model_hash=model_hash, quant=art.quant, artifact_sha256=art.sha256,
                     is_reference=art.is_reference, device_id=device_id, device=device,
                     runtime=runtime, runtime_version=runtime_version, params=params)
        reporter.rung_started(art.quant)
        try:
            art.verify()
            res = measure(art.path, settings, repack=params.get("repack"),
                          on_progress=lambda phase, q=art.quant: reporter.rung_phase(q, phase))
        except RunFailed as exc:     # a BenchError, or an artifact changed on disk: this rung's failure
            status = getattr(exc, "status", "failed")
            store.record_rung(run_id, key, _artifact_measurements(art), status=status, detail=str(exc))
            outcome.outcomes.append(RungOutcome(art, status, str(exc)))
            reporter.rung_done(art.quant, status)
            continue
        rows = _artifact_measurements(art) + [
            Measurement("load_time", res.load_s, "s", None, 1),
            Measurement("pp_tps", res.pp.mean, "t/s", res.pp.stddev, res.pp.n, {"samples": list(res.pp.samples)}),
            Measurement("tg_tps", res.tg.mean, "t/s", res.tg.stddev, res.tg.n, {"samples": list(res.tg.samples)}),
            Measurement("ttft", res.ttft_ms.mean, "ms", res.ttft_ms.stddev, res.ttft_ms.n),
            Measurement("peak_rss", res.peak_rss_bytes, "bytes"),
            Measurement("peak_rss_anon", res.peak_rss_anon_bytes, "bytes"),
            Measurement("peak_rss_file", res.peak_rss_file_bytes, "bytes"),
        ]
        status = store.record_rung(run_id, key, rows, status="ok") or "ok"   # "failed" for a NaN figure
        outcome.outcomes.append(RungOutcome(art, status, None if status == "ok" else "a figure is not finite"))
        reporter.rung_done(art.quant, status)
    return outcome


def process_age_seconds() -> float:
    """Seconds since this process started (imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def quality_measurements(metrics, gates: list[dict]) -> list[Measurement]:
    """The store rows of one rung's quality metrics, plus ``gates_pass`` when the suite has gates."""
    rows = [Measurement(m.metric, m.value, m.unit, m.detail.get("stddev"), m.n, m.detail or None) for m in metrics]
    if gates:
        rows.append(Measurement("gates_pass", 1.0 if all(g["pass"] for g in gates) else 0.0, "bool", None,
                                len(gates), {"gates": gates}))
    return rows


def quality_rungs(store: Store, run_id: str, model_id: str, model_hash: str, artifacts: list[Artifact],
                  profile: Profile, suite, cache_root: Path, reporter: Reporter,
                  prompting: str = "auto", only: set[str] | None = None,
                  extra_params: dict | None = None) -> dict[str, str]:
    """Run the eval suite on every rung (reference first) and store its figures and per-case detail.

    ``only``: evaluate just these quants (a resumed run); the reference's outputs are always used.
    Returns quant -> status ("ok" or how the eval failed).
    """
    from importlib import metadata

    from edgequant.bench import quality

    settings = profile.bench
    threads = settings.resolved_threads()
    repack = settings.resolved_repack()
    device, device_id = host_device(), host_device_id()
    runtime_version = metadata.version("llama-cpp-python")
    ref_art = next(a for a in artifacts if a.is_reference)
    statuses: dict[str, str] = {}
    reporter.rung_started(f"{ref_art.quant} reference outputs")
    ref_art.verify()
    ref = quality.reference_outputs(ref_art.path, ref_art.sha256, ref_art.quant, suite, cache_root, threads,
                                    repack, prompting, settings.timeout,
                                    lambda p: reporter.rung_phase(ref_art.quant, p))
    params = {"runner": "host", "stage": "quality", "suite": suite.name, "suite_sha256": suite.sha256,
              "prompting": ref.prompting, "threads": threads, "repack": repack, "decoding": "greedy",
              "n_cases": len(suite.cases), **(extra_params or {})}

    def key(art: Artifact) -> RowKey:
        return RowKey(model_id=model_id, model_hash=model_hash, quant=art.quant, artifact_sha256=art.sha256,
                      is_reference=art.is_reference, device_id=device_id, device=device,
                      runtime="llama.cpp", runtime_version=runtime_version, params=params)

    def store_quality(art: Artifact, q, status: str | None = None, detail: str | None = None) -> None:
        # a figure that is not finite makes this rung failed (the store says which); the others are stored
        stored = store.record_rung(run_id, key(art), quality_measurements(q.metrics, q.gates), status=status,
                                   detail=detail, cases=[c.record() for c in q.cases], suite=suite.name)
        statuses[art.quant] = stored or "ok"
        reporter.rung_done(art.quant, stored or "ok")

    selected = [a for a in artifacts if only is None or a.quant in only]
    # 1. every rung's own outputs, one process per rung
    outputs: list[tuple[Artifact, dict]] = []
    for art in selected:
        reporter.rung_started(art.quant)
        if art.is_reference:
            store_quality(art, quality.reference_quality(suite, ref))
            continue
        try:
            art.verify()
            outputs.append((art, quality.generate_rung(art.path, suite, ref, threads, repack, settings.timeout,
                                                       lambda p, quant=art.quant: reporter.rung_phase(quant, p))))
        except RunFailed as exc:     # an EvalError, or an artifact changed on disk: this rung's failure
            status = getattr(exc, "status", "failed")
            store.record_rung(run_id, key(art), [], status=status, detail=f"quality: {exc}")
            statuses[art.quant] = status
            reporter.rung_done(art.quant, status)
    # 2. token-level scores: the reference's outputs teacher-forced through as many rungs at once as fit
    groups = quality.teacher_groups(ref_art.size_bytes, [(a.path, a.size_bytes) for a, _ in outputs])
    by_path = {a.path: (a, data) for a, data in outputs}
    for group in groups:
        label = f"KLD vs {ref_art.quant}: " + ", ".join(by_path[p][0].quant for p in group)
        reporter.rung_started(label)
        try:
            scores = quality.teacher_scores(ref, group, suite, threads, repack, settings.timeout,
                                            lambda p, label=label: reporter.rung_phase(label, p))
        except quality.EvalError as exc:
            if len(group) > 1:      # several rungs beside the reference may be too many: one at a time
                groups.extend([p] for p in group)
                continue
            art, data = by_path[group[0]]
            store_quality(art, quality.rung_quality(art.quant, suite, ref, data, None), status=exc.status,
                          detail=f"quality: outputs judged, token-level scores failed: {exc}")
            continue
        for path in group:
            art, data = by_path[path]
            store_quality(art, quality.rung_quality(art.quant, suite, ref, data, scores[path]))
    return statuses


def artifacts_from_files(paths: list[Path], reporter: Reporter) -> list[Artifact]:
    """Artifacts for GGUF files given on the command line; the first is the reference."""
    import gguf

    from edgequant.quantize.gguf_info import BadGGUF, file_sha256, read_gguf_info

    out = []
    for i, path in enumerate(paths):
        if not path.is_file():
            raise BadInput(f"artifact {path}: no such file")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise BadInput(f"artifact {path}: not a GGUF file (bad magic)")
        try:
            info = read_gguf_info(path)
        except BadGGUF as exc:        # the user's own file: refused, never "delete it"
            raise BadInput(f"artifact {exc}; pass a complete GGUF file") from None
        quant = path.stem
        if info.file_type is not None:
            try:
                quant = gguf.LlamaFileType(info.file_type).name.removeprefix("MOSTLY_")
            except ValueError:
                pass
        reporter.step(f"hashing {path}")
        digest = file_sha256(path)
        st = path.stat()
        out.append(Artifact(quant=quant, is_reference=i == 0, path=path.resolve(), cache_key="file:" + digest,
                            model_hash="gguf:" + digest, sha256=digest, size_bytes=st.st_size,
                            n_params=info.n_params, bits_per_weight=info.bits_per_weight,
                            tensor_types=info.tensor_types, architecture=info.architecture,
                            checked=stat_signature(st)))
    names = [a.quant for a in out]
    if len(set(names)) != len(names):
        for a in out:
            a.quant = f"{a.quant}:{a.path.stem}"
    return out
