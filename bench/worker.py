"""Run a worker module in a child process, within a deadline: the one runner of the host bench and eval workers.

The worker protocol (``host_worker``, ``eval_worker``, ``onnx_worker``, ...): a JSON request on stdin, one
JSON object on the last line of stdout (the result, or ``{"error": ...}`` with exit code 1), and on stderr
lines ``progress <phase>``, ``config <key>=<value> ...`` and anything else (kept as a short tail for the
error message).  The parent's side is ``run_worker``; the worker's side is ``serve``.

The worker runs in its own session, so its process group is its own: a terminal's Ctrl-C reaches only us,
and at the deadline (or on any exception here, KeyboardInterrupt included) the whole group is killed with
SIGKILL, whether or not the worker is printing anything.  How it ended is classified once
(``edgequant.core.status.classify_exit``) into ``WorkerExit.status``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from edgequant.core.children import die_with_parent, raise_if_terminated
from edgequant.core.status import RungStatus, classify_exit, exit_signal

STDERR_TAIL = 20
PARENT_ENV = "EDGEQUANT_WORKER_PARENT"     # the pid of the edgequant process that started the worker


@dataclass
class WorkerExit:
    """How a worker ended and what it said."""

    status: RungStatus                 # ok only with a result that is not an error
    code: int | None                   # the exit code (Popen's: -N when killed by signal N); None at the deadline
    data: dict[str, Any] | None        # the last stdout line as a JSON object, if it was one
    phase: str = "start-up"            # the last ``progress`` phase it reported
    stderr_tail: list[str] = field(default_factory=list)
    config: dict[str, str] = field(default_factory=dict)

    @property
    def signal(self) -> int | None:
        return None if self.code is None else exit_signal(self.code)

    @property
    def error(self) -> str | None:
        """The error the worker reported in its result, if any."""
        if self.data is not None and "error" in self.data:
            return str(self.data["error"])
        return None

    def last_stderr(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else ""


class _Run:
    def __init__(self, module: str, request: dict[str, Any], on_progress: Callable[[str], None] | None):
        self.on_progress = on_progress
        self.phase = "start-up"
        self.stdout = bytearray()
        self.tail: list[str] = []
        self.config: dict[str, str] = {}
        self._partial = b""
        self._stdin = json.dumps(request).encode()
        # its own session (a terminal's Ctrl-C reaches only us, and we stop its group); it dies with us, armed
        # by the worker itself (``serve``): no preexec_fn, so no Python code runs around the fork, where a
        # Ctrl-C would be lost (``edgequant.core.children``)
        self.proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, PARENT_ENV: str(os.getpid())})

    def _stderr_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").strip()
        if line.startswith("progress "):
            self.phase = line[len("progress "):]
            if self.on_progress is not None:
                self.on_progress(self.phase)
        elif line.startswith("config "):
            for word in line[len("config "):].split():
                key, sep, value = word.partition("=")
                if sep:
                    self.config[key] = value
        elif line:
            self.tail = (self.tail + [line])[-STDERR_TAIL:]

    def pump(self, deadline: float) -> bool:
        """Write the request and read both outputs until they close; False once the deadline has passed."""
        sel = selectors.DefaultSelector()
        os.set_blocking(self.proc.stdin.fileno(), False)
        sel.register(self.proc.stdin, selectors.EVENT_WRITE, "in")
        sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        sent = 0
        try:
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                for key, _ in sel.select(timeout=remaining):
                    if key.data == "in":
                        try:
                            sent += os.write(key.fd, self._stdin[sent:sent + 65536])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:   # it stopped reading (or died): how it exited tells why
                            sent = len(self._stdin)
                        if sent >= len(self._stdin):
                            sel.unregister(key.fileobj)
                            self.proc.stdin.close()
                        continue
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
                self._partial = b""
            return True
        finally:
            sel.close()

    def kill_group(self) -> None:
        """SIGKILL the worker's process group (before the worker is reaped, so the group id is still its own)."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.close()

    def close(self) -> None:
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def result(self) -> dict[str, Any] | None:
        for line in reversed(self.stdout.decode("utf-8", "replace").splitlines()):
            if line.strip():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return data if isinstance(data, dict) else None
        return None


def run_worker(module: str, request: dict[str, Any], timeout: float,
               on_progress: Callable[[str], None] | None = None) -> WorkerExit:
    """Run ``python -m module`` on ``request`` for at most ``timeout`` seconds and say how it ended.

    ``on_progress`` is called (in this thread) with each ``progress`` phase the worker reports.  The worker
    is killed (its whole process group) at the deadline, whatever it prints, and on any exception here.
    """
    deadline = time.monotonic() + timeout
    run = _Run(module, request, on_progress)
    try:
        raise_if_terminated()      # a SIGTERM or Ctrl-C that arrived while it forked
        code: int | None = None
        if run.pump(deadline):
            try:
                code = run.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
    except BaseException:
        run.kill_group()   # KeyboardInterrupt included: never leave the worker running
        raise
    if code is None:
        run.kill_group()
    else:
        run.close()
    data = run.result()
    status = classify_exit(0 if code is None else code, timed_out=code is None)
    if status is RungStatus.OK and (data is None or "error" in data):
        status = RungStatus.FAILED
    return WorkerExit(status=status, code=code, data=data, phase=run.phase, stderr_tail=run.tail,
                      config=run.config)


# ---------------------------------------------------------------------------
# the worker's side of the protocol


class WorkerError(Exception):
    """A failure reported to the parent as ``{"error": message}``."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process if the parent dies first; exit now if it is already gone
    (``run_worker`` passes its pid; a worker started by hand arms against whoever started it)."""
    parent = os.environ.get(PARENT_ENV, "")
    die_with_parent(int(parent) if parent.isdigit() else os.getppid())()


def _private_stdout() -> TextIO:
    """A duplicate of stdout for the result; fd 1 then points at stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8")


def serve(handle: Callable[[Any, Callable[[str], None]], dict]) -> int:
    """The worker protocol: a JSON request on stdin, one JSON line on stdout, progress on stderr."""
    _die_with_parent()
    out = _private_stdout()

    def progress(text: str) -> None:
        sys.stderr.write(f"progress {text}\n")
        sys.stderr.flush()

    try:
        result = handle(json.loads(sys.stdin.read() or "null"), progress)
        code = 0
        if isinstance(result, dict):   # the whole process's peak RSS (KiB on Linux), for its stage's row
            import resource

            result.setdefault("process_peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except WorkerError as exc:
        result, code = {"error": str(exc)}, 1
    except json.JSONDecodeError as exc:
        result, code = {"error": f"the request is not valid JSON: {exc}"}, 1
    except Exception as exc:  # report anything else as one line too; traceback to stderr
        traceback.print_exc()
        result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
    out.write(json.dumps(result) + "\n")
    out.flush()
    return code
