"""Preparing a run: its model and artifacts.  The checkpoint resolved (the embedded default, a folder, a hub
id) and fingerprinted, its GGUF ladder built or found in the cache (with the build's stage rows and the rungs
whose quantization was killed), GGUF files given on the command line.  Nothing here prints: progress goes
through a ``Reporter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgequant.core.errors import BadInput
from edgequant.devices.host import host_device, host_device_id
from edgequant.pipeline.scope import Reporter, RunScope
from edgequant.profiles import Profile
from edgequant.quantize.checkpoint import (Checkpoint, checkpoint_hash, download_from_hub, looks_like_hub_id,
                                           open_checkpoint)
from edgequant.quantize.ladder import Artifact, Ladder, files_signature
from edgequant.results.store import Store


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
    outside = ckpt.n_params_outside_ladder
    if outside:
        reporter.step(f"{ckpt.architecture}: the ladder quantizes the language model "
                      f"({ckpt.n_params_estimate / 1e9:.2f} B parameters); the vision tower and projector "
                      f"({outside / 1e9:.2f} B) are not part of any rung")
    reporter.step(f"fingerprinting {ckpt.path}")
    digest = checkpoint_hash(ckpt, cache_root / "checkpoint-hashes.json")
    return ResolvedModel(ckpt, digest)


def build_ladder(resolved: ResolvedModel, profile: Profile, cache_root: Path,
                 reporter: Reporter, imatrix=None, failed: list | None = None) -> list[Artifact]:
    """``imatrix``: an ImatrixProvider (edgequant.pipeline.calibrate.SuiteImatrix) for ``+imatrix`` rungs.  A rung
    whose quantization was killed (OOM) is left out and, with ``failed`` (a list), added to it as
    (rung, status, detail, its stage's time and peak RSS); without it, the first such rung is raised
    (``quantize.ladder.BuildFailed``)."""
    ladder = Ladder(resolved.checkpoint, resolved.model_hash, profile, cache_root, imatrix=imatrix,
                    notice=reporter.step)
    out = ladder.build(reporter.bytes_progress, keep_going=failed is not None)
    if failed is not None:
        failed.extend(ladder.failed)
    return out


def record_build_failures(scope: RunScope, n_params: int, failures: list) -> list[str]:
    """Rungs whose quantization was killed (``build_ladder``'s ``failed``): each stored with its status and
    the stage in the detail, and as a ``stage_resources`` row; returns "RUNG STATUS" for each."""
    from importlib import metadata

    from edgequant.estimate import stage_row

    store, run_id = scope.store, scope.run_id
    device, device_id = host_device(), host_device_id()
    out = []
    for quant, status, detail, built in failures:
        key = scope.key(None, quant=quant, is_reference=False, device_id=device_id, device=device,
                        runtime="llama.cpp", runtime_version=metadata.version("llama-cpp-python"),
                        params={"runner": "host"})
        store.record_rung(run_id, key, [], status=status, detail=detail)
        store.record_stages(run_id, [stage_row("quantize", quant, device_id, n_params, built.get("seconds"),
                                               built.get("peak_rss_bytes"), status, False, detail)])
        out.append(f"{quant} {status}")
    return out


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


def record_build_stages(store: Store, run_id: str, artifacts: list[Artifact], device_id: str | None = None) -> None:
    """The conversion and quantization behind each artifact as ``stage_resources`` rows of the run that
    built or reused it (a reused artifact's row carries the time and peak RSS recorded in its manifest when
    it was built, ``reused`` set)."""
    from edgequant.estimate import stage_row

    device_id = device_id or host_device_id()
    have = {(r["stage"], r["quant"]) for r in store.stage_resources(run_id)}     # a resumed run has them
    rows = []
    for art in artifacts:
        build = getattr(art, "build", None) or {}
        stage = build.get("stage") or ("convert" if art.is_reference else "quantize")
        if (stage, art.quant) in have:
            continue
        rows.append(stage_row(stage, art.quant, device_id, art.n_params, build.get("seconds"),
                              build.get("peak_rss_bytes"), "ok", art.reused, build.get("detail")))
    store.record_stages(run_id, rows)


def process_age_seconds() -> float:
    """Seconds since this process started (imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


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
                            checked=files_signature([path.resolve()])))
    names = [a.quant for a in out]
    if len(set(names)) != len(names):
        for a in out:
            a.quant = f"{a.quant}:{a.path.stem}"
    return out
