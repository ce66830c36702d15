"""Write files under a temporary name and rename them into place when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgequant.core.errors import BadInput, RunFailed
import errno


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


def write_error(path: Path, exc: OSError, need: int | None = None):
    """The one-line error (an ``EdgequantError``) for a file that could not be written: a folder in its
    place, a read-only or forbidden place (bad input, 2), a full disk (1, with what is free and needed)."""

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        probe = Path(path).parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "no space left"
        needed = f", about {need / 2**20:,.1f} MiB needed" if need else ""
        return RunFailed(f"cannot write {path}: the disk is full ({free}{needed}); free some space or write "
                         f"to another disk")
    if exc.errno == errno.EISDIR or Path(path).is_dir():
        return BadInput(f"cannot write {path}: it is a folder; name a file to write")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BadInput(f"cannot write {path}: {exc.strerror} (a read-only file system, or a folder you may "
                        f"not write to); pick another path")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return BadInput(f"cannot write {path}: {exc.strerror} (its folder cannot be made); pick another path")
    return RunFailed(f"cannot write {path}: {exc.strerror or exc}")


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` to ``final`` through a temporary name; a failure is one ``EdgequantError`` line."""
    if final.is_dir():
        raise write_error(final, IsADirectoryError(21, "Is a directory"))
    try:
        with atomic_path(final) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(final, exc, len(text.encode("utf-8", "replace"))) from None


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
