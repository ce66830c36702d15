"""Benchmark a GGUF on a device with the runner's llama-bench, through a ``Transport``.

The program runs as a measured command (``edgequant.devices.measured.run_measured``: ``toybox time -v``
and a ``/proc`` poller, with the deadline, peak memory and the other load on the device); what this module
adds is llama-bench's: its arguments, its JSON parsed as untrusted text, and its load time::

    cd WORKDIR && LD_LIBRARY_PATH=RUNNER/lib toybox time -v sh -c POLLER sh 0.1 N  RUNNER/bin/llama-bench ARGS

Outcomes map like the host runner's (``edgequant.core.status.classify_exit``): SIGKILL -> ``oom`` (the
kernel's OOM killer and Android's lmkd both send it), another signal -> ``crashed``, past the deadline ->
``timeout``, a non-zero exit -> ``failed``.

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

"""

from __future__ import annotations

import json
import math
import posixpath
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

from edgequant.bench.stats import Summary
from edgequant.core.errors import BenchError
from edgequant.core.status import RungStatus, classify_exit, signal_name
from edgequant.devices.facts import big_cores
from edgequant.devices.measured import (DEFAULT_TIME, MAX_JSON_CHARS, MAX_TEXT_CHARS, DeviceOutputError, MeasuredRun,
                                        bounded, run_measured)
from edgequant.devices.transport import Transport, quote
from edgequant.profiles import BenchSettings
from edgequant.profiles.variants import BenchVariant

BENCH_TOOL = "llama-bench"
_MAX_SAMPLES = 100_000


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


# ---------------------------------------------------------------------------
# parsing what comes back (untrusted)


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
    text = bounded(text, MAX_JSON_CHARS, "llama-bench's JSON output")
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


# ---------------------------------------------------------------------------
# running


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
