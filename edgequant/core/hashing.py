"""The one file-digest helper: artifacts, checkpoints, runners, imatrices and pushes are all keyed by it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks into one reused buffer."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
