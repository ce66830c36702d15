"""ONNX rungs in the commands: `edgequant run --device SERIAL --onnx-perf-test TOOL` measures them on the
"phone" (the ADB device peer on loopback, the real linux-arm64 llama-bench under qemu for the GGUF rung,
and the stand-in onnxruntime_perf_test for the ONNX rung: it honours the real tool's command line but is
not the tool; phone figures need onnxruntime_perf_test built for Android), without the option they are
stored as skipped with the reason, a bad tool is one line; `edgequant bench` and `edgequant eval` take the
profile's ONNX rungs like `run` does on the host."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, db_rows, phone_profile_text, run_cli
from test_device_run import peer_battery_level
from test_quality import write_suite

STANDIN = Path(__file__).with_name("onnx_perf_standin.py")

# the BF16 reference (the one GGUF rung) and one ONNX variant; small tests
def _standin(folder: Path) -> Path:
    """The stand-in as an executable named like the real tool (a `#!` script run by this Python)."""
    tool = folder / "onnxruntime_perf_test"
    tool.write_text(f"#!{sys.executable}\n" + STANDIN.read_text())
    tool.chmod(0o755)
    return tool


def _run_args(tiny_checkpoint, peer, workdir, profile, runner, cache, *extra):
    return ["run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
            "--device-dir", workdir, "--runner-dir", str(runner.path), "--no-quality", "--cache-dir", str(cache),
            *extra]


def _statuses(db: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    return {(r["quant"], r["device_id"]): (r["status"], r["detail"])
            for r in db_rows(db, "SELECT quant, device_id, status, detail FROM rung_status")}


def _rows(db: Path, quant: str) -> dict[str, dict]:
    return {r["metric"]: r for r in db_rows(db, "SELECT * FROM measurements WHERE quant = ?", quant)}


@pytest.fixture
def onnx_phone(phone, tmp_path):
    peer, workdir, env, _ = phone
    profile = tmp_path / "phone-onnx.toml"
    profile.write_text(phone_profile_text("phone-onnx", (), onnx=("int4",), threads=1))
    return peer, workdir, env, profile


@pytest.mark.slow
def test_run_on_a_phone_measures_the_onnx_rung_with_perf_test(tiny_checkpoint, tiny_onnx, onnx_phone, arm64_runner,
                                                              tmp_path):
    _, _, cache = tiny_onnx
    peer, workdir, env, profile = onnx_phone
    tool = _standin(tmp_path)
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, cache,
                             "--onnx-perf-test", str(tool)), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    db = Path(env["EDGEQUANT_DB"])
    device_id = f"adb:{peer.serial}"
    assert _statuses(db) == {("BF16", device_id): ("ok", None), ("ONNX-INT4", device_id): ("ok", None)}
    onnx = _rows(db, "ONNX-INT4")
    assert {r["device_id"] for r in onnx.values()} == {device_id}
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    params = json.loads(onnx["pp_tps"]["params"])
    assert params["runner"] == "device" and params["tool"] == "onnxruntime_perf_test" and params["threads"] == 1
    # the figures are the tool's own latencies on the device: prefill t/s = 16 / latency, decode = 1 / latency
    runs = {p.parent.parent.name: [float(line.split(",")[1]) for line in p.read_text().splitlines()]
            for p in (Path(workdir) / "runs" / "onnx").glob("*/*/run/perf_result.csv")}
    assert set(runs) == {"prefill", "decode"} and all(len(v) == 3 for v in runs.values())
    assert onnx["pp_tps"]["value"] == pytest.approx(sum(16 / s for s in runs["prefill"]) / 3)
    assert onnx["tg_tps"]["value"] == pytest.approx(sum(1 / s for s in runs["decode"]) / 3)
    assert onnx["pp_tps"]["repetitions"] == onnx["tg_tps"]["repetitions"] == 3
    assert onnx["load_time"]["value"] > 0 and onnx["peak_rss"]["value"] > 0
    # the phone's health beside the figures, as on the GGUF rungs: cool before and after, its battery level
    assert onnx["throttled"]["value"] == 0 and json.loads(onnx["throttled"]["detail"])["after"]["thermal_status"] == 0
    assert onnx["cooldown_wait"]["unit"] == "s"
    assert onnx["battery_level"]["value"] == pytest.approx(peer_battery_level(peer))
    # the GGUF rung beside it, measured by llama-bench on the same phone
    gguf = _rows(db, "BF16")
    assert {r["device_id"] for r in gguf.values()} == {device_id} and gguf["tg_tps"]["value"] > 0
    # the tool was installed in the work directory, executable, with the host file's bytes
    installed = Path(workdir) / "bin" / "onnxruntime_perf_test"
    assert installed.read_bytes() == tool.read_bytes() and installed.stat().st_mode & 0o111
    assert not list(Path(workdir).rglob("*.partial"))
    assert "ONNX-INT4" in res.stdout
    # the phone's push and measuring step of each rung are stage rows with the phone as the place: the ONNX
    # rung's push sent its model files (and its input sets), its peak is the one perf_test's run read there
    phone_stages = {(r["stage"], r["quant"]): r for r in db_rows(db, "SELECT * FROM stage_resources"
                                                                     " WHERE device_id = ?", device_id)}
    assert set(phone_stages) == {("push", "BF16"), ("bench", "BF16"), ("push", "ONNX-INT4"),
                                 ("bench-onnx", "ONNX-INT4")}
    ((art,),) = [[r["path"] for r in db_rows(db, "SELECT path FROM artifacts WHERE quant = 'ONNX-INT4'")]]
    model_bytes = sum(f.stat().st_size for f in Path(art).parent.iterdir())
    assert phone_stages[("push", "ONNX-INT4")]["data_bytes"] > model_bytes
    assert phone_stages[("bench-onnx", "ONNX-INT4")]["peak_rss_bytes"] == onnx["peak_rss"]["value"]
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in phone_stages.values())


@pytest.mark.slow
def test_without_perf_test_the_onnx_rung_on_a_phone_is_stored_as_skipped(tiny_checkpoint, tiny_onnx, onnx_phone,
                                                                        arm64_runner):
    _, _, cache = tiny_onnx
    peer, workdir, env, profile = onnx_phone
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, cache), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]          # a skipped rung is not a failure
    db = Path(env["EDGEQUANT_DB"])
    device_id = f"adb:{peer.serial}"
    statuses = _statuses(db)
    assert statuses[("BF16", device_id)] == ("ok", None)
    status, detail = statuses[("ONNX-INT4", device_id)]
    assert status == "skipped" and "--onnx-perf-test" in detail and "onnxruntime_perf_test" in detail
    # the row is there (size, bits per weight), with the phone's id, but no speed figures
    onnx = _rows(db, "ONNX-INT4")
    assert {r["device_id"] for r in onnx.values()} == {device_id} and "size" in onnx and "tg_tps" not in onnx
    # the run's summary says why
    assert "ONNX-INT4" in res.stderr and "--onnx-perf-test" in res.stderr
    assert not (Path(workdir) / "bin" / "onnxruntime_perf_test").exists()
    assert not (Path(workdir) / "runs" / "onnx").exists()


def test_a_bad_perf_test_is_one_line_and_nothing_is_stored(tiny_checkpoint, onnx_phone, arm64_runner, tmp_path):
    peer, workdir, env, profile = onnx_phone
    args = ["run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
            "--device-dir", workdir, "--runner-dir", str(arm64_runner.path), "--no-quality"]
    missing = tmp_path / "nowhere" / "onnxruntime_perf_test"
    plain = tmp_path / "plain"
    plain.write_bytes(b"\x7fELF" + b"\0" * 8)
    plain.chmod(0o644)
    host_binary = tmp_path / "host" / "onnxruntime_perf_test"      # a real x86-64 executable
    host_binary.parent.mkdir()
    shutil.copy(Path(sys.executable).resolve(), host_binary)
    for tool, needles in ((missing, ("no such file", "--android")), (plain, ("not executable",)),
                          (host_binary, ("x86-64", "aarch64", "arm64-v8a"))):
        res = run_cli(*args, "--onnx-perf-test", str(tool), env=env, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert_one_line_error(res.stderr, "--onnx-perf-test", str(tool), *needles)
    # an aarch64 program linked against glibc cannot start on an Android phone: refused before the run starts
    # (the linux-arm64 runner the other device tests use needs the same cross compiler: make test installs it, .ci/system-deps)
    cc = shutil.which("aarch64-linux-gnu-gcc")
    assert cc is not None, "aarch64-linux-gnu-gcc is needed (apt-get install gcc-aarch64-linux-gnu)"
    src = tmp_path / "t.c"
    src.write_text("int main(void) { return 0; }\n")
    glibc = tmp_path / "glibc" / "onnxruntime_perf_test"
    glibc.parent.mkdir()
    subprocess.run([cc, "-o", str(glibc), str(src)], check=True, capture_output=True, timeout=120)
    res = run_cli(*args, "--onnx-perf-test", str(glibc.parent), env=env, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    assert_one_line_error(res.stderr, "linked for linux", f"device {peer.serial}", "android")
    assert not (Path(workdir) / "bin" / "onnxruntime_perf_test").exists()
    db = Path(env["EDGEQUANT_DB"])
    assert not db.exists() or not db_rows(db, "SELECT * FROM runs")


# ---------------------------------------------------------------------------
# bench and eval on the host

HOST_PROFILE = ('[profile]\nname = "host-onnx"\n[quantize]\ntypes = []\n[onnx]\nvariants = ["int4"]\n'
                '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nthreads = 1\n')


@pytest.mark.slow
def test_bench_measures_the_profiles_onnx_rungs_and_refuses_unbuilt_ones(tiny_checkpoint, tiny_onnx, tmp_path):
    _, _, cache = tiny_onnx
    env = cli_env(tmp_path)
    prof = tmp_path / "p.toml"
    prof.write_text(HOST_PROFILE)
    built = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(prof), "--cache-dir", str(cache),
                    env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(prof), "--cache-dir", str(cache),
                  env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "results.db"
    onnx, gguf = _rows(db, "ONNX-INT4"), _rows(db, "BF16")
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    assert {r["device_id"] for r in onnx.values()} == {r["device_id"] for r in gguf.values()}   # the host
    for metric in ("pp_tps", "tg_tps"):
        assert onnx[metric]["value"] > 0 and onnx[metric]["repetitions"] == 3
    assert json.loads(onnx["tg_tps"]["params"])["execution_provider"] == "CPUExecutionProvider"
    assert "ONNX-INT4" in res.stdout
    # a variant that was never built: one line naming it, before a run is stored
    runs_before = len(db_rows(db, "SELECT * FROM runs"))
    other = tmp_path / "other.toml"
    other.write_text(HOST_PROFILE.replace('variants = ["int4"]', 'variants = ["int4-b128"]\n'
                                          '[onnx.int4-b128]\nkind = "int4"\nblock_size = 128'))
    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(other), "--cache-dir", str(cache),
                  env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "ONNX-INT4-B128", "edgequant quantize")
    assert len(db_rows(db, "SELECT * FROM runs")) == runs_before


@pytest.mark.slow
def test_eval_judges_the_profiles_onnx_rungs_against_the_gguf_reference(tiny_checkpoint, tiny_onnx, tmp_path):
    _, _, cache = tiny_onnx
    env = cli_env(tmp_path)
    prof = tmp_path / "p.toml"
    prof.write_text(HOST_PROFILE)
    suite = write_suite(tmp_path)
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--profile", str(prof), "--suite", str(suite),
                  "-t", "1", "--cache-dir", str(cache), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "results.db"
    onnx = _rows(db, "ONNX-INT4")
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    for metric in ("xml_parse_rate", "mean_kld", "top1_agreement"):
        assert metric in onnx, metric
    assert json.loads(onnx["mean_kld"]["params"])["reference"] == "BF16"
    assert 0 <= onnx["top1_agreement"]["value"] <= 1 and onnx["mean_kld"]["value"] >= 0
    cases = db_rows(db, "SELECT DISTINCT quant FROM eval_cases")
    assert {c["quant"] for c in cases} == {"BF16", "ONNX-INT4"}


# ---------------------------------------------------------------------------
# the GGUF rungs' per-rung steps on the ONNX rungs: RAM fit, cool-down, health, throttled, resume

class _Recorder:
    """A reporter that keeps what it was told; ``on_phase(quant, phase)`` lets a test act mid-rung."""

    def __init__(self, on_phase=None, on_done=None):
        self.started: list[str] = []
        self.on_phase = on_phase or (lambda q, p: None)
        self.on_done = on_done or (lambda q, s: None)

    def step(self, message: str) -> None:
        pass

    def bytes_progress(self, task: str, done: float, total: float | None) -> None:
        pass

    def rung_started(self, quant: str) -> None:
        self.started.append(quant)

    def rung_phase(self, quant: str, phase: str) -> None:
        self.on_phase(quant, phase)

    def rung_done(self, quant: str, status: str) -> None:
        self.on_done(quant, status)


@contextmanager
def _device_bench(onnx_phone, runner, tmp_path):
    """(ctx, store, run_id, bench): the phone opened like `edgequant run` opens it, and a callable that
    measures ONNX artifacts on it with the stand-in tool."""
    from edgequant.pipeline import device_run
    from edgequant.bench.onnx_device import open_perf_test
    from edgequant.devices import select
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import load_profile
    from edgequant.results.store import Store

    peer, workdir, _, profile_path = onnx_phone
    profile = load_profile(profile_path)
    tool = open_perf_test(_standin(tmp_path))
    ctx = device_run.open_device(select.Target(peer.serial, "direct"), workdir, str(runner.path),
                                 tmp_path / "cache", NullReporter())
    store = Store(tmp_path / "r.db")
    run_id = store.start_run("test", profile.name, "tiny", "hash")

    def bench(artifacts, reporter=None, done=frozenset()):
        scope = RunScope(store, run_id, "tiny", "hash", reporter or _Recorder())
        return device_run.bench_onnx_rungs_on_device(scope, artifacts, profile, ctx, tmp_path / "sets", tool,
                                                     done=done)

    try:
        yield ctx, store, run_id, bench
    finally:
        ctx.close()


@pytest.mark.slow
def test_onnx_rungs_on_a_phone_record_its_health_and_are_throttled_when_it_heats_up(tiny_onnx, onnx_phone,
                                                                                     arm64_runner, tmp_path):
    arts, _, _ = tiny_onnx
    peer, _, _, _ = onnx_phone
    peer.set_battery(level=57, temperature_c=29.5)
    hot, calm = arts["int4"], arts["int8"]

    def on_phase(quant, phase):       # the phone heats up while the first rung's decode set runs
        if quant == hot.quant and phase == "decode":
            peer.set_thermal(2)

    def on_done(quant, status):       # and cools down before the next rung
        if quant == hot.quant:
            peer.set_thermal(0)

    with _device_bench(onnx_phone, arm64_runner, tmp_path) as (ctx, store, run_id, bench):
        out = bench([hot, calm], _Recorder(on_phase, on_done))
    assert [o.status for o in out.outcomes] == ["ok", "ok"]
    db = tmp_path / "r.db"
    statuses = {s["quant"]: s for s in store.rung_statuses(run_id)}
    assert "throttled" in statuses[hot.quant]["detail"] and "rose" in statuses[hot.quant]["detail"]
    assert statuses[calm.quant]["detail"] is None
    for art, was_hot in ((hot, True), (calm, False)):
        rows = _rows(db, art.quant)
        assert rows["tg_tps"]["value"] > 0 and rows["tg_tps"]["runtime"] == "onnxruntime"
        throttled = rows["throttled"]
        assert (throttled["value"], throttled["unit"]) == (1.0 if was_hot else 0.0, "bool")
        health = json.loads(throttled["detail"])
        assert health["before"]["thermal_status"] == 0 and health["after"]["thermal_status"] == (2 if was_hot else 0)
        assert health["cooled"] is True
        assert rows["cooldown_wait"]["unit"] == "s" and rows["cooldown_wait"]["value"] >= 0
        assert rows["thermal_status"]["value"] == 0
        assert json.loads(rows["thermal_status"]["detail"])["after"] == (2 if was_hot else 0)
        assert rows["battery_level"]["value"] == 57
        assert rows["device_celsius"]["value"] == pytest.approx(29.5)
        assert json.loads(rows["device_celsius"]["detail"])["sensor"] == "battery"
        # one transaction per rung: the health rows sit beside the figures, with the same key
        assert {r["device_id"] for r in rows.values()} == {ctx.device_id}
        assert len({r["params"] for r in rows.values()}) == 1


@pytest.mark.slow
def test_an_onnx_rung_larger_than_the_phones_free_ram_is_skipped_and_the_next_one_runs(tiny_onnx, onnx_phone,
                                                                                      arm64_runner, tmp_path):
    arts, _, _ = tiny_onnx
    peer, workdir, _, _ = onnx_phone
    big, small = arts["fp32"], arts["int4"]
    assert small.size_bytes < big.size_bytes
    with _device_bench(onnx_phone, arm64_runner, tmp_path) as (ctx, store, run_id, bench):
        # the phone has less RAM available than the fp32 rung's files, more than the int4 rung's
        available_kib = (small.size_bytes + big.size_bytes) // 2 // 1024
        ctx.facts = replace(ctx.facts, ram_available_kib=available_kib)
        out = bench([big, small])
    assert [(o.artifact.quant, o.status) for o in out.outcomes] == [(big.quant, "skipped"), (small.quant, "ok")]
    statuses = {s["quant"]: s for s in store.rung_statuses(run_id)}
    detail = statuses[big.quant]["detail"]
    assert statuses[big.quant]["status"] == "skipped"
    assert "does not fit in the RAM" in detail and peer.serial in detail
    assert f"{available_kib * 1024 / 2**30:.2f} GiB" in detail
    db = tmp_path / "r.db"
    skipped = _rows(db, big.quant)
    assert skipped["size"]["value"] == big.size_bytes and "tg_tps" not in skipped
    assert _rows(db, small.quant)["tg_tps"]["value"] > 0 and statuses[small.quant] == \
        {"quant": small.quant, "device_id": ctx.device_id, "status": "ok", "detail": None}
    # the skipped rung was never pushed: only the int4 model's bytes are on the phone
    on_phone = [p for p in (Path(workdir) / "models").iterdir() if p.name.endswith("model.onnx")]
    assert [p.read_bytes() for p in on_phone] == [small.path.read_bytes()]


@pytest.mark.slow
def test_a_resumed_run_does_not_measure_a_stored_onnx_rung_again(tiny_onnx, onnx_phone, arm64_runner, tmp_path):
    arts, _, _ = tiny_onnx
    first, second = arts["int4"], arts["int8"]
    with _device_bench(onnx_phone, arm64_runner, tmp_path) as (ctx, store, run_id, bench):
        bench([first])
        # what `edgequant run --resume` finds stored for this phone
        done = {s["quant"] for s in store.rung_statuses(run_id) if s["device_id"] == ctx.device_id}
        assert done == {first.quant}
        reporter = _Recorder()
        out = bench([first, second], reporter, done=done)
    assert reporter.started == [second.quant]
    assert [o.artifact.quant for o in out.outcomes] == [second.quant]
    counts = db_rows(tmp_path / "r.db", "SELECT quant, COUNT(*) AS n FROM measurements WHERE run_id = ? "
                                        "AND metric = 'tg_tps' GROUP BY quant", run_id)
    assert {r["quant"]: r["n"] for r in counts} == {first.quant: 1, second.quant: 1}


@pytest.mark.slow
def test_an_onnx_rung_changed_on_disk_after_its_check_is_not_pushed_and_fails_alone(tiny_onnx, onnx_phone,
                                                                                    arm64_runner, tmp_path):
    """The push sends only bytes whose sha256 the rows record: an ONNX rung whose external data changed after
    the ladder checked it fails with the reason, before anything of it reaches the phone; the next rung runs."""
    import os

    from edgequant.quantize.onnx_export import OnnxLadder

    _, ladder, cache = tiny_onnx
    shutil.copytree(cache, tmp_path / "onnx-copy", symlinks=True)       # the shared cache stays whole
    arts = {a.variant: a for a in OnnxLadder(ladder.ckpt, ladder.model_hash, ladder.spec,
                                             tmp_path / "onnx-copy").build()}
    ext, small = arts["fp32-ext"], arts["int4"]
    data = ext.path.with_name("model.onnx_data")
    st = data.stat()
    with open(data, "r+b") as fh:                                       # bytes flipped, size and mtime kept
        fh.seek(st.st_size // 2)
        block = fh.read(64)
        fh.seek(st.st_size // 2)
        fh.write(bytes(b ^ 0x5A for b in block))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    peer, workdir, _, _ = onnx_phone
    with _device_bench(onnx_phone, arm64_runner, tmp_path) as (ctx, store, run_id, bench):
        out = bench([ext, small])
    assert [(o.artifact.quant, o.status) for o in out.outcomes] == [(ext.quant, "failed"), (small.quant, "ok")]
    statuses = {s["quant"]: s for s in store.rung_statuses(run_id)}
    assert statuses[ext.quant]["status"] == "failed"
    assert "bytes changed on disk" in statuses[ext.quant]["detail"]
    assert "tg_tps" not in _rows(tmp_path / "r.db", ext.quant) and _rows(tmp_path / "r.db", small.quant)["tg_tps"]
    pushed = [p.name for p in (Path(workdir) / "models").iterdir()]
    assert not [n for n in pushed if n.endswith("onnx_data")], pushed       # nothing of the damaged rung
