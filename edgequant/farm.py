"""Farm runs: the ladder on many phones at once, each phone under a lease.

``edgequant run --device all`` (or several ``--device`` specs, or a device pool
``--device pool:NAME|PATH``) plans rungs × phones:

* **Pools** (``edgequant.devices.pools``): a TOML file listing device specs with optional labels and
  work directories.
* **Leases** (``edgequant.devices.leases``).  Before anything is pushed to a phone, the run takes its
  lease (a host lock and a lease folder on the device), so two edgequant processes never benchmark on the
  same phone at once.  A busy phone is waited for (``--lease-wait``); past the wait the run refuses with
  one line naming the holder, before anything is stored.
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

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgequant.pipeline import device_run
from edgequant.core.errors import BadInput
from edgequant.devices import select
from edgequant.devices.leases import DeviceLease, HostLock, LEASE_WAIT_S, LeaseLost, Stopped, take_lease
from edgequant.devices.pools import PoolDevice, load_pool
from edgequant.devices.transport import DeviceError, Transport

RETRY_DELAYS = (1.0, 3.0, 9.0)  # seconds before each reopen of a phone that stopped answering
RETRYABLE = frozenset({"offline", "timeout", "io"})    # DeviceError kinds worth reconnecting for


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
    # imported here, not at the top: concurrent.futures imports logging, whose at-fork hooks swallow a SIGTERM
    # that arrives while a host run forks a worker (the exception is "ignored" there; test_faults)
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

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
                    raise Stopped() from None
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
        raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])
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


