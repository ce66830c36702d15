"""A phone's stages of each rung as ``stage_resources`` rows (``Store.record_stages``), with the phone's
device id as the place, so that ``report``'s resources table shows them beside the host's:

* ``push``: the wall time of putting the rung on the phone and the bytes sent (``Pusher.sent_bytes``; 0
  when the phone already held the same bytes);
* ``bench`` (GGUF, llama-bench) or ``bench-onnx`` (onnxruntime_perf_test): the wall time of the rung's
  measuring step, as the host sees it (its measured commands on the phone with their adb round-trips), and
  the peak RSS those commands read on the phone (the rung's ``peak_rss`` row: ``time -v``'s Max RSS, else
  the poller's VmHWM; over its variants, the largest).  A measurement that failed (``oom``, ``timeout``,
  ...) is a row with that status.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from edgequant.core.errors import BenchError
from edgequant.estimate import stage_row
from edgequant.quantize.ladder import Artifact
from edgequant.results.store import Store

PUSH_DETAIL = "wall time of the push, bytes sent to the phone"
MEASURE_DETAIL = "wall time of the measuring step seen from the host; peak RSS read on the phone"


class PhoneStages:
    """Times a rung's push and measuring step on one phone and stores each as a stage row."""

    def __init__(self, store: Store, run_id: str, device_id: str, bench_stage: str = "bench"):
        self.store, self.run_id, self.device_id, self.bench_stage = store, run_id, device_id, bench_stage

    def _row(self, stage: str, art: Artifact, seconds: float, peak: float | None, status: str = "ok",
             detail: str | None = None, data_bytes: int | None = None) -> None:
        self.store.record_stages(self.run_id, [stage_row(stage, art.quant, self.device_id, art.n_params, seconds,
                                                         peak, status, False, detail, data_bytes)])

    def push(self, art: Artifact, pusher, push: Callable[[], Any]) -> Any:
        """``push()``, stored as a ``push`` row when it put the rung there (a failure is the rung's own)."""
        before = getattr(pusher, "sent_bytes", None)
        t0 = time.monotonic()
        handle = push()
        sent = None if before is None else pusher.sent_bytes - before
        self._row("push", art, time.monotonic() - t0, None, detail=PUSH_DETAIL, data_bytes=sent)
        return handle

    def measure(self, art: Artifact, measure: Callable[[], Any]) -> Any:
        """``measure()``, stored as a ``bench`` (``bench-onnx``) row with its status: ``BenchError``'s when
        it failed (and raised on)."""
        t0 = time.monotonic()
        try:
            measured = measure()
        except BenchError as exc:
            self._row(self.bench_stage, art, time.monotonic() - t0, None, exc.status, str(exc)[:300])
            raise
        self._row(self.bench_stage, art, time.monotonic() - t0, peak_rss(measured), detail=MEASURE_DETAIL)
        return measured


def peak_rss(measured) -> float | None:
    """The largest ``peak_rss`` figure of a rung's rows (a list, or a dict of variants' (key, rows))."""
    rows = [r for _, rs in measured.values() for r in rs] if isinstance(measured, dict) else list(measured)
    peaks = [r.value for r in rows if r is not None and r.metric == "peak_rss" and r.value is not None]
    return max(peaks) if peaks else None
