"""Benchmark a GGUF file on this host, in a child process, the way llama-bench does.

The measurement itself lives in ``edgequant.bench.host_worker`` (see its
docstring for the method and the exact meaning of every number).  This module
starts the worker, hands it the request, enforces the timeout and turns the way
the worker ended into a ``HostBenchResult`` or a ``BenchError`` whose status is
one of ``failed`` (the worker reported an error), ``crashed`` (killed by a
signal other than SIGKILL), ``oom`` (SIGKILL, which is what the kernel's OOM
killer sends) or ``timeout``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgequant.bench.stats import Summary
from edgequant.errors import RunFailed
from edgequant.children import die_with_parent
from edgequant.profiles import BenchSettings

WORKER_MODULE = "edgequant.bench.host_worker"
GGUF_MAGIC = b"GGUF"
BENCH_STATUSES = ("failed", "crashed", "oom", "timeout")
_STDERR_TAIL = 20


class BenchError(RunFailed):
    """A benchmark that did not produce a result; ``status`` says how it ended."""

    def __init__(self, status: str, message: str):
        if status not in BENCH_STATUSES:
            raise ValueError(f"unknown bench status {status!r}; allowed: {', '.join(BENCH_STATUSES)}")
        super().__init__(" ".join(message.split()))  # always one line
        self.status = status


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


def build_request(path: Path, settings: BenchSettings, repack: bool | None = None) -> dict[str, Any]:
    """The JSON request for the worker; ``repack=None`` means ``settings.resolved_repack()``."""
    return {
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


class _Child:
    """The running worker: feeds stdin, collects stdout, reads stderr line by line."""

    def __init__(self, request: dict[str, Any], on_progress: Callable[[str], None] | None,
                 module: str = WORKER_MODULE):
        self.on_progress = on_progress
        self.phase = "start-up"
        self.stdout = bytearray()
        self.stderr_tail: list[str] = []
        self.repack: bool | None = None
        self._partial = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # its own session: a terminal's Ctrl-C reaches only us, and we stop the worker
            start_new_session=True, preexec_fn=die_with_parent(),
        )
        try:
            self.proc.stdin.write(json.dumps(request).encode())
            self.proc.stdin.close()
        except BrokenPipeError:  # it died before reading; its exit status tells why
            pass

    def _stderr_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line.startswith("progress "):
            self.phase = line[len("progress "):]
            if self.on_progress is not None:
                self.on_progress(self.phase)
        elif line.startswith("config repack="):
            self.repack = line[len("config repack="):].startswith("1")
        elif line.strip():
            self.stderr_tail = (self.stderr_tail + [line.strip()])[-_STDERR_TAIL:]

    def pump(self, deadline: float) -> bool:
        """Read output until both pipes close; False if the deadline passed first."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        try:
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                for key, _ in sel.select(timeout=remaining):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == "out":
                        self.stdout += chunk
                    else:
                        *lines, self._partial = (self._partial + chunk).split(b"\n")
                        for line in lines:
                            self._stderr_line(line)
            if self._partial:
                self._stderr_line(self._partial)
            return True
        finally:
            sel.close()

    def wait(self, deadline: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def result_json(self) -> dict[str, Any] | None:
        for line in reversed(self.stdout.decode("utf-8", "replace").splitlines()):
            if line.strip():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return data if isinstance(data, dict) else None
        return None

    def last_stderr(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else ""


def _failure(child: _Child, code: int, path: Path) -> BenchError:
    name = path.name
    if code < 0:
        sig = -code
        try:
            sig_name = signal.Signals(sig).name
        except ValueError:
            sig_name = f"signal {sig}"
        if sig == signal.SIGKILL:
            return BenchError("oom", f"{name}: the benchmark worker was killed (SIGKILL) during "
                                     f"'{child.phase}', most likely by the kernel's OOM killer; "
                                     f"check free memory or try a smaller model or n_prompt")
        detail = child.last_stderr()
        hint = ""
        if sig in (signal.SIGSEGV, signal.SIGILL) and child.repack:
            hint = (" (with repacked weights on; llama.cpp's AMX kernels crash on some CPUs: "
                    "set bench.repack = \"off\")")
        return BenchError("crashed", f"{name}: the benchmark worker crashed with {sig_name} during "
                                     f"'{child.phase}'" + (f": {detail}" if detail else "") + hint)
    data = child.result_json()
    if data and "error" in data:
        return BenchError("failed", f"{name}: {data['error']}")
    detail = child.last_stderr() or "no error message"
    return BenchError("failed", f"{name}: the benchmark worker exited with status {code}: {detail}")


def measure_gguf(path: Path, settings: BenchSettings,
                 on_progress: Callable[[str], None] | None = None,
                 repack: bool | None = None) -> HostBenchResult:
    """Measure ``path`` with ``settings`` in a fresh worker process.

    ``on_progress`` is called (in this thread) with the worker's phase as it
    changes: ``load``, ``warmup pp 1/1``, ``pp 2/3``, ``warmup tg 1/1``,
    ``tg 1/3``, ``done``.  ``repack`` (llama-bench ``--repack``) overrides
    ``settings.repack``; the value used is in the result.
    Raises ``BenchError``; on KeyboardInterrupt the worker is killed first.
    """
    path = Path(path)
    check_gguf_file(path)
    request = build_request(path, settings, repack)
    return result_from(run_worker(request, WORKER_MODULE, settings.timeout, on_progress, path), path)


def run_worker(request: dict[str, Any], module: str, timeout: float,
               on_progress: Callable[[str], None] | None, path: Path) -> dict[str, Any]:
    """Run ``python -m module`` on ``request`` (the JSON protocol of ``host_worker.serve``) within
    ``timeout`` seconds and return its result; ``BenchError`` (named after ``path``) if it timed out,
    crashed, was killed or reported an error.  On KeyboardInterrupt the worker is killed first."""
    deadline = time.monotonic() + timeout
    child = _Child(request, on_progress, module)
    try:
        finished = child.pump(deadline)
        code = child.wait(deadline) if finished else None
        if code is None:
            child.kill()
            raise BenchError("timeout", f"{path.name}: the benchmark did not finish within "
                                        f"{timeout:g} s (stopped during '{child.phase}'); "
                                        f"raise bench.timeout or lower n_prompt/n_gen/repetitions")
    except BaseException:
        child.kill()  # KeyboardInterrupt included: never leave the worker running
        raise
    child.kill()  # already exited: just reap and close pipes
    if code != 0:
        raise _failure(child, code, path)
    data = child.result_json()
    if data is None or "error" in data:
        raise _failure(child, 1, path)
    return data


def result_from(data: dict[str, Any], path: Path) -> HostBenchResult:
    """The worker's result as a ``HostBenchResult``; ``BenchError`` if it lacks a field."""
    try:
        return HostBenchResult.from_worker(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError("failed", f"{path.name}: the benchmark worker returned an unusable result: {exc}") from None
