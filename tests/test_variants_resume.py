"""``edgequant run --resume`` and the KV-cache quality variants (issue 18): a run stopped after some of
``RUNG@kv=TYPE``'s quality rows were stored evaluates, on resume, exactly the names missing (a rung's own
quality or one of its cache-type variants), none twice.  The partial run is made by hand through the store
API from a complete run's rows, so which rows are missing is known exactly."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from conftest import cli_env, db_rows, run_cli
from test_quality import CASES, write_suite
from test_variants import variant_profile

from edgequant.results.store import Measurement, RowKey, Store

# dropped from the copy: a rung's own quality (its kv variant stays) and the reference's kv variant
MISSING = {"Q8_0", "BF16@kv=q8_0"}


def _is_quality(row) -> bool:
    return row["params"].get("stage") == "quality"


def _copy_partial(db, run_id: str, missing: set[str]) -> str:
    """A new run holding every row of ``run_id`` except the quality rows (and eval cases) of ``missing``,
    marked partial as an interrupted run is."""
    store = Store(db)
    try:
        run = store.run(run_id)
        new = store.start_run(run["command"], run["profile"], run["model_id"], run["model_hash"])
        statuses = {(s["quant"], s["device_id"]): (s["status"], s["detail"]) for s in store.rung_statuses(run_id)}
        groups: dict[tuple, list] = {}
        for r in store.measurements(run_id):
            if _is_quality(r) and r["quant"] in missing:
                continue
            k = (r["quant"], r["device_id"], json.dumps(r["params"], sort_keys=True))
            groups.setdefault(k, []).append(r)
        for (quant, device_id, _), rows in groups.items():
            r0 = rows[0]
            key = RowKey(model_id=r0["model_id"], model_hash=r0["model_hash"], quant=quant,
                         artifact_sha256=r0["artifact_sha256"], is_reference=r0["is_reference"], device_id=device_id,
                         device=r0["device"], runtime=r0["runtime"], runtime_version=r0["runtime_version"],
                         params=r0["params"])
            ms = [Measurement(r["metric"], r["value"], r["unit"], r["stddev"], r["repetitions"], r["detail"])
                  for r in rows]
            cases = store.eval_cases(run_id, quant) if _is_quality(r0) else []
            status = None if _is_quality(r0) else statuses[(quant, device_id)][0]
            store.record_rung(new, key, ms, status=status, cases=cases, suite=cases[0]["suite"] if cases else None)
        store.finish_run(new, "partial", "interrupted while running the eval suite")
        return new
    finally:
        store.close()


@pytest.mark.slow
def test_resume_evaluates_exactly_the_missing_kv_quality_variants(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    suite = write_suite(tmp_path)
    profile = variant_profile(tmp_path, [0], ["f16", "q8_0"])
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite", str(suite), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "results.db"
    (first,) = db_rows(db, "SELECT run_id FROM runs")
    partial = _copy_partial(db, first["run_id"], MISSING)
    copied = {r["quant"] for r in db_rows(db, "SELECT quant, params FROM measurements WHERE run_id = ?", partial)
              if json.loads(r["params"]).get("stage") == "quality"}
    assert copied == {"BF16", "Q8_0@kv=q8_0"}          # the partial run lacks exactly MISSING's quality
    bench_before = Counter(r["quant"] for r in db_rows(db, "SELECT quant, params FROM measurements WHERE run_id = ?",
                                                       partial) if json.loads(r["params"]).get("stage") != "quality")
    resumed_at = time.time()

    res = run_cli("run", "--resume", partial, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = db_rows(db, "SELECT status FROM runs WHERE run_id = ?", partial)
    assert run["status"] == "complete"
    rows = db_rows(db, "SELECT quant, metric, params, measured_at FROM measurements WHERE run_id = ?", partial)
    quality = [r for r in rows if json.loads(r["params"]).get("stage") == "quality"]
    # every rung and kv variant has its quality once: no metric stored twice for one name
    per_name = Counter((r["quant"], r["metric"]) for r in quality)
    assert {q for q, _ in per_name} == {"BF16", "Q8_0", "BF16@kv=q8_0", "Q8_0@kv=q8_0"}
    assert max(per_name.values()) == 1, [k for k, n in per_name.items() if n > 1]
    # what the resume measured is exactly what was missing
    assert {r["quant"] for r in quality if r["measured_at"] >= resumed_at} == MISSING
    # the reference's variant ran with its quantized cache (and flash attention, which llama.cpp needs for it)
    params = next(json.loads(r["params"]) for r in quality if r["quant"] == "BF16@kv=q8_0")
    assert params["cache_type"] == "q8_0" and params["flash_attn"] == "on"
    # its cases are stored; the speed rows were not measured again
    cases = db_rows(db, "SELECT quant, case_id FROM eval_cases WHERE run_id = ?", partial)
    assert {c["case_id"] for c in cases if c["quant"] == "BF16@kv=q8_0"} == {c["id"] for c in CASES}
    bench_after = Counter(r["quant"] for r in rows if json.loads(r["params"]).get("stage") != "quality")
    assert bench_after == bench_before
