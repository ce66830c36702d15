"""The SQLite results store: named migrations, transactional rung writes, partial runs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from edgequant.core.errors import BadInput
from edgequant.results.store import MIGRATIONS, Measurement, RowKey, Store


def key(quant="Q4_K_M", ref=False) -> RowKey:
    return RowKey(model_id="m", model_hash="h" * 64, quant=quant, artifact_sha256="a" * 64, is_reference=ref,
                  device_id="host:x", device={"cpu_model": "cpu"}, runtime="llama.cpp",
                  runtime_version="0.3.36", params={"n_prompt": 512})


def test_migrations_are_named_applied_once_and_recorded(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        assert s.migrations() == [name for name, _ in MIGRATIONS]
    with Store(db) as s:  # reopening applies nothing twice
        assert s.migrations() == [name for name, _ in MIGRATIONS]
    conn = sqlite3.connect(db)
    cols = {r[1] for r in conn.execute("PRAGMA table_info(measurements)")}
    assert {"run_id", "model_id", "model_hash", "quant", "artifact_sha256", "device_id", "device", "runtime",
            "runtime_version", "params", "metric", "value", "stddev", "repetitions", "measured_at"} <= cols


def test_a_database_from_a_newer_edgequant_is_refused(tmp_path):
    db = tmp_path / "r.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO _migrations VALUES ('999_from_the_future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(BadInput, match="999_from_the_future"):
        Store(db)


def test_not_a_database_is_one_clear_error(tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BadInput, match="not a usable SQLite database"):
        Store(bad)


def test_rung_rows_are_written_in_one_transaction(tmp_path):
    with Store(tmp_path / "r.db") as s:
        run = s.start_run("edgequant run", "default", "m", "h" * 64)
        s.record_rung(run, key(), [Measurement("pp_tps", 100.0, "t/s", 2.0, 3)])
        bad = [Measurement("tg_tps", 50.0, "t/s", 1.0, 3), Measurement("pp_tps", None, "t/s")]
        with pytest.raises(TypeError):
            s.record_rung(run, key("Q8_0"), bad)
        rows = s.measurements(run)
        # the Q4_K_M rung is stored, nothing of the failed Q8_0 write is
        assert [(r["quant"], r["metric"], r["value"], r["stddev"], r["repetitions"]) for r in rows] == \
            [("Q4_K_M", "pp_tps", 100.0, 2.0, 3)]
        assert [r["quant"] for r in s.rung_statuses(run)] == ["Q4_K_M"]


def test_run_lifecycle_and_last(tmp_path):
    with Store(tmp_path / "r.db") as s:
        a = s.start_run("edgequant run", "default", "m", "h")
        s.finish_run(a, "complete")
        b = s.start_run("edgequant run", "quick", "m", "h")
        s.finish_run(b, "partial", "interrupted (Ctrl-C) while benchmarking")
        assert s.run("last")["run_id"] == b
        assert s.run(a)["status"] == "complete"
        assert s.run(b)["status_detail"].startswith("interrupted")
        with pytest.raises(BadInput, match="not in"):
            s.run("nope")


def test_a_run_whose_process_died_reads_as_partial(tmp_path):
    db = tmp_path / "r.db"
    code = ("import sys; from edgequant.results.store import Store; s = Store(sys.argv[1]); "
            "print(s.start_run('edgequant run', 'default', 'm', 'h'))")
    run_id = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True,
                            check=True).stdout.strip()
    with Store(db) as s:
        r = s.run(run_id)
        assert r["status"] == "partial"
        assert "ended before the run finished" in r["status_detail"]
