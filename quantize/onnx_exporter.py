"""The ONNX exporter's own package folder: optimum-onnx and its pinned transformers, installed once.

optimum-onnx 0.1.0 (the release on PyPI) requires ``transformers<4.58`` while edgequant runs on
transformers 5, so ``edgequant setup-onnx`` (``make setup`` runs it) installs the exporter and its pinned
transformers with ``pip install --no-deps --target`` into this environment
(``share/edgequant/onnx-exporter-<hash>``); ``quantize.onnx_export`` puts that folder first on
``PYTHONPATH`` of its export process only.  Nothing is downloaded during a run.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Callable

from edgequant.core.atomic import atomic_path, clean_stale_partials
from edgequant.core.errors import BadInput, RunFailed

Progress = Callable[[str, float, "float | None"], None]

# optimum-onnx 0.1.0 and the versions pip resolves for it (its transformers pin: <4.58);
# installed with --no-deps into a folder of their own (see the module doc).
EXPORTER_PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "tokenizers==0.22.2",
                 "huggingface_hub==0.36.2")


def exporter_dir(cache_root: Path | None = None) -> Path:
    """Where ``edgequant setup-onnx`` puts the exporter: inside this Python environment, so it is
    installed with the environment (``make setup``) and never fetched while a run is going on."""
    digest = hashlib.sha256("\n".join(EXPORTER_PINS).encode()).hexdigest()[:12]
    return Path(sys.prefix) / "share" / "edgequant" / f"onnx-exporter-{digest}"


def _installed(folder: Path) -> bool:
    return (folder / "optimum" / "exporters" / "onnx").is_dir()


def install_exporter(report: Progress = lambda *a: None) -> Path:
    """Install optimum-onnx and its pinned transformers (pip, --no-deps) into :func:`exporter_dir`.

    The one network access of the ONNX path, made only when the user asks (``edgequant setup-onnx``)."""
    folder = exporter_dir()
    if _installed(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(folder.parent)
    log = folder.parent / (folder.name + ".log")
    report("installing the ONNX exporter", 0, None)
    with atomic_path(folder) as tmp, open(log, "w") as fh:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(tmp), *EXPORTER_PINS]
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not (tmp / "optimum").is_dir():
            raise RunFailed(f"installing the ONNX exporter ({', '.join(EXPORTER_PINS)}) failed with exit "
                            f"{proc.returncode}: {last_log_line(log)}; full log: {log}")
    report("installing the ONNX exporter", 1, 1)
    return folder


def ensure_exporter(cache_root: Path | None = None, report: Progress = lambda *a: None) -> Path:
    """The folder holding optimum-onnx and its pinned transformers; BadInput when it is not installed."""
    folder = exporter_dir()
    if not _installed(folder):
        raise BadInput("the ONNX exporter (optimum-onnx 0.1.0 with its own pinned transformers) is not "
                       "installed in this environment; run `edgequant setup-onnx` once (pip fetches about "
                       "140 MB from PyPI; `make setup` does it)")
    return folder


def last_log_line(path: Path) -> str:
    """The last line of a worker's log that names an error (else its last line), for a one-line failure."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]
