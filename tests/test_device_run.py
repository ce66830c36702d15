"""`edgequant run --device` end to end: the tiny Gemma 3's ladder on a "phone" that is the ADB
device peer on loopback, running the real linux-arm64 llama-bench under qemu-aarch64-static
(as an ARMv8.0 Cortex-A53), through our direct adb-shell transport; then the faults: the
low-memory killer, a phone unplugged mid-run and resumed, a rung that does not fit in RAM,
a hot phone."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from adbpeer.peer import LmkRule
from conftest import assert_one_line_error, db_rows, run_cli

from edgequant.devices import select
from edgequant.devices.health import CoolDown, read_health, throttled, wait_cool
from edgequant.devices.push import Pusher

def _run_args(tiny_checkpoint, peer, workdir, profile, runner, *extra):
    return ["run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
            "--device-dir", workdir, "--runner-dir", str(runner.path), "--no-quality", *extra]


def _metrics(env, run_id):
    rows = db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM measurements WHERE run_id = ?", run_id)
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["quant"], {})[r["metric"]] = {
            "value": r["value"], "stddev": r["stddev"], "repetitions": r["repetitions"], "device_id": r["device_id"],
            "params": json.loads(r["params"]), "detail": json.loads(r["detail"]) if r["detail"] else None}
    return out


def _statuses(env, run_id):
    return {r["quant"]: (r["status"], r["detail"])
            for r in db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM rung_status WHERE run_id = ?", run_id)}


def _run_row(env, run_id=None):
    con = sqlite3.connect(env["EDGEQUANT_DB"])
    con.row_factory = sqlite3.Row
    try:
        if run_id is None:
            return dict(con.execute("SELECT * FROM runs ORDER BY started_at DESC LIMIT 1").fetchone())
        return dict(con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone())
    finally:
        con.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# the runs that open connections, install the runner, push with sha256 checks, run llama-bench and
# reconnect after an unplug meet a modern daemon and a legacy one (CLSE(0, id) ends, 4 KiB, no shell v2)
DAEMONS = pytest.mark.parametrize("phone", ["modern", "legacy"], indirect=True)


@pytest.mark.slow
@DAEMONS
def test_run_on_a_phone_stores_device_rows(tiny_checkpoint, phone, arm64_runner):
    peer, workdir, env, profile = phone
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    run = _run_row(env)
    assert run["status"] == "complete"
    metrics = _metrics(env, run["run_id"])
    assert set(metrics) == {"BF16", "Q8_0", "Q4_0"}
    assert _statuses(env, run["run_id"]) == {q: ("ok", None) for q in ("BF16", "Q8_0", "Q4_0")}
    artifacts = {r["quant"]: r["path"] for r in db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM artifacts")}
    for quant, m in metrics.items():
        assert {r["device_id"] for r in m.values()} == {f"adb:{peer.serial}"}
        params = m["tg_tps"]["params"]
        assert params["runner"] == "device" and params["threads"] == 2 and params["n_prompt"] == 16
        for metric in ("pp_tps", "tg_tps"):
            assert m[metric]["value"] > 0 and m[metric]["repetitions"] == 3 and m[metric]["stddev"] is not None
        assert m["load_time"]["value"] > 0
        # the file itself is mmapped: its pages are file RSS; the KV cache and buffers are anonymous
        assert m["peak_rss"]["value"] >= m["peak_rss_anon"]["value"] > 0
        assert m["peak_rss_file"]["value"] > 0
        assert m["throttled"]["value"] == 0 and m["throttled"]["detail"]["before"]["thermal_status"] == 0
        assert m["battery_level"]["value"] == pytest.approx(peer_battery_level(peer))
        # the bytes measured on the phone are the artifact's bytes
        local = Path(artifacts[quant])
        remote = Path(workdir) / "models" / f"{_sha256(local)[:16]}-{quant}.gguf"
        assert remote.is_file() and _sha256(remote) == _sha256(local)
    assert metrics["Q4_0"]["size"]["value"] < metrics["BF16"]["size"]["value"]
    # the runner was installed in the work directory, executable, and not left as a partial
    bench = Path(workdir) / "bin" / "llama-bench"
    assert bench.is_file() and bench.stat().st_mode & 0o111
    assert not list(Path(workdir).rglob("*.partial"))
    # the table says where the figures were measured
    assert "via adb" in res.stdout and f"adb:{peer.serial}" in res.stdout
    # a second run pushes nothing: every file is already on the phone with the same sha256
    sends_before = len([e for e in peer.events_of("sync") if e.startswith("SEND")])
    again = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len([e for e in peer.events_of("sync") if e.startswith("SEND")]) == sends_before


def peer_battery_level(peer) -> float:
    from edgequant.devices.facts import parse_battery

    out = peer_shell(peer, "dumpsys battery")
    return float(parse_battery(out)["level"])


def peer_shell(peer, command: str) -> str:
    transport = select.open_transport(select.Target(peer.serial, "direct"))
    try:
        return transport.shell(command, 60).stdout
    finally:
        transport.close()


@pytest.mark.slow
def test_low_memory_killer_marks_the_rung_oom_and_the_ladder_goes_on(tiny_checkpoint, phone, arm64_runner):
    peer, workdir, env, profile = phone
    # only the llama-bench process itself (qemu runs it) matches, not the shells and `time` around it
    peer.faults.lmk = [LmkRule(r"^\S*qemu-aarch64\S* .*llama-bench .*Q8_0\.gguf", delay=0.0)]   # at once: not a race
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "Q8_0")
    run = _run_row(env)
    assert run["status"] == "complete"          # every rung was tried; one did not survive
    statuses = _statuses(env, run["run_id"])
    assert statuses["Q8_0"][0] == "oom" and "low-memory killer" in statuses["Q8_0"][1]
    assert statuses["BF16"][0] == "ok" and statuses["Q4_0"][0] == "ok"
    assert peer.lmk_kills, "the peer's low-memory killer never fired"


def preload_runner_and_reference(tiny_checkpoint, peer, workdir, env, profile, arm64_runner) -> dict:
    """Build the profile's ladder and put the runner and the BF16 reference on the phone beforehand, so
    the first model a run pushes is the first quantized rung's.  Returns the ladder's artifacts by quant."""
    built = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(profile), "--json", env=env,
                    timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]
    arts = {a["quant"]: a for a in json.loads(built.stdout)}
    transport = select.open_transport(select.Target(peer.serial, "direct"))
    try:
        pusher = Pusher(transport, workdir)
        for rel in arm64_runner.files():
            pusher.push(arm64_runner.path / rel, dest=rel, executable=rel.startswith("bin/"))
        pusher.push(Path(arts["BF16"]["path"]), arts["BF16"]["sha256"], name="BF16.gguf")
    finally:
        transport.close()
    return arts


@pytest.mark.slow
@DAEMONS
def test_unplugged_mid_run_is_partial_and_resumes(tiny_checkpoint, phone, arm64_runner):
    peer, workdir, env, profile = phone
    # build the ladder, and put the runner and the reference on the phone beforehand, so that the
    # first file the run pushes is Q8_0's: the connection drops in the middle of it
    preload_runner_and_reference(tiny_checkpoint, peer, workdir, env, profile, arm64_runner)
    # every push of a model drops: the farm's reconnect-and-retry (edgequant/farm.py) gives up in the end
    peer.faults.drop_send_after = 4096
    peer.faults.drop_send_times = None
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    peer.faults.drop_send_after = None
    assert res.returncode == 1
    line = assert_one_line_error(res.stderr, "--resume")
    run = _run_row(env)
    assert run["status"] == "partial" and peer.serial in run["status_detail"]
    assert run["run_id"] in line
    assert set(_statuses(env, run["run_id"])) == {"BF16"}      # the finished rung is kept
    assert not [p for p in (Path(workdir) / "models").iterdir() if "Q8_0" in p.name and not p.name.startswith(".")]

    resumed = run_cli("run", "--resume", run["run_id"], env=env, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _run_row(env, run["run_id"])
    assert after["status"] == "complete"
    assert _statuses(env, run["run_id"]) == {q: ("ok", None) for q in ("BF16", "Q8_0", "Q4_0")}
    # BF16 was not measured again: one row per metric and rung
    counts = db_rows(Path(env["EDGEQUANT_DB"]), "SELECT quant, COUNT(*) AS n FROM measurements WHERE run_id = ? "
                                               "AND metric = 'tg_tps' GROUP BY quant", run["run_id"])
    assert {r["quant"]: r["n"] for r in counts} == {"BF16": 1, "Q8_0": 1, "Q4_0": 1}
    # a complete run cannot be resumed
    again = run_cli("run", "--resume", run["run_id"], env=env, timeout=120)
    assert again.returncode != 0
    assert_one_line_error(again.stderr, "nothing to resume")


@pytest.mark.slow
def test_rungs_larger_than_available_ram_are_skipped(tiny_checkpoint, phone, arm64_runner, tmp_path):
    from edgequant.pipeline import device_run
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import load_profile
    from edgequant.results.store import Store

    peer, workdir, env, profile_path = phone
    profile = load_profile(profile_path)
    cache = tmp_path / "cache"
    resolved = prepare.resolve_model(str(tiny_checkpoint), cache, NullReporter())
    artifacts = prepare.build_ladder(resolved, profile, cache, NullReporter())
    ctx = device_run.open_device(select.Target(peer.serial, "direct"), workdir, str(arm64_runner.path), cache,
                                 NullReporter())
    try:
        smallest = min(a.size_bytes for a in artifacts)
        # the phone says it has less RAM available than the smallest file
        ctx.facts = replace(ctx.facts, ram_available_kib=smallest // 1024 - 1)
        store = Store(tmp_path / "r.db")
        run_id = store.start_run("test", profile.name, "tiny", resolved.model_hash)
        out = device_run.bench_rungs_on_device(RunScope(store, run_id, "tiny", resolved.model_hash, NullReporter()),
                                               artifacts, profile, ctx)
    finally:
        ctx.close()
    assert {o.status for o in out.outcomes} == {"skipped"}
    for s in store.rung_statuses(run_id):
        assert s["status"] == "skipped" and "does not fit in the RAM" in s["detail"]
    assert not (Path(workdir) / "models").exists() or not list((Path(workdir) / "models").iterdir())


def test_cool_down_waits_for_the_phone_and_flags_a_hot_run(phone):
    peer, workdir, env, _ = phone
    transport = select.open_transport(select.Target(peer.serial, "direct"))
    try:
        peer.set_thermal(3)
        timer = threading.Timer(1.5, peer.set_thermal, args=(0,))
        timer.start()
        start = time.monotonic()
        res = wait_cool(transport, workdir, CoolDown(max_status=0, max_celsius=60, max_wait_s=30, poll_s=0.3))
        timer.join()
        assert res.cooled and 1.2 <= res.waited_s <= 15 and time.monotonic() - start >= 1.4
        assert res.health.thermal_status == 0
        # the status rises during the "run": throttled
        peer.set_thermal(2)
        assert throttled(res, read_health(transport, workdir))
        # a phone that never cools down within the wait: throttled too, without waiting longer
        gave_up = wait_cool(transport, workdir, CoolDown(max_status=0, max_celsius=60, max_wait_s=0.5, poll_s=0.2))
        assert not gave_up.cooled and gave_up.health.thermal_status == 2
        assert throttled(gave_up, read_health(transport, workdir))
        peer.set_thermal(0)
        calm = wait_cool(transport, workdir, CoolDown())
        assert calm.cooled and not throttled(calm, read_health(transport, workdir))
    finally:
        transport.close()


@pytest.mark.slow
def test_device_run_errors_are_one_line(tiny_checkpoint, phone, arm64_runner, adb_peer_factory, tmp_path):
    peer, workdir, env, profile = phone
    # a phone that is not arm64
    x86 = adb_peer_factory(props={"ro.product.cpu.abi": "x86_64", "ro.product.cpu.abilist": "x86_64,x86"})
    res = run_cli(*_run_args(tiny_checkpoint, x86, str(x86.sandbox / "eq"), profile, arm64_runner), env=env,
                  timeout=300)
    assert res.returncode != 0
    assert_one_line_error(res.stderr, "arm64")
    # a runner built for the host cannot run on the phone
    bad = tmp_path / "notarunner"
    bad.mkdir()
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
                  "--device-dir", workdir, "--runner-dir", str(bad), "--no-quality", env=env, timeout=300)
    assert res.returncode != 0
    assert_one_line_error(res.stderr, "llama-bench")
    # an unknown run to resume
    res = run_cli("run", "--resume", "no-such-run", env=env, timeout=120)
    assert res.returncode != 0
    assert_one_line_error(res.stderr, "no-such-run")
    # nothing was started: no run is stored for these failures
    assert not Path(env["EDGEQUANT_DB"]).exists() or not db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM runs")


@pytest.mark.slow
def test_a_full_disk_skips_the_rungs_that_do_not_fit_and_measures_the_rest(tiny_checkpoint, phone, arm64_runner,
                                                                          tmp_path):
    from edgequant.pipeline import device_run
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import load_profile
    from edgequant.results.store import Store

    peer, workdir, env, profile_path = phone
    profile = load_profile(profile_path)
    cache = tmp_path / "cache"
    resolved = prepare.resolve_model(str(tiny_checkpoint), cache, NullReporter())
    artifacts = prepare.build_ladder(resolved, profile, cache, NullReporter())
    smallest = min(artifacts, key=lambda a: a.size_bytes)
    ctx = device_run.open_device(select.Target(peer.serial, "direct"), workdir, str(arm64_runner.path), cache,
                                 NullReporter())
    try:
        peer.faults.disk_free = smallest.size_bytes + 64 * 1024    # only the smallest rung fits
        store = Store(tmp_path / "r.db")
        run_id = store.start_run("test", profile.name, "tiny", resolved.model_hash)
        out = device_run.bench_rungs_on_device(RunScope(store, run_id, "tiny", resolved.model_hash, NullReporter()),
                                               artifacts, profile, ctx)
    finally:
        ctx.close()
    statuses = {s["quant"]: s for s in store.rung_statuses(run_id)}
    assert statuses[smallest.quant]["status"] == "ok"
    for art in artifacts:
        if art is not smallest:
            assert statuses[art.quant]["status"] == "skipped"
            assert "not enough space" in statuses[art.quant]["detail"]
    assert [o.status for o in out.outcomes].count("ok") == 1
    assert not list(Path(workdir).rglob("*.partial"))
