"""Write files under a temporary name and rename them into place when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_name(final: Path) -> Path:
    """The temporary name a file is written under; never mistaken for a finished one."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``final`` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(final)
    try:
        yield tmp
        if tmp.is_dir():
            if final.exists():
                shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def clean_stale_partials(folder: Path) -> None:
    """Remove temporary files left by a process that no longer runs."""
    if not folder.is_dir():
        return
    for p in folder.glob(".*.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # still being written
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
