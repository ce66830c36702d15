"""Run aarch64 programs started from the peer's shell under qemu-aarch64-static.

binfmt_misc is not mounted on these machines (and registering a handler would
change the whole machine), so the peer preloads a small exec shim
(``execshim.c``) into the shell it starts.  The shim interposes the exec family
and ``posix_spawn``: an aarch64 ELF is re-executed as
``qemu-aarch64-static -0 ARGV0 [-cpu CPU] PATH ARGS...``.  It works for
``./bin/x``, absolute paths, ``$PATH`` lookups and ``toybox time -v ./bin/x``,
because every process in that tree inherits ``LD_PRELOAD``.  Exit codes and
signals pass through unchanged (qemu-user exits with the guest's status and
re-raises a fatal signal on itself).  Limits: statically linked host programs
and programs that drop ``LD_PRELOAD`` from their children's environment do
not get the shim.

The shim is compiled with ``cc`` once per source version into a per-user
cache directory (``$TMPDIR/adbpeer-<uid>/``), written under a temporary name
and renamed, so parallel test processes can share it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("execshim.c")
LD_PREFIX = Path("/usr/aarch64-linux-gnu")


class ShimBuildError(RuntimeError):
    pass


def find_qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def cache_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"adbpeer-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def build_shim() -> Path:
    """Path of the compiled shim, building it if this source version is new."""
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"execshim-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ShimBuildError("no C compiler (cc) to build the adbpeer exec shim; install build-essential")
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, str(SHIM_SOURCE), "-ldl"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ShimBuildError(f"building the adbpeer exec shim failed:\n{result.stderr}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def shim_environment(qemu: str, cpu: str | None) -> dict[str, str]:
    """Variables that make the peer's shell run aarch64 programs under ``qemu``."""
    env = {"LD_PRELOAD": str(build_shim()), "ADBPEER_QEMU": qemu}
    if cpu:
        env["ADBPEER_QEMU_CPU"] = cpu
    if LD_PREFIX.is_dir():
        env["ADBPEER_QEMU_LD_PREFIX"] = str(LD_PREFIX)
    return env
