"""A worker process's own memory: ``/proc/self/status`` read in place, and a sampler thread that keeps the
largest anonymous and file-backed resident set while a measurement runs (the host bench's and the ONNX
worker's peak memory figures)."""

from __future__ import annotations

import os
import threading


_STATUS = "/proc/self/status"


def _status_fields(text: bytes, fields: tuple[str, ...]) -> dict[str, int]:
    """Pick ``Name:   123 kB`` fields out of a /proc status text, in bytes."""
    out: dict[str, int] = {}
    for name in fields:
        at = text.find(b"\n" + name.encode() + b":")
        if at >= 0:
            out[name] = int(text[at + len(name) + 2:text.index(b"kB", at)]) * 1024
    return out


def read_status(fields: tuple[str, ...] = ("VmHWM", "VmRSS", "RssAnon", "RssFile")) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (the kernel reports kB)."""
    with open(_STATUS, "rb") as fh:
        return _status_fields(fh.read(), fields)


class RssSampler:
    """Keeps the largest RssAnon and RssFile of this process seen so far.

    Each sample is one ``pread`` of /proc/self/status on a descriptor kept
    open (about 4 us) by a thread scheduled SCHED_IDLE, so it does not take
    CPU time from the decode threads it shares the cores with.
    """

    _FIELDS = ("RssAnon", "RssFile")

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.peak_anon = 0
        self.peak_file = 0
        self.samples = 0
        self._fd = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        status = _status_fields(os.pread(self._fd, 16384, 0), self._FIELDS)
        with self._lock:
            anon, file = status.get("RssAnon", 0), status.get("RssFile", 0)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            self.window_anon = max(self.window_anon, anon)
            self.window_file = max(self.window_file, file)
            self.samples += 1

    window_anon = 0
    window_file = 0

    def start_window(self) -> None:
        """Start a new pair of window maxima (one variant's), beginning with a sample now."""
        with self._lock:
            self.window_anon = self.window_file = 0
        self.sample()

    def _loop(self) -> None:
        # SCHED_IDLE (this thread only): the sampler never preempts a decode thread;
        # it runs in the gaps, so it cannot slow the measurement it observes
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self._fd = os.open(_STATUS, os.O_RDONLY)
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        os.close(self._fd)
