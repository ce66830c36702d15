"""Leases: a phone measured by one edgequant process at a time, and this host measuring one thing at a time.

* a host lock (``fcntl.flock`` on ``CACHE/leases/<serial>.lock``) keeps two processes of this host apart,
  and goes away with the process;
* a lease on the device itself protects across hosts: the folder ``WORKDIR/lease``, created with ``mkdir``
  (atomic: exactly one creator wins), holding ``owner`` (token, host, pid, run).  The holder renews it
  (rewrites ``owner``) before every rung; a lease not renewed for :data:`LEASE_STALE_S` by the device's own
  clock, or left by a dead process of this host, is stale and is broken.  Breaking re-checks the stale token
  and renames the folder away in one shell round-trip.

``take_lease`` waits for a busy phone (polled every :data:`LEASE_POLL_S` s) and past the wait refuses with
one line naming the holder (:class:`PhoneBusy`).  ``edgequant.farm`` takes them for every phone of a run.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil

from edgequant.core.errors import BadInput, EdgequantError
from edgequant.devices import select
from edgequant.devices.transport import DeviceError, Transport, quote


LEASE_DIR = "lease"
LEASE_STALE_S = 30 * 60.0       # a lease not renewed for this long (device clock) is stale
LEASE_WAIT_S = 300.0            # --lease-wait default
LEASE_POLL_S = 2.0
SHELL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Holder:
    """Who holds a phone's lease, as its ``owner`` file says."""

    token: str
    host: str
    pid: int | None
    run: str
    age_s: float | None        # seconds since the last renewal, by the device's clock

    def describe(self) -> str:
        who = f"edgequant on {self.host or 'an unknown host'}"
        if self.pid:
            who += f" (pid {self.pid}" + (f", run {self.run}" if self.run else "") + ")"
        if self.age_s is not None:
            who += f", renewed {self.age_s:.0f} s ago"
        return who


class LeaseLost(DeviceError):
    def __init__(self, serial: str, message: str):
        super().__init__("lease", f"device {serial}: {message}")


class PhoneBusy(EdgequantError):
    def __init__(self, serial: str, holder: str, waited: float, hint: str):
        super().__init__(f"device {serial} is in use by {holder}; waited {waited:.0f} s (--lease-wait): {hint}", 1)
        self.serial = serial


class Stopped(Exception):
    """Another phone failed while this one was being opened: stop quietly."""


_OWNER_LINE = re.compile(r"^(token|host|pid|run)=(.*)$", re.M)


def _clean_field(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:@+\-]", "_", value)[:120]


class DeviceLease:
    """The lease folder ``WORKDIR/lease`` on one phone (see the module doc)."""

    def __init__(self, transport: Transport, workdir: str, run: str = "", *, stale_after: float = LEASE_STALE_S,
                 host: str | None = None, pid: int | None = None):
        self.transport = transport
        self.workdir = workdir
        self.path = posixpath.join(workdir, LEASE_DIR)
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.host = _clean_field(host or socket.gethostname())
        self.pid = os.getpid() if pid is None else pid
        self.run = _clean_field(run)
        self.held = False

    def _shell(self, script: str):
        return self.transport.shell(script, SHELL_TIMEOUT)

    def _owner_lines(self) -> str:
        fields = (("token", self.token), ("host", self.host), ("pid", self.pid), ("run", _clean_field(self.run)))
        return " ".join(quote(f"{k}={v}") for k, v in fields)

    def _owner_token(self) -> str:
        return f"$(sed -n 's/^token=//p' {quote(self.path + '/owner')} 2>/dev/null)"

    def try_acquire(self) -> Holder | None:
        """Take the lease (None), or say who holds it; a stale lease is broken and taken."""
        holder = self._attempt()
        if holder is None:
            return None
        if self._stale(holder):
            self._shell(f"[ \"{self._owner_token()}\" = {quote(holder.token)} ] && "
                        f"mv {quote(self.path)} {quote(self.path + '.stale-' + self.token)} && "
                        f"rm -rf {quote(self.path + '.stale-' + self.token)}; exit 0")
            holder = self._attempt()
        return holder

    def _attempt(self) -> Holder | None:
        d, owner, lines = quote(self.path), quote(self.path + "/owner"), self._owner_lines()
        res = self._shell(
            f"mkdir -p {quote(self.workdir)} 2>/dev/null; "
            f"if mkdir {d} 2>/dev/null; then printf '%s\\n' {lines} > {owner}.tmp && mv -f {owner}.tmp {owner} "
            f"&& echo @@acquired; exit 0; fi; "
            f"[ -d {d} ] || exit 21; "
            f"echo \"@@age $(( $(date +%s) - $(stat -c %Y {owner} 2>/dev/null || stat -c %Y {d}) ))\"; "
            f"cat {owner} 2>/dev/null; exit 0")
        if res.exit_code == 21:
            raise DeviceError("io", f"cannot create the lease {self.path} on {self.transport.serial}: "
                                    f"{(res.stdout + res.stderr).strip()[:160]}; pick another --device-dir")
        if "@@acquired" in res.stdout:
            self.held = True
            return None
        fields = dict(_OWNER_LINE.findall(res.stdout))
        age = re.search(r"^@@age (-?\d+)", res.stdout, re.M)
        pid = fields.get("pid", "")
        return Holder(fields.get("token", ""), fields.get("host", ""), int(pid) if pid.isdigit() else None,
                      fields.get("run", ""), float(age.group(1)) if age else None)

    def _stale(self, holder: Holder) -> bool:
        if holder.age_s is not None and holder.age_s > self.stale_after:
            return True
        # left behind by a process of this host that is gone (a killed run being resumed)
        return bool(holder.host == self.host and holder.pid and holder.pid != self.pid
                    and not psutil.pid_exists(holder.pid))

    def renew(self) -> None:
        """Rewrite the owner file (its mtime is the renewal time).

        :class:`LeaseLost` when it is no longer ours (broken as stale by another run)."""
        owner = quote(self.path + "/owner")
        res = self._shell(f"[ \"{self._owner_token()}\" = {quote(self.token)} ] || {{ cat {owner} 2>/dev/null; "
                          f"exit 22; }}; printf '%s\\n' {self._owner_lines()} > {owner}.tmp && "
                          f"mv -f {owner}.tmp {owner}")
        if res.exit_code == 22:
            self.held = False
            fields = dict(_OWNER_LINE.findall(res.stdout))
            now = f"edgequant on {fields['host']} (pid {fields.get('pid', '?')}) holds it now" \
                if fields.get("host") else "nobody holds it now"
            raise LeaseLost(self.transport.serial, f"the lease {self.path} was taken over ({now}); stopped using "
                                                   f"this phone so that no two runs interleave")
        if not res.ok:
            raise DeviceError("io", f"could not renew the lease {self.path} on {self.transport.serial}: "
                                    f"{(res.stdout + res.stderr).strip()[:160]}")

    def release(self) -> None:
        """Remove the lease if it is still ours."""
        if self.held:
            self._shell(f"[ \"{self._owner_token()}\" = {quote(self.token)} ] && rm -rf {quote(self.path)}; exit 0")
            self.held = False


class HostLock:
    """An exclusive ``flock`` on ``CACHE/leases/<serial>.lock``: one process of this host per phone."""

    def __init__(self, cache_root: Path, serial: str):
        self.path = Path(cache_root) / "leases" / (re.sub(r"[^A-Za-z0-9._-]", "_", serial) + ".lock")
        self._fd: int | None = None

    def try_acquire(self, note: str = "", wait: bool = False) -> bool:
        """Take the lock (``wait``: blocking until its holder ends; Ctrl-C stops the wait); the file then
        says who holds it: our pid, and ``note`` on a second line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{note}\n".encode() if note else f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder_pid(self) -> int | None:
        return self.holder()[0]

    def holder(self) -> tuple[int | None, str]:
        """(pid, note) of the process that holds the lock, as far as its file says."""
        try:
            first, _, note = self.path.read_text().partition("\n")
        except OSError:
            return None, ""
        return (int(first) if first.strip().isdigit() else None), note.strip()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing drops the flock
            self._fd = None


MEASURING_LOCK = "@host-measuring"     # CACHE/leases/_host-measuring.lock (no phone serial starts with @)


@contextmanager
def measuring_on_host(cache_root: Path, note: str, no_wait: bool = False,
                      on_wait: Callable[[str], None] = lambda m: None) -> Iterator[None]:
    """One measuring command (run, bench, eval, tune on this host) at a time per host, like a phone's lease:
    two at once slow each other's figures and build the same artifacts twice.  A second one waits for the
    first (saying which), or with ``no_wait`` is refused (exit 2).  The flock goes away with its process."""
    lock = HostLock(cache_root, MEASURING_LOCK)
    if not lock.try_acquire(note):
        pid, what = lock.holder()
        who = f"edgequant pid {pid or '?'}" + (f" ({what})" if what else "")
        if no_wait:
            raise BadInput(f"this host is already measuring: {who}; two runs at once slow each other's figures: "
                           f"run again when it ends, or drop --no-wait to wait for it")
        on_wait(f"this host is already measuring: {who}; waiting for it to end (Ctrl-C stops waiting)")
        lock.try_acquire(note, wait=True)
    try:
        yield
    finally:
        lock.release()


def take_lease(target: select.Target, transport: Transport, workdir: str, cache_root: Path, wait_s: float,
               run: str = "", on_wait: Callable[[str], None] = lambda m: None,
               stop: threading.Event | None = None) -> tuple[HostLock, DeviceLease]:
    """The host lock, then the device lease of one phone, waiting up to ``wait_s``; :class:`PhoneBusy` past it."""
    stop = stop or threading.Event()
    start = time.monotonic()
    told = False
    lock = HostLock(cache_root, target.serial)
    while not lock.try_acquire():
        waited = time.monotonic() - start
        pid = lock.holder_pid()
        if waited >= wait_s:
            raise PhoneBusy(target.serial, f"another edgequant process of this host (pid {pid or '?'})", waited,
                            "run again when that process ends, or wait longer")
        if not told:
            on_wait(f"{target.serial} is in use by edgequant pid {pid or '?'} on this host: waiting up to "
                    f"{wait_s:.0f} s")
            told = True
        if stop.wait(min(LEASE_POLL_S, max(wait_s - waited, 0.05))):
            raise Stopped()
    lease = DeviceLease(transport, workdir, run)
    try:
        told = False
        while (holder := lease.try_acquire()) is not None:
            waited = time.monotonic() - start
            if waited >= wait_s:
                raise PhoneBusy(target.serial, holder.describe(), waited,
                                f"run again when it is free (if that run is gone, remove {lease.path} on the phone)")
            if not told:
                on_wait(f"{target.serial} is in use by {holder.describe()}: waiting up to {wait_s:.0f} s")
                told = True
            if stop.wait(min(LEASE_POLL_S, max(wait_s - waited, 0.05))):
                raise Stopped()
    except BaseException:
        lock.release()
        raise
    return lock, lease
