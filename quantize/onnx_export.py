"""Build the ONNX rungs: export the checkpoint once with optimum, then make each variant with onnxruntime.

* **Export** (the ``fp32`` reference export): optimum-onnx's exporter, task
  ``text-generation-with-past`` (inputs ``input_ids``, ``attention_mask`` and
  ``past_key_values.N.key/value``; outputs ``logits`` and ``present.N.*``).
  For ``Gemma3ForConditionalGeneration`` checkpoints (MedGemma) only the
  language model is exported, as a ``Gemma3ForCausalLM``; the vision tower is
  not part of a rung, exactly as on the GGUF side.
* **Variants** (``edgequant.profiles.OnnxVariant``), all made from the fp32
  export: ``fp16`` (onnxruntime's float16 converter, inputs and outputs kept
  fp32), ``int8`` (``quantize_dynamic``, QInt8 weights, optional per-channel),
  ``int4`` (``MatMulNBitsQuantizer``: weight-only 4-bit ``MatMulNBits`` with a
  block size of 32/64/128, symmetric or not, an accuracy level), and for both
  quantized kinds optionally the token-embedding ``Gather`` too.

The exporter lives in its own package folder (``quantize.onnx_exporter``:
optimum-onnx with its pinned transformers, installed once by ``edgequant
setup-onnx``), put first on ``PYTHONPATH`` of the export process only; torch,
onnx and the rest come from edgequant's own environment.  The export and each
variant run in a worker process (``python -m edgequant.quantize.onnx_export``)
whose time and peak RSS are the stage's (``Artifact.build``, kept in the
manifest; ``pipeline.onnx_rungs.record_onnx_stages`` stores them as rows).

Artifacts follow the GGUF ladder's rules: content-addressed folders
(``onnx-<VARIANT>-<key>/model.onnx`` plus ``model.onnx_data`` when the model is
over 2 GB or the variant asks for external data), built under a temporary
name and renamed when complete, a manifest beside each (sha256 over the model
files, size, bits per weight = bytes * 8 / checkpoint parameters, counts of
initializer types and quantized ops).  As for the GGUF rungs (``quantize.verified``),
the manifest keeps the signature of every model file when its sha256 was checked: a
cached variant whose files moved is hashed again and rebuilt, with one line, if its
bytes are not the recorded ones.  Memory and disk needs are estimated and
checked before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from edgequant.core.atomic import atomic_path, atomic_write_text, clean_stale_partials
from edgequant.core.children import die_with_parent, raise_if_terminated
from edgequant.core.errors import BadInput, RunFailed
from edgequant.core.meter import StageMeter
from edgequant.profiles import OnnxSpec, OnnxVariant, Profile
from edgequant.quantize.checkpoint import Checkpoint
from edgequant.quantize.ladder import Artifact, free_bytes
from edgequant.quantize.onnx_exporter import EXPORTER_PINS, ensure_exporter, last_log_line
from edgequant.quantize.verified import CacheCheck, check_entry, files_signature, recheck, signature_of, write_manifest

Progress = Callable[[str, float, "float | None"], None]

TASK = "text-generation-with-past"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
PROTOBUF_LIMIT = 2 * 1024 ** 3          # a single ONNX protobuf cannot exceed 2 GB
_DISK_MARGIN = 256 * 1024 * 1024
# Export memory per parameter: the fp32 torch model (4 B), the traced graph and the
# ONNX protobuf holding a copy of every weight (4 B), plus slack for the tracer.
EXPORT_BYTES_PER_PARAM = 10
EXPORT_BASE = 1024 ** 3
# Bits per parameter of each kind's file, for the disk estimate (fp32 carries the tied
# embedding twice: the Gather table and the lm_head MatMul).
_EST_BITS = {"fp32": 48.0, "fp16": 24.0, "int8": 12.0, "int4": 8.0}
# what an ONNX stage's peak RSS is (its ``stage_resources`` row's detail)
WORKER_MEMORY = "peak RSS of its worker process (tree), sampled"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def onnx_versions() -> dict[str, str]:
    return {"onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"), "exporter": " ".join(EXPORTER_PINS)}


# ---------------------------------------------------------------------------
# artifacts


@dataclass
class OnnxArtifact(Artifact):
    """An ONNX rung: ``path`` is its ``model.onnx``; the rest of the folder is its external data."""

    variant: str = ""
    external_data: bool = False
    # the export it was made from: {"stage": "onnx-export", "seconds", "peak_rss_bytes", "detail", "reused"}
    # (its own ``build`` is its variant's stage; the fp32 variant is the export itself)
    export_build: dict = field(default_factory=dict)

    def files(self) -> list[Path]:
        """model.onnx and its external data: all are hashed and checked (``verified``)."""
        return model_files(self.path.parent)

    def content_sha256(self) -> str:
        return folder_sha256(self.path.parent)

    def record(self) -> dict:
        rec = super().record()
        rec["format"] = "onnx"
        return rec


def rung_name(variant: str) -> str:
    return "ONNX-" + variant.upper()


def model_files(folder: Path) -> list[Path]:
    """The files that make the model: model.onnx and its external data, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(MODEL_FILE))


def folder_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for p in model_files(folder):
        d = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(8 << 20):
                d.update(block)
        h.update(f"{p.name}\0{d.hexdigest()}\n".encode())
    return h.hexdigest()


def check_onnx_model(path: Path) -> dict[str, Any]:
    """Read ``path``'s graph (not the weights) and check every external-data reference.

    A truncated or corrupt ``.onnx`` (protobuf that does not parse), a missing
    external-data file, or one shorter than the offsets the graph points to is
    one ``BadInput`` line naming the file.  Returns counts of initializer data
    types and of operators, and whether external data is used.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"ONNX model {path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"ONNX model {path}: corrupt or truncated ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else 'does not parse'}); "
                       f"delete it and build it again") from None
    if not model.graph.node or not model.graph.output:
        raise BadInput(f"ONNX model {path}: corrupt or truncated (the graph has no nodes or outputs); "
                       f"delete it and build it again")
    types: Counter[str] = Counter()
    external = False
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        types[onnx.TensorProto.DataType.Name(init.data_type).lower()] += 1
        if init.data_location == onnx.TensorProto.EXTERNAL:
            external = True
            info = {e.key: e.value for e in init.external_data}
            loc = info.get("location", "")
            target = (path.parent / loc)
            if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
                raise BadInput(f"ONNX model {path}: tensor {init.name} points outside the model folder ({loc!r})")
            if loc not in sizes:
                if not target.is_file():
                    raise BadInput(f"ONNX model {path}: its external-data file {target.name} is missing; "
                                   f"copy it next to the model or build it again")
                sizes[loc] = target.stat().st_size
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if end > sizes[loc]:
                raise BadInput(f"ONNX model {path}: external-data file {target.name} is truncated ({sizes[loc]} "
                               f"bytes, tensor {init.name} ends at byte {end}); build it again")
    ops = Counter(n.op_type for n in model.graph.node)
    out = {f"init:{k}": v for k, v in sorted(types.items())}
    for op in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeLinear", "MatMul", "Gather"):
        if ops.get(op):
            out[f"op:{op}"] = ops[op]
    return {"tensor_types": out, "external_data": external}


@dataclass(frozen=True)
class PlannedOnnx:
    variant: OnnxVariant
    cache_key: str
    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def manifest(self) -> Path:
        return self.folder.with_name(self.folder.name + ".json")


class OnnxLadder:
    """The profile's ONNX variants of one checkpoint: plan, check resources, build (cached)."""

    def __init__(self, ckpt: Checkpoint, model_hash: str, spec: OnnxSpec, cache_root: Path,
                 notice: Callable[[str], None] = lambda message: None):
        """``notice`` gets one line for each cached variant found damaged (and rebuilt)."""
        self.notice = notice
        self.rebuilt: list[str] = []
        self._built: dict[Path, dict] = {}      # a folder just built -> its stage's time and peak RSS
        self.ckpt = ckpt
        self.model_hash = model_hash
        self.spec = spec
        self.cache_root = cache_root
        self.folder = cache_root / "artifacts" / model_hash[:16]
        self.versions = onnx_versions()

    @classmethod
    def for_profile(cls, ckpt: Checkpoint, model_hash: str, profile: Profile, cache_root: Path,
                    notice: Callable[[str], None] = lambda message: None) -> "OnnxLadder":
        return cls(ckpt, model_hash, profile.onnx, cache_root, notice)

    def _key(self, variant: OnnxVariant, export_key: str | None) -> str:
        payload: dict[str, Any] = {"model_hash": self.model_hash, "format": "onnx", "task": TASK,
                                   "exporter": self.versions["exporter"], "torch": _version("torch"),
                                   "kind": variant.kind}
        if export_key is not None:
            payload.update(options=variant.key_options(), source=export_key,
                           onnxruntime=self.versions["onnxruntime"], onnx=self.versions["onnx"])
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def export_plan(self) -> PlannedOnnx:
        ref = OnnxVariant(name="fp32", kind="fp32")
        key = self._key(ref, None)
        return PlannedOnnx(ref, key, self.folder / f"onnx-FP32-{key[:16]}")

    def plan(self) -> list[PlannedOnnx]:
        """Every variant of the profile, in profile order (the fp32 export where listed)."""
        export = self.export_plan()
        out = []
        for v in self.spec.variants:
            if v.kind == "fp32" and not v.key_options():
                out.append(PlannedOnnx(v, export.cache_key, export.folder))
                continue
            key = self._key(v, export.cache_key)
            out.append(PlannedOnnx(v, key, self.folder / f"onnx-{v.name.upper()}-{key[:16]}"))
        return out

    def missing(self) -> list[PlannedOnnx]:
        needed = [self.export_plan()] + self.plan()
        seen, out = set(), []
        for p in needed:
            if p.folder not in seen and not p.model.is_file():
                seen.add(p.folder)
                out.append(p)
        return out

    # -- resources ---------------------------------------------------------------

    def needs(self) -> tuple[int, int]:
        """(memory bytes for the export, disk bytes for what is missing)."""
        n = self.ckpt.n_params_estimate
        missing = self.missing()
        disk = sum(int(n * _EST_BITS[p.variant.kind] / 8) for p in missing)
        memory = 0
        if not self.export_plan().model.is_file():
            memory = n * EXPORT_BYTES_PER_PARAM + EXPORT_BASE
        elif missing:
            memory = n * 4 * 3 + EXPORT_BASE   # a variant loads the fp32 model and writes its own
        return memory, disk

    def check_resources(self, free_memory: int | None = None, free_disk: int | None = None) -> None:
        """Refuse, before starting, an export or variant that would not fit in memory or on disk."""
        memory, disk = self.needs()
        if disk:
            free = free_bytes(self.folder) if free_disk is None else free_disk
            if free < disk + _DISK_MARGIN:
                raise BadInput(f"artifacts folder {self.folder}: the ONNX rungs need about {disk / 2**30:.2f} GiB "
                               f"and only {free / 2**30:.2f} GiB is free; free some space or pass --cache-dir "
                               f"on a bigger disk")
        if memory:
            if free_memory is None:
                import psutil

                free_memory = psutil.virtual_memory().available
            if free_memory < memory:
                raise BadInput(f"model {self.ckpt.model_id}: the ONNX export needs about {memory / 2**30:.1f} GiB "
                               f"of memory and only {free_memory / 2**30:.1f} GiB is available; close other "
                               f"programs, use a machine with more memory or drop the [onnx] variants")

    # -- building ------------------------------------------------------------------

    def build(self, report: Progress = lambda *a: None) -> list[OnnxArtifact]:
        """Make every variant not in the cache; return the profile's variants as artifacts.  A cached one
        whose files no longer hold the bytes recorded when it was built is rebuilt, with one line."""
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(self.folder)
        export = self.export_plan()
        for p in [export] + self.plan():        # damaged ones go first, so that what is missing is counted
            if p.model.is_file():
                self._cached(p, report)
        self.check_resources()
        t0 = time.perf_counter()
        exported_now = not export.model.is_file()
        if exported_now:
            self._export(export, report)
            export_art = self._manifest(export, report)
        else:
            export_art = self._cached(export, report)
        export_seconds = time.perf_counter() - t0
        export_build = {**(export_art.build if export_art else {}), "reused": not exported_now}
        out = []
        for p in self.plan():
            t0 = time.perf_counter()
            art = self._cached(p, report) if p.model.is_file() else None
            reused = art is not None and not (p.folder == export.folder and exported_now)
            if art is None:
                self._variant(export.model, p, report)
                art = self._manifest(p, report)
            art.reused = reused
            art.seconds = export_seconds if p.folder == export.folder else time.perf_counter() - t0
            art.export_build = export_build
            out.append(art)
        return out

    def _cached(self, p: PlannedOnnx, report: Progress) -> OnnxArtifact | None:
        """The cached variant if its files hold the bytes recorded when it was built (``verified.recheck``,
        as for the GGUF rungs); None, after removing it and saying so, when it must be built again."""
        try:
            data = json.loads(p.manifest.read_text())
            recorded = signature_of(data)
            data.pop("stamp", None)       # the record of older versions (without ctime): hashed once again
            art = OnnxArtifact(**{**data, "path": p.model, "quant": rung_name(p.variant.name),
                                  "variant": p.variant.name, "is_reference": False})
        except (OSError, ValueError, KeyError, TypeError):
            why = "no readable record of the sha256 it was built with"
        else:
            why = recheck(art, recorded, report)
            if why is None:
                if art.checked != recorded:      # touched, not changed: the check is now as new as the files
                    self._write_manifest(art, p)
                return art
        self.notice(f"cached artifact {rung_name(p.variant.name)} ({p.folder.name}) is damaged: {why}; "
                    f"rebuilding it")
        self.rebuilt.append(rung_name(p.variant.name))
        shutil.rmtree(p.folder, ignore_errors=True)
        p.manifest.unlink(missing_ok=True)
        return None

    def _run_worker(self, request: dict, log_path: Path, task: str, env_extra: dict[str, str]) -> dict:
        """Run one export or variant in a worker process; its wall time and peak RSS (sampled over its process
        tree: a fresh Python, so all of it is the stage's own)."""
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env_extra)
        report_file = log_path.with_suffix(".result.json")
        report_file.unlink(missing_ok=True)
        request = dict(request, result=str(report_file))
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edgequant.quantize.onnx_export", json.dumps(request)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=die_with_parent())
            try:
                raise_if_terminated()      # a SIGTERM or Ctrl-C that arrived while it forked
                with StageMeter(proc.pid) as meter:
                    proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        try:
            result = json.loads(report_file.read_text())
        except (OSError, ValueError):
            result = {}
        finally:
            report_file.unlink(missing_ok=True)
        if result.get("bad_input"):
            raise BadInput(result["bad_input"])
        if proc.returncode != 0 or result.get("error"):
            detail = result.get("error") or last_log_line(log_path)
            raise RunFailed(f"{task} failed (exit {proc.returncode}): {detail}; full log: {log_path}")
        return meter.record()

    def _export(self, p: PlannedOnnx, report: Progress) -> None:
        exporter = ensure_exporter(self.cache_root, report)
        task = f"exporting {self.ckpt.model_id} to ONNX"
        report(task, 0, None)
        log_path = self.folder / f"onnx-export-{p.cache_key[:16]}.log"
        with atomic_path(p.folder) as tmp:
            measured = self._run_worker({"op": "export", "checkpoint": str(self.ckpt.path), "output": str(tmp),
                              "architecture": self.ckpt.architecture}, log_path, task,
                             {"PYTHONPATH": os.pathsep.join([str(exporter)] + [x for x in os.environ.get(
                                 "PYTHONPATH", "").split(os.pathsep) if x])})
            if not (tmp / MODEL_FILE).is_file():
                raise RunFailed(f"{task} wrote no {MODEL_FILE}; full log: {log_path}")
        self._built[p.folder] = {"stage": "onnx-export", **measured, "detail": WORKER_MEMORY}
        report(task, 1, 1)

    def _variant(self, source: Path, p: PlannedOnnx, report: Progress) -> None:
        task = f"making {rung_name(p.variant.name)}"
        report(task, 0, None)
        log_path = self.folder / f"onnx-{p.variant.name}-{p.cache_key[:16]}.log"
        est = int(self.ckpt.n_params_estimate * _EST_BITS[p.variant.kind] / 8)
        external = p.variant.external_data or est >= PROTOBUF_LIMIT * 0.9
        with atomic_path(p.folder) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            measured = self._run_worker({"op": "variant", "source": str(source), "output": str(tmp / MODEL_FILE),
                                         "kind": p.variant.kind, "options": p.variant.key_options(),
                                         "external_data": external}, log_path, task, {})
        self._built[p.folder] = {"stage": "onnx-quantize", **measured, "detail": WORKER_MEMORY}
        report(task, 1, 1)

    def _manifest(self, p: PlannedOnnx, report: Progress) -> OnnxArtifact:
        """Read, hash and record a variant just built."""
        files = model_files(p.folder)
        size = sum(f.stat().st_size for f in files)
        name = rung_name(p.variant.name)
        report(f"hashing {name}", 0, size)
        try:
            info = check_onnx_model(p.model)
        except BadInput as exc:       # ours, just made: not kept
            shutil.rmtree(p.folder, ignore_errors=True)
            raise RunFailed(f"the {name} artifact just built is not a readable ONNX model ({exc}); it was "
                            f"removed: re-run, and report it if it happens again") from None
        n_params = self.ckpt.n_params_estimate
        art = OnnxArtifact(quant=name, is_reference=False, path=p.model, cache_key=p.cache_key,
                           model_hash=self.model_hash, sha256=folder_sha256(p.folder), size_bytes=size,
                           n_params=n_params, bits_per_weight=size * 8 / n_params if n_params else 0.0,
                           tensor_types=info["tensor_types"], architecture=self.ckpt.architecture,
                           variant=p.variant.name, external_data=info["external_data"],
                           build=self._built.pop(p.folder, {}))
        report(f"hashing {name}", size, size)
        self._write_manifest(art, p)
        return art

    @staticmethod
    def _write_manifest(art: OnnxArtifact, p: PlannedOnnx) -> None:
        """The variant's record beside its folder, with its files' signature now (``verified.write_manifest``);
        its name is the profile's, not part of the record (the fp32 export serves under two names)."""
        data = asdict(art)
        data.update(path=str(p.model))
        for k in ("reused", "seconds", "checked", "quant", "variant", "is_reference", "export_build"):
            data.pop(k)
        write_manifest(art, p.manifest, data)


def _onnx_label(folder: Path) -> str:
    """``onnx-INT4-B128-<key>`` -> ``ONNX-INT4-B128``."""
    return "ONNX-" + folder.name[len("onnx-"):].rsplit("-", 1)[0]


def verify_onnx_cache(cache_root: Path, report: Progress = lambda *a: None) -> list[CacheCheck]:
    """Hash every cached ONNX variant again (model.onnx and its external data) and compare it with the sha256
    recorded when it was built (``edgequant quantize --verify``, as ``ladder.verify_cache`` for GGUF).  A
    damaged one, or one with no record, is removed: the next run rebuilds it."""
    out = []
    for folder in sorted((Path(cache_root) / "artifacts").glob("*/onnx-*")):
        if not folder.is_dir():
            continue
        out.append(check_entry(folder / MODEL_FILE, folder.with_name(folder.name + ".json"), _onnx_label(folder),
                               lambda f=folder: folder_sha256(f), lambda f=folder: shutil.rmtree(f, ignore_errors=True),
                               lambda f=folder: files_signature(model_files(f)), report))
    return out


# ---------------------------------------------------------------------------
# the worker: runs in its own process (the export with the exporter's packages first on the path)


def _export_language_model(checkpoint: str, output: str, architecture: str) -> None:
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the model types
    from optimum.exporters.tasks import TasksManager

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    model_type = config.get("model_type", "")
    text_only = architecture == "Gemma3ForConditionalGeneration"
    check_type = "gemma3_text" if text_only else model_type
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(check_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise BadInput(f"architecture {architecture} (model_type {model_type!r}) cannot be exported to ONNX by "
                       f"optimum-onnx 0.1.0 with task {TASK}; drop the [onnx] variants for this model")
    if not text_only:
        from optimum.exporters.onnx import main_export

        main_export(checkpoint, output=output, task=TASK, library_name="transformers", do_validation=False,
                    local_files_only=True)
        return
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    full = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
    text_config = full.config.text_config
    text_config.architectures = ["Gemma3ForCausalLM"]
    lm = Gemma3ForCausalLM(text_config)
    lm.model = full.model.language_model
    lm.lm_head = full.lm_head
    lm.eval()
    del full
    onnx_export_from_model(lm, output=output, task=TASK, do_validation=False)
    try:
        AutoTokenizer.from_pretrained(checkpoint, local_files_only=True).save_pretrained(output)
    except (OSError, ValueError):
        pass


def _int8(source: str, output: str, options: dict, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul"] + (["Gather"] if options.get("quantize_embedding") else [])
    quantize_dynamic(source, output, op_types_to_quantize=ops, per_channel=bool(options.get("per_channel")),
                     weight_type=QuantType.QInt8, use_external_data_format=external)


def _int4(source: str, output: str, options: dict, external: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ops = ("MatMul", "Gather") if options.get("quantize_embedding") else ("MatMul",)
    quant = MatMulNBitsQuantizer(onnx.load(source), bits=4, block_size=int(options["block_size"]),
                                 is_symmetric=bool(options["symmetric"]),
                                 accuracy_level=int(options["accuracy_level"]) or None,
                                 op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quant.process()
    quant.model.save_model_to_file(output, use_external_data_format=external)


def _save(model, output: str, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, output, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, output)


def _fp16(source: str, output: str, options: dict, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _save(convert_float_to_float16(onnx.load(source), keep_io_types=True, disable_shape_infer=True), output, external)


def _fp32(source: str, output: str, options: dict, external: bool) -> None:
    import onnx

    _save(onnx.load(source), output, external)


# variant kind -> maker(source model, output path, options, external data?); one line per kind
VARIANT_MAKERS: dict[str, Callable[[str, str, dict, bool], None]] = {
    "fp32": _fp32, "fp16": _fp16, "int8": _int8, "int4": _int4,
}


def _worker(argv: list[str]) -> int:
    req = json.loads(argv[0])
    result: dict[str, Any] = {}
    code = 0
    try:
        if req["op"] == "export":
            _export_language_model(req["checkpoint"], req["output"], req["architecture"])
        else:
            VARIANT_MAKERS[req["kind"]](req["source"], req["output"], req["options"], req["external_data"])
    except BadInput as exc:
        result, code = {"bad_input": str(exc)}, 2
    except MemoryError:
        result, code = {"error": "out of memory"}, 1
    except Exception as exc:  # noqa: BLE001 - reported as one line; the traceback goes to the log

        traceback.print_exc()
        result, code = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}, 1
    Path(req["result"]).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
