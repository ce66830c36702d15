"""The main job through the real CLI on the tiny Gemma 3: convert -> quantize ->
bench -> store -> table, checked against the files and the database directly."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import gguf
import psutil
import pytest

from conftest import db_rows, REPO, assert_one_line_error, cli_env, ctrl_c, run_cli, start_cli, wait_for
from tiny_model import make_checkpoint_without_tokenizer, make_pickle_only_checkpoint, \
    make_unsupported_arch_checkpoint

LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"]
BENCH_METRICS = {"size", "bpw", "n_params", "load_time", "pp_tps", "tg_tps", "ttft", "peak_rss",
                 "peak_rss_anon", "peak_rss_file", "contention"}


def tiny_profile(folder: Path, types=LADDER, **bench) -> Path:
    settings = {"n_prompt": 64, "n_gen": 16, "repetitions": 3, "warmup": 1, **bench}
    lines = ["[profile]", 'name = "tiny"', "[quantize]", f"types = {json.dumps(list(types))}", "[bench]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = folder / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoint, tmp_path_factory):
    """One full `edgequant run` of the tiny model; the tests below inspect what it left."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    env = cli_env(tmp)
    profile = tiny_profile(tmp)
    result = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)
    assert result.returncode == 0, result.stderr
    return {"tmp": tmp, "env": env, "profile": profile, "result": result, "db": tmp / "results.db",
            "cache": tmp / "cache"}



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_stores_every_metric_for_every_rung(tiny_run):
    runs = db_rows(tiny_run["db"], "SELECT * FROM runs")
    assert len(runs) == 1 and runs[0]["status"] == "complete"
    run_id = runs[0]["run_id"]
    rows = db_rows(tiny_run["db"], "SELECT * FROM measurements WHERE run_id = ?", run_id)
    by_rung: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_rung.setdefault(r["quant"], {})[r["metric"]] = r
    assert set(by_rung) == {"BF16", *LADDER}
    for quant, metrics in by_rung.items():
        assert set(metrics) == BENCH_METRICS, quant
        for m in ("pp_tps", "tg_tps", "ttft"):
            assert metrics[m]["value"] > 0 and metrics[m]["repetitions"] == 3 and metrics[m]["stddev"] >= 0
        for m in ("pp_tps", "tg_tps"):  # the per-repetition rates are kept (llama-bench export's samples)
            samples = json.loads(metrics[m]["detail"])["samples"]
            assert len(samples) == 3 and sum(samples) / 3 == pytest.approx(metrics[m]["value"])
        assert metrics["peak_rss"]["value"] >= metrics["peak_rss_anon"]["value"] > 0
        assert metrics["peak_rss_file"]["value"] > 0  # the GGUF is mmapped
        # TTFT (ms) is the prefill time of each pp repetition and pp = 64 / that time, so by
        # Jensen's inequality mean(TTFT) >= 64 / mean(pp), with equality only without spread
        assert metrics["ttft"]["value"] >= 64 / metrics["pp_tps"]["value"] * 1000 * (1 - 1e-9)
    refs = {r["quant"] for r in rows if r["is_reference"]}
    assert refs == {"BF16"}
    params = json.loads(rows[0]["params"])
    assert params["n_prompt"] == 64 and params["n_gen"] == 16 and params["repetitions"] == 3
    assert params["threads"] == (psutil.cpu_count(logical=False) or psutil.cpu_count())
    device = json.loads(rows[0]["device"])
    assert device["ram_bytes"] == psutil.virtual_memory().total and device["physical_cores"] >= 1
    assert rows[0]["runtime"] == "llama.cpp" and rows[0]["runtime_version"] == "0.3.36"


def test_artifacts_match_the_files_on_disk(tiny_run):
    arts = db_rows(tiny_run["db"], "SELECT * FROM artifacts")
    assert {a["quant"] for a in arts} == {"BF16", *LADDER}
    bpw = {}
    for a in arts:
        path = Path(a["path"])
        assert path.is_file() and path.parent.parent == tiny_run["cache"] / "artifacts"
        assert a["size_bytes"] == path.stat().st_size
        assert a["sha256"] == sha256(path)
        reader = gguf.GGUFReader(str(path))
        assert json.loads(a["tensor_types"]) == dict(Counter(t.tensor_type.name for t in reader.tensors))
        n = sum(int(t.n_elements) for t in reader.tensors)
        assert a["n_params"] == n
        bpw[a["quant"]] = a["bits_per_weight"]
    assert 15.5 < bpw["BF16"] <= 16.5
    assert bpw["Q8_0"] > bpw["Q6_K"] > bpw["Q4_K_M"] > bpw["Q3_K_M"] > bpw["Q2_K"]
    assert 8.0 < bpw["Q8_0"] < 9.0 and bpw["Q4_0"] < 5.0
    tensor_types = {a["quant"]: json.loads(a["tensor_types"]) for a in arts}
    assert "Q4_K" in tensor_types["Q4_K_M"] and "IQ4_XS" in tensor_types["IQ4_XS"]
    # nothing half-written is left behind
    assert not [p for p in (tiny_run["cache"] / "artifacts").rglob("*") if ".partial" in p.name]


def test_table_lists_the_reference_first_then_the_profile_order(tiny_run):
    out = tiny_run["result"].stdout
    names = re.findall(r"^[│|]\s*(BF16 \(ref\)|[A-Z0-9_]+)\s", out, flags=re.M)
    assert names == ["BF16 (ref)", *LADDER], out
    header = out.splitlines()[1]
    for col in ("size MiB", "bits/w", "load s", "pp64 t/s", "tg16 t/s", "peak RSS MiB", "size ×"):
        assert col in out, col
    assert "± " in out and header


def test_report_formats_rerender_the_stored_run(tiny_run):
    env = tiny_run["env"]
    (run,) = db_rows(tiny_run["db"], "SELECT run_id FROM runs")
    stored = {(r["quant"], r["metric"]): r["value"] for r in
              db_rows(tiny_run["db"], "SELECT quant, metric, value FROM measurements")}

    js = run_cli("report", run["run_id"], "--format", "json", env=env)
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert [r["quant"] for r in data["rungs"]] == ["BF16", *LADDER]
    for r in data["rungs"]:
        assert r["tg_tps"] == stored[(r["quant"], "tg_tps")]
        assert r["size_ratio"] == pytest.approx(stored[(r["quant"], "size")] / stored[("BF16", "size")])
        assert r["tg_speedup"] == pytest.approx(stored[(r["quant"], "tg_tps")] / stored[("BF16", "tg_tps")])

    c = run_cli("report", "last", "--format", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(c.stdout)))
    assert [r["quant"] for r in rows] == ["BF16", *LADDER]
    assert float(rows[3]["pp_tps"]) == pytest.approx(stored[(rows[3]["quant"], "pp_tps")])

    md = run_cli("report", "--format", "md", env=env)
    speed_table = md.stdout.split("\n\n**resources", 1)[0]      # the stages' resources table follows it
    table_rows = [ln for ln in speed_table.splitlines() if ln.startswith("| ") and "rung" not in ln]
    assert len(table_rows) == 1 + len(LADDER)

    out_file = tiny_run["tmp"] / "report.md"
    w = run_cli("report", "--format", "md", "--output", str(out_file), env=env)
    assert w.returncode == 0 and out_file.read_text() == md.stdout

    listing = run_cli("report", "--list", env=env)
    assert run["run_id"] in listing.stdout and "complete" in listing.stdout


def test_second_run_converts_and_quantizes_nothing(tiny_run, tiny_checkpoint):
    arts = db_rows(tiny_run["db"], "SELECT path FROM artifacts")
    before = {a["path"]: os.stat(a["path"]).st_mtime_ns for a in arts}
    again = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(tiny_run["profile"]),
                    "--json", env=tiny_run["env"])
    assert again.returncode == 0, again.stderr
    listed = json.loads(again.stdout)
    assert [a["quant"] for a in listed] == ["BF16", *LADDER]
    assert all(a["reused"] for a in listed)
    assert {a["path"]: os.stat(a["path"]).st_mtime_ns for a in listed} == before


def test_bench_subcommand_reuses_artifacts_and_stores_a_new_run(tiny_run, tiny_checkpoint):
    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(tiny_run["profile"]),
                  "-p", "32", "-n", "8", "--format", "json", env=tiny_run["env"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["params"]["n_prompt"] == 32 and data["params"]["n_gen"] == 8
    assert data["run"]["status"] == "complete"
    assert [r["quant"] for r in data["rungs"]] == ["BF16", *LADDER]
    assert len(db_rows(tiny_run["db"], "SELECT run_id FROM runs")) == 2


def test_bench_without_built_artifacts_says_to_quantize_first(tiny_checkpoint, tmp_path):
    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(tiny_profile(tmp_path)),
                  env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "edgequant quantize")


# ---------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing half-written


def _no_artifacts(tmp: Path) -> bool:
    return not list((tmp / "cache").rglob("*.gguf")) and not list((tmp / "cache").rglob("*.partial*"))


def test_path_that_is_not_a_checkpoint(tmp_path):
    env = cli_env(tmp_path)
    missing = run_cli("run", "--model", str(tmp_path / "nope"), env=env)
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "no such file or folder")
    a_file = tmp_path / "weights.gguf"
    a_file.write_bytes(b"GGUF")
    res = run_cli("run", "--model", str(a_file), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "not a checkpoint folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("quantize", "--model", str(empty), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "no config.json")
    assert _no_artifacts(tmp_path)


def test_checkpoint_without_tokenizer(tmp_path):
    ckpt = make_checkpoint_without_tokenizer(tmp_path / "notok")
    res = run_cli("run", "--model", str(ckpt), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "no tokenizer")
    assert _no_artifacts(tmp_path)


def test_unsupported_architecture(tmp_path):
    ckpt = make_unsupported_arch_checkpoint(tmp_path / "bert")
    res = run_cli("run", "--model", str(ckpt), env=cli_env(tmp_path))
    assert res.returncode == 2
    line = assert_one_line_error(res.stderr, "BertModel", "not supported")
    assert "Gemma3ForCausalLM" in line
    assert _no_artifacts(tmp_path)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    ckpt = make_pickle_only_checkpoint(tmp_path / "pickled")
    # a pickle that would leave a mark if it were ever loaded
    marker = tmp_path / "UNPICKLED"
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    res = run_cli("run", "--model", str(ckpt), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "pytorch_model.bin", "safetensors only")
    assert not marker.exists()
    assert _no_artifacts(tmp_path)


def test_unknown_quant_type_lists_the_valid_ones(tiny_checkpoint, tmp_path):
    profile = tiny_profile(tmp_path, types=["Q4_K_M", "Q5_K_X"])
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "Q5_K_X", "quantize.types[1]", "Q4_K_M", "IQ4_XS", str(profile))
    assert _no_artifacts(tmp_path)


def test_unknown_option_and_unknown_run(tmp_path):
    env = cli_env(tmp_path)
    res = run_cli("run", "--frobnicate", env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "--frobnicate")
    res = run_cli("report", "no-such-run", env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "no-such-run")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return os.system(f"mount -t tmpfs -o size={size} tmpfs {path} 2>/dev/null") == 0


def test_too_little_disk_is_caught_before_converting(tiny_checkpoint, tmp_path):
    cache = tmp_path / "smalldisk"
    if not _tmpfs(cache, "3M"):  # needs root, as in CI
        pytest.fail("cannot mount a small tmpfs to simulate a full disk (tests must run as root)")
    try:
        env = cli_env(tmp_path, EDGEQUANT_CACHE_DIR=str(cache))
        res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(tiny_profile(tmp_path)), env=env)
        assert res.returncode == 2
        assert_one_line_error(res.stderr, "needs about", "free", "--cache-dir")
        assert not list(cache.rglob("*.gguf")) and not list(cache.rglob("*.partial*"))
        # refused before anything was written: no run stored (none left looking complete either)
        db = tmp_path / "results.db"
        assert not db.exists() or db_rows(db, "SELECT status FROM runs") == []
    finally:
        os.system(f"umount {cache}")


def test_ctrl_c_while_converting_leaves_no_file_and_a_partial_run(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    proc = start_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(tiny_profile(tmp_path)), env=env)
    arts = tmp_path / "cache" / "artifacts"
    wait_for(lambda: any(".partial" in p.name for p in arts.rglob("*")), 120, "conversion to start", proc)
    out, err = ctrl_c(proc)
    assert proc.returncode == 130
    assert_one_line_error(err, "interrupted while quantizing", "partial")
    assert not list(arts.rglob("*.gguf")) and not [p for p in arts.rglob("*") if ".partial" in p.name]
    runs = db_rows(tmp_path / "results.db", "SELECT status, status_detail FROM runs")
    assert runs[0]["status"] == "partial" and "Ctrl-C" in runs[0]["status_detail"]


def test_ctrl_c_while_benchmarking_keeps_finished_rungs_and_kills_the_worker(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    # long enough that the interrupt lands inside the benchmark of the first rung
    profile = tiny_profile(tmp_path, types=["Q8_0"], n_gen=64, repetitions=400)
    proc = start_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)

    def worker_running():
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for k in kids:
            try:
                if "host_worker" in " ".join(k.cmdline()):
                    return True
            except psutil.Error:  # a child that just ended (e.g. the converter)
                continue
        return False

    wait_for(worker_running, 180, "the benchmark worker to start", proc)
    workers = [k for k in psutil.Process(proc.pid).children(recursive=True)]
    out, err = ctrl_c(proc)
    assert proc.returncode == 130
    assert_one_line_error(err, "interrupted while benchmarking", "partial")
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    (run,) = db_rows(tmp_path / "results.db", "SELECT run_id, status FROM runs")
    assert run["status"] == "partial"
    # the artifacts are complete files, kept for the next run
    assert len(list((tmp_path / "cache" / "artifacts").rglob("*.gguf"))) == 2
    rep = run_cli("report", run["run_id"], env=env)
    assert rep.returncode == 0 and "partial" in rep.stdout


# ---------------------------------------------------------------------------
# docs stay honest


def test_every_command_has_help_and_is_in_the_readme(tmp_path):
    from edgequant.cli import cli

    readme = (REPO / "README.md").read_text()
    for name, cmd in cli.commands.items():
        res = run_cli(name, "--help", env=cli_env(tmp_path))
        assert res.returncode == 0 and "Usage: edgequant " + name in res.stdout
        for param in cmd.params:
            if param.name != "help":
                assert param.help or getattr(param, "metavar", None), f"{name} {param.name} has no help"
        assert f"edgequant {name}" in readme, f"`edgequant {name}` is not in the README"
