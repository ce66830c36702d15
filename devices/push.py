"""Safe pushes to a device's edgequant work directory, and cleaning it.

Layout on the device (``WORKDIR`` defaults to ``/data/local/tmp/edgequant``)::

    WORKDIR/.edgequant                       marker: this folder is ours
    WORKDIR/models/<sha256[:16]>-<name>      pushed artifacts, content-addressed
    WORKDIR/models/.<sha256[:16]>-<name>.partial   a push in flight

A push (:meth:`Pusher.push`):

1. one round-trip asks the device whether the final file exists and its
   sha256 (``sha256sum``, in toybox since Android 7), removes a stale
   partial of the same file and reports free space (``df -k``); a file whose
   hash matches is not sent again, and a verified file is not asked about
   again during the run;
2. not enough space: one line with what is needed and what is free;
3. the bytes go to the ``.partial`` name, with progress and MB/s;
4. one round-trip checks the sha256 on the device and renames the partial
   into place (``mv`` within a folder is atomic), or removes it.

A dropped connection therefore never leaves a file under the final name, and
the next run starts the push again.
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgequant.devices.facts import parse_df
from edgequant.devices.transport import DeviceError, Transport, quote
from edgequant.core.errors import BadInput
from edgequant.core.hashing import file_sha256

MARKER = ".edgequant"
MODELS = "models"
# Everything edgequant puts in a work directory; `clean` removes these and nothing else.
OWNED = (MODELS, "bin", "lib", "runs", "tmp", MARKER)
# Folders that must never be a work directory (nor any of their parents).
PROTECTED = ("/", "/data", "/data/local", "/data/local/tmp", "/data/data", "/data/app", "/data/media",
             "/sdcard", "/storage", "/storage/emulated", "/storage/emulated/0", "/storage/self/primary",
             "/mnt", "/mnt/sdcard", "/system", "/vendor", "/product", "/odm", "/apex", "/proc", "/sys", "/dev",
             "/etc", "/bin", "/sbin", "/usr", "/lib", "/var", "/tmp", "/home", "/root", "/opt", "/boot", "/run",
             "/srv", "/media")
SHELL_TIMEOUT = 60.0
VERIFY_TIMEOUT = 600.0      # sha256sum of a multi-GB file on a phone
PREFIX_LEN = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+\-]{0,200}")
_HASH_CMD = "sha256sum {0} 2>/dev/null || toybox sha256sum {0} 2>/dev/null"


def check_workdir(workdir: str) -> str:
    """The normalized work directory, or one line saying why it is refused."""
    path = posixpath.normpath(workdir)
    if not path.startswith("/") or path.startswith("//"):
        raise BadInput(f"device work directory {workdir!r} must be an absolute path")
    if path in PROTECTED or any(p.startswith(path.rstrip("/") + "/") for p in PROTECTED) \
            or path.count("/") < 2:
        raise BadInput(f"refusing device work directory {path}: it is a system or shared folder; use a "
                       f"dedicated one such as /data/local/tmp/edgequant (--device-dir)")
    return path


def remote_name(name: str, sha256: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadInput(f"artifact name {name!r} cannot be used on a device: letters, digits, . _ + - only")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise BadInput(f"{sha256!r} is not a sha256 hex digest")
    return f"{sha256[:PREFIX_LEN]}-{name}"


@dataclass(frozen=True)
class PushProgress:
    name: str
    done: int
    total: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.done / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class PushResult:
    remote: str
    size: int
    transferred: int        # bytes sent (0 when the device already had the file)
    seconds: float
    skipped: bool

    @property
    def mb_per_s(self) -> float:
        return self.transferred / 1e6 / self.seconds if self.seconds > 0 and self.transferred else 0.0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


class Pusher:
    """Pushes to one device's work directory; remembers what it verified during the run."""

    def __init__(self, transport: Transport, workdir: str,
                 on_progress: Callable[[PushProgress], None] | None = None):
        self.transport = transport
        self.workdir = check_workdir(workdir)
        self.models = posixpath.join(self.workdir, MODELS)
        self.on_progress = on_progress
        self._verified: dict[str, str] = {}      # remote path -> sha256 checked on the device this run
        self.sent_bytes = 0                      # bytes sent by every push so far (a file the device had: 0)

    def _shell(self, command: str, timeout: float = SHELL_TIMEOUT):
        return self.transport.shell(command, timeout=timeout)

    def push(self, local: Path, sha256: str | None = None, name: str | None = None,
             dest: str | None = None, executable: bool = False) -> PushResult:
        """Push ``local`` to ``models/<sha256[:16]>-<name>``, or to ``dest`` (a path relative to the work
        directory under one of its owned folders, e.g. ``bin/llama-bench``) when given."""
        local = Path(local)
        size = local.stat().st_size
        sha256 = sha256 or file_sha256(local)
        if dest is None:
            folder, final_name = self.models, remote_name(name or local.name, sha256)
        else:
            rel = posixpath.normpath(dest)
            head, _, base = rel.partition("/")
            if head not in OWNED or head == MARKER or ".." in rel.split("/") or not _NAME.fullmatch(
                    posixpath.basename(rel)):
                raise BadInput(f"cannot push to {dest!r}: not a file under one of {', '.join(OWNED[:-1])}")
            folder = posixpath.join(self.workdir, posixpath.dirname(rel))
            final_name = posixpath.basename(rel)
        remote = posixpath.join(folder, final_name)
        partial = posixpath.join(folder, f".{final_name}.partial")
        serial = self.transport.serial
        if self._verified.get(remote) == sha256:
            return PushResult(remote, size, 0, 0.0, True)

        probe = self._shell(
            f"mkdir -p {quote(folder)} && : > {quote(posixpath.join(self.workdir, MARKER))} || exit 20; "
            f"rm -f {quote(partial)}; "
            f"if [ -f {quote(remote)} ]; then echo \"have $({_HASH_CMD.format(quote(remote))})\"; fi; "
            f"echo @@df; df -k {quote(folder)}", timeout=VERIFY_TIMEOUT)
        if probe.exit_code == 20:
            raise DeviceError("io", f"cannot create {folder} on {serial}: "
                                    f"{(probe.stdout + probe.stderr).strip()[:160]}; pick another --device-dir")
        have = re.search(r"^have ([0-9a-f]{64})\b", probe.stdout, re.M)
        if have and have.group(1) == sha256:
            self._verified[remote] = sha256
            return PushResult(remote, size, 0, 0.0, True)
        free_kib = parse_df(probe.stdout.rpartition("@@df")[2])
        if free_kib is not None and free_kib * 1024 < size:
            raise DeviceError("no_space", f"not enough space on {serial} in {self.workdir} for {local.name}: "
                                          f"need {_mib(size)}, have {_mib(free_kib * 1024)}; free some space "
                                          f"(`edgequant devices clean {serial}`) or use --device-dir")

        start = time.monotonic()

        def progress(done: int, total: int) -> None:
            if self.on_progress is not None:
                self.on_progress(PushProgress(local.name, done, total, time.monotonic() - start))

        try:
            self.transport.push(local, partial, on_progress=progress)
        except DeviceError:
            self._remove_quietly(partial)
            raise
        seconds = time.monotonic() - start
        check = self._shell(
            f"h=$({_HASH_CMD.format(quote(partial))}); case \"$h\" in {sha256}*) "
            + (f"chmod 755 {quote(partial)} && " if executable else "")
            + f"mv -f {quote(partial)} {quote(remote)} || exit 8;; "
            f"*) rm -f {quote(partial)}; echo \"got:$h\"; exit 9;; esac",
            timeout=VERIFY_TIMEOUT)
        if check.exit_code == 9:
            got = re.search(r"got:([0-9a-f]{64})", check.stdout)
            raise DeviceError("io", f"the copy of {local.name} on {serial} has sha256 "
                                    f"{got.group(1)[:16] + '…' if got else 'unknown (no sha256sum?)'}, expected "
                                    f"{sha256[:16]}…: the transfer was corrupted; retry")
        if not check.ok:
            raise DeviceError("io", f"could not move {local.name} into place on {serial} "
                                    f"(exit {check.exit_code}): {(check.stdout + check.stderr).strip()[:160]}")
        self._verified[remote] = sha256
        self.sent_bytes += size
        return PushResult(remote, size, size, seconds, False)

    def _remove_quietly(self, path: str) -> None:
        try:
            self._shell(f"rm -f {quote(path)}", timeout=10)
        except DeviceError:
            pass  # the connection is gone; the next push removes the stale partial


def clean(transport: Transport, workdir: str) -> int:
    """Remove edgequant's files from the device's work directory; the KiB they used.

    Only the entries edgequant creates (:data:`OWNED`) are removed, and only from a
    folder carrying edgequant's marker; the folder itself goes when it is then empty."""
    workdir = check_workdir(workdir)
    owned = " ".join(quote(posixpath.join(workdir, name)) for name in OWNED)
    marker = quote(posixpath.join(workdir, MARKER))
    res = transport.shell(
        f"[ -f {marker} ] || exit 0; "
        f"echo \"used $(du -sk {quote(workdir)} 2>/dev/null)\"; "
        f"rm -rf -- {owned} || exit 7; rmdir -- {quote(workdir)} 2>/dev/null; exit 0", timeout=SHELL_TIMEOUT)
    if not res.ok:
        raise DeviceError("io", f"could not remove edgequant's files from {workdir} on {transport.serial}: "
                                f"{(res.stdout + res.stderr).strip()[:160]}")
    used = re.search(r"^used (\d{1,15})\s", res.stdout, re.M)
    return int(used.group(1)) if used else 0
