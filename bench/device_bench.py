"""Benchmark a GGUF on a device with the runner's llama-bench, through a ``Transport``.

The device side is only POSIX ``sh`` (Android's mksh, dash, busybox ash) plus
the runner; everything sent is quoted with ``devices.transport.quote`` and
everything read back is parsed as untrusted text (bounded, validated, one
clear error when it makes no sense).

What runs on the device, for one measurement (``run_measured``)::

    cd WORKDIR && LD_LIBRARY_PATH=RUNNER/lib toybox time -v sh -c POLLER sh 0.1 N  RUNNER/bin/llama-bench ARGS

``toybox time -v`` reports ``Max RSS (KiB)``: the kernel's high-water mark of
the resident set of everything it waited for (the llama-bench process, file
pages of the mmapped GGUF included).  The poller shell starts the program in
the background and reads ``/proc/<pid>/status`` every 0.1 s, keeping the
largest ``RssAnon`` (heap: KV cache, compute buffers, weights copied or
repacked out of the file) and ``RssFile`` (resident pages of mapped files:
the GGUF weights touched, shared libraries) apart, and the last ``VmHWM``; it
also enforces the deadline (SIGTERM, then SIGKILL) and writes the program's
real exit status (``128 + N`` when killed by signal N, which ``toybox time``
itself would report as plain N).  Outcomes map like the host runner's:
SIGKILL -> ``oom`` (the kernel's OOM killer and Android's lmkd both send it),
another signal -> ``crashed``, past the deadline -> ``timeout``, a non-zero
exit -> ``failed``.

The measurement itself is llama-bench's (``-o json``): with the same
settings as the host rows (``llama_bench_args``: threads, -p/-n, -r, batch
sizes, flash attention, load mode, repack), a pp test (``n_prompt`` tokens in
a fresh context) and a tg test (``n_gen`` single-token decodes), each after
one warm-up run; tokens/s per repetition come from ``samples_ns``.

Load time is not in llama-bench's JSON.  ``measure_load`` runs llama-bench
once more with ``-v`` (llama.cpp's own log, written synchronously), one
repetition of the pp test and no warm-up, and reads llama.cpp's ``load time =
... ms``.  That timer runs from the start of ``llama_model_load_from_file``
until the first decode has finished, so the time of that decode (the test's
only sample in ``samples_ns``) is subtracted: ``load_s`` is the time to load
the model (read the GGUF's metadata, map or read the weights, repack them
when repack is on) and create a context of ``n_prompt`` tokens: what the host
rows' ``load_s`` measures too.  Page-ins of an mmapped file deferred to the
first decode are not in it, on either side.  (llama-completion's log is
written by a background thread that this llama.cpp revision may not flush at
exit, upstream issue #22142, so its timings are not parsed.)

The peak anonymous and file memory are maxima of samples: a run shorter than
the poll interval may be seen only once, at its start (``rss_samples`` says how
many samples there were); ``time -v``'s Max RSS is exact.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

from edgequant.devices.contention import CpuTimes, contention_between, top_processes
from edgequant.core.status import BenchError
from edgequant.bench.stats import Summary
from edgequant.core.errors import RunFailed
from edgequant.core.status import RungStatus, classify_exit, exit_signal, signal_name
from edgequant.devices.facts import Cluster, big_core_count
from edgequant.devices.transport import DeviceError, Transport, quote
from edgequant.profiles import BenchSettings
from edgequant.profiles.variants import BenchVariant

BENCH_TOOL = "llama-bench"
DEFAULT_TIME = ("toybox", "time", "-v")
MAX_JSON_CHARS = 4 << 20
MAX_TEXT_CHARS = 64 << 10
MAX_STDERR_CHARS = 8 << 10
_MAX_SAMPLES = 100_000
_MAX_KIB = 1 << 40


class DeviceOutputError(RunFailed):
    """Text read back from a device that does not parse; the message says what was wrong."""


# ---------------------------------------------------------------------------
# where the runner is on the device


@dataclass(frozen=True)
class RemoteRunner:
    """A runner folder as the device sees it, and how to start its programs there."""

    root: str                                  # holds bin/ (and lib/ when the build is shared)
    has_libs: bool = False
    launcher: tuple[str, ...] = ()             # argv prefix, e.g. ("qemu-aarch64-static", "-cpu", "cortex-a53")
    time_cmd: tuple[str, ...] = DEFAULT_TIME   # () to rely on the /proc poller alone

    @classmethod
    def for_runner(cls, runner, root: str, **kw) -> "RemoteRunner":
        """For a local ``RunnerDir`` copied to ``root`` on the device."""
        return cls(root=root, has_libs=runner.has_libs, **kw)

    def tool(self, name: str) -> list[str]:
        return [*self.launcher, posixpath.join(self.root, "bin", name)]

    def env(self) -> dict[str, str]:
        return {"LD_LIBRARY_PATH": posixpath.join(self.root, "lib")} if self.has_libs else {}


# ---------------------------------------------------------------------------
# command lines


def device_repack(settings: BenchSettings) -> bool | None:
    """--repack for a device: "auto" keeps llama.cpp's default (the AMX exception is x86-only)."""
    return None if settings.repack == "auto" else settings.repack == "on"


def llama_bench_args(model: str, settings: BenchSettings, threads: int, repack: bool | None,
                     depths: tuple[int, ...] = (0,), cache_type: str = "f16") -> list[str]:
    """llama-bench arguments measuring what the host worker measures with ``settings``.

    llama-bench does at most one warm-up run per test: ``warmup = 0`` turns it
    off, any larger value means that one run.  ``repack=None`` leaves
    llama-bench's default.  ``depths`` (``-d``, one pp and one tg test per
    depth, on one model load) and ``cache_type`` (``-ctk``/``-ctv``; flash
    attention on for a quantized V cache, which llama.cpp requires) measure
    variants of the rung (``edgequant.profiles.variants``).
    """
    flash_attn = BenchVariant(0, cache_type).flash_attn(settings)
    args = ["-m", model, "-p", str(settings.n_prompt), "-n", str(settings.n_gen), "-t", str(threads),
            "-r", str(settings.repetitions), "-b", str(settings.n_batch), "-ub", str(settings.n_ubatch),
            "-fa", flash_attn, "-lm", "mmap" if settings.mmap else "none"]
    if tuple(depths) != (0,):
        args += ["-d", ",".join(str(int(d)) for d in depths)]
    if cache_type != "f16":
        args += ["-ctk", cache_type, "-ctv", cache_type]
    if repack is not None:
        args += ["--repack", "1" if repack else "0"]
    if settings.warmup == 0:
        args.append("--no-warmup")
    return args + ["-o", "json"]


def load_probe_args(model: str, settings: BenchSettings, threads: int, repack: bool | None) -> list[str]:
    """llama-bench arguments for the load-time run: verbose, one pp repetition, no warm-up.

    The context has ``n_prompt`` tokens like the host's first context (one
    token when there is no pp test).
    """
    tokens = ["-p", str(settings.n_prompt), "-n", "0"] if settings.n_prompt > 0 else ["-p", "0", "-n", "1"]
    args = ["-v", "-m", model, *tokens, "-r", "1", "--no-warmup", "-t", str(threads), "-b", str(settings.n_batch),
            "-ub", str(settings.n_ubatch), "-fa", settings.flash_attn, "-lm", "mmap" if settings.mmap else "none"]
    if repack is not None:
        args += ["--repack", "1" if repack else "0"]
    return args + ["-o", "json"]


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
    for line in _bounded(text, MAX_JSON_CHARS, "the power samples").splitlines():
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


# ---------------------------------------------------------------------------
# parsing what comes back (untrusted)


def _bounded(text: str, limit: int, what: str) -> str:
    if not isinstance(text, str):
        raise DeviceOutputError(f"{what}: expected text, got {type(text).__name__}")
    if len(text) > limit:
        raise DeviceOutputError(f"{what} is {len(text)} characters, more than the {limit} expected")
    return text


def parse_status_line(text: str) -> dict[str, int]:
    """The poller's ``rc=0 timedout=0 polls=12 vmhwm_kb=... rss_anon_kb=... rss_file_kb=...`` line."""
    text = _bounded(text, 4096, "the poller's status").strip()
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
    words = dict(w.partition("=")[::2] for w in _bounded(text, 4096, "the poller's status").split() if "=" in w)
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
    lines = [ln.split() for ln in _bounded(result.stdout, 4096, "the device's /proc/stat").splitlines() if ln.strip()]
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
    before, sep, after = _bounded(result.stdout, MAX_JSON_CHARS, "the device's process list").partition("==top==")
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
    text = _bounded(text, MAX_TEXT_CHARS, "/proc/<pid>/status")
    out = {name: int(value) * 1024 for name, value in _STATUS_FIELD.findall(text.replace("\r\n", "\n"))
           if name in fields and int(value) <= _MAX_KIB}
    if not out:
        raise DeviceOutputError(f"/proc/<pid>/status text has none of {', '.join(fields)}: {text[:120]!r}")
    return out


_LOAD = re.compile(r"load time\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*ms")


def parse_load_ms(text: str) -> float:
    """llama.cpp's ``...: load time = 123.45 ms`` line (the last one)."""
    if not isinstance(text, str):
        raise DeviceOutputError(f"load log: expected text, got {type(text).__name__}")
    found = _LOAD.findall(text[-MAX_TEXT_CHARS:])
    if not found:
        raise DeviceOutputError("llama.cpp's log has no 'load time = ... ms' line")
    ms = float(found[-1])
    if not math.isfinite(ms) or ms > 1e9:
        raise DeviceOutputError(f"load time {ms} ms is not plausible")
    return ms


@dataclass(frozen=True)
class BenchTest:
    """One test object of llama-bench's JSON output."""

    n_prompt: int
    n_gen: int
    n_threads: int
    samples_ns: tuple[int, ...]
    avg_ts: float
    stddev_ts: float
    info: dict[str, Any] = field(default_factory=dict)   # the other scalar fields, strings bounded

    @property
    def kind(self) -> str:
        return "pp" if self.n_gen == 0 else ("tg" if self.n_prompt == 0 else "pg")

    @property
    def n_depth(self) -> int:
        d = self.info.get("n_depth", 0)
        return d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else 0

    def tokens_per_second(self) -> Summary:
        n = self.n_prompt + self.n_gen
        return Summary.from_values(n * 1e9 / ns for ns in self.samples_ns)


def _int(obj: dict, key: str, where: str, minimum: int = 0) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value > 1 << 62:
        raise DeviceOutputError(f"llama-bench output: {where} field '{key}' must be an integer >= {minimum}, "
                                f"got {str(value)[:60]!r}")
    return value


def _float(obj: dict, key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DeviceOutputError(f"llama-bench output: {where} field '{key}' must be a number >= 0, "
                                f"got {str(value)[:60]!r}")
    return float(value)


def parse_llama_bench_json(text: str) -> dict[str, BenchTest]:
    """llama-bench ``-o json`` output -> its tests by kind (``pp``, ``tg``, ``pg``)."""
    tests: dict[str, BenchTest] = {}
    for test in parse_llama_bench_tests(text):
        if test.kind in tests:
            raise DeviceOutputError(f"llama-bench output has two {test.kind} tests")
        tests[test.kind] = test
    return tests


def parse_llama_bench_tests(text: str) -> list[BenchTest]:
    """llama-bench ``-o json`` output -> its tests in order (several per kind with ``-d``: one per depth)."""
    text = _bounded(text, MAX_JSON_CHARS, "llama-bench's JSON output")
    if not text.strip():
        raise DeviceOutputError("llama-bench printed no JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeviceOutputError(f"llama-bench output is not valid JSON ({exc.msg} at line {exc.lineno} "
                                f"column {exc.colno})") from None
    if not isinstance(data, list) or not data:
        raise DeviceOutputError("llama-bench output is not a non-empty JSON list of tests")
    tests: list[BenchTest] = []
    seen: set[tuple] = set()
    for i, obj in enumerate(data):
        where = f"test {i + 1}"
        if not isinstance(obj, dict):
            raise DeviceOutputError(f"llama-bench output: {where} is not a JSON object")
        samples = obj.get("samples_ns")
        if (not isinstance(samples, list) or not samples or len(samples) > _MAX_SAMPLES
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 1 << 62 for s in samples)):
            raise DeviceOutputError(f"llama-bench output: {where} field 'samples_ns' must be a non-empty list "
                                    f"of positive integers")
        info = {k: (v[:200] if isinstance(v, str) else v) for k, v in obj.items()
                if isinstance(v, (str, int, float, bool)) and len(str(k)) <= 64}
        test = BenchTest(n_prompt=_int(obj, "n_prompt", where), n_gen=_int(obj, "n_gen", where),
                         n_threads=_int(obj, "n_threads", where, 1), samples_ns=tuple(samples),
                         avg_ts=_float(obj, "avg_ts", where), stddev_ts=_float(obj, "stddev_ts", where), info=info)
        if test.n_prompt + test.n_gen == 0:
            raise DeviceOutputError(f"llama-bench output: {where} has neither prompt nor generated tokens")
        ident = (test.kind, test.n_depth, test.info.get("type_k"), test.info.get("type_v"))
        if ident in seen:
            raise DeviceOutputError(f"llama-bench output has two {test.kind} tests at depth {test.n_depth}")
        seen.add(ident)
        tests.append(test)
    return tests


def parse_cpu_topology(text: str) -> int:
    """Big cores from ``policy <cpus> : <max kHz>`` and ``online <ranges>`` lines (``cpu_topology_command``).

    Big = every online CPU outside the slowest cpufreq cluster (the rule of
    ``devices.facts.big_core_count``); with one cluster (or no cpufreq), every
    online CPU.  On a 1+3+4 phone that is 4.
    """
    text = _bounded(text, MAX_TEXT_CHARS, "the CPU topology")
    policies: list[tuple[set[int], int]] = []
    online: set[int] = set()
    for line in text.replace("\r\n", "\n").splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "policy" and ":" in words:
            colon = words.index(":")
            cpus = {int(w) for w in words[1:colon] if w.isdigit() and len(w) < 5}
            freq = words[colon + 1] if colon + 1 < len(words) else ""
            if cpus and freq.isdigit() and len(freq) < 12:
                policies.append((cpus, int(freq)))
        elif len(words) == 2 and words[0] == "online":
            online = _cpu_ranges(words[1])
    clusters = [Cluster(tuple(sorted(cpus & online if online else cpus)), freq) for cpus, freq in policies]
    big = big_core_count([c for c in clusters if c.cpus])
    if big:
        return big
    if online:
        return len(online)
    if policies:
        return len(set().union(*(cpus for cpus, _freq in policies)))
    raise DeviceOutputError(f"cannot tell the device's CPUs from {text[:200]!r}")


def _cpu_ranges(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()) and len(lo) < 5 and len(hi) < 5:
            a, b = int(lo), int(hi or lo)
            if a <= b:
                out.update(range(a, b + 1))
    return out


CPU_TOPOLOGY_COMMAND = (
    "cd /sys/devices/system/cpu 2>/dev/null || exit 0; "
    "for p in cpufreq/policy*; do [ -r \"$p/related_cpus\" ] && "
    "echo \"policy $(cat \"$p/related_cpus\") : $(cat \"$p/cpuinfo_max_freq\" 2>/dev/null)\"; done; "
    "echo \"online $(cat online 2>/dev/null)\""
)


def big_cores(transport: Transport, timeout: float = 30.0) -> int:
    """The number of big cores: the default thread count on a device."""
    result = transport.shell(CPU_TOPOLOGY_COMMAND, timeout)
    return parse_cpu_topology(result.stdout)


# ---------------------------------------------------------------------------
# running


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


def failure(run: MeasuredRun, what: str) -> BenchError | None:
    """The BenchError for a run that did not succeed, None for one that did."""
    status = classify_exit(run.exit_code, timed_out=run.timed_out, shell=True)
    if status is RungStatus.OK:
        return None
    if status is RungStatus.TIMEOUT:
        return BenchError("timeout", f"{what} did not finish within {run.deadline_s:g} s on the device and was "
                                     f"stopped; raise bench.timeout or lower n_prompt/n_gen/repetitions")
    sig = run.signal
    detail = run.last_error()
    if status is RungStatus.OOM:
        return BenchError("oom", f"{what} was killed (SIGKILL), most likely by the kernel's OOM killer or "
                                 f"Android's low-memory killer; free memory on the device or try a smaller model "
                                 f"or n_prompt")
    if status is RungStatus.CRASHED:
        hint = (" (an instruction this CPU does not support: use a runner built for an older baseline, or "
                "repack off where repacked kernels need one)" if sig == signal.SIGILL else "")
        return BenchError("crashed", f"{what} crashed with {signal_name(sig)}" + (f": {detail}" if detail else "")
                          + hint)
    return BenchError("failed", f"{what} exited with status {run.exit_code}"
                                + (f": {detail}" if detail else ": no error message"))


@dataclass(frozen=True)
class DeviceBenchResult:
    """One GGUF measured on a device; the figures have the host rows' names and units."""

    pp: Summary | None            # tokens/s per repetition
    tg: Summary | None
    ttft_ms: Summary | None       # the pp prompt's prefill time per repetition
    load_s: float | None          # model load + first context (see the module doc), None if not measured
    peak_rss_bytes: int           # Max RSS of the llama-bench process (time -v; else the last VmHWM seen)
    peak_rss_anon_bytes: int      # largest RssAnon seen by the poller
    peak_rss_file_bytes: int      # largest RssFile seen by the poller
    vmhwm_bytes: int
    rss_samples: int              # how many /proc samples the anon/file maxima come from
    threads: int
    repack: bool | None
    n_params: int
    model_size_bytes: int
    build_commit: str
    cpu_info: str
    backends: str
    command: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    cache_type: str = "f16"
    # depth -> (pp, tg, ttft_ms) with ``-d``; pp/tg/ttft_ms above are the first depth's
    by_depth: dict[int, tuple[Summary | None, Summary | None, Summary | None]] = field(default_factory=dict)
    power: list[tuple[float, float]] | None = None   # (uptime s, watts) during the run, when sampled
    tg_seconds: float | None = None                  # the tg test's timed seconds (its repetitions together)
    tg_tokens: int = 0                               # tokens the tg test generated in them
    contention: Any = None        # the other load on the device during the llama-bench run (None: unknown)


def measure_load(transport: Transport, runner: RemoteRunner, model: str, settings: BenchSettings, threads: int,
                 workdir: str, repack: bool | None = None, poll_interval: float = 0.1) -> float:
    """Seconds llama.cpp takes on the device to load ``model`` and create a context (see the module doc)."""
    name = posixpath.basename(model)
    run = run_measured(transport, runner.tool(BENCH_TOOL) + load_probe_args(model, settings, threads, repack),
                       workdir, env=runner.env(), time_cmd=runner.time_cmd, poll_interval=poll_interval,
                       deadline_s=settings.timeout, stderr_limit=MAX_TEXT_CHARS)
    err = failure(run, f"{BENCH_TOOL} (load time of {name})")
    if err is not None:
        raise err
    try:
        total_ms = parse_load_ms(run.stderr_tail)
        tests = parse_llama_bench_json(run.stdout)
    except DeviceOutputError as exc:
        raise BenchError("failed", f"{name}: {exc}") from None
    first_decode_ms = next(iter(tests.values())).samples_ns[0] / 1e6
    if first_decode_ms > total_ms:
        raise BenchError("failed", f"{name}: llama.cpp's load time ({total_ms:.2f} ms) is shorter than the first "
                                   f"decode it includes ({first_decode_ms:.2f} ms)")
    return (total_ms - first_decode_ms) / 1000.0


def run_device_bench(transport: Transport, runner: RemoteRunner, model: str, settings: BenchSettings, *,
                     workdir: str, threads: int | None = None, repack: bool | None = None,
                     with_load_time: bool = True, poll_interval: float = 0.1,
                     on_progress: Callable[[str], None] | None = None,
                     depths: tuple[int, ...] = (0,), cache_type: str = "f16",
                     power_dir: str | None = None) -> DeviceBenchResult:
    """Measure ``model`` (a path on the device) with ``settings``; ``BenchError`` when it does not finish.

    ``threads`` defaults to ``settings.threads`` or, when that is 0, the
    device's big cores.  ``repack`` defaults to ``device_repack(settings)``.
    ``depths`` and ``cache_type``: llama-bench's own ``-d`` and ``-ctk/-ctv``
    in the one invocation (``by_depth`` holds each depth's figures; the memory
    figures are the invocation's, its deepest context included).
    """
    progress = on_progress or (lambda _p: None)
    name = posixpath.basename(model)
    if threads is None:
        threads = settings.threads if settings.threads > 0 else big_cores(transport)
    if repack is None:
        repack = device_repack(settings)
    load_s = None
    if with_load_time:
        progress("load")
        load_s = measure_load(transport, runner, model, settings, threads, workdir, repack, poll_interval)
    progress("bench")
    argv = runner.tool(BENCH_TOOL) + llama_bench_args(model, settings, threads, repack, depths, cache_type)
    run = run_measured(transport, argv, workdir, env=runner.env(), time_cmd=runner.time_cmd,
                       poll_interval=poll_interval, deadline_s=settings.timeout, power_dir=power_dir)
    err = failure(run, f"{BENCH_TOOL} on {name}")
    if err is not None:
        raise err
    try:
        all_tests = parse_llama_bench_tests(run.stdout)
    except DeviceOutputError as exc:
        raise BenchError("failed", f"{name}: {exc}") from None
    by_depth: dict[int, tuple[Summary | None, Summary | None, Summary | None]] = {}
    for depth in depths:
        tests = {t.kind: t for t in all_tests if t.n_depth == int(depth)}
        at = f" at depth {depth}" if tuple(depths) != (0,) else ""
        wanted = {"pp": settings.n_prompt, "tg": settings.n_gen}
        for kind, n in wanted.items():
            test = tests.get(kind)
            if n > 0 and (test is None or (test.n_prompt if kind == "pp" else test.n_gen) != n):
                raise BenchError("failed", f"{name}: llama-bench's output has no {kind} test of {n} tokens{at}")
            if test is not None and len(test.samples_ns) != settings.repetitions:
                raise BenchError("failed", f"{name}: llama-bench's {kind} test{at} has {len(test.samples_ns)} "
                                           f"samples, expected {settings.repetitions}")
            if test is not None and cache_type != "f16" and test.info.get("type_k", cache_type) != cache_type:
                raise BenchError("failed", f"{name}: llama-bench ran the {kind} test with a "
                                           f"{test.info.get('type_k')} K cache, not {cache_type}")
        pp_d, tg_d = tests.get("pp"), tests.get("tg")
        by_depth[int(depth)] = (pp_d.tokens_per_second() if pp_d else None, tg_d.tokens_per_second() if tg_d else None,
                                Summary.from_values(ns / 1e6 for ns in pp_d.samples_ns) if pp_d else None)
    tests = {t.kind: t for t in all_tests if t.n_depth == int(depths[0])}
    pp, tg = tests.get("pp"), tests.get("tg")
    first = pp or tg
    last_tg = next((t for t in reversed(all_tests) if t.kind == "tg"), None)   # the run's last test
    progress("done")
    return DeviceBenchResult(
        pp=pp.tokens_per_second() if pp else None,
        tg=tg.tokens_per_second() if tg else None,
        ttft_ms=Summary.from_values(ns / 1e6 for ns in pp.samples_ns) if pp else None,
        load_s=load_s,
        peak_rss_bytes=run.peak_rss_kib * 1024,
        peak_rss_anon_bytes=run.rss_anon_kib * 1024,
        peak_rss_file_bytes=run.rss_file_kib * 1024,
        vmhwm_bytes=run.vmhwm_kib * 1024,
        rss_samples=run.polls,
        threads=threads,
        repack=repack,
        n_params=int(first.info.get("model_n_params", 0) or 0),
        model_size_bytes=int(first.info.get("model_size", 0) or 0),
        build_commit=str(first.info.get("build_commit", "")),
        cpu_info=str(first.info.get("cpu_info", "")),
        backends=str(first.info.get("backends", "")),
        command=" ".join(quote(a) for a in argv),
        raw={kind: {**t.info, "samples_ns": list(t.samples_ns)} for kind, t in tests.items()},
        cache_type=cache_type,
        by_depth=by_depth,
        power=run.power,
        tg_seconds=sum(last_tg.samples_ns) / 1e9 if last_tg else None,
        tg_tokens=last_tg.n_gen * len(last_tg.samples_ns) if last_tg else 0,
        contention=run.contention,
    )
