"""How much of the machine something other than the measured process used while it was measured.

llama.cpp on a shared CPU is hurt far more than its share of the machine (its
threads wait for each other at every barrier), so a speed figure is only as
good as the quiet it was measured in.  This module turns two readings of the
kernel's CPU accounting into the **other load** of a measurement window, in
cores (1.0 = one core's worth of CPU time for the whole window):

    other = (machine busy time - the measured process's own CPU time) / window

where *machine busy* is every non-idle field of the aggregate ``cpu`` line of
``/proc/stat`` (user, nice, system, irq, softirq and **steal**: time a
hypervisor gave to another guest counts as other load), and the measured
process's own time is its user + system time (all its threads).  The same
parser reads a phone's ``/proc/stat`` fetched through the device transport.

Jiffies (``USER_HZ``, 100 on Linux and Android) limit the resolution: for a
window of ``w`` seconds on ``n`` cores a reading is good to about
``2 * n / (100 * w)`` cores, which is why the threshold is not set near 0.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

PROC_STAT = "/proc/stat"
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal guest guest_nice
# (guest time is already counted in user/nice, so it is not added again)
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
_STEAL = 7


class ProcStatError(ValueError):
    """A /proc/stat text without a usable aggregate ``cpu`` line."""


@dataclass(frozen=True)
class CpuTimes:
    """One reading of the aggregate ``cpu`` line of /proc/stat, in jiffies."""

    busy: int
    steal: int
    total: int
    n_cpus: int

    @classmethod
    def parse(cls, text: str) -> "CpuTimes":
        busy = steal = total = None
        n_cpus = 0
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "cpu":
                try:
                    values = [int(v) for v in parts[1:11]]
                except ValueError:
                    raise ProcStatError(f"/proc/stat: the cpu line is not numbers: {line[:80]!r}") from None
                if len(values) < 4:
                    raise ProcStatError(f"/proc/stat: the cpu line has {len(values)} fields, expected at least 4")
                values += [0] * (10 - len(values))
                busy = sum(values[i] for i in _BUSY_FIELDS)
                steal = values[_STEAL]
                total = busy + values[3] + values[4]
            elif parts[0].startswith("cpu") and parts[0][3:].isdigit():
                n_cpus += 1
        if busy is None:
            raise ProcStatError("/proc/stat has no aggregate 'cpu' line")
        return cls(busy=busy, steal=steal, total=total, n_cpus=max(1, n_cpus))


def read_cpu_times(path: str = PROC_STAT) -> CpuTimes:
    with open(path, encoding="ascii", errors="replace") as fh:
        return CpuTimes.parse(fh.read())


def clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK")) or 100
    except (ValueError, OSError, AttributeError):
        return 100


def own_cpu_seconds() -> float:
    """This process's user + system CPU seconds (every thread; not its children)."""
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True)
class Contention:
    """The other load during one measurement window (see the module docstring)."""

    other_cores: float       # machine busy minus the measured process, in cores
    machine_busy_cores: float
    own_cores: float
    steal_cores: float
    window_s: float
    n_cpus: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Contention":
        return cls(other_cores=float(data["other_cores"]), machine_busy_cores=float(data["machine_busy_cores"]),
                   own_cores=float(data["own_cores"]), steal_cores=float(data["steal_cores"]),
                   window_s=float(data["window_s"]), n_cpus=int(data["n_cpus"]))


def contention_between(before: CpuTimes, after: CpuTimes, own_seconds: float, window_s: float,
                       hz: int | None = None) -> Contention:
    """The other load between two readings; ``own_seconds`` is the measured process's CPU time in the window.

    With ``window_s`` 0 (a reading of a phone without a clock) the window is the jiffies that passed on
    every CPU divided by the number of CPUs."""
    hz = hz or clock_ticks()
    busy = max(0, after.busy - before.busy) / hz
    steal = max(0, after.steal - before.steal) / hz
    n = max(before.n_cpus, after.n_cpus)
    if window_s <= 0:
        window_s = max(0, after.total - before.total) / hz / n
    if window_s <= 0:
        return Contention(0.0, 0.0, 0.0, 0.0, 0.0, n)
    own = max(0.0, own_seconds)
    return Contention(other_cores=max(0.0, busy - own) / window_s, machine_busy_cores=busy / window_s,
                      own_cores=own / window_s, steal_cores=steal / window_s, window_s=window_s, n_cpus=n)


class Window:
    """Measure this process's window: ``with Window() as w: ...`` then ``w.result``."""

    def __init__(self, path: str = PROC_STAT):
        self.path = path
        self.result: Contention | None = None

    def __enter__(self) -> "Window":
        self._own = own_cpu_seconds()
        self._t = time.monotonic()
        self._before = read_cpu_times(self.path)
        return self

    def __exit__(self, *exc) -> None:
        after = read_cpu_times(self.path)
        window = time.monotonic() - self._t
        own = own_cpu_seconds() - self._own
        self.result = contention_between(self._before, after, own, window)


def machine_load(interval_s: float, path: str = PROC_STAT) -> Contention:
    """The load of everything but this (idle, waiting) process over ``interval_s`` seconds."""
    with Window(path) as w:
        time.sleep(interval_s)
    assert w.result is not None
    return w.result


def wait_for_quiet(threshold_cores: float, max_wait_s: float, poll_s: float = 1.0,
                   on_wait: Callable[[Contention], None] | None = None,
                   read: Callable[[float], Contention] = machine_load) -> Contention | None:
    """Poll until the other load over one ``poll_s`` interval is at most ``threshold_cores``, for at most
    ``max_wait_s`` seconds.  Returns the last reading, or None when ``max_wait_s`` is 0 (no wait asked)."""
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    while True:
        load = read(min(poll_s, max(0.05, deadline - time.monotonic())))
        if load.other_cores <= threshold_cores or time.monotonic() >= deadline:
            return load
        if on_wait is not None:
            on_wait(load)


# ---------------------------------------------------------------------------
# who the other load was: the busiest processes over a short interval


def parse_pid_stats(text: str) -> dict[int, tuple[str, int]]:
    """pid -> (name, utime + stime in jiffies) from concatenated ``/proc/<pid>/stat`` lines (untrusted text)."""
    out: dict[int, tuple[str, int]] = {}
    for line in text.splitlines()[:100_000]:
        head, sep, rest = line.rpartition(") ")
        pid, _, name = head.partition(" (")
        fields = rest.split()
        if not sep or not pid.strip().isdigit() or len(fields) < 13:
            continue
        try:
            out[int(pid)] = (name[:64], int(fields[11]) + int(fields[12]))
        except ValueError:
            continue
    return out


def top_processes(before: str, after: str, interval_s: float, hz: int | None = None, n: int = 5,
                  exclude: frozenset[int] = frozenset()) -> list[dict]:
    """The ``n`` processes that used the most CPU between two snapshots, in cores (``exclude``: ours)."""
    hz = hz or clock_ticks()
    a, b = parse_pid_stats(before), parse_pid_stats(after)
    used = [(pid, name, (t - a[pid][1]) / hz / interval_s) for pid, (name, t) in b.items()
            if pid in a and pid not in exclude and interval_s > 0]
    used = sorted((u for u in used if u[2] > 0), key=lambda u: -u[2])[:n]
    return [{"pid": pid, "name": name, "cores": round(cores, 3)} for pid, name, cores in used]


def _snapshot() -> str:
    lines = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                    lines.append(fh.read().strip())
            except OSError:
                continue
    return "\n".join(lines)


def host_top(interval_s: float = 1.0, n: int = 5) -> list[dict]:
    """This host's busiest processes (other than this one) over ``interval_s`` seconds."""
    before = _snapshot()
    time.sleep(interval_s)
    return top_processes(before, _snapshot(), interval_s, n=n, exclude=frozenset({os.getpid()}))
