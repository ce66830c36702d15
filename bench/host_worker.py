"""Measure one GGUF file on this host, in this process, the way llama-bench does.

Run as ``python -m edgequant.bench.host_worker``: it reads one JSON request on
stdin and writes one JSON line on stdout, either the result or
``{"error": "..."}`` (then the exit code is 1).  Progress goes to stderr as
lines ``progress <phase> [i/n]``.  Anything llama.cpp prints goes to stderr:
file descriptor 1 is pointed at stderr before llama.cpp is loaded and the
result is written to a private duplicate of the original stdout.

The request (``edgequant.bench.host`` builds it)::

    {"path": str, "threads": int, "n_prompt": int, "n_gen": int,
     "repetitions": int, "warmup": int, "n_batch": int, "n_ubatch": int,
     "flash_attn": "auto"|"on"|"off", "mmap": bool,
     "repack": bool or null (optional; null = see ``resolve_repack``),
     "seed": int (optional), "sample_interval_s": float (optional),
     "verbose": bool (optional: forward llama.cpp's log to stderr),
     "variants": [{"n_depth": int, "cache_type": str, "flash_attn": str}, ...] (optional)}

Variants (llama-bench ``-d`` and ``-ctk/-ctv``): with ``variants`` every one
of them runs the pp and tg tests on the same loaded model (llama-bench reloads
a model only when a model parameter changes; depth and cache type are context
parameters).  A variant's contexts hold ``n_prompt + n_depth`` (pp) and
``n_gen + n_depth`` (tg) cells with K and V of ``cache_type``; before each
repetition ``n_depth`` random tokens (BOS first) fill the context, outside the
clock, and the state they leave is saved and restored for the next repetition
instead of being decoded again, as llama-bench does.  The warm-up runs from an
empty context.  Each variant's result carries its own pp/tg/TTFT samples and
the largest ``RssAnon``/``RssFile`` seen while its contexts existed (the KV
cache is anonymous memory), and ``peak_rss_bytes`` = their sum; the top-level
figures are the first variant's.

Method (mirrors ``tools/llama-bench/llama-bench.cpp`` of the vendored llama.cpp):

* The model is loaded once.  Each test gets its own context built like
  llama-bench's ``to_llama_cparams``: ``n_ctx = n_prompt`` for the pp test and
  ``n_ctx = n_gen`` for the tg test, the given ``n_batch``/``n_ubatch``, F16 K/V
  cache, ``flash_attn_type`` from the request, ``swa_full = false``,
  ``n_threads = n_threads_batch = threads``.
* pp (prompt processing): warm-up = one full prompt run (``warmup`` times; 0 =
  none); then ``repetitions`` times: clear the memory, start the clock, decode
  ``n_prompt`` tokens in chunks of ``n_batch`` (the first token is BOS if the
  vocabulary adds one, the rest random), ``llama_synchronize``, stop the clock.
  pp t/s = n_prompt / seconds.
* tg (text generation): warm-up = decode one token; then ``repetitions`` times:
  clear the memory, start the clock, ``n_gen`` single-token decodes (BOS first,
  then random tokens), each followed by ``llama_synchronize``, stop the clock.
  tg t/s = n_gen / seconds.
* Tokens come from a seeded RNG and are drawn before the clock starts:
  tokenization and sampling are excluded, as in llama-bench.

What each number in the result is:

* ``load_s``: wall seconds for ``llama_model_load_from_file`` plus creating the
  first context (the pp context), as a user waiting for the first prompt sees it.
  With ``mmap`` the file's pages may already be in the page cache, so this is a
  warm-cache figure unless the caller dropped caches.
* ``pp_tps``, ``tg_tps``: tokens per second of each repetition, as above.
* ``ttft_ms``: for each pp repetition, milliseconds from the first decode call
  until the logits of the last prompt token are ready (``llama_synchronize``
  returned): the time to first token for an ``n_prompt``-token prompt,
  excluding tokenization and sampling.  It is the same clock as ``pp_tps``.
* ``contention``: the other load on the machine from the first pp warm-up to
  the last tg repetition (``edgequant.devices.contention``): /proc/stat's busy
  time (steal included) minus this process's own CPU time, in cores.
* ``peak_rss_bytes``: ``VmHWM`` from ``/proc/self/status`` read at the end, the
  kernel's exact high-water mark of this process's resident set (anonymous +
  file-backed + shared memory), including the Python interpreter.
* ``peak_rss_anon_bytes``: the largest ``RssAnon`` seen (heap: KV cache, compute
  buffers, weights copied or repacked out of the file, the interpreter).
* ``peak_rss_file_bytes``: the largest ``RssFile`` seen (resident pages of
  mapped files: with mmap, the GGUF weights that were touched, plus shared
  libraries).
  Both are maxima of samples of ``/proc/self/status`` taken by a background
  thread every ``sample_interval_s`` (default 10 ms; the ctypes calls release
  the GIL) and at the end of each phase, so they can miss a short peak;
  ``VmHWM`` cannot.  The thread runs SCHED_IDLE: at normal priority its
  wake-ups cost 1-2 % of tg throughput on a 2-core host (measured), idle
  priority removes that bias, at the price of fewer samples while every core
  is decoding (about 20/s instead of 100/s there).  llama.cpp allocates the KV
  cache and compute buffers when a context is created, so the anonymous peak
  is reached at a phase boundary, where a sample is always taken; on the
  development host peak anon + peak file matched ``VmHWM`` to within 0.1 %.
  ``rss_samples`` counts the samples.
* ``baseline_rss_bytes``: ``VmRSS`` before the model was loaded (interpreter
  and libraries), to subtract if wanted.
"""

from __future__ import annotations

import collections
import ctypes
import glob
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from edgequant.bench.memory import RssSampler, read_status
from edgequant.bench.worker import WorkerError, serve
from edgequant.devices.contention import Window

# ggml's log levels (ggml.h enum ggml_log_level)
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5

_REQUIRED = {"path": str, "threads": int, "n_prompt": int, "n_gen": int, "repetitions": int,
             "warmup": int, "n_batch": int, "n_ubatch": int, "flash_attn": str, "mmap": bool}


# ---------------------------------------------------------------------------
# llama.cpp


class WorkerLog:
    """Receives llama.cpp's log: keeps the last warnings/errors, optionally echoes to stderr."""

    def __init__(self, llama_cpp, echo: bool):
        self.tail: collections.deque[str] = collections.deque(maxlen=8)
        self._keep_cont = False
        self._echo = echo

        def on_log(level: int, text: bytes, _user: Any) -> None:
            message = (text or b"").decode("utf-8", "replace")
            if echo:
                sys.stderr.write(message)
            if level in (_LOG_WARN, _LOG_ERROR):
                self.tail.append(message.strip())
                self._keep_cont = True
            elif level == _LOG_CONT and self._keep_cont and self.tail:
                self.tail[-1] = (self.tail[-1] + " " + message.strip()).strip()
            else:
                self._keep_cont = False

        # the ctypes callback must stay referenced as long as llama.cpp may call it
        self.callback = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))

    def reset(self) -> None:
        self.tail.clear()
        self._keep_cont = False

    def cause(self) -> str:
        """The first warning/error since ``reset()``: the root cause; later lines only wrap it."""
        lines = [t for t in self.tail if t]
        return lines[0] if lines else ""


@dataclass
class _Vocab:
    n_tokens: int
    add_bos: bool
    bos: int


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return any(line.startswith("flags") and " amx_int8" in line for line in fh)
    except OSError:
        return False


def resolve_repack(llama_cpp, requested: bool | None) -> tuple[bool, str]:
    """Whether to use llama.cpp's extra weight buffers (llama-bench ``--repack``), and why.

    The default is llama.cpp's (``use_extra_bufts``, on), except where the
    library was built with AMX kernels and the CPU has AMX: there the AMX
    buffer takes the weights and its matmul crashes on some machines
    (llama.cpp issue #20824, a segfault in ``ggml_backend_amx_mul_mat``,
    reproduced with Gemma 3 Q4_K_M on this project's development hosts).
    Turning it off disables the CPU_REPACK buffer too; llama-bench's
    ``--repack 0`` is the same setting.
    """
    if requested is not None:
        return bool(requested), "requested"
    default = bool(llama_cpp.llama_model_default_params().use_extra_bufts)
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    if default and "AMX_INT8 = 1" in system_info and _cpu_has_amx():
        return False, "auto: off on AMX CPUs (llama.cpp #20824)"
    return default, "auto: llama.cpp default"


def cache_type_id(name: str) -> int:
    """A KV cache type by ggml's name (``f16``, ``q8_0``) -> its ggml_type value (gguf mirrors ggml's enum)."""
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise WorkerError(f"unknown KV cache type {name!r}") from None


def flash_attn_id(llama_cpp, name: str) -> int:
    table = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
             "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
             "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
    try:
        return table[name]
    except KeyError:
        raise WorkerError(f"flash_attn must be one of {', '.join(table)}, got {name!r}") from None


class Bench:
    """One loaded model and the llama-bench tests run on it."""

    def __init__(self, llama_cpp, req: dict, log: WorkerLog, progress: Callable[[str], None]):
        self.L = llama_cpp
        self.req = req
        self.log = log
        self.progress = progress
        self.threads = req["threads"]
        self.rng = random.Random(req.get("seed", 1))
        self.model = None
        self.repack, self.repack_reason = resolve_repack(llama_cpp, req.get("repack"))

    # -- setup ------------------------------------------------------------

    def load_model(self) -> None:
        L = self.L
        mparams = L.llama_model_default_params()
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP if self.req["mmap"] else L.LLAMA_LOAD_MODE_NONE
        mparams.use_extra_bufts = self.repack
        mparams.vocab_only = bool(self.req.get("vocab_only", False))
        self.log.reset()
        self.model = L.llama_model_load_from_file(os.fsencode(self.req["path"]), mparams)
        if not self.model:
            detail = self.log.cause() or "llama.cpp could not load it"
            raise WorkerError(f"cannot load model {self.req['path']}: {detail}")
        vocab = L.llama_model_get_vocab(self.model)
        self.vocab = _Vocab(n_tokens=L.llama_vocab_n_tokens(vocab),
                            add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
                            bos=L.llama_vocab_bos(vocab))

    def new_context(self, n_ctx: int, variant: dict | None = None):
        """A context configured like llama-bench's ``to_llama_cparams`` (``variant``: cache type, flash attention)."""
        L, req = self.L, self.req
        variant = variant or {}
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = req["n_batch"]
        cp.n_ubatch = req["n_ubatch"]
        cp.type_k = cp.type_v = cache_type_id(variant.get("cache_type", "f16"))
        cp.offload_kqv = True
        cp.flash_attn_type = flash_attn_id(L, variant.get("flash_attn", req["flash_attn"]))
        cp.embeddings = False
        cp.op_offload = True
        cp.swa_full = False
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        self.log.reset()
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            detail = self.log.cause() or "llama_init_from_model returned NULL"
            raise WorkerError(f"cannot create a context (n_ctx={n_ctx}) for {req['path']}: {detail}")
        L.llama_set_n_threads(ctx, self.threads, self.threads)
        return ctx

    def clear(self, ctx) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), False)

    # -- token streams, drawn before the clock starts ------------------------

    def _token(self, first: bool) -> int:
        if first and self.vocab.add_bos:
            return self.vocab.bos
        return self.rng.randrange(self.vocab.n_tokens)

    def prompt_batches(self, n_prompt: int, n_batch: int) -> list:
        """Batches of up to n_batch tokens; keeps the token arrays alive with them."""
        batches = []
        done = 0
        while done < n_prompt:
            n = min(n_prompt - done, n_batch)
            arr = (self.L.llama_token * n)(*[self._token(done == 0 and i == 0) for i in range(n)])
            batches.append((arr, self.L.llama_batch_get_one(arr, n)))
            done += n
        return batches

    def gen_batches(self, n_gen: int) -> list:
        batches = []
        for i in range(n_gen):
            arr = (self.L.llama_token * 1)(self._token(i == 0))
            batches.append((arr, self.L.llama_batch_get_one(arr, 1)))
        return batches

    # -- the timed loops ------------------------------------------------------

    def _decode(self, ctx, batch, what: str) -> None:
        rc = self.L.llama_decode(ctx, batch)
        if rc != 0:
            detail = self.log.cause()
            raise WorkerError(f"llama_decode returned {rc} during {what}" + (f": {detail}" if detail else ""))

    def run_prompt(self, ctx, batches, what: str) -> float:
        """Decode the prompt batches and wait for the result; returns seconds."""
        L = self.L
        self.log.reset()
        t0 = time.perf_counter_ns()
        for _arr, batch in batches:
            self._decode(ctx, batch, what)
        L.llama_synchronize(ctx)
        return (time.perf_counter_ns() - t0) / 1e9

    def run_gen(self, ctx, batches, what: str) -> float:
        """One decode + synchronize per token; returns seconds."""
        L = self.L
        self.log.reset()
        t0 = time.perf_counter_ns()
        for _arr, batch in batches:
            self._decode(ctx, batch, what)
            L.llama_synchronize(ctx)
        return (time.perf_counter_ns() - t0) / 1e9

    # -- depth: the context filled before the clock starts (llama-bench -d) -------

    def fill_depth(self, ctx, depth: int) -> None:
        """Clear the memory, then put ``depth`` tokens in it: restored from the state saved the first
        time (as llama-bench does), or decoded when there is none or it does not fit this context."""
        L = self.L
        self.clear(ctx)
        if depth > 0:
            state = self._depth_state
            if state is None or state[0] != depth or L.llama_state_seq_set_data(ctx, state[1], len(state[1]), 0) == 0:
                self.clear(ctx)
                self.run_prompt(ctx, self.prompt_batches(depth, self.req["n_batch"]),
                                f"filling the context to depth {depth}")
                size = L.llama_state_seq_get_size(ctx, 0)
                buf = (ctypes.c_uint8 * size)()
                L.llama_state_seq_get_data(ctx, buf, size, 0)
                self._depth_state = (depth, buf)
        # what llama.cpp holds before the timed test (position of the last token + 1), reported as is
        self.depth_seen = L.llama_memory_seq_pos_max(L.llama_get_memory(ctx), 0) + 1

    _depth_state: tuple[int, Any] | None = None
    depth_seen: int = 0

    # -- the tests --------------------------------------------------------------

    def test_pp(self, ctx, depth: int = 0) -> tuple[list[float], list[float]]:
        req = self.req
        n_prompt, n_batch, reps = req["n_prompt"], req["n_batch"], req["repetitions"]
        self.clear(ctx)
        for i in range(req["warmup"]):
            self.progress(f"warmup pp {i + 1}/{req['warmup']}")
            self.clear(ctx)
            self.run_prompt(ctx, self.prompt_batches(n_prompt, n_batch), "the pp warm-up")
        tps, ttft = [], []
        for i in range(reps):
            self.progress(f"pp {i + 1}/{reps}")
            batches = self.prompt_batches(n_prompt, n_batch)
            self.fill_depth(ctx, depth)
            seconds = self.run_prompt(ctx, batches, f"pp repetition {i + 1}")
            tps.append(n_prompt / seconds)
            ttft.append(seconds * 1000.0)
        return tps, ttft

    def test_tg(self, ctx, depth: int = 0) -> list[float]:
        req = self.req
        n_gen, reps = req["n_gen"], req["repetitions"]
        self.clear(ctx)
        for i in range(req["warmup"]):
            self.progress(f"warmup tg {i + 1}/{req['warmup']}")
            self.clear(ctx)
            self.run_gen(ctx, self.gen_batches(1), "the tg warm-up")
        tps = []
        for i in range(reps):
            self.progress(f"tg {i + 1}/{reps}")
            batches = self.gen_batches(n_gen)
            self.fill_depth(ctx, depth)
            seconds = self.run_gen(ctx, batches, f"tg repetition {i + 1}")
            tps.append(n_gen / seconds)
        return tps


def _check_request(req: Any) -> dict:
    if not isinstance(req, dict):
        raise WorkerError("the request must be a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in req:
            raise WorkerError(f"the request has no '{key}'")
        value = req[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise WorkerError(f"request field '{key}' must be {kind.__name__}, got {value!r}")
    for key in ("threads", "repetitions", "n_batch", "n_ubatch"):
        if req[key] < 1:
            raise WorkerError(f"request field '{key}' must be >= 1, got {req[key]}")
    for key in ("n_prompt", "n_gen", "warmup"):
        if req[key] < 0:
            raise WorkerError(f"request field '{key}' must be >= 0, got {req[key]}")
    if req.get("repack") is not None and not isinstance(req["repack"], bool):
        raise WorkerError(f"request field 'repack' must be true, false or null, got {req['repack']!r}")
    if req["n_prompt"] == 0 and req["n_gen"] == 0:
        raise WorkerError("nothing to measure: n_prompt and n_gen are both 0")
    variants = req.get("variants")
    if variants is not None:
        if not isinstance(variants, list):
            raise WorkerError("request field 'variants' must be a list")
        for v in variants:
            if (not isinstance(v, dict) or not isinstance(v.get("n_depth", 0), int) or v.get("n_depth", 0) < 0
                    or not isinstance(v.get("cache_type", "f16"), str)):
                raise WorkerError(f"request field 'variants' has an unusable entry {v!r}")
    return req


def measure(req: dict, progress: Callable[[str], None]) -> dict:
    """Run the pp and tg tests for ``req``; returns the result object."""
    baseline = read_status(("VmRSS",)).get("VmRSS", 0)
    import llama_cpp as L  # loaded after stdout was redirected, so its output cannot pollute it

    log = WorkerLog(L, echo=bool(req.get("verbose", False)))
    L.llama_backend_init()
    bench = Bench(L, req, log, progress)
    sys.stderr.write(f"config repack={int(bench.repack)} ({bench.repack_reason})\n")
    variants = req.get("variants") or [{"n_depth": 0, "cache_type": "f16", "flash_attn": req["flash_attn"]}]
    done: list[dict] = []
    ctx = None
    with RssSampler(float(req.get("sample_interval_s", 0.010))) as sampler:
        try:
            progress("load")
            t0 = time.perf_counter_ns()
            bench.load_model()
            with Window() as window:    # the other load on the machine while the tests ran
                for vi, variant in enumerate(variants):
                    depth = int(variant.get("n_depth", 0))
                    tag = "" if len(variants) == 1 else f" [{vi + 1}/{len(variants)}]"
                    bench.progress = (lambda text, tag=tag: progress(text + tag)) if tag else progress
                    bench._depth_state, bench.depth_seen = None, -1
                    sampler.start_window()
                    pp_tps: list[float] = []
                    ttft_ms: list[float] = []
                    tg_tps: list[float] = []
                    first_n_ctx = (req["n_prompt"] if req["n_prompt"] > 0 else req["n_gen"]) + depth
                    ctx = bench.new_context(first_n_ctx, variant)
                    if vi == 0:
                        load_s = (time.perf_counter_ns() - t0) / 1e9
                    sampler.sample()
                    if req["n_prompt"] > 0:
                        pp_tps, ttft_ms = bench.test_pp(ctx, depth)
                        sampler.sample()
                        L.llama_free(ctx)
                        ctx = None
                    if req["n_gen"] > 0:
                        if ctx is None:
                            ctx = bench.new_context(req["n_gen"] + depth, variant)
                        tg_tps = bench.test_tg(ctx, depth)
                        sampler.sample()
                    L.llama_free(ctx)
                    ctx = None
                    done.append({**variant, "n_depth": depth, "context_before_test": bench.depth_seen,
                                 "pp_tps": pp_tps, "tg_tps": tg_tps, "ttft_ms": ttft_ms,
                                 "peak_rss_anon_bytes": sampler.window_anon,
                                 "peak_rss_file_bytes": sampler.window_file,
                                 "peak_rss_bytes": sampler.window_anon + sampler.window_file})
            bench.progress = progress
            status = read_status()
            n_params = int(L.llama_model_n_params(bench.model))
            model_size = int(L.llama_model_size(bench.model))
        finally:
            if ctx is not None:
                L.llama_free(ctx)
            if bench.model:
                L.llama_model_free(bench.model)
    progress("done")
    first = done[0]
    return {
        "load_s": load_s,
        "pp_tps": first["pp_tps"],
        "tg_tps": first["tg_tps"],
        "ttft_ms": first["ttft_ms"],
        "variants": done if req.get("variants") else [],
        "peak_rss_bytes": status["VmHWM"],
        "peak_rss_anon_bytes": sampler.peak_anon,
        "peak_rss_file_bytes": sampler.peak_file,
        "baseline_rss_bytes": baseline,
        "rss_samples": sampler.samples,
        "n_params": n_params,
        "model_size_bytes": model_size,
        "n_vocab": bench.vocab.n_tokens,
        "threads": req["threads"],
        "repack": bench.repack,
        "repack_reason": bench.repack_reason,
        "contention": window.result.as_dict() if window.result is not None else None,
        "request": req,
        "runtime_version": L.__version__,
        "system_info": L.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


# ---------------------------------------------------------------------------
# sustained runs ([sustained]): back-to-back generation, the host's thermal state after each


def host_thermal() -> dict[str, Any]:
    """The hottest readable temperature (``/sys/class/thermal/thermal_zone*/temp`` in millidegrees, and
    psutil's sensors) with its sensor, and the current clock of the fastest CPU cluster in kHz
    (``cpufreq/policy*``; else psutil's highest per-CPU figure).  ``None`` where nothing is readable."""

    import psutil

    best: tuple[float, str] | None = None
    for zone in glob.glob("/sys/class/thermal/thermal_zone*"):
        try:
            with open(zone + "/temp") as fh:
                value = int(fh.read().strip()) / 1000.0
            with open(zone + "/type") as fh:
                name = fh.read().strip()
        except (OSError, ValueError):
            continue
        if -50 < value < 200 and (best is None or value > best[0]):
            best = (value, name)
    try:
        for chip, entries in (psutil.sensors_temperatures() or {}).items():
            for e in entries:
                if e.current is not None and -50 < e.current < 200 and (best is None or e.current > best[0]):
                    best = (float(e.current), f"{chip}/{e.label or 'temp'}")
    except (AttributeError, OSError):
        pass
    khz = None
    policies = []
    for pol in glob.glob("/sys/devices/system/cpu/cpufreq/policy*"):
        try:
            with open(pol + "/cpuinfo_max_freq") as fh:
                top = int(fh.read())
            with open(pol + "/scaling_cur_freq") as fh:
                policies.append((top, int(fh.read())))
        except (OSError, ValueError):
            continue
    if policies:
        khz = max(policies)[1]
    else:
        freqs = [f.current for f in (psutil.cpu_freq(percpu=True) or []) if f.current]
        khz = int(max(freqs) * 1000) if freqs else None
    return {"celsius": best[0] if best else None, "sensor": best[1] if best else None, "cpu_khz": khz,
            "thermal_status": None}


def measure_sustained(req: dict, progress: Callable[[str], None]) -> dict:
    """``runs`` generation tests of ``n_gen`` tokens back to back on one loaded model and one context
    (cleared before each run), no cool-down; the thermal state is read after each run."""
    import llama_cpp as L

    spec = req["sustained"]
    runs, n_gen = int(spec["runs"]), int(spec["n_gen"])
    log = WorkerLog(L, echo=bool(req.get("verbose", False)))
    L.llama_backend_init()
    bench = Bench(L, req, log, progress)
    ctx = None
    out: list[dict[str, Any]] = []
    try:
        progress("load")
        bench.load_model()
        ctx = bench.new_context(n_gen)
        start = host_thermal()
        for i in range(runs):
            progress(f"sustained {i + 1}/{runs}")
            batches = bench.gen_batches(n_gen)
            bench.clear(ctx)
            seconds = bench.run_gen(ctx, batches, f"sustained run {i + 1}")
            out.append({"run": i + 1, "tg_tps": n_gen / seconds, **host_thermal()})
    finally:
        if ctx is not None:
            L.llama_free(ctx)
        if bench.model:
            L.llama_model_free(bench.model)
    progress("done")
    return {"sustained": out, "before": start, "n_gen": n_gen, "threads": req["threads"],
            "runtime_version": L.__version__}


def main() -> int:
    def handle(request, progress):
        req = _check_request(request)
        return measure_sustained(req, progress) if req.get("sustained") else measure(req, progress)

    return serve(handle)


if __name__ == "__main__":
    sys.exit(main())
