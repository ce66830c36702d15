"""The pieces behind trustworthy speed figures, without a model: reading /proc/stat into the other load
of a window, and the one-sided Mann-Whitney U test compare judges raw samples with.  Expected values are
worked out by hand in the comments or by brute-force enumeration (an independent method)."""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
import time

import pytest

from edgequant.devices.contention import (Contention, CpuTimes, ProcStatError, Window, contention_between,
                                        wait_for_quiet)
from edgequant.bench.stats import mann_whitney_greater

STAT = """cpu  100 5 50 1000 20 3 2 10 0 0
cpu0 50 2 25 500 10 1 1 5 0 0
cpu1 50 3 25 500 10 2 1 5 0 0
intr 12345
ctxt 999
"""


def test_proc_stat_busy_steal_and_cpus():
    t = CpuTimes.parse(STAT)
    # busy = user 100 + nice 5 + system 50 + irq 3 + softirq 2 + steal 10; idle 1000 and iowait 20 are not
    assert (t.busy, t.steal, t.total, t.n_cpus) == (170, 10, 1190, 2)


def test_an_old_kernel_with_four_fields_and_a_text_without_a_cpu_line():
    t = CpuTimes.parse("cpu 10 0 5 100\ncpu0 10 0 5 100\n")
    assert (t.busy, t.steal, t.total, t.n_cpus) == (15, 0, 115, 1)
    with pytest.raises(ProcStatError):
        CpuTimes.parse("intr 1\nctxt 2\n")
    with pytest.raises(ProcStatError):
        CpuTimes.parse("cpu a b c d\n")


def test_other_load_is_machine_busy_minus_the_process_in_cores():
    before = CpuTimes(busy=1000, steal=10, total=5000, n_cpus=2)
    after = CpuTimes(busy=1300, steal=60, total=5400, n_cpus=2)
    c = contention_between(before, after, own_seconds=1.0, window_s=2.0, hz=100)
    # 300 jiffies = 3 s busy over 2 s = 1.5 cores; own 1 s = 0.5 cores; other 1.0; steal 50 jiffies = 0.25 cores
    assert c.machine_busy_cores == pytest.approx(1.5)
    assert c.own_cores == pytest.approx(0.5)
    assert c.other_cores == pytest.approx(1.0)
    assert c.steal_cores == pytest.approx(0.25)
    assert Contention.from_dict(c.as_dict()) == c
    # a process that used more than the kernel's busy count (tick rounding) leaves no negative load
    assert contention_between(before, after, own_seconds=5.0, window_s=2.0, hz=100).other_cores == 0.0
    # no wall clock (a phone's two readings): the window is the jiffies that passed per CPU: 400 / 2 / 100 = 2 s
    assert contention_between(before, after, 1.0, 0.0, hz=100).window_s == pytest.approx(2.0)


def _burner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_a_window_on_this_machine_sees_another_process_burning_a_core():
    hog = _burner()
    try:
        time.sleep(0.3)
        with Window() as w:
            time.sleep(1.5)              # this process idles; the hog (and anyone else) is the other load
        c = w.result
        # the hog alone keeps about one core busy; other work on a shared machine only adds to it
        assert c.other_cores > 0.5
        assert c.own_cores < 0.2
        assert c.machine_busy_cores <= c.n_cpus + 0.2
    finally:
        hog.kill()
        hog.wait()


def test_wait_for_quiet_stops_at_the_first_quiet_reading_or_at_its_bound():
    readings = iter([2.0, 1.0, 0.05, 3.0])
    seen = []

    def read(_interval):
        return Contention(next(readings), 0, 0, 0, 1.0, 2)

    last = wait_for_quiet(0.1, 60.0, on_wait=lambda c: seen.append(c.other_cores), read=read)
    assert last.other_cores == 0.05 and seen == [2.0, 1.0]
    assert wait_for_quiet(0.1, 0.0, read=read) is None            # no wait asked: not even one reading
    busy = wait_for_quiet(0.1, 0.2, read=lambda i: (time.sleep(i), Contention(5.0, 0, 0, 0, i, 2))[1])
    assert busy.other_cores == 5.0                                 # gave up at the bound, still busy


# ---------------------------------------------------------------------------
# Mann-Whitney U


def _brute_force_p(higher, lower) -> float:
    """P(U >= observed) over every way of splitting the pooled values into groups of these sizes."""
    pooled = list(higher) + list(lower)
    m = len(higher)

    def u(h, lo):
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in h for b in lo)

    observed = u(higher, lower)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), m):
        h = [pooled[i] for i in idx]
        lo = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += u(h, lo) >= observed - 1e-12
        total += 1
    return hits / total


def test_fully_separated_samples_give_one_over_the_number_of_orderings():
    t = mann_whitney_greater([50, 51, 49], [40, 41, 39])
    assert t.u == 9 and t.p == pytest.approx(1 / 20) and t.min_p == pytest.approx(1 / 20)   # C(6, 3) = 20
    t4 = mann_whitney_greater([5, 6, 7, 8], [1, 2, 3, 4])
    assert t4.p == pytest.approx(1 / 70) and t4.method == "exact"                            # C(8, 4) = 70
    # the other direction: nothing suggests the first is higher
    assert mann_whitney_greater([1, 2, 3], [4, 5, 6]).p == pytest.approx(1.0)
    # two samples a side can never reach 0.05: 1 / C(4, 2) = 1/6
    assert mann_whitney_greater([9, 10], [1, 2]).min_p == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", range(6))
def test_exact_p_matches_brute_force_enumeration(seed):
    rng = random.Random(seed)
    m, n = rng.randint(2, 6), rng.randint(2, 6)
    shift = rng.choice([0.0, 0.5, 1.5])
    higher = [rng.gauss(shift, 1) for _ in range(m)]
    lower = [rng.gauss(0, 1) for _ in range(n)]
    t = mann_whitney_greater(higher, lower)
    assert t.method == "exact"
    assert t.p == pytest.approx(_brute_force_p(higher, lower), abs=1e-12)


def test_normal_approximation_is_close_to_enumeration_with_ties():
    higher = [3, 3, 4, 5, 5, 6]
    lower = [1, 2, 3, 3, 4, 4]
    t = mann_whitney_greater(higher, lower)
    assert t.method == "normal"          # ties: the exact table does not apply
    assert abs(t.p - _brute_force_p(higher, lower)) < 0.02


def test_large_samples_use_the_normal_approximation():
    rng = random.Random(7)
    a = [rng.gauss(1.0, 1) for _ in range(30)]
    b = [rng.gauss(0.0, 1) for _ in range(30)]
    t = mann_whitney_greater(a, b)
    assert t.method == "normal" and t.min_p < 1e-9
    # z from the definition: (U - mn/2 - 0.5) / sqrt(mn(m+n+1)/12), no ties
    z = (t.u - 450 - 0.5) / math.sqrt(900 * 61 / 12)
    assert t.p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))


# ---------------------------------------------------------------------------
# the device side: the measuring shell's /proc readings, in the shells phones have


@pytest.mark.parametrize("shell", ["sh", "mksh", "busybox"])
def test_the_measuring_shell_reports_what_the_other_load_is_computed_from(shell, tmp_path):
    import shutil

    from edgequant.devices.measured import POLLER, parse_status_contention, parse_status_line

    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is needed (apt: mksh, busybox)")
    argv = ([shell, "sh"] if shell == "busybox" else [shell]) + ["-c", POLLER, "sh", "0.05", "1000", sys.executable,
                                                               "-c", "import time\nt = time.process_time()\n"
                                                               "while time.process_time() - t < 0.6: pass"]
    subprocess.run(argv, cwd=tmp_path, check=True, timeout=120)
    text = (tmp_path / "status.txt").read_text()
    assert parse_status_line(text)["rc"] == 0            # the older fields are all still there
    c = parse_status_contention(text)
    assert c is not None and c.n_cpus == (os.cpu_count() or 1)
    assert c.window_s >= 0.5                              # it burned 0.6 s of CPU, so it ran at least that long
    assert c.own_cores > 0                                # its utime + stime were read from /proc/<pid>/stat
    assert c.own_cores * c.window_s <= 0.6 + 0.1          # ... and never more than it burned (+ a tick or two)
    assert 0 <= c.other_cores <= c.n_cpus + 0.5


def test_status_words_from_an_old_device_without_proc_stat_mean_unknown():
    from edgequant.devices.measured import parse_status_contention

    old = "rc=0 timedout=0 polls=3 vmhwm_kb=1 rss_anon_kb=1 rss_file_kb=1"
    assert parse_status_contention(old) is None
    assert parse_status_contention(old + " stat0=,,,,,,, stat1=,,,,,,, up0= up1= ptime_ticks= ncpu=0") is None
    # hand-made: 200 busy jiffies in 1 s on 4 CPUs, the program 50 of them: (2.0 - 0.5) = 1.5 other cores
    c = parse_status_contention(old + " stat0=100,0,0,1000,0,0,0,0 stat1=300,0,0,1200,0,0,0,0 up0=10.00 up1=11.00"
                                      " ptime_ticks=50 ncpu=4")
    assert (c.n_cpus, c.window_s) == (4, pytest.approx(1.0))
    assert c.other_cores == pytest.approx(1.5) and c.own_cores == pytest.approx(0.5)


def test_the_busiest_processes_from_two_snapshots():
    from edgequant.devices.contention import parse_pid_stats, top_processes

    def stat(pid, name, utime, stime):
        return f"{pid} ({name}) R 1 1 1 0 -1 4194304 100 0 0 0 {utime} {stime} 0 0 20 0 1 0 100 0 0"

    before = "\n".join([stat(10, "busy app", 100, 50), stat(11, "idle", 5, 5), stat(12, "x) y", 0, 0)])
    after = "\n".join([stat(10, "busy app", 250, 100), stat(11, "idle", 5, 5), stat(12, "x) y", 30, 0),
                       stat(13, "new", 999, 0), "garbage line"])
    assert parse_pid_stats(before)[12] == ("x) y", 0)        # a name with ") " in it
    top = top_processes(before, after, interval_s=2.0, hz=100)
    # busy app: 200 jiffies in 2 s at 100 Hz = 1.0 core; "x) y": 30 jiffies = 0.15; idle and new not listed
    assert top == [{"pid": 10, "name": "busy app", "cores": 1.0}, {"pid": 12, "name": "x) y", "cores": 0.15}]
    assert top_processes(before, after, 2.0, hz=100, exclude=frozenset({10}))[0]["pid"] == 12


def test_host_top_names_a_burning_process():
    from edgequant.devices.contention import host_top

    hog = _burner()
    try:
        top = host_top(1.0, n=20)
        assert any(p["pid"] == hog.pid and p["cores"] > 0.2 for p in top), top
    finally:
        hog.kill()
        hog.wait()
