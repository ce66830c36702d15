"""Benchmark a GGUF file on this host, in a child process, the way llama-bench does.

The measurement itself lives in ``edgequant.bench.host_worker`` (see its
docstring for the method and the exact meaning of every number).  This module
runs the worker (through ``edgequant.bench.worker``, which enforces the timeout)
and turns the way it ended into a ``HostBenchResult`` or a ``BenchError`` whose status is
one of ``failed`` (the worker reported an error), ``crashed`` (killed by a
signal other than SIGKILL), ``oom`` (SIGKILL, which is what the kernel's OOM
killer sends) or ``timeout``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgequant.bench import worker
from edgequant.devices.contention import Contention
from edgequant.bench.stats import Summary
from edgequant.bench.sustained import SustainedRun
from edgequant.bench.worker import WorkerExit
from edgequant.core.errors import BenchError
from edgequant.core.status import RungStatus, signal_name
from edgequant.profiles import BenchSettings

WORKER_MODULE = "edgequant.bench.host_worker"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class VariantResult:
    """One variant (context depth, KV cache type) of a rung, measured on the model loaded for the rung."""

    n_depth: int
    cache_type: str
    flash_attn: str
    pp: Summary
    tg: Summary
    ttft_ms: Summary
    peak_rss_bytes: int
    peak_rss_anon_bytes: int
    peak_rss_file_bytes: int

    @classmethod
    def from_worker(cls, data: dict[str, Any]) -> "VariantResult":
        return cls(n_depth=int(data["n_depth"]), cache_type=str(data["cache_type"]),
                   flash_attn=str(data["flash_attn"]), pp=Summary.from_values(data["pp_tps"]),
                   tg=Summary.from_values(data["tg_tps"]), ttft_ms=Summary.from_values(data["ttft_ms"]),
                   peak_rss_bytes=int(data["peak_rss_bytes"]), peak_rss_anon_bytes=int(data["peak_rss_anon_bytes"]),
                   peak_rss_file_bytes=int(data["peak_rss_file_bytes"]))


@dataclass(frozen=True)
class HostBenchResult:
    """One GGUF measured on this host.

    ``pp`` and ``tg`` are tokens/s per repetition, ``ttft_ms`` the prefill time
    of each pp repetition; the memory figures are bytes (see
    ``edgequant.bench.host_worker`` for exactly what each one counts).
    """

    load_s: float
    pp: Summary
    tg: Summary
    ttft_ms: Summary
    peak_rss_bytes: int
    peak_rss_anon_bytes: int
    peak_rss_file_bytes: int
    threads: int
    runtime_version: str
    system_info: str
    n_params: int = 0
    model_size_bytes: int = 0
    baseline_rss_bytes: int = 0
    repack: bool = True
    variants: tuple[VariantResult, ...] = ()     # when the request named variants (depths, cache types)
    contention: Contention | None = None   # the other load while the tests ran (None: not measured)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_worker(cls, data: dict[str, Any]) -> "HostBenchResult":
        return cls(
            load_s=float(data["load_s"]),
            pp=Summary.from_values(data["pp_tps"]),
            tg=Summary.from_values(data["tg_tps"]),
            ttft_ms=Summary.from_values(data["ttft_ms"]),
            peak_rss_bytes=int(data["peak_rss_bytes"]),
            peak_rss_anon_bytes=int(data["peak_rss_anon_bytes"]),
            peak_rss_file_bytes=int(data["peak_rss_file_bytes"]),
            threads=int(data["threads"]),
            runtime_version=str(data["runtime_version"]),
            system_info=str(data["system_info"]),
            n_params=int(data.get("n_params", 0)),
            model_size_bytes=int(data.get("model_size_bytes", 0)),
            baseline_rss_bytes=int(data.get("baseline_rss_bytes", 0)),
            repack=bool(data.get("repack", True)),
            variants=tuple(VariantResult.from_worker(v) for v in data.get("variants") or ()),
            contention=Contention.from_dict(data["contention"]) if data.get("contention") else None,
            raw=data,
        )


def check_gguf_file(path: Path) -> None:
    """Fail early, with a one-line message, if ``path`` is not a readable GGUF file."""
    if not path.exists():
        raise BenchError("failed", f"{path}: no such file")
    if not path.is_file():
        raise BenchError("failed", f"{path}: not a file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise BenchError("failed", f"{path}: cannot be read: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise BenchError("failed", f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def build_request(path: Path, settings: BenchSettings, repack: bool | None = None,
                  variants: list | None = None) -> dict[str, Any]:
    """The JSON request for the worker; ``repack=None`` means ``settings.resolved_repack()``;
    ``variants`` (``profiles.variants.BenchVariant``) are measured on one loaded model."""
    extra = {"variants": [v.request(settings) for v in variants]} if variants else {}
    return {**extra,
        "path": str(path),
        "threads": settings.resolved_threads(),
        "n_prompt": settings.n_prompt,
        "n_gen": settings.n_gen,
        "repetitions": settings.repetitions,
        "warmup": settings.warmup,
        "n_batch": settings.n_batch,
        "n_ubatch": settings.n_ubatch,
        "flash_attn": settings.flash_attn,
        "mmap": settings.mmap,
        "repack": settings.resolved_repack() if repack is None else bool(repack),
    }


def _failure(run: WorkerExit, path: Path) -> BenchError:
    """The BenchError for a worker that did not return a result (``run.status`` is not ok)."""
    name = path.name
    sig = run.signal
    if run.status is RungStatus.OOM:
        return BenchError("oom", f"{name}: the benchmark worker was killed (SIGKILL) during "
                                 f"'{run.phase}', most likely by the kernel's OOM killer; "
                                 f"check free memory or try a smaller model or n_prompt")
    if run.status is RungStatus.CRASHED:
        detail = run.last_stderr()
        hint = ""
        if sig in (signal.SIGSEGV, signal.SIGILL) and run.config.get("repack", "").startswith("1"):
            hint = (" (with repacked weights on; llama.cpp's AMX kernels crash on some CPUs: "
                    "set bench.repack = \"off\")")
        return BenchError("crashed", f"{name}: the benchmark worker crashed with {signal_name(sig)} during "
                                     f"'{run.phase}'" + (f": {detail}" if detail else "") + hint)
    if run.error is not None:
        return BenchError("failed", f"{name}: {run.error}")
    detail = run.last_stderr() or "no error message"
    return BenchError("failed", f"{name}: the benchmark worker exited with status {run.code or 1}: {detail}")


def measure_gguf(path: Path, settings: BenchSettings,
                 on_progress: Callable[[str], None] | None = None,
                 repack: bool | None = None, variants: list | None = None) -> HostBenchResult:
    """Measure ``path`` with ``settings`` in a fresh worker process.

    ``on_progress`` is called (in this thread) with the worker's phase as it
    changes: ``load``, ``warmup pp 1/1``, ``pp 2/3``, ``warmup tg 1/1``,
    ``tg 1/3``, ``done``.  ``repack`` (llama-bench ``--repack``) overrides
    ``settings.repack``; the value used is in the result.
    ``variants`` (depths x cache types) are all measured by the one worker, on one model load; the
    result's ``variants`` has them in order.
    Raises ``BenchError``; on KeyboardInterrupt the worker is killed first.
    """
    path = Path(path)
    check_gguf_file(path)
    request = build_request(path, settings, repack, variants)
    return result_from(run_worker(request, WORKER_MODULE, settings.timeout, on_progress, path), path)


def run_worker(request: dict[str, Any], module: str, timeout: float,
               on_progress: Callable[[str], None] | None, path: Path) -> dict[str, Any]:
    """Run ``python -m module`` on ``request`` (the JSON protocol of ``host_worker.serve``) within
    ``timeout`` seconds and return its result; ``BenchError`` (named after ``path``) if it timed out,
    crashed, was killed or reported an error.  On KeyboardInterrupt the worker is killed first."""
    run = worker.run_worker(module, request, timeout, on_progress)
    if run.status is RungStatus.TIMEOUT:
        raise BenchError("timeout", f"{path.name}: the benchmark did not finish within "
                                    f"{timeout:g} s (stopped during '{run.phase}'); "
                                    f"raise bench.timeout or lower n_prompt/n_gen/repetitions")
    if run.status is not RungStatus.OK:
        raise _failure(run, path)
    return run.data


def result_from(data: dict[str, Any], path: Path) -> HostBenchResult:
    """The worker's result as a ``HostBenchResult``; ``BenchError`` if it lacks a field."""
    try:
        return HostBenchResult.from_worker(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError("failed", f"{path.name}: the benchmark worker returned an unusable result: {exc}") from None


def measure_sustained(path: Path, settings: BenchSettings, runs: int, n_gen: int,
                      on_progress: Callable[[str], None] | None = None) -> tuple[list, dict]:
    """``runs`` back-to-back generation runs of ``n_gen`` tokens on this host, in one worker process
    (``host_worker.measure_sustained``); returns the runs (``bench.sustained.SustainedRun``) and the
    thermal reading taken before the first.  Raises ``BenchError``."""
    path = Path(path)
    check_gguf_file(path)
    request = {**build_request(path, settings), "sustained": {"runs": runs, "n_gen": n_gen}}
    data = run_worker(request, WORKER_MODULE, settings.timeout * max(1, runs // 3 + 1), on_progress, path)
    try:
        return [SustainedRun.from_dict(d) for d in data["sustained"]], dict(data.get("before") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError("failed", f"{path.name}: the benchmark worker returned unusable sustained runs: {exc}") \
            from None

