"""Wall time and peak RSS of one stage of a run (a child process tree, or this process).

Ground code: imports nothing of edgequant's.
"""

from __future__ import annotations

import os
import threading
import time


class StageMeter:
    """Wall time and peak RSS of one stage, sampled every ``interval`` s in a thread: the process tree of
    ``pid`` (a child, with its own children), or this process for a stage run in-process.

    ``with StageMeter(pid) as m: ...`` then ``m.seconds``, ``m.peak_rss_bytes``."""

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.peak_rss_bytes = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def sample(self) -> int:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            procs = [proc] + (proc.children(recursive=True) if self.pid != os.getpid() else [])
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "StageMeter":
        self._t0 = time.perf_counter()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="stage-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        return False

    def record(self) -> dict[str, float]:
        return {"seconds": self.seconds, "peak_rss_bytes": float(self.peak_rss_bytes) or None}


def status_bytes(field_name: str) -> int:
    """A ``kB`` figure of this process's /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; 0 where there is
    none (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
