"""`edgequant export --llama-bench`: llama-bench's JSON and SQL shapes, checked against the llama-bench
source of the vendored llama.cpp and read back by llama.cpp's own scripts/compare-llama-bench.py."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, run_cli
from edgequant.results.store import Measurement, RowKey, Store

MiB = 1024 * 1024
PARAMS = {"runner": "host", "threads": 2, "n_prompt": 512, "n_gen": 128, "repetitions": 3, "warmup": 1,
          "n_batch": 2048, "n_ubatch": 512, "flash_attn": "auto", "mmap": True, "repack": False}


@pytest.fixture(scope="module")
def llama_cpp_tree() -> Path:
    from edgequant.bench.llamacpp_tools import llama_cpp_source

    return llama_cpp_source()


def upstream_fields(tree: Path) -> tuple[list[str], dict[str, str]]:
    """llama-bench's field names (test::get_fields) and types (test::get_field_type), read from its source."""
    src = (tree / "tools" / "llama-bench" / "llama-bench.cpp").read_text()
    body = re.search(r"get_fields\(\) \{.*?fields = \{(.*?)\};", src, re.S).group(1)
    names = re.findall(r'"(\w+)"', body)
    types_src = re.search(r"field_type get_field_type\(const std::string & field\) \{(.*?)\n    \}", src, re.S).group(1)
    types = {}
    for cond, kind in re.findall(r"if \((.*?)\) \{\s*return (\w+);", types_src, re.S):
        for name in re.findall(r'"(\w+)"', cond):
            types.setdefault(name, kind)
    return names, {n: types.get(n, "STRING") for n in names}


def store_run(db, tg: float, pp: float, model="org/m") -> str:
    with Store(db) as s:
        run = s.start_run("edgequant run", "default", model, "h" * 64)
        for quant, scale in (("BF16", 1.0), ("Q4_0", 2.0)):
            key = RowKey(model, "h" * 64, quant, quant * 4, quant == "BF16", "host:a",
                         {"cpu_model": "Test CPU @ 2GHz"}, "llama.cpp", "0.3.36", PARAMS)
            s.record_rung(run, key, [Measurement("size", 300 * MiB / scale, "bytes"),
                                     Measurement("n_params", 268_000_000, "count"),
                                     Measurement("pp_tps", pp * scale, "t/s", 4.0, 3),
                                     Measurement("tg_tps", tg * scale, "t/s", 1.0, 3)])
        key = RowKey(model, "h" * 64, "Q2_K", "q2", False, "host:a", {}, "llama.cpp", "0.3.36", PARAMS)
        s.record_rung(run, key, [Measurement("size", 1.0, "bytes")], status="oom", detail="killed")
        s.finish_run(run, "complete")
    return run


def export(tmp_path, db, *args):
    return run_cli("export", *args, "--db", str(db), env=cli_env(tmp_path), timeout=120)


def test_json_rows_have_llama_benchs_fields_types_and_figures(tmp_path, llama_cpp_tree):
    db = tmp_path / "r.db"
    run = store_run(db, tg=50.0, pp=200.0)
    out = tmp_path / "a.json"
    r = export(tmp_path, db, "--llama-bench", run, "-o", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    names, types = upstream_fields(llama_cpp_tree)
    assert len(names) > 30
    for row in rows:
        assert list(row) == names + ["samples_ns", "samples_ts"]
        for name in names:
            expected = {"STRING": str, "INT": int, "BOOL": bool, "FLOAT": float}[types[name]]
            assert type(row[name]) is expected, (name, row[name])
    # two tests per measured rung (the oom rung has none), pp then tg, as llama-bench reports them
    assert [(x["model_type"], x["n_prompt"], x["n_gen"]) for x in rows] == [
        ("org/m BF16", 512, 0), ("org/m BF16", 0, 128), ("org/m Q4_0", 512, 0), ("org/m Q4_0", 0, 128)]
    pp, tg = rows[2], rows[3]
    assert (pp["avg_ts"], pp["stddev_ts"], tg["avg_ts"], tg["stddev_ts"]) == (400.0, 4.0, 100.0, 1.0)
    assert pp["avg_ns"] == 1_280_000_000 and tg["avg_ns"] == 1_280_000_000  # 512 / 400 t/s, 128 / 100 t/s
    assert tg["stddev_ns"] == 12_800_000
    assert (pp["build_commit"], pp["cpu_info"], pp["n_threads"], pp["model_size"], pp["model_n_params"]) == \
        (run, "Test CPU @ 2GHz", 2, 150 * MiB, 268_000_000)
    assert (pp["flash_attn"], pp["repack"], pp["n_batch"], pp["n_ubatch"]) == (-1, False, 2048, 512)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", pp["test_time"])


def compare_llama_bench(tree: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    for mod in ("tabulate", "git"):  # the script's own imports: test dependencies, so missing ones fail
        __import__(mod)
    return subprocess.run([sys.executable, str(tree / "scripts" / "compare-llama-bench.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def speedups(table: str) -> dict[tuple[str, str], float]:
    """(model, test) -> speedup from compare-llama-bench's pipe table."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"\d+\.\d+", cells[-1]):
            out[(cells[-5], cells[-4])] = float(cells[-1])
    return out


def test_compare_llama_bench_reads_two_exported_json_files(tmp_path, llama_cpp_tree):
    db = tmp_path / "r.db"
    a, b = store_run(db, tg=50.0, pp=200.0), store_run(db, tg=40.0, pp=220.0)
    for run, name in ((a, "a.json"), (b, "b.json")):
        assert export(tmp_path, db, "--llama-bench", run, "-o", str(tmp_path / name)).returncode == 0
    # with JSON input the script needs -t (it detects the tool only from a SQLite file)
    r = compare_llama_bench(llama_cpp_tree, tmp_path, "-t", "llama-bench", "-i", "a.json", "-i", "b.json",
                            "-b", a, "-c", b)
    assert r.returncode == 0, r.stderr[-3000:]
    got = speedups(r.stdout)
    assert got == {("org/m BF16", "pp512"): 1.10, ("org/m BF16", "tg128"): 0.80,
                   ("org/m Q4_0", "pp512"): 1.10, ("org/m Q4_0", "tg128"): 0.80}, r.stdout


def test_compare_llama_bench_reads_the_sql_export_loaded_into_sqlite(tmp_path, llama_cpp_tree):
    db = tmp_path / "r.db"
    # a quote in a value must not break the SQL (llama-bench itself does not escape them)
    a, b = store_run(db, tg=50.0, pp=200.0, model="o'brien/m"), store_run(db, tg=60.0, pp=100.0, model="o'brien/m")
    bench_db = tmp_path / "llama-bench.sqlite"
    for run in (a, b):  # like `llama-bench -o sql | sqlite3 llama-bench.sqlite`, once per build
        r = export(tmp_path, db, "--llama-bench", run, "--format", "sql")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("CREATE TABLE IF NOT EXISTS llama_bench (")
        conn = sqlite3.connect(bench_db)
        conn.executescript(r.stdout)
        conn.close()
    conn = sqlite3.connect(bench_db)
    assert conn.execute("SELECT count(*), count(DISTINCT build_commit) FROM llama_bench").fetchone() == (8, 2)
    assert conn.execute("SELECT DISTINCT model_type FROM llama_bench ORDER BY 1").fetchall() == \
        [("o'brien/m BF16",), ("o'brien/m Q4_0",)]
    conn.close()
    r = compare_llama_bench(llama_cpp_tree, tmp_path, "-i", str(bench_db), "-b", a, "-c", b)
    assert r.returncode == 0, r.stderr[-3000:]
    assert speedups(r.stdout) == {("o'brien/m BF16", "pp512"): 0.50, ("o'brien/m BF16", "tg128"): 1.20,
                                  ("o'brien/m Q4_0", "pp512"): 0.50, ("o'brien/m Q4_0", "tg128"): 1.20}, r.stdout


def test_export_bad_input_is_one_line(tmp_path):
    db = tmp_path / "r.db"
    run = store_run(db, tg=50.0, pp=200.0)
    r = export(tmp_path, db, run)
    assert r.returncode == 2 and "--llama-bench" in assert_one_line_error(r.stderr)
    with Store(db) as s:
        empty = s.start_run("edgequant eval", "default", "m", "h")
        s.finish_run(empty, "complete")
    r = export(tmp_path, db, "--llama-bench", empty)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, empty, "no pp/tg measurements")
    # --build-commit names the rows for compare-llama-bench's -b/-c
    r = export(tmp_path, db, "--llama-bench", run, "--build-commit", "nightly-42")
    assert {x["build_commit"] for x in json.loads(r.stdout)} == {"nightly-42"}


def test_stored_samples_and_a_devices_own_cpu_info_are_exported(tmp_path):
    import statistics

    db = tmp_path / "r.db"
    samples = [95.0, 100.0, 105.0]  # tokens/s per repetition, as host runs store them
    with Store(db) as s:
        run = s.start_run("edgequant run", "default", "m", "h")
        key = RowKey("m", "h", "Q4_0", "a", False, "android:R58", {"cpu_model": "samsung SM-S911B"},
                     "llama.cpp", "0.3.36", {**PARAMS, "runner": "device", "repack": "default"})
        s.record_rung(run, key, [
            Measurement("pp_tps", 300.0, "t/s", 3.0, 3, {"build_commit": "abc1234", "cpu_info": "ARMv8 Processor"}),
            Measurement("tg_tps", statistics.fmean(samples), "t/s", statistics.stdev(samples), 3,
                        {"samples": samples})])
        s.finish_run(run, "complete")
    rows = json.loads(export(tmp_path, db, "--llama-bench", run).stdout)
    pp, tg = rows
    assert pp["cpu_info"] == tg["cpu_info"] == "ARMv8 Processor" and pp["repack"] is True
    assert pp["samples_ns"] == [] and pp["samples_ts"] == []
    ns = [128 / t * 1e9 for t in samples]
    assert tg["samples_ts"] == samples
    assert [abs(a - b) <= 1 for a, b in zip(tg["samples_ns"], ns)] == [True] * 3
    assert abs(tg["avg_ns"] - statistics.fmean(ns)) <= 2 and abs(tg["stddev_ns"] - statistics.stdev(ns)) <= 2
