"""Farm runs: the ladder on many phones at once, each phone under a lease.

``edgequant run --device all`` (or several ``--device`` specs, or a device pool
``--device pool:NAME|PATH``) plans rungs × phones:

* **Pools.**  A pool is a TOML file (``profiles/pool.toml`` is the template)
  listing device specs with optional labels (they name the phones in the
  live view and the summary) and work directories (a board without
  ``/data`` needs another one than the phones).
* **Leases.**  Before anything is pushed to a phone, the run takes its lease,
  so two edgequant processes never benchmark on the same phone at once:

  - a host lock (``fcntl.flock`` on ``CACHE/leases/<serial>.lock``) keeps two
    processes of this host apart, and goes away with the process;
  - a lease on the device itself protects across hosts: the folder
    ``WORKDIR/lease``, created with ``mkdir`` (atomic: exactly one creator
    wins), holding ``owner`` (token, host, pid, run).  The holder renews it
    (rewrites ``owner``) before every rung; a lease not renewed for
    :data:`LEASE_STALE_S` by the device's own clock, or left by a dead
    process of this host, is stale and is broken.  Breaking re-checks the
    stale token and renames the folder away in one shell round-trip; two
    hosts breaking the same stale lease within that round-trip is the one
    window this does not close.

  A busy phone is waited for (``--lease-wait``, polled every few seconds);
  past the wait the run refuses with one line naming the holder, before
  anything is stored.
* **Phones in parallel.**  One thread per phone, each with its own transport
  (adb connections are not thread-safe), running that phone's rungs one at a
  time through the per-device job; the store is shared through
  :class:`LockedStore`, which serializes calls.  Pushes stay
  skip-if-same-sha256 per phone.
* **Retries.**  A phone that stops answering is reopened after a backoff
  (:data:`RETRY_DELAYS`): new transport, facts read again, lease checked,
  runner re-verified, and the rung that was interrupted is measured again.
  When every retry fails, the phone is marked failed for the rest of the run
  while the others finish; the run then ends partial and ``--resume``
  measures what is missing.
* **View.**  A live table on stderr shows each phone's rung, progress and
  state; the run ends with a summary per phone of what ran, what was
  skipped and why.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import re
import socket
import threading
import time
import tomllib
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from edgequant import device_run
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.devices import select
from edgequant.devices.transport import DeviceError, Transport, quote

LEASE_DIR = "lease"
LEASE_STALE_S = 30 * 60.0       # a lease not renewed for this long (device clock) is stale
LEASE_WAIT_S = 300.0            # --lease-wait default
LEASE_POLL_S = 2.0
RETRY_DELAYS = (1.0, 3.0, 9.0)  # seconds before each reopen of a phone that stopped answering
RETRYABLE = frozenset({"offline", "timeout", "io"})    # DeviceError kinds worth reconnecting for
SHELL_TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# device pools


@dataclass(frozen=True)
class PoolDevice:
    spec: str
    label: str | None = None
    device_dir: str | None = None     # this phone's work directory instead of --device-dir


@dataclass(frozen=True)
class Pool:
    name: str
    path: Path
    description: str
    devices: tuple[PoolDevice, ...]


_POOL_KEYS = {"pool": ("name", "description"), "device": ("spec", "label", "device_dir")}


def builtin_pools() -> list[str]:
    names = []
    for p in resources.files("edgequant.profiles").iterdir():
        if p.name.endswith(".toml") and "pool" in tomllib.loads(p.read_text(encoding="utf-8")):
            names.append(p.name[:-5])
    return sorted(names)


def load_pool(name_or_path: str) -> Pool:
    """A device pool by built-in name (a TOML in ``profiles/`` with a ``[pool]`` table) or path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or "/" in name_or_path or path.exists()):
        if name_or_path not in builtin_pools():
            raise BadInput(f"device pool '{name_or_path}' not found; built-in pools: "
                           f"{', '.join(builtin_pools()) or 'none'}, or pass a path to a pool .toml file")
        path = Path(str(resources.files("edgequant.profiles") / f"{name_or_path}.toml"))
    if not path.is_file():
        raise BadInput(f"device pool {path}: no such file; pass pool:NAME or pool:PATH to a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"device pool {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"device pool {path}: cannot be read: {exc}") from None
    return parse_pool(data, path)


def parse_pool(data: dict[str, Any], path: Path) -> Pool:
    def fail(where: str, message: str) -> BadInput:
        return BadInput(f"device pool {path}: {where} {message}")

    for key in data:
        if key not in _POOL_KEYS:
            raise fail(f"[{key}]", f"is not a pool section; allowed: [pool], [[device]]")
    head = data.get("pool")
    if not isinstance(head, dict):
        raise fail("[pool]", "is missing: a pool file starts with [pool] and name = \"...\"")
    for key in head:
        if key not in _POOL_KEYS["pool"]:
            raise fail(f"pool.{key}", f"is not a pool field; allowed: {', '.join(_POOL_KEYS['pool'])}")
    name = head.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise fail("pool.name", "must be a non-empty string")
    entries = data.get("device", [])
    if not isinstance(entries, list) or not entries:
        raise fail("[[device]]", "is missing: list at least one device (spec = \"SERIAL\" or \"HOST:PORT\")")
    devices = []
    for i, entry in enumerate(entries):
        where = f"device[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, "must be a table with spec and an optional label")
        for key in entry:
            if key not in _POOL_KEYS["device"]:
                raise fail(f"{where}.{key}", f"is not a device field; allowed: {', '.join(_POOL_KEYS['device'])}")
        spec, label = entry.get("spec"), entry.get("label")
        if not isinstance(spec, str) or not spec.strip():
            raise fail(f"{where}.spec", "must be a device spec string (SERIAL, HOST:PORT, server:SERIAL or all)")
        if spec.strip() == "host" or spec.strip().startswith("pool:"):
            raise fail(f"{where}.spec", f"must name a phone, got {spec!r}")
        try:
            select.parse_spec(spec)
        except BadInput as exc:
            raise fail(f"{where}.spec", f"is not a device spec ({exc})") from None
        if label is not None and (not isinstance(label, str) or len(label) > 80):
            raise fail(f"{where}.label", "must be a string of at most 80 characters")
        device_dir = entry.get("device_dir")
        if device_dir is not None:
            try:
                device_dir = select.device_dir(device_dir if isinstance(device_dir, str) else "?")
            except BadInput as exc:
                raise fail(f"{where}.device_dir", str(exc)) from None
        devices.append(PoolDevice(spec.strip(), label, device_dir))
    return Pool(name, path, str(head.get("description", "")), tuple(devices))


def resolve_farm(specs: tuple[str, ...] | list[str]
                 ) -> tuple[bool, list[select.Target], dict[str, PoolDevice]]:
    """(include the host, the phones, pool entries by serial) for ``--device`` specs, pools expanded."""
    expanded: list[str] = []
    entries: dict[str, PoolDevice] = {}
    for spec in specs:
        if spec.strip().startswith("pool:"):
            pool = load_pool(spec.strip()[5:])
            for d in pool.devices:
                expanded.append(d.spec)
                parsed = select.parse_spec(d.spec)
                serial = parsed.serial if isinstance(parsed, select.Target) else parsed.partition(":")[2]
                if serial and serial != "all":
                    entries[serial] = d
        else:
            expanded.append(spec)
    targets = select.resolve(expanded)
    phones = [t for t in targets if isinstance(t, select.Target)]
    if not phones and "host" not in targets:
        raise BadInput("--device named no device")
    return "host" in targets, phones, entries


# ---------------------------------------------------------------------------
# leases


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


class _Stopped(Exception):
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
            raise _Stopped()
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
                raise _Stopped()
    except BaseException:
        lock.release()
        raise
    return lock, lease


# ---------------------------------------------------------------------------
# a store shared by threads


class LockedStore:
    """The run's :class:`~edgequant.results.store.Store`, one call at a time from any thread.

    Every method call (and every ``transaction()`` block) holds one lock, so the
    single SQLite or PostgreSQL connection never sees two threads at once."""

    def __init__(self, store):
        self._store = store
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self._lock, self._store.transaction() as conn:
            yield conn

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked


# ---------------------------------------------------------------------------
# phones and their state


@dataclass
class Phone:
    """One phone of the farm: its connection, lease and what happened to its rungs."""

    target: select.Target
    workdir: str
    label: str | None = None
    ctx: Any = None                     # device_run.DeviceContext while connected
    lock: HostLock | None = None
    lease: DeviceLease | None = None
    state: str = "waiting"
    rung: str = ""
    phase: str = ""
    total: int = 0
    done: int = 0
    retries: int = 0
    outcomes: list = field(default_factory=list)            # pipeline.RungOutcome, in order
    not_run: list[tuple[str, str]] = field(default_factory=list)
    failure: str | None = None          # why the phone was given up
    error: BaseException | None = None  # a failure that is not the phone's (e.g. the store)
    started: float | None = None
    finished: float | None = None

    @property
    def serial(self) -> str:
        return self.target.serial

    @property
    def name(self) -> str:
        return f"{self.serial} ({self.label})" if self.label else self.serial

    @property
    def work_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started


def open_phones(targets: list[select.Target], workdir: str, runner_dir: str | None, cache_root: Path, reporter,
                lease_wait: float = LEASE_WAIT_S, entries: dict[str, PoolDevice] | None = None,
                run: str = "", retry_delays: tuple[float, ...] = RETRY_DELAYS) -> list[Phone]:
    """Lease and open every phone, in parallel; a dropped connection is retried like during the run; any
    other failure releases every phone and is raised (one line), before the run starts.

    ``entries``: pool entries by serial (a label, a work directory other than ``workdir``)."""
    entries = entries or {}
    phones = []
    for t in targets:
        entry = entries.get(t.serial, PoolDevice(t.serial))
        phones.append(Phone(t, entry.device_dir or workdir, entry.label))
    stop = threading.Event()

    def open_one(phone: Phone) -> None:
        for attempt in range(len(retry_delays) + 1):
            transport = select.open_transport(phone.target)
            try:
                if phone.lease is None:
                    phone.lock, phone.lease = take_lease(phone.target, transport, phone.workdir, cache_root,
                                                         lease_wait, run, on_wait=reporter.step, stop=stop)
                else:
                    phone.lease.transport = transport
                phone.ctx = device_run.open_device(phone.target, phone.workdir, runner_dir, cache_root, reporter,
                                                   transport=transport)
                return
            except DeviceError as exc:
                transport.close()
                if stop.is_set():
                    release_phone(phone, transport)
                    raise _Stopped() from None
                if exc.kind not in RETRYABLE or attempt == len(retry_delays):
                    release_phone(phone, transport)
                    raise
                phone.retries += 1
                reporter.step(f"{phone.name}: {exc}; retry {attempt + 1}/{len(retry_delays)} in "
                              f"{retry_delays[attempt]:g} s")
                stop.wait(retry_delays[attempt])
            except BaseException:
                release_phone(phone, transport)
                transport.close()
                raise

    if len(phones) <= 1:
        for p in phones:
            open_one(p)
        return phones
    with ThreadPoolExecutor(max_workers=len(phones), thread_name_prefix="eq-open") as pool:
        futures = [pool.submit(open_one, p) for p in phones]
        try:
            # the first failure stops the phones still waiting for a lease or a retry
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            if pending:
                stop.set()
                wait(pending)
        except KeyboardInterrupt:
            stop.set()
            pool.shutdown(wait=True)
            close_phones(phones)
            raise
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        close_phones(phones)
        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
    return phones


def release_phone(phone: Phone, transport: Transport | None = None) -> None:
    """Release the phone's lease (best effort: the phone may be gone) and its host lock."""
    if phone.lease is not None and phone.lease.held:
        try:
            if transport is not None:
                phone.lease.transport = transport
            phone.lease.release()
        except DeviceError:
            pass  # unreachable: the lease goes stale, or a resume on this host breaks it
    if phone.lock is not None:
        phone.lock.release()


def close_phones(phones: list[Phone]) -> None:
    for phone in phones:
        transport = phone.ctx.transport if phone.ctx is not None else (
            phone.lease.transport if phone.lease is not None else None)
        release_phone(phone, transport)
        if phone.ctx is not None:
            phone.ctx.close()
            phone.ctx = None


# ---------------------------------------------------------------------------
# the live view


class PhoneReporter:
    """The reporter interface of ``edgequant.pipeline`` for one phone: it updates the phone's row."""

    def __init__(self, phone: Phone, view: "FarmView"):
        self.phone = phone
        self.view = view

    def step(self, message: str) -> None:
        self.view.log(message)

    def bytes_progress(self, task: str, done: float, total: float | None) -> None:
        self.phone.phase = f"{task} {100 * done / total:.0f}%" if total else task

    def start_bench(self, n_rungs: int, label: str = "") -> None:
        pass

    def rung_started(self, quant: str) -> None:
        self.phone.rung, self.phone.phase = quant, "loading"

    def rung_phase(self, quant: str, phase: str) -> None:
        self.phone.phase = phase

    def rung_done(self, quant: str, status: str) -> None:
        self.phone.phase = status
        if status != "ok":
            self.view.log(f"{self.phone.name}: {quant} {status}")


class FarmView:
    """One row per phone (rung, progress, state), live on a rich console (stderr)."""

    def __init__(self, phones: list[Phone], console=None):
        self.phones = phones
        self.console = console
        self._live = None

    def table(self):
        from rich.table import Table

        t = Table(title="phones", title_justify="left", expand=False)
        for col in ("phone", "device", "state", "rung", "done", "now", "time"):
            t.add_column(col, no_wrap=col in ("phone", "done", "time"))
        for p in self.phones:
            facts = p.ctx.facts if p.ctx is not None else None
            device = " ".join(x for x in (facts.manufacturer, facts.model) if x) if facts else ""
            style = {"failed": "red", "done": "green"}.get(p.state.split(" ")[0], "")
            t.add_row(p.name, device, f"[{style}]{p.state}[/{style}]" if style else p.state, p.rung,
                      f"{p.done}/{p.total}", p.phase, f"{p.work_s:.0f} s")
        return t

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(f"[cyan]•[/cyan] {message}")

    def __enter__(self):
        # live on a terminal; in a CI log the log lines and the closing summary say it all
        if self.console is not None and self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, get_renderable=self.table, refresh_per_second=4,
                              transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.stop()
        return False


# ---------------------------------------------------------------------------
# the scheduler


@dataclass
class FarmResult:
    phones: list[Phone]
    wall_s: float

    @property
    def lost(self) -> list[Phone]:
        return [p for p in self.phones if p.failure is not None]

    @property
    def failed_rungs(self) -> list[str]:
        """Rungs that ran and did not succeed (a skipped rung is not a failure)."""
        return [f"{o.artifact.quant} on {p.serial} {o.status}" for p in self.phones for o in p.outcomes
                if o.status not in ("ok", "skipped", "noisy")]   # noisy: measured and marked


# job(device context, artifacts, reporter) -> pipeline.BenchOutcome: every measurement of the rungs on that phone
Job = Callable[[Any, list, Any], Any]


def run_farm(phones: list[Phone], todo: dict[str, list], job: Job, *, runner_dir: str | None, cache_root: Path,
             console=None, retry_delays: tuple[float, ...] = RETRY_DELAYS) -> FarmResult:
    """Run ``todo[serial]`` (artifacts) on every phone in parallel, one rung at a time per phone, via ``job``.

    The lease is renewed before each rung; a phone that stops answering is reopened after each of
    ``retry_delays`` and then given up (``Phone.failure``).  Ctrl-C stops every phone between
    rungs and interrupts what runs (the transports are closed) and is raised again."""
    stop = threading.Event()
    for p in phones:
        p.total = len(todo.get(p.serial, []))
        p.state = "queued"
    start = time.monotonic()
    with FarmView(phones, console) as view:
        threads = [threading.Thread(target=_phone_worker,
                                    args=(p, list(todo.get(p.serial, [])), job, view, stop, runner_dir,
                                          cache_root, retry_delays),
                                    name=f"eq-phone-{p.serial}", daemon=True) for p in phones]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.25)
        except KeyboardInterrupt:
            stop.set()
            for p in phones:             # interrupt what runs: the workers see their transport fail
                if p.ctx is not None:
                    p.ctx.close()
            for t in threads:
                t.join(10)
            raise
    result = FarmResult(phones, time.monotonic() - start)
    errors = [p.error for p in phones if p.error is not None]
    if errors:
        raise errors[0]
    return result


def _phone_worker(phone: Phone, queue: list, job: Job, view: FarmView, stop: threading.Event,
                  runner_dir: str | None, cache_root: Path, retry_delays: tuple[float, ...]) -> None:
    reporter = PhoneReporter(phone, view)
    phone.started = time.monotonic()
    attempt = 0
    try:
        while queue:
            if stop.is_set():
                phone.not_run += [(a.quant, "interrupted") for a in queue]
                phone.state = "interrupted"
                return
            art = queue[0]
            try:
                if phone.ctx is None:
                    phone.state = "reconnecting"
                    transport = select.open_transport(phone.target)
                    try:
                        phone.lease.transport = transport
                        phone.lease.renew()
                        phone.ctx = device_run.open_device(phone.target, phone.workdir, runner_dir, cache_root,
                                                           reporter, transport=transport)
                    except BaseException:
                        transport.close()
                        raise
                    view.log(f"{phone.name}: reconnected, {len(queue)} rung(s) to go")
                else:
                    phone.lease.renew()
                phone.state = "running"
                outcome = job(phone.ctx, [art], reporter)
            except LeaseLost as exc:
                _give_up(phone, queue, str(exc), view)
                return
            except (device_run.DeviceLost, DeviceError) as exc:
                if phone.ctx is not None:
                    phone.ctx.close()
                    phone.ctx = None
                if stop.is_set():
                    continue
                kind = exc.cause.kind if isinstance(exc, device_run.DeviceLost) else exc.kind
                if kind not in RETRYABLE:
                    _give_up(phone, queue, str(exc), view)
                    return
                if attempt >= len(retry_delays):
                    _give_up(phone, queue, f"{exc} (gave up after {attempt} retr{'y' if attempt == 1 else 'ies'})",
                             view)
                    return
                delay = retry_delays[attempt]
                attempt += 1
                phone.retries += 1
                phone.state = f"retry {attempt}/{len(retry_delays)}"
                phone.phase = f"reopening in {delay:g} s"
                view.log(f"{phone.name}: {exc}; retry {attempt}/{len(retry_delays)} in {delay:g} s")
                stop.wait(delay)
                continue
            phone.outcomes += outcome.outcomes
            phone.done += 1
            queue.pop(0)
            attempt = 0
        phone.state = "done"
        phone.rung = ""
    except BaseException as exc:  # noqa: BLE001 - not the phone's fault (e.g. the store): raised by run_farm
        phone.error = exc
        phone.failure = str(exc)
        phone.not_run += [(a.quant, "stopped: " + str(exc)) for a in queue]
        phone.state = "failed"
    finally:
        phone.finished = time.monotonic()
        if phone.state != "failed":
            phone.phase = ""


def _give_up(phone: Phone, queue: list, why: str, view: FarmView) -> None:
    phone.failure = why
    phone.not_run += [(a.quant, "not run: the phone failed") for a in queue]
    phone.state = "failed"
    phone.phase = why[:60]
    view.log(f"[red]{phone.name} failed for the rest of the run[/red]: {why}")


# ---------------------------------------------------------------------------
# the summary


def render_summary(result: FarmResult, console) -> None:
    """Per phone: what ran, what was skipped or failed and why, retries, time."""
    from rich.table import Table

    t = Table(title=f"farm: {len(result.phones)} phone(s) in {result.wall_s:.0f} s", title_justify="left")
    for col in ("phone", "state", "ran", "skipped / failed (why)", "retries", "time"):
        t.add_column(col)
    for p in result.phones:
        ran = ", ".join(o.artifact.quant for o in p.outcomes if o.status == "ok") or "-"
        why = [f"{o.artifact.quant}: {o.status}" + (f" ({o.detail})" if o.detail else "")
               for o in p.outcomes if o.status != "ok"]
        why += [f"{q}: {reason}" for q, reason in p.not_run]
        if p.failure:
            why.append(f"phone failed: {p.failure}")
        state = "failed" if p.failure else p.state
        t.add_row(p.name, state, ran, "\n".join(why) or "-", str(p.retries), f"{p.work_s:.0f} s")
    console.print(t)


