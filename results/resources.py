"""What a place has shown, kept for later runs: the resources of each stage of a run (``edgequant.estimate``
reads them back for the next run's time estimate), the speed rows by parameter count, and the A/A noise
floors ``edgequant noise`` measures (``edgequant compare`` uses them as its threshold).

:class:`PlaceHistory` is a part of ``edgequant.results.store.Store``, which provides the connection
(``conn``, ``transaction()``) its methods use.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable


class PlaceHistory:
    """Stage resources, speed history and noise floors (a base of ``Store``)."""

    # -- stage resources (edgequant.estimate) -----------------------------------

    def record_stages(self, run_id: str, stages: Iterable[dict[str, Any]]) -> None:
        """Rows of ``stage_resources`` in one transaction; each a dict with ``stage``, ``quant``, ``device_id``,
        ``status`` and optionally ``n_params``, ``seconds``, ``peak_rss_bytes``, ``reused``, ``detail``,
        ``data_bytes``."""
        now = time.time()
        cols = ("stage", "quant", "device_id", "n_params", "seconds", "peak_rss_bytes", "status", "reused", "detail",
                "data_bytes")
        with self.transaction() as conn:
            for st in stages:
                values = [st.get(c) for c in cols]
                values[cols.index("reused")] = int(bool(st.get("reused")))
                conn.execute(f"INSERT INTO stage_resources (run_id, {', '.join(cols)}, measured_at)"
                             f" VALUES (?, {', '.join('?' * len(cols))}, ?)", [run_id, *values, now])

    def stage_resources(self, run_id: str) -> list[dict[str, Any]]:
        """A run's stage rows, in the order they were stored."""
        rows = self.conn.execute(
            "SELECT run_id, stage, quant, device_id, n_params, seconds, peak_rss_bytes, status, reused, detail,"
            " data_bytes, measured_at FROM stage_resources WHERE run_id = ? ORDER BY id", (run_id,))
        return [{**dict(r), "reused": bool(r["reused"])} for r in rows]

    def stage_history(self, device_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The latest timed ``ok`` stage rows of one place, newest first: the speed this place has shown, for
        the next run's time estimate (a reused artifact's row carries the time it was built in)."""
        rows = self.conn.execute(
            "SELECT stage, quant, n_params, seconds, peak_rss_bytes, measured_at FROM stage_resources"
            " WHERE device_id = ? AND status = 'ok' AND seconds IS NOT NULL"
            " ORDER BY measured_at DESC, id DESC LIMIT ?", (device_id, limit))
        return [dict(r) for r in rows]

    def speed_history(self, device_id: str, limit: int = 2000) -> list[tuple[str, str, float, int]]:
        """(quant, metric, value, n_params) of the latest benchmark rows (``pp_tps``, ``tg_tps``, ``load_time``)
        of one place, newest first, each with the parameter count its rung stored beside it."""
        rows = self.conn.execute(
            "SELECT m.quant, m.metric, m.value, m.params, p.value AS n_params FROM measurements m"
            " JOIN measurements p ON p.run_id = m.run_id AND p.quant = m.quant AND p.device_id = m.device_id"
            " AND p.metric = 'n_params' AND p.params = m.params"
            " WHERE m.device_id = ? AND m.metric IN ('pp_tps', 'tg_tps', 'load_time')"
            " ORDER BY m.measured_at DESC, m.id DESC LIMIT ?", (device_id, limit))
        out = []
        for r in rows:
            params = json.loads(r["params"])
            if params.get("stage", "bench") != "bench" or not r["n_params"]:
                continue
            out.append((r["quant"], r["metric"], float(r["value"]), int(r["n_params"])))
        return out

    # -- A/A noise floors (edgequant noise) ------------------------------------

    def record_noise_floor(self, device_id: str, quant: str, artifact_sha256: str, params: dict,
                           floors: dict[str, tuple[float, list[float]]]) -> None:
        """A place's run-to-run spread: metric -> (floor in %, the medians it came from), in one transaction."""
        now = time.time()
        with self.transaction() as conn:
            for metric, (floor_pct, medians) in floors.items():
                conn.execute("INSERT INTO noise_floors (device_id, quant, artifact_sha256, metric, floor_pct, n_runs,"
                             " medians, params, measured_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (device_id, quant, artifact_sha256, metric, float(floor_pct), len(medians),
                              json.dumps(medians), json.dumps(params, sort_keys=True), now))

    def noise_floors(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The latest stored floor of every (device_id, quant, metric)."""
        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        for r in self.conn.execute("SELECT device_id, quant, artifact_sha256, metric, floor_pct, n_runs, medians,"
                                   " params, measured_at FROM noise_floors ORDER BY measured_at, id"):
            d = dict(r)
            d["medians"], d["params"] = json.loads(d["medians"]), json.loads(d["params"])
            out[(d["device_id"], d["quant"], d["metric"])] = d
        return out
