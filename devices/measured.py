"""The measured command on a phone: a program run under ``toybox time -v`` and a ``/proc`` poller.

The device side is only POSIX ``sh`` (Android's mksh, dash, busybox ash); everything sent is quoted with
``devices.transport.quote`` and everything read back is parsed as untrusted text (bounded, validated, one
clear error when it makes no sense).  What runs on the device, for one measurement (``run_measured``)::

    cd WORKDIR && ENV=... toybox time -v sh -c POLLER sh 0.1 N  PROGRAM ARGS

``toybox time -v`` reports ``Max RSS (KiB)``: the kernel's high-water mark of the resident set of everything
it waited for (file pages of a mmapped model included).  The poller shell starts the program in the
background and reads ``/proc/<pid>/status`` every 0.1 s, keeping the largest ``RssAnon`` and ``RssFile``
apart, and the last ``VmHWM``; it also enforces the deadline (SIGTERM, then SIGKILL) and writes the
program's real exit status (``128 + N`` when killed by signal N, which ``toybox time`` itself would report
as plain N), and the other load on the device during the run (``edgequant.devices.contention``).  How the
exit status reads as a rung status is ``edgequant.core.status.classify_exit``'s (``shell=True``).

The peak anonymous and file memory are maxima of samples: a run shorter than the poll interval may be seen
only once, at its start (``polls`` says how many samples there were); ``time -v``'s Max RSS is exact.
What the program is and how its output parses is the runtime's (``edgequant.bench.device_bench`` for
llama-bench, ``edgequant.bench.onnx_device`` for onnxruntime).
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from edgequant.core.errors import RunFailed
from edgequant.core.errors import BenchError
from edgequant.core.status import exit_signal
from edgequant.devices.contention import CpuTimes, contention_between, top_processes
from edgequant.devices.transport import DeviceError, Transport, quote


DEFAULT_TIME = ("toybox", "time", "-v")
MAX_JSON_CHARS = 4 << 20
MAX_TEXT_CHARS = 64 << 10
MAX_STDERR_CHARS = 8 << 10
_MAX_KIB = 1 << 40


class DeviceOutputError(RunFailed):
    """Text read back from a device that does not parse; the message says what was wrong."""


# The measuring shell: $1 = poll interval (s), $2 = polls before the deadline, then the program.
# Written for any POSIX sh (mksh on Android); reads only builtins besides sleep, kill and renice.
# Once the program runs (at normal priority), the shell lowers its own priority to nice 19 so its
# samples take CPU time from the measurement only where a core is idle (where renice is missing
# it keeps sampling at normal priority).  For the other load during the run
# (edgequant.devices.contention) it keeps the aggregate cpu line of /proc/stat and /proc/uptime at the
# start and at the end, and the program's utime + stime (/proc/<pid>/stat) at its last poll.
POLLER = r"""interval=$1 max_polls=$2
shift 2
"$@" > bench.out 2> bench.err &
p=$!
cpustat() { { read -r c0 c1 c2 c3 c4 c5 c6 c7 c8 cr; } 2>/dev/null < /proc/stat; echo "$c1,$c2,$c3,$c4,$c5,$c6,$c7,$c8"; }
uptime_s() { { read -r u ur; } 2>/dev/null < /proc/uptime; echo "$u"; }
stat0=$(cpustat) up0=$(uptime_s) ncpu=0
{ while read -r k rest; do case $k in cpu[0-9]*) ncpu=$((ncpu + 1)) ;; esac; done; } 2>/dev/null < /proc/stat
renice -n 19 -p $$ > /dev/null 2>&1
n=0 timedout=0 hwm=0 anon=0 file=0 ptime=
while :; do
  st= h= a= f=
  { while read -r k v rest; do
      case $k in
        State:) st=$v ;;
        VmHWM:) h=$v ;;
        RssAnon:) a=$v ;;
        RssFile:) f=$v ;;
      esac
    done; } 2>/dev/null < "/proc/$p/status"
  case $st in ''|Z*|X*) break ;; esac
  [ -n "$h" ] && hwm=$h
  [ -n "$a" ] && [ "$a" -gt "$anon" ] && anon=$a
  [ -n "$f" ] && [ "$f" -gt "$file" ] && file=$f
  line=
  { read -r line; } 2>/dev/null < "/proc/$p/stat"
  set -- ${line##*) }
  [ $# -ge 13 ] && shift 11 && ptime=$(($1 + $2))
  n=$((n + 1))
  if [ "$n" -ge "$max_polls" ]; then
    timedout=1
    kill -TERM "$p" 2>/dev/null
    sleep 2
    kill -KILL "$p" 2>/dev/null
    break
  fi
  sleep "$interval"
done
stat1=$(cpustat) up1=$(uptime_s)
wait "$p"
rc=$?
echo "rc=$rc timedout=$timedout polls=$n vmhwm_kb=$hwm rss_anon_kb=$anon rss_file_kb=$file" \
  "stat0=$stat0 stat1=$stat1 up0=$up0 up1=$up1 ptime_ticks=$ptime ncpu=$ncpu" > status.txt
exit "$rc"
"""
_FILES = ("bench.out", "bench.err", "time.txt", "status.txt")
# Energy: while the program runs, a second loop appends "uptime current_now voltage_now" (s, uA, uV)
# of a power-supply folder to power.txt every $2 seconds, until the measuring command touches power.stop.
POWER_SAMPLER = r"""dir=$1 interval=$2 n=0
while [ ! -e power.stop ] && [ "$n" -lt 100000 ]; do
  read -r up rest < /proc/uptime; read -r c < "$dir/current_now"; read -r v < "$dir/voltage_now"
  echo "$up $c $v"
  n=$((n + 1))
  sleep "$interval"
done
"""


def measured_command(argv: list[str], workdir: str, *, env: dict[str, str] | None = None,
                     time_cmd: tuple[str, ...] = DEFAULT_TIME, poll_interval: float = 0.1,
                     deadline_s: float = 1800.0, power_dir: str | None = None) -> str:
    """The shell command that runs ``argv`` in ``workdir`` under the time command and the poller
    (``power_dir``: also sample that power-supply folder's current and voltage into power.txt)."""
    if not argv:
        raise ValueError("nothing to run")
    if not (poll_interval > 0 and math.isfinite(poll_interval)):
        raise ValueError(f"poll interval must be a positive number of seconds, got {poll_interval!r}")
    max_polls = max(1, math.ceil(deadline_s / poll_interval))
    assigns = [f"{k}={quote(v)}" for k, v in (env or {}).items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    program = [*time_cmd, "sh", "-c", POLLER, "sh", f"{poll_interval:g}", str(max_polls), *argv]
    run = " ".join(assigns + [quote(a) for a in program]) + " 2> time.txt"
    prepare = f"mkdir -p {quote(workdir)} && cd {quote(workdir)} && rm -f {' '.join(_FILES)} power.txt power.stop"
    if power_dir is None:
        return f"{prepare} && {run}"
    sampler = " ".join(quote(a) for a in ("sh", "-c", POWER_SAMPLER, "sh", power_dir, "0.2"))
    return f"{prepare} && ( {sampler} > power.txt 2>/dev/null & {run}; rc=$?; touch power.stop; wait; exit $rc )"


def parse_power(text: str) -> list[tuple[float, float]]:
    """power.txt -> (uptime s, watts) samples: |current| x voltage, current_now in uA and voltage_now in uV
    (the kernel's power-supply units).  Lines that do not parse (a file that was unreadable) are left out."""
    out = []
    for line in bounded(text, MAX_JSON_CHARS, "the power samples").splitlines():
        parts = line.split()
        if len(parts) != 3 or not re.fullmatch(r"\d{1,9}(?:\.\d{1,3})?", parts[0]):
            continue
        if not all(re.fullmatch(r"-?\d{1,12}", p) for p in parts[1:]):
            continue
        up, ua, uv = float(parts[0]), int(parts[1]), int(parts[2])
        if 0 < uv < 20_000_000 and abs(ua) < 50_000_000:
            out.append((up, abs(ua) * uv / 1e12))
    return out


def window_energy(samples: list[tuple[float, float]], seconds: float) -> tuple[float, float, int] | None:
    """(average watts, joules, samples) over the last ``seconds`` of the samples (the tail of the run,
    where llama-bench's last test ran), or None with fewer than two samples there."""
    if len(samples) < 2:
        return None
    end = samples[-1][0]
    inside = [s for s in samples if s[0] >= end - seconds - 1e-9]
    if len(inside) < 2:
        return None
    watts = sum(w for _, w in inside) / len(inside)
    return watts, watts * seconds, len(inside)


def bounded(text: str, limit: int, what: str) -> str:
    if not isinstance(text, str):
        raise DeviceOutputError(f"{what}: expected text, got {type(text).__name__}")
    if len(text) > limit:
        raise DeviceOutputError(f"{what} is {len(text)} characters, more than the {limit} expected")
    return text


def parse_status_line(text: str) -> dict[str, int]:
    """The poller's ``rc=0 timedout=0 polls=12 vmhwm_kb=... rss_anon_kb=... rss_file_kb=...`` line."""
    text = bounded(text, 4096, "the poller's status").strip()
    keys = ("rc", "timedout", "polls", "vmhwm_kb", "rss_anon_kb", "rss_file_kb")
    out: dict[str, int] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key in keys and re.fullmatch(r"\d{1,15}", value):
            out[key] = int(value)
    missing = [k for k in keys if k not in out]
    if missing:
        raise DeviceOutputError(f"the poller's status line {text[:200]!r} lacks {', '.join(missing)}")
    return out


_STAT_WORD = re.compile(r"^\d{1,18}(?:,\d{1,18}){3,7}$")
_UPTIME_WORD = re.compile(r"^\d{1,12}(?:\.\d{1,6})?$")
DEVICE_HZ = 100   # USER_HZ: 100 on Linux and Android whatever the kernel's tick


def parse_status_contention(text: str, hz: int = DEVICE_HZ):
    """The other load during the run from the poller's ``stat0= stat1= up0= up1= ptime_ticks= ncpu=`` words
    (``edgequant.devices.contention.Contention``); None when the device did not give them (no /proc/stat)."""
    words = dict(w.partition("=")[::2] for w in bounded(text, 4096, "the poller's status").split() if "=" in w)
    stats = [words.get("stat0", ""), words.get("stat1", "")]
    if not all(_STAT_WORD.match(x) for x in stats):
        return None
    ncpu = words.get("ncpu", "")
    n = int(ncpu) if ncpu.isdigit() and 0 < len(ncpu) < 5 else 0
    per_cpu = "".join(f"cpu{i} 0 0 0 0\n" for i in range(n))
    before, after = (CpuTimes.parse("cpu " + x.replace(",", " ") + "\n" + per_cpu) for x in stats)
    ups = [words.get("up0", ""), words.get("up1", "")]
    window = float(ups[1]) - float(ups[0]) if all(_UPTIME_WORD.match(u) for u in ups) else 0.0
    ptime = words.get("ptime_ticks", "")
    own = int(ptime) / hz if ptime.isdigit() and len(ptime) < 15 else 0.0
    return contention_between(before, after, own, max(window, 0.0), hz)


def device_load(transport: Transport, interval_s: float, timeout: float = 60.0):
    """The device's whole load over ``interval_s`` seconds (our shell only sleeps meanwhile), as a Contention."""
    gap = f"{max(0.05, min(interval_s, 30.0)):.2f}"
    result = transport.shell(f"head -n 1 /proc/stat; cat /proc/uptime; sleep {quote(gap)}; "
                             "head -n 1 /proc/stat; cat /proc/uptime", timeout)
    lines = [ln.split() for ln in bounded(result.stdout, 4096, "the device's /proc/stat").splitlines() if ln.strip()]
    cpu = [ln for ln in lines if ln and ln[0] == "cpu"]
    ups = [ln[0] for ln in lines if ln and _UPTIME_WORD.match(ln[0])]
    if len(cpu) != 2 or len(ups) != 2:
        raise DeviceOutputError(f"the device's /proc/stat and /proc/uptime did not read twice: {result.stdout[:200]!r}")
    before, after = (CpuTimes.parse(" ".join(ln)) for ln in cpu)
    return contention_between(before, after, 0.0, max(0.0, float(ups[1]) - float(ups[0])), DEVICE_HZ)


def device_top(transport: Transport, interval_s: float = 1.0, n: int = 5, timeout: float = 60.0) -> list[dict]:
    """The device's busiest processes over ``interval_s`` seconds: every /proc/<pid>/stat read twice."""
    gap = f"{max(0.1, min(interval_s, 10.0)):.2f}"
    result = transport.shell(f"cat /proc/[0-9]*/stat 2>/dev/null; echo; echo ==top==; sleep {quote(gap)}; "
                             "cat /proc/[0-9]*/stat 2>/dev/null", timeout)
    before, sep, after = bounded(result.stdout, MAX_JSON_CHARS, "the device's process list").partition("==top==")
    return top_processes(before, after, float(gap), DEVICE_HZ, n) if sep else []


@dataclass(frozen=True)
class TimeReport:
    max_rss_kib: int
    real_s: float | None


_MAX_RSS = re.compile(r"^\s*(?:Max RSS \(KiB\)|Maximum resident set size \(kbytes\)):\s*(\d{1,15})\s*$", re.M)
_REAL = re.compile(r"^\s*(?:Real time \(s\)|real):?\s*([0-9]+(?:\.[0-9]+)?)\s*$", re.M)
# busybox writes the wall time as "0m 1.23s" (GNU time: "0:01.23") ...
_BUSYBOX_ELAPSED = re.compile(r"^\s*Elapsed \(wall clock\) time \([^)]*\):\s*(?:\d+h )?\d+m \d+\.\d+s\s*$", re.M)
_PAGE_SIZE = re.compile(r"^\s*Page size \(bytes\):\s*(\d{3,9})\s*$", re.M)


def parse_time_report(text: str) -> TimeReport:
    """``Max RSS`` from ``toybox time -v`` (``Max RSS (KiB): N``) or GNU/busybox ``time -v``
    (``Maximum resident set size (kbytes): N``).  Only the last 64 KiB are read: the
    report comes last, after anything else the program wrote there.

    busybox's ``time`` treats Linux's ``ru_maxrss`` (KiB) as a page count and
    multiplies it by page size / 1024 (4x with 4 KiB pages); its report is
    recognized by its elapsed-time format and the figure divided back."""
    if not isinstance(text, str):
        raise DeviceOutputError(f"time report: expected text, got {type(text).__name__}")
    tail = text[-MAX_TEXT_CHARS:].replace("\r\n", "\n")
    found = _MAX_RSS.findall(tail)
    if not found:
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
        raise DeviceOutputError("the time report has no Max RSS line (is `toybox time -v` available on the "
                                f"device?); it ends with {last[:200]!r}")
    kib = int(found[-1])
    page = _PAGE_SIZE.findall(tail)
    if _BUSYBOX_ELAPSED.search(tail) and page and int(page[-1]) >= 1024:
        kib //= int(page[-1]) // 1024
    if kib > _MAX_KIB:
        raise DeviceOutputError(f"the time report's Max RSS {kib} KiB is not plausible")
    real = _REAL.findall(tail)
    return TimeReport(kib, float(real[-1]) if real else None)


_STATUS_FIELD = re.compile(r"^([A-Za-z_]+):\s+(\d{1,15})\s+kB\s*$", re.M)


def parse_proc_status(text: str, fields: tuple[str, ...] = ("VmHWM", "VmRSS", "RssAnon", "RssFile")) -> dict[str, int]:
    """Memory fields of a ``/proc/<pid>/status`` text, in bytes (the kernel writes kB = KiB)."""
    text = bounded(text, MAX_TEXT_CHARS, "/proc/<pid>/status")
    out = {name: int(value) * 1024 for name, value in _STATUS_FIELD.findall(text.replace("\r\n", "\n"))
           if name in fields and int(value) <= _MAX_KIB}
    if not out:
        raise DeviceOutputError(f"/proc/<pid>/status text has none of {', '.join(fields)}: {text[:120]!r}")
    return out


@dataclass(frozen=True)
class MeasuredRun:
    """How one program ended on the device, what it printed, and its memory."""

    exit_code: int                 # 128 + N when killed by signal N
    timed_out: bool
    stdout: str
    stderr_tail: str
    max_rss_kib: int | None        # from the time command (None without one)
    vmhwm_kib: int                 # the poller's figures (0 when it never saw the process)
    rss_anon_kib: int
    rss_file_kib: int
    polls: int
    deadline_s: float
    power: list[tuple[float, float]] | None = None   # (uptime s, watts) samples when power was sampled
    contention: Any = None         # edgequant.devices.contention.Contention of the run (None: not readable)

    @property
    def signal(self) -> int | None:
        return exit_signal(self.exit_code, shell=True)

    @property
    def peak_rss_kib(self) -> int:
        return self.max_rss_kib if self.max_rss_kib is not None else self.vmhwm_kib

    def last_error(self) -> str:
        lines = [ln.strip() for ln in self.stderr_tail.replace("\r", "\n").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""


def _read(transport: Transport, path: str, limit: int, what: str, tail: bool = False) -> str | None:
    cmd = f"{'tail' if tail else 'head'} -c {limit + 1} {quote(path)} 2>/dev/null"
    result = transport.shell(cmd, 120.0)
    if result.exit_code != 0:
        return None
    text = result.stdout
    if len(text) > limit:
        if not tail:
            raise DeviceOutputError(f"{what} is larger than {limit} bytes")
        text = text[-limit:]
    return text


def run_measured(transport: Transport, argv: list[str], workdir: str, *, env: dict[str, str] | None = None,
                 time_cmd: tuple[str, ...] = DEFAULT_TIME, poll_interval: float = 0.1,
                 deadline_s: float = 1800.0, stdout_limit: int = MAX_JSON_CHARS,
                 stderr_limit: int = MAX_STDERR_CHARS, power_dir: str | None = None) -> MeasuredRun:
    """Run ``argv`` on the device under the time command and the /proc poller (see the module doc);
    ``power_dir``: the run's power samples are in ``MeasuredRun.power``."""
    command = measured_command(argv, workdir, env=env, time_cmd=time_cmd, poll_interval=poll_interval,
                               deadline_s=deadline_s, power_dir=power_dir)
    # the poller stops the program at the deadline; the transport's own timeout is the backstop
    try:
        transport.shell(command, deadline_s * 1.25 + 60.0)
    except DeviceError as exc:
        if exc.kind != "timeout":
            raise
        raise BenchError("timeout", f"the measuring shell did not return although it stops the program at "
                                    f"{deadline_s:g} s; the device may be hung: {exc}") from None
    status_text = _read(transport, posixpath.join(workdir, "status.txt"), 4096, "the poller's status")
    time_text = _read(transport, posixpath.join(workdir, "time.txt"), MAX_TEXT_CHARS, "the time report", tail=True)
    if status_text is None:
        detail = next((ln.strip() for ln in reversed((time_text or "").splitlines()) if ln.strip()), "")
        raise DeviceError("io", f"the measuring shell did not run in {workdir}"
                                + (f": {detail[:300]}" if detail else "")
                                + (f" (is `{' '.join(time_cmd)}` available on the device?)" if time_cmd else ""))
    status = parse_status_line(status_text)
    max_rss = parse_time_report(time_text or "").max_rss_kib if time_cmd else None
    stdout = _read(transport, posixpath.join(workdir, "bench.out"), stdout_limit, "the program's output") or ""
    stderr = _read(transport, posixpath.join(workdir, "bench.err"), stderr_limit, "the program's log",
                   tail=True) or ""
    power = None
    if power_dir is not None:
        power = parse_power(_read(transport, posixpath.join(workdir, "power.txt"), MAX_JSON_CHARS,
                                  "the power samples", tail=True) or "")
    return MeasuredRun(exit_code=status["rc"], timed_out=bool(status["timedout"]), stdout=stdout,
                       stderr_tail=stderr, max_rss_kib=max_rss, vmhwm_kib=status["vmhwm_kb"],
                       rss_anon_kib=status["rss_anon_kb"], rss_file_kib=status["rss_file_kb"],
                       polls=status["polls"], deadline_s=deadline_s, power=power,
                       contention=parse_status_contention(status_text))
