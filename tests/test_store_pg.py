"""The shared results store: the same migrations and API on SQLite and on a real PostgreSQL server,
concurrent writers from several processes, a newer schema refused, an unreachable server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, run_cli
from pgserver import free_port
from edgequant.core.errors import BadInput
from edgequant.results.store import MIGRATIONS, Measurement, RowKey, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "results.db")
    return request.getfixturevalue("pg_url")


def pg_rows(url: str, sql: str, *args) -> list[dict]:
    """Rows read with plain psycopg, not edgequant's store."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql, args).fetchall()


def key(quant: str, device_id: str = "host:a", params=None) -> RowKey:
    return RowKey(model_id="org/model", model_hash="h" * 64, quant=quant, artifact_sha256=quant.lower() * 8,
                  is_reference=quant == "BF16", device_id=device_id, device={"cpu_model": "cpu", "cores": 2},
                  runtime="llama.cpp", runtime_version="0.3.36", params=params or {"n_prompt": 512, "threads": 2})


def test_the_same_named_migrations_run_on_postgresql(pg_url):
    with Store(pg_url) as s:
        assert s.dialect == "postgresql"
        assert s.migrations() == [name for name, _ in MIGRATIONS]
        assert "secret" not in s.path
    with Store(pg_url) as s:  # reopening applies nothing twice
        assert s.migrations() == [name for name, _ in MIGRATIONS]
    cols = {r["column_name"]: r["data_type"] for r in pg_rows(
        pg_url, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'measurements'")}
    assert {"run_id", "model_id", "model_hash", "quant", "artifact_sha256", "device_id", "device", "runtime",
            "runtime_version", "params", "metric", "value", "stddev", "repetitions", "measured_at",
            "detail"} <= set(cols)
    # SQLite's REAL is a double and its INTEGER 64-bit: the translation keeps both
    assert cols["value"] == "double precision" and cols["measured_at"] == "double precision"
    assert cols["repetitions"] == "bigint"
    tables = {r["table_name"] for r in pg_rows(
        pg_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"runs", "artifacts", "measurements", "rung_status", "eval_cases", "tags", "_migrations"} <= tables


def test_every_store_call_round_trips_on_both_backends(target):
    big = 5 * 2**30  # a 5 GiB artifact: more than a 32-bit integer holds
    with Store(target) as s:
        run = s.start_run("edgequant run", "default", "org/model", "h" * 64)
        s.set_prep_seconds(run, 12.5)
        s.record_artifact({"sha256": "s" * 64, "model_hash": "h" * 64, "quant": "Q4_0", "format": "gguf",
                           "size_bytes": big, "n_params": 4_000_000_000, "bits_per_weight": 4.5,
                           "tensor_types": {"q4_0": 200, "f32": 10}, "cache_key": "k", "path": "/x.gguf",
                           "created_at": 1700000000.25})
        # re-recording an artifact updates it in place
        s.record_artifact({"sha256": "s" * 64, "model_hash": "h" * 64, "quant": "Q4_0", "format": "gguf",
                           "size_bytes": big, "n_params": 4_000_000_000, "bits_per_weight": 4.5,
                           "tensor_types": {"q4_0": 200, "f32": 10}, "cache_key": "k", "path": "/moved.gguf",
                           "created_at": 1700000000.25})
        s.record_rung(run, key("BF16"), [Measurement("pp_tps", 101.5, "t/s", 2.25, 3),
                                         Measurement("peak_rss", float(big), "bytes")])
        cases = [{"case_id": "c1", "format": "xml", "ok": True, "refusal": False, "reason": None,
                  "fields": {"esi": 2}, "output": "<a/>", "stopped": "eos", "n_tokens": 7},
                 {"case_id": "c2", "format": "xml", "ok": False, "refusal": True, "reason": "refused",
                  "fields": {}, "output": "no", "stopped": None, "n_tokens": None}]
        s.record_rung(run, key("Q4_0"), [Measurement("xml_parse_rate", 0.5, "ratio", None, 2,
                                                     {"ci95": [0.1, 0.9]})],
                      status=None, cases=cases, suite="triage")
        s.record_rung(run, key("Q4_0"), [], status="oom", detail="killed")
        s.finish_run(run, "complete")
        t0 = s.run(run)["started_at"]

    with Store(target) as s:
        r = s.run(run)
        assert (r["status"], r["prep_seconds"], r["profile"], r["model_id"]) == ("complete", 12.5, "default",
                                                                                "org/model")
        assert "rowid" not in r
        assert abs(r["started_at"] - time.time()) < 120 and r["started_at"] == t0  # a double, not a float4
        art = s.artifact("s" * 64)
        assert (art["size_bytes"], art["path"], art["tensor_types"]) == (big, "/moved.gguf", {"q4_0": 200, "f32": 10})
        assert s.artifact("nope") is None
        rows = s.measurements(run)
        assert [(m["quant"], m["metric"], m["value"], m["stddev"], m["repetitions"], m["is_reference"])
                for m in rows] == [("BF16", "pp_tps", 101.5, 2.25, 3, True), ("BF16", "peak_rss", float(big), None,
                                                                            None, True),
                                   ("Q4_0", "xml_parse_rate", 0.5, None, 2, False)]
        assert rows[0]["params"] == {"n_prompt": 512, "threads": 2} and rows[0]["device"]["cores"] == 2
        assert rows[2]["detail"] == {"ci95": [0.1, 0.9]}
        got = s.eval_cases(run)
        assert [(c["case_id"], c["ok"], c["refusal"], c["fields"], c["suite"]) for c in got] == \
            [("c1", True, False, {"esi": 2}, "triage"), ("c2", False, True, {}, "triage")]
        assert s.eval_cases(run, "BF16") == []
        assert s.rung_statuses(run) == [{"quant": "BF16", "device_id": "host:a", "status": "ok", "detail": None},
                                        {"quant": "Q4_0", "device_id": "host:a", "status": "oom",
                                         "detail": "killed"}]
        assert [x["run_id"] for x in s.runs()] == [run]


def test_last_last_complete_and_tags_resolve_on_both_backends(target):
    with Store(target) as s:
        a = s.start_run("edgequant run", "default", "m", "h")
        s.finish_run(a, "complete")
        b = s.start_run("edgequant run", "default", "m", "h")
        s.finish_run(b, "failed", "boom")
        assert s.run("last")["run_id"] == b
        assert s.run("last-complete")["run_id"] == a
        assert s.tag("last", "good") == b
        assert s.run("good")["run_id"] == b
        s.tag(a, "good")  # a tag moves
        assert s.run("good")["run_id"] == a
        assert s.tags() == [{"name": "good", "run_id": a, "tagged_at": s.tags()[0]["tagged_at"]}]
        with pytest.raises(BadInput, match="tag name"):
            s.tag(a, "last")
        with pytest.raises(BadInput, match="tag name"):
            s.tag(a, "no spaces")
        with pytest.raises(BadInput, match="neither a run id nor a tag"):
            s.tag("missing", "x")


def test_a_failed_rung_write_leaves_nothing_on_postgresql(pg_url):
    with Store(pg_url) as s:
        run = s.start_run("edgequant run", "default", "m", "h")
        bad = [Measurement("tg_tps", 50.0, "t/s", 1.0, 3), Measurement("pp_tps", None, "t/s")]
        with pytest.raises(TypeError):
            s.record_rung(run, key("Q8_0"), bad)
        # the store is still usable and nothing of the failed rung is stored
        s.record_rung(run, key("Q4_0"), [Measurement("pp_tps", 1.0, "t/s")])
        assert [(r["quant"], r["metric"]) for r in s.measurements(run)] == [("Q4_0", "pp_tps")]
        assert [r["quant"] for r in s.rung_statuses(run)] == ["Q4_0"]
    assert pg_rows(pg_url, "SELECT count(*) AS n FROM measurements WHERE quant = 'Q8_0'") == [{"n": 0}]


def test_a_postgresql_database_of_a_newer_schema_is_refused_untouched(pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:  # a database created by a future edgequant
        conn.execute("CREATE TABLE _migrations (rowid BIGINT GENERATED ALWAYS AS IDENTITY, name TEXT PRIMARY KEY,"
                     " applied_at DOUBLE PRECISION NOT NULL)")
        conn.execute("INSERT INTO _migrations (name, applied_at) VALUES ('001_runs_and_measurements', 0),"
                     " ('999_from_the_future', 0)")
    with pytest.raises(BadInput, match="999_from_the_future") as exc:
        Store(pg_url)
    assert "\n" not in str(exc.value) and "newer edgequant" in str(exc.value)
    tables = {r["table_name"] for r in pg_rows(
        pg_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert tables == {"_migrations"}  # no migration was applied on top
    assert len(pg_rows(pg_url, "SELECT name FROM _migrations")) == 2


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path):
    url = f"postgresql://edgequant:s3cret@127.0.0.1:{free_port()}/results"
    with pytest.raises(BadInput, match="cannot connect") as exc:
        Store(url)
    assert "s3cret" not in str(exc.value) and "\n" not in str(exc.value)
    env = cli_env(tmp_path)
    for args in (["report", "--list"], ["compare", "last", "last"], ["tag", "last", "good"]):
        r = run_cli(*args, "--db", url, env=env, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        line = assert_one_line_error(r.stderr, "results database postgresql://edgequant@127.0.0.1", "cannot connect")
        assert "s3cret" not in r.stderr + r.stdout, line
    # EDGEQUANT_DB may hold the URL too; nothing was written anywhere
    r = run_cli("report", "--list", env=cli_env(tmp_path, EDGEQUANT_DB=url), timeout=120)
    assert r.returncode == 2 and "cannot connect" in r.stderr
    assert not (tmp_path / "results.db").exists()


WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from edgequant.results.store import Measurement, RowKey, Store

    target, worker, n_runs, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    store = Store(target)  # every writer migrates a fresh database at the same moment
    for i in range(n_runs):
        run = store.start_run(f"writer {worker} run {i}", "p", "m", "h")
        store.record_artifact({"sha256": "shared", "model_hash": "h", "quant": "Q4_0", "format": "gguf",
                               "size_bytes": 1, "n_params": 1, "bits_per_weight": 4.5, "tensor_types": {},
                               "cache_key": "k", "path": f"/w{worker}", "created_at": 0.0})
        for q in ("BF16", "Q8_0", "Q4_0"):
            key = RowKey("m", "h", q, "a", q == "BF16", f"dev{worker}", {}, "llama.cpp", "v", {"w": worker})
            rows = [Measurement(f"metric{j}", worker * 1000 + i * 10 + j, "u") for j in range(5)]
            cases = [{"case_id": f"c{j}", "format": "xml", "ok": True, "refusal": False, "reason": None,
                      "fields": {}, "output": "x", "stopped": None, "n_tokens": 1} for j in range(4)]
            store.record_rung(run, key, rows, cases=cases, suite="s")
        store.tag(run, f"w{worker}")
        store.finish_run(run, "complete")
    store.close()
    print("done")
""")


def test_concurrent_writers_from_several_processes_lose_nothing(target, tmp_path):
    writers, n_runs = 4, 6
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, target, str(w), str(n_runs), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(writers)]
    time.sleep(0.3)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and out.strip() == "done", err[-3000:]
    with Store(target) as s:
        assert s.migrations() == [name for name, _ in MIGRATIONS]
        runs = s.runs(limit=1000)
        assert len(runs) == writers * n_runs and {r["status"] for r in runs} == {"complete"}
        assert {r["command"] for r in runs} == {f"writer {w} run {i}" for w in range(writers) for i in range(n_runs)}
        for r in runs:
            w, i = (int(x) for x in r["command"].split()[1::2])
            rows = s.measurements(r["run_id"])
            assert sorted((m["quant"], m["metric"], m["value"]) for m in rows) == sorted(
                (q, f"metric{j}", float(w * 1000 + i * 10 + j)) for q in ("BF16", "Q8_0", "Q4_0") for j in range(5))
            assert len(s.eval_cases(r["run_id"])) == 12
            assert len(s.rung_statuses(r["run_id"])) == 3
        assert {t["name"] for t in s.tags()} == {f"w{w}" for w in range(writers)}


def test_a_connection_lost_mid_run_is_one_line_and_leaves_no_half_rung(pg_url):
    import psycopg

    from edgequant.core.errors import RunFailed

    s = Store(pg_url)
    run = s.start_run("edgequant run", "default", "m", "h")
    s.record_rung(run, key("BF16"), [Measurement("pp_tps", 1.0, "t/s")])
    with psycopg.connect(pg_url, autocommit=True) as admin:  # the server drops edgequant's connection
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'edgequant'")
    with pytest.raises(RunFailed, match="results database postgresql://") as exc:
        s.record_rung(run, key("Q4_0"), [Measurement("pp_tps", 2.0, "t/s"), Measurement("tg_tps", 3.0, "t/s")])
    assert "\n" not in str(exc.value)
    s.close()
    with Store(pg_url) as again:
        assert [(r["quant"], r["metric"]) for r in again.measurements(run)] == [("BF16", "pp_tps")]
        assert [r["quant"] for r in again.rung_statuses(run)] == ["BF16"]


@pytest.mark.slow
def test_edgequant_run_stores_to_postgresql_end_to_end(tiny_checkpoint, pg_url, tmp_path):
    """A real `edgequant run` of the tiny model with --db postgresql://...; report, tag, compare and export
    read it back from the server."""
    import json

    from test_cli import tiny_profile

    env = cli_env(tmp_path)
    profile = tiny_profile(tmp_path, types=["Q4_0"], n_prompt=16, n_gen=8)
    r = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), "--db", pg_url,
                env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "results.db").exists()  # nothing went to the default SQLite file
    stored = pg_rows(pg_url, "SELECT quant, metric, value FROM measurements WHERE metric = 'tg_tps' ORDER BY quant")
    assert [x["quant"] for x in stored] == ["BF16", "Q4_0"] and all(x["value"] > 0 for x in stored)
    rep = json.loads(run_cli("report", "last", "--format", "json", "--db", pg_url, env=env).stdout)
    assert {x["quant"]: x["tg_tps"] for x in rep["rungs"]} == {x["quant"]: x["value"] for x in stored}
    assert rep["run"]["status"] == "complete"
    assert run_cli("tag", "last", "good", "--db", pg_url, env=env).returncode == 0
    r = run_cli("compare", "good", "last", "--db", pg_url, env=env)
    assert r.returncode == 0 and "no regression" in r.stdout, r.stderr
    out = run_cli("export", "--llama-bench", "good", "--db", pg_url, env=env)
    assert sorted((x["model_type"].split()[-1], x["n_gen"]) for x in json.loads(out.stdout)) == \
        [("BF16", 0), ("BF16", 8), ("Q4_0", 0), ("Q4_0", 8)]


def test_the_store_sql_stays_in_the_dialect_both_backends_share():
    """SQLite-only SQL in results/store.py (or the parts of its Store in runs.py and resources.py) would break
    the PostgreSQL store: ON CONFLICT upserts, `?` placeholders, `rowid` for insertion order are shared; these
    are not."""
    import re

    import edgequant.results.resources as resources_module
    import edgequant.results.runs as runs_module
    import edgequant.results.store as store_module

    for module in (store_module, runs_module, resources_module):
        src = Path(module.__file__).read_text()
        name = Path(module.__file__).name
        for pattern in (r"INSERT OR ", r"REPLACE INTO", r"last_insert_rowid", r"\.lastrowid", r"sqlite_master",
                        r"executescript"):
            hits = [ln.strip() for ln in src.splitlines()
                    if re.search(pattern, ln) and not ln.lstrip().startswith("#")]
            assert not hits, f"{pattern!r} in results/{name}: {hits}"
