"""Importance matrices from an eval suite, kept apart from the cases that judge them.

The suite's cases are split deterministically into a *calibration* half and an
*evaluation* half (per format, cases ordered by the sha256 of their id and dealt
alternately, so both halves see every format and the same suite always splits
the same way; the split is recorded in the store).  The calibration text is the calibration cases'
prompts, each followed by the reference model's own answer, and
``llama-imatrix`` (built from the vendored llama.cpp source) computes the
matrix on the reference GGUF.  Quality is then measured on the evaluation half
only, so a gain is not measured on the data it was tuned on.

The file is cached under ``<cache>/imatrix/<key>/`` where the key covers the
reference artifact's sha256, the suite's hash, the split and the prompting;
``manifest.json`` beside ``imatrix.gguf`` records the reference it was computed
on (sha256 and model hash), the suite, the split and the calibration case ids.
An imatrix is only used for quantizing the reference it was computed on: any
other is refused by that sha256.

The data is handed to ``llama_model_quantize`` in-process through
``llama_model_quantize_params.imatrix`` (an array of
``llama_model_imatrix_data``), normalized the way llama-quantize's loader does
(``in_sum2 / counts`` per expert; entries with zero count are 1).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgequant.core.errors import BadInput, RunFailed
from edgequant.core.hashing import file_sha256
from edgequant.profiles.suite_records import Suite
from edgequant.core.children import die_with_parent, raise_if_terminated
from edgequant.core.atomic import atomic_write_text

# A split needs at least this many cases on each side, and every format of the
# suite needs at least one case on each side (two in all).
MIN_CASES_PER_SIDE = 4
MIN_CALIBRATION_TOKENS = 64
MAX_CHUNK = 512
SPLIT_VERSION = "v1"


@dataclass(frozen=True)
class Split:
    suite_sha256: str
    calibration: tuple[str, ...]   # case ids, suite order
    evaluation: tuple[str, ...]
    sha256: str                    # identifies the split (its version and both id lists)

    def record(self) -> dict:
        return {"suite_sha256": self.suite_sha256, "split_sha256": self.sha256, "version": SPLIT_VERSION,
                "calibration": list(self.calibration), "evaluation": list(self.evaluation)}


def _rank(case_id: str) -> str:
    return hashlib.sha256(f"edgequant-split|{case_id}".encode()).hexdigest()


def min_cases_needed(suite: Suite) -> int:
    n_formats = len({c.format for c in suite.cases})
    return max(2 * MIN_CASES_PER_SIDE, 2 * n_formats)


def split_suite(suite: Suite) -> Split:
    """Deterministic calibration/evaluation halves, stratified by format.

    Within each format the cases are ordered by the sha256 of their id and
    alternate between the sides (the evaluation side gets the odd one out).
    """
    by_format: dict[str, list[str]] = {}
    for c in suite.cases:
        by_format.setdefault(c.format, []).append(c.id)
    short = sorted(f for f, ids in by_format.items() if len(ids) < 2)
    need = min_cases_needed(suite)
    if len(suite.cases) < need or short:
        why = f"; format {', '.join(short)} has fewer than 2 cases" if short else ""
        raise BadInput(f"suite {suite.name} ({suite.path}) has {len(suite.cases)} cases: too few to split into "
                       f"calibration and evaluation halves; it needs at least {need} "
                       f"({MIN_CASES_PER_SIDE} per side, 2 per format){why}")
    calib: set[str] = set()
    for ids in by_format.values():
        ranked = sorted(ids, key=_rank)
        calib.update(ranked[1::2])
    calibration = tuple(c.id for c in suite.cases if c.id in calib)
    evaluation = tuple(c.id for c in suite.cases if c.id not in calib)
    if len(calibration) < MIN_CASES_PER_SIDE or len(evaluation) < MIN_CASES_PER_SIDE:
        raise BadInput(f"suite {suite.name} ({suite.path}) splits into {len(calibration)} calibration and "
                       f"{len(evaluation)} evaluation cases; each side needs at least {MIN_CASES_PER_SIDE}: "
                       f"add cases (at least {need} in all)")
    digest = hashlib.sha256(json.dumps([SPLIT_VERSION, suite.sha256, calibration, evaluation]).encode())
    return Split(suite.sha256, calibration, evaluation, digest.hexdigest())


def subset_suite(suite: Suite, split: Split, side: str) -> Suite:
    """The suite restricted to one side of the split (``calibration`` or ``evaluation``).

    Its sha256 is derived from the full suite's, the split's and the side, so
    caches keyed by the suite hash (reference outputs) never mix sides.
    """
    if split.suite_sha256 != suite.sha256:
        raise BadInput(f"the split was made for another version of suite {suite.name}; make it again")
    ids = set(getattr(split, side))
    cases = tuple(c for c in suite.cases if c.id in ids)
    digest = hashlib.sha256(f"{suite.sha256}|{split.sha256}|{side}".encode()).hexdigest()
    return replace(suite, cases=cases, sha256=digest)


def calibration_text(suite: Suite, outputs: dict[str, str], prompting: str) -> str:
    """Each calibration case's prompt as the model sees it, followed by the reference's answer.

    ``outputs`` maps case id -> the reference's output text; cases without one are skipped.
    """
    parts = []
    for case in suite.cases:
        out = outputs.get(case.id)
        if out is None:
            continue
        if prompting == "chat":
            spec = suite.formats[case.format]
            parts.append(f"{spec.system}\n\n{case.prompt}\n\n{out}")
        else:
            parts.append(f"{suite.completion_prompt(case)}{out}")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------
# the file and its cache


@dataclass(frozen=True)
class ImatrixFile:
    path: Path
    manifest: dict

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def reference_sha256(self) -> str:
        return self.manifest["reference_sha256"]


def cache_key(reference_sha256: str, suite_sha256: str, split_sha256: str, prompting: str) -> str:
    return hashlib.sha256(f"{reference_sha256}|{suite_sha256}|{split_sha256}|{prompting}|{SPLIT_VERSION}"
                          .encode()).hexdigest()[:24]


def cache_folder(cache_root: Path, key: str) -> Path:
    return cache_root / "imatrix" / key


def open_cached(folder: Path) -> ImatrixFile | None:
    path, manifest = folder / "imatrix.gguf", folder / "manifest.json"
    if not (path.is_file() and manifest.is_file()):
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return ImatrixFile(path, data)


def open_imatrix(path: Path) -> ImatrixFile:
    """An imatrix file with its manifest (``manifest.json`` beside it); BadInput when either is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / "imatrix.gguf"
    if not path.is_file():
        raise BadInput(f"imatrix {path}: no such file; compute one with `edgequant imatrix`")
    manifest = path.with_name("manifest.json")
    try:
        data = json.loads(manifest.read_text())
        data["reference_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInput(f"imatrix {path}: no edgequant manifest beside it ({manifest}), so the model it was "
                       f"computed for is unknown; compute it with `edgequant imatrix`") from None
    return ImatrixFile(path, data)


def compute_imatrix(tool: Path, reference: Path, reference_sha256: str, model_hash: str, text: str,
                    folder: Path, meta: dict, threads: int, repack: bool | None,
                    say: Callable[[str], None] = lambda _m: None, timeout: float = 3600.0) -> ImatrixFile:
    """Run ``llama-imatrix`` on ``reference`` over ``text``; write imatrix.gguf + manifest.json into ``folder``."""
    n_tokens = count_tokens(reference, text)
    if n_tokens < MIN_CALIBRATION_TOKENS:
        raise BadInput(f"the calibration text is only {n_tokens} tokens; llama-imatrix needs at least "
                       f"{MIN_CALIBRATION_TOKENS}: add calibration cases to the suite")
    ctx = MAX_CHUNK
    while ctx > 16 and 2 * ctx > n_tokens:
        ctx //= 2
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".work-") as tmp:
        calib = Path(tmp) / "calibration.txt"
        calib.write_text(text, encoding="utf-8")
        out = Path(tmp) / "imatrix.gguf"
        log = folder / "llama-imatrix.log"
        cmd = [str(tool), "-m", str(reference), "-f", str(calib), "-o", str(out), "--output-format", "gguf",
               "-c", str(ctx), "-b", str(ctx), "-ub", str(ctx), "--no-ppl", "-t", str(threads),
               "--output-frequency", "100000"]
        if repack is False:
            cmd.append("--no-repack")
        say(f"llama-imatrix: {n_tokens} tokens in chunks of {ctx}")
        with open(log, "w", encoding="utf-8", errors="replace") as fh:
            try:
                proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      timeout=timeout, check=False, preexec_fn=die_with_parent())
            except subprocess.TimeoutExpired:
                raise RunFailed(f"llama-imatrix took longer than {timeout:.0f} s (log: {log})") from None
        raise_if_terminated()      # a SIGTERM or Ctrl-C that arrived while it forked: late, but not lost
        if proc.returncode != 0 or not out.is_file():
            tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            raise RunFailed(f"llama-imatrix failed (exit {proc.returncode}): {' '.join(tail)[:300]} "
                            f"(full log: {log})")
        digest = file_sha256(out)
        manifest = {**meta, "reference_sha256": reference_sha256, "model_hash": model_hash,
                    "sha256": digest, "n_tokens": n_tokens, "chunk_size": ctx, "n_chunks": n_tokens // ctx,
                    "seconds": round(time.perf_counter() - t0, 2), "created_at": time.time()}
        # the manifest goes first: a folder with imatrix.gguf always has the manifest that describes it
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(out, folder / "imatrix.gguf")
    return ImatrixFile(folder / "imatrix.gguf", manifest)


def count_tokens(model: Path, text: str) -> int:
    """Tokens of ``text`` with the model's own tokenizer (vocab-only load: no weights are read)."""
    import llama_cpp

    from edgequant.quantize.ladder import silence_llama_logs  # function-level: ladder imports this module (a cycle)

    silence_llama_logs()
    llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# handing it to llama_model_quantize


def load_imatrix(imx: ImatrixFile, reference_sha256: str) -> dict[str, np.ndarray]:
    """Tensor name -> importance vector, normalized like llama-quantize's loader.

    Refuses (BadInput) an imatrix computed on another model than ``reference_sha256``.
    """
    if imx.reference_sha256 != reference_sha256:
        raise BadInput(f"imatrix {imx.path} was computed for model {imx.reference_sha256[:12]}, not for "
                       f"{reference_sha256[:12]} being quantized; compute one for this model with "
                       f"`edgequant imatrix`")
    import gguf

    reader = gguf.GGUFReader(str(imx.path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out: dict[str, np.ndarray] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise BadInput(f"imatrix {imx.path}: tensor {base}.counts is missing; compute it again")
        counts = counts.reshape(-1)
        sums = sums.reshape(len(counts), -1)
        scaled = np.ones_like(sums)
        nz = counts > 0
        scaled[nz] = sums[nz] / counts[nz, None]
        out[base] = np.ascontiguousarray(scaled.reshape(-1), dtype=np.float32)
    if not out:
        raise BadInput(f"imatrix {imx.path} holds no importance data; compute it again")
    return out


class ImatrixArray:
    """The ``llama_model_imatrix_data`` array (null-terminated) for ``llama_model_quantize_params.imatrix``.

    Keeps every buffer alive as long as the array is referenced.
    """

    def __init__(self, data: dict[str, np.ndarray]):
        import llama_cpp

        self._names = [name.encode() for name in sorted(data)]
        self._arrays = [data[name.decode()] for name in self._names]
        arr = (llama_cpp.llama_model_imatrix_data * (len(self._names) + 1))()
        for i, (name, values) in enumerate(zip(self._names, self._arrays)):
            arr[i].name = name
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(self._names)].name = None
        self.array = arr

    def pointer(self):
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
