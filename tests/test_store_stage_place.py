"""Stage and place are columns of the measurement rows (migration 007_s15p_stage_place): written for new rows,
back-filled in place for rows stored before the migration (on SQLite and PostgreSQL), and queried by
``Store.measurements`` / ``Store.measured``."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from edgequant.core.errors import BadInput
from edgequant.results import store as store_module
from edgequant.results.store import MIGRATIONS, Measurement, RowKey, Store

# made by the code before this migration (edgequant at commit 8007765, migrations 001-006): one run, six rows
FIXTURE = Path(__file__).parent / "data" / "store-before-stage-place.db"
NEW = "007_s15p_stage_place"

# the rows of that fixture and what each row measured, read off the params the old code stored them with
FIXTURE_ROWS = {  # (quant, device_id, metric) -> (stage, place)
    ("BF16", "host:x", "tg_tps"): ("bench", "host"),                      # {"runner": "host"}
    ("Q4_0", "android:a1", "tg_tps"): ("bench", "device"),                # {"runner": "device"}
    ("Q4_0", "host:x", "xml_parse_rate"): ("quality", "host"),            # eval on the host
    ("Q4_0", "android:a1", "xml_parse_rate"): ("quality", "device"),      # --quality-on-device: where = device
    ("Q4_0", "android:a1", "sustained_drop"): ("sustained", "device"),
    ("Q5_K_M", "host:x", "tune_pass"): ("tune", "host"),
}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "results.db")
    return request.getfixturevalue("pg_url")


def key(quant: str, device_id: str, params: dict) -> RowKey:
    return RowKey(model_id="org/tiny", model_hash="h" * 64, quant=quant, artifact_sha256=quant.lower() * 4,
                  is_reference=False, device_id=device_id, device={"cpu_model": "cpu"}, runtime="llama.cpp",
                  runtime_version="0.3.36", params=params)


def _columns(store: Store, run_id: str) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(quant, device_id, metric) -> (stage, place), read with plain SQL."""
    rows = store.conn.execute("SELECT quant, device_id, metric, stage, place FROM measurements WHERE run_id = ?",
                              (run_id,)).fetchall()
    return {(r["quant"], r["device_id"], r["metric"]): (r["stage"], r["place"]) for r in rows}


def test_a_database_made_before_the_migration_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    raw = sqlite3.connect(db)
    assert NEW not in {r[0] for r in raw.execute("SELECT name FROM _migrations")}
    assert "stage" not in {r[1] for r in raw.execute("PRAGMA table_info(measurements)")}
    raw.close()
    with Store(db) as s:
        assert s.migrations() == [name for name, _ in MIGRATIONS]     # this one, and any after it
        run_id = s.runs()[0]["run_id"]
        assert _columns(s, run_id) == FIXTURE_ROWS
        # the queries read the columns
        assert {(r["quant"], r["metric"]) for r in s.measurements(run_id, stage="quality")} == \
            {("Q4_0", "xml_parse_rate")}
        assert {r["metric"] for r in s.measurements(run_id, stage="quality", place="device")} == {"xml_parse_rate"}
        assert [r["value"] for r in s.measurements(run_id, stage="quality", place="device")] == [0.25]
        assert s.measured(run_id, "bench") == {("BF16", "host:x"), ("Q4_0", "android:a1")}
        assert s.measured(run_id, "sustained", "device") == {("Q4_0", "android:a1")}
        assert s.measured(run_id, "sustained", "host") == set()
        assert len(s.measurements(run_id)) == 6     # nothing lost, nothing added
    with Store(db) as s:                             # reopening applies nothing twice
        assert s.migrations().count(NEW) == 1


def test_old_rows_are_back_filled_on_both_dialects(target, monkeypatch):
    """Rows written by the pre-migration schema (only the first six migrations applied), then the
    database opened by this edgequant: the columns come from each row's params."""
    names = [name for name, _ in MIGRATIONS]
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:names.index(NEW)])
    with Store(target) as s:
        assert NEW not in s.migrations()
        run_id = s.start_run("edgequant run", "quick", "org/tiny", "h" * 64)
        with s.transaction() as conn:   # the INSERT of the code before the migration: no stage, no place
            for (quant, device_id, metric), params in [
                    (("Q8_0", "host:x", "pp_tps"), {"runner": "host", "threads": 2}),
                    (("Q8_0", "android:p", "pp_tps"), {"runner": "device", "threads": 4}),
                    (("Q8_0", "android:p", "xml_parse_rate"), {"runner": "device", "stage": "quality",
                                                              "where": "device"}),
                    (("Q8_0", "host:x", "xml_parse_rate"), {"runner": "host", "stage": "quality"}),
                    (("Q8_0", "host:x", "sustained_drop"), {"runner": "host", "stage": "sustained"})]:
                conn.execute("INSERT INTO measurements (run_id, model_id, model_hash, quant, artifact_sha256,"
                             " is_reference, device_id, device, runtime, runtime_version, params, metric, value,"
                             " unit, measured_at) VALUES (?, 'm', 'h', ?, 'a', 0, ?, '{}', 'llama.cpp', '0',"
                             " ?, ?, 1.0, 'x', 0)", (run_id, quant, device_id,
                                                     json.dumps(params, sort_keys=True), metric))
    monkeypatch.undo()
    with Store(target) as s:
        assert s.migrations() == [name for name, _ in MIGRATIONS]     # this one, and any after it
        assert _columns(s, run_id) == {
            ("Q8_0", "host:x", "pp_tps"): ("bench", "host"),
            ("Q8_0", "android:p", "pp_tps"): ("bench", "device"),
            ("Q8_0", "android:p", "xml_parse_rate"): ("quality", "device"),
            ("Q8_0", "host:x", "xml_parse_rate"): ("quality", "host"),
            ("Q8_0", "host:x", "sustained_drop"): ("sustained", "host"),
        }


def test_new_rows_carry_their_stage_and_place(target):
    with Store(target) as s:
        run_id = s.start_run("edgequant run", "quick", "org/tiny", "h" * 64)
        s.record_rung(run_id, key("Q4_K_M", "host:x", {"runner": "host", "threads": 2}),
                      [Measurement("tg_tps", 50.0, "t/s")])
        s.record_rung(run_id, key("Q4_K_M", "android:p", {"runner": "device", "stage": "quality",
                                                          "where": "device"}),
                      [Measurement("xml_parse_rate", 1.0, "ratio")], status=None)
        s.record_rungs(run_id, [(key("Q4_K_M@d512", "android:p", {"runner": "device", "depth": 512}),
                                 [Measurement("tg_tps", 20.0, "t/s")], "ok", None)])
        assert _columns(s, run_id) == {("Q4_K_M", "host:x", "tg_tps"): ("bench", "host"),
                                       ("Q4_K_M", "android:p", "xml_parse_rate"): ("quality", "device"),
                                       ("Q4_K_M@d512", "android:p", "tg_tps"): ("bench", "device")}
        rows = s.measurements(run_id, stage="bench", device_id="android:p")
        assert [(r["quant"], r["stage"], r["place"]) for r in rows] == [("Q4_K_M@d512", "bench", "device")]
        assert s.measurements(run_id, stage=("quality", "tune"), place="host") == []


def test_a_database_from_a_newer_edgequant_is_still_refused(tmp_path):
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    Store(db).close()
    raw = sqlite3.connect(db)
    raw.execute("INSERT INTO _migrations VALUES ('999_from_the_future', 0)")
    raw.commit()
    raw.close()
    with pytest.raises(BadInput, match="999_from_the_future"):
        Store(db)
