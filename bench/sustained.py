"""Sustained runs (``[sustained]``): back-to-back generation runs of one rung, no cool-down in between.

A phone that warms up loses throughput run after run (TinyBench 2026: an iPhone 16 Pro lost 44 % by the
8th back-to-back run).  Each run is one generation test of ``n_gen`` tokens; after each the place's
thermal state is read (a phone: Android's thermal status, the battery and the hottest sensor; this host:
``/sys/class/thermal`` and psutil) with the clock of its fastest CPU cluster where readable.  The curve is
summarized as the drop from the first run to the last and the first run below 90 % of the first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

THRESHOLD = 0.9   # "fell below 90 % of the first run"


@dataclass(frozen=True)
class SustainedRun:
    run: int                        # 1-based
    tg_tps: float
    celsius: float | None = None    # the hottest sensor read after the run
    sensor: str | None = None
    thermal_status: int | None = None
    battery_celsius: float | None = None
    cpu_khz: int | None = None      # the fastest cluster's current clock after the run
    # energy over the run's generation test (a phone with device.energy): ``j_per_token``, ``watts``,
    # ``samples``, ``seconds``, ``tokens``, ``source``; or ``not_measured`` with the reason.  None: not asked
    energy: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SustainedRun":
        return cls(run=int(d["run"]), tg_tps=float(d["tg_tps"]),
                   celsius=None if d.get("celsius") is None else float(d["celsius"]), sensor=d.get("sensor"),
                   thermal_status=None if d.get("thermal_status") is None else int(d["thermal_status"]),
                   battery_celsius=None if d.get("battery_celsius") is None else float(d["battery_celsius"]),
                   cpu_khz=None if d.get("cpu_khz") is None else int(d["cpu_khz"]),
                   energy=d.get("energy") if isinstance(d.get("energy"), dict) else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SustainedSummary:
    first_tps: float
    last_tps: float
    drop_pct: float                 # 100 * (first - last) / first
    below_run: int | None           # the first run whose tg fell below THRESHOLD x the first run's; None: never


def summarize(runs: list[SustainedRun]) -> SustainedSummary:
    if not runs:
        raise ValueError("no sustained runs")
    first, last = runs[0].tg_tps, runs[-1].tg_tps
    below = next((r.run for r in runs[1:] if r.tg_tps < THRESHOLD * first), None)
    return SustainedSummary(first, last, 100.0 * (first - last) / first if first else 0.0, below)
