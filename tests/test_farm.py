"""Farm runs (edgequant/farm.py): pools, leases, a store shared by threads, and `edgequant run` on
several "phones" at once — ADB device peers on loopback running the real linux-arm64 llama-bench
under qemu-aarch64-static — including a busy phone and a phone that drops."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, db_rows, phone_profile_text, run_cli, start_cli, wait_for

from edgequant import farm
from edgequant.devices import leases, pools
from edgequant.devices import select
from edgequant.devices.push import Pusher
from edgequant.core.errors import BadInput

RUNGS = {"BF16", "Q4_0"}


@pytest.fixture
def farm_env(phone_env, tmp_path):
    """(conftest's phone env, a profile of two rungs of the tiny model: small llama-bench tests, no warm-up,
    no cool-down wait)."""
    profile = tmp_path / "farm.toml"
    profile.write_text(phone_profile_text("farm-tiny", ("Q4_0",), description="two rungs of the tiny model",
                                          threads=1, n_prompt=8, n_gen=2))
    return phone_env, profile


def _phones(adb_peer_factory, n):
    peers = [adb_peer_factory(qemu_cpu="cortex-a53") for _ in range(n)]
    assert all(p.qemu_enabled for p in peers), "qemu-aarch64-static is needed: make test installs qemu-user-static (.ci/system-deps)"
    return peers


def _workdir(peer) -> str:
    return str(peer.sandbox / "eq")


def _transport(peer):
    return select.open_transport(select.Target(peer.serial, "direct"))


def _run_args(checkpoint, profile, runner, *devices_and_extra):
    return ["run", "--model", str(checkpoint), "--profile", str(profile), "--runner-dir", str(runner.path),
            "--no-quality", *devices_and_extra]


def _pool(tmp_path, peers, labels=None) -> Path:
    """A pool file naming the peers, each with its own work directory inside its sandbox."""
    text = '[pool]\nname = "rack"\n'
    for i, peer in enumerate(peers):
        text += f'[[device]]\nspec = "{peer.serial}"\ndevice_dir = "{_workdir(peer)}"\n'
        if labels:
            text += f'label = "{labels[i]}"\n'
    path = tmp_path / "rack.toml"
    path.write_text(text)
    return path


def _last_run(env):
    return db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM runs ORDER BY started_at DESC LIMIT 1")[0]


def _statuses(env, run_id):
    return {(r["device_id"], r["quant"]): r["status"]
            for r in db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM rung_status WHERE run_id = ?", run_id)}


# ---------------------------------------------------------------------------
# pools


def test_pool_file_expands_to_labelled_phones(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEQUANT_DEVICES", raising=False)
    pool = tmp_path / "rack.toml"
    pool.write_text('[pool]\nname = "rack"\n\n[[device]]\nspec = "10.0.0.5:5555"\nlabel = "Pixel 8, shelf 1"\n\n'
                    '[[device]]\nspec = "tcp:10.0.0.6:5555"\ndevice_dir = "/home/root/eq"\n')
    on_host, phones, entries = farm.resolve_farm([f"pool:{pool}", "host"])
    assert on_host
    assert [(t.serial, t.transport) for t in phones] == [("10.0.0.5:5555", "direct"), ("10.0.0.6:5555", "direct")]
    assert entries["10.0.0.5:5555"].label == "Pixel 8, shelf 1" and entries["10.0.0.5:5555"].device_dir is None
    assert entries["10.0.0.6:5555"].device_dir == "/home/root/eq" and entries["10.0.0.6:5555"].label is None
    # the shipped template is a pool, not a quant profile
    from edgequant.profiles import builtin_profiles

    assert "pool" in pools.builtin_pools() and "pool" not in builtin_profiles()
    assert [d.spec for d in pools.load_pool("pool").devices] == ["all"]


@pytest.mark.parametrize("text, needle", [
    ('[[device]]\nspec = "a:1"\n', "[pool]"),
    ('[pool]\nname = "x"\n', "[[device]]"),
    ('[pool]\nname = "x"\n[[device]]\nserial = "abc"\n', "device[0].serial"),
    ('[pool]\nname = "x"\n[[device]]\nspec = "no spaces allowed"\n', "device[0].spec"),
    ('[pool]\nname = "x"\n[[device]]\nspec = "host"\n', "must name a phone"),
    ('[pool]\nname = "x"\ncolour = 1\n[[device]]\nspec = "a:1"\n', "pool.colour"),
    ('[pool]\nname = "x"\n[[device]]\nspec = "a:1"\ndevice_dir = "relative/eq"\n', "device[0].device_dir"),
    ('[pool\n', "not valid TOML"),
])
def test_bad_pool_files_are_one_line(tmp_path, text, needle):
    pool = tmp_path / "bad.toml"
    pool.write_text(text)
    with pytest.raises(BadInput) as err:
        pools.load_pool(str(pool))
    assert needle in str(err.value) and str(pool) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BadInput, match="device pool 'nope' not found"):
        pools.load_pool("nope")


# ---------------------------------------------------------------------------
# the store from several threads


def test_locked_store_takes_writes_from_many_threads(tmp_path):
    from edgequant.results.store import Measurement, RowKey, Store

    store = Store(tmp_path / "r.db")
    run_id = store.start_run("test", "p", "m", "h")
    shared = farm.LockedStore(store)
    errors = []

    def phone(i):
        try:
            for q in range(20):
                key = RowKey(model_id="m", model_hash="h", quant=f"Q{q}", artifact_sha256="s", is_reference=False,
                             device_id=f"adb:{i}", device={}, runtime="llama.cpp", runtime_version="1", params={})
                shared.record_rung(run_id, key, [Measurement("tg_tps", float(q), "t/s"),
                                                 Measurement("pp_tps", float(i), "t/s")])
                shared.rung_statuses(run_id)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=phone, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = db_rows(tmp_path / "r.db", "SELECT device_id, COUNT(*) AS n FROM measurements GROUP BY device_id")
    assert {r["device_id"]: r["n"] for r in rows} == {f"adb:{i}": 40 for i in range(6)}
    assert len(store.rung_statuses(run_id)) == 6 * 20


# ---------------------------------------------------------------------------
# leases


def test_device_lease_excludes_renews_and_goes_stale(adb_peer, adb_host_key, monkeypatch, tmp_path):
    monkeypatch.setenv("ANDROID_USER_HOME", str(adb_host_key.home / ".android"))
    workdir = _workdir(adb_peer)
    a_t, b_t = _transport(adb_peer), _transport(adb_peer)
    try:
        a = leases.DeviceLease(a_t, workdir, "run-a", host="host-a", pid=111)
        b = leases.DeviceLease(b_t, workdir, "run-b", host="host-b", pid=222)
        assert a.try_acquire() is None and a.held
        owner = Path(workdir) / "lease" / "owner"
        assert f"token={a.token}" in owner.read_text() and "host=host-a" in owner.read_text()
        held = b.try_acquire()
        assert held is not None and not b.held
        assert (held.host, held.pid, held.run, held.token) == ("host-a", 111, "run-a", a.token)
        assert held.age_s is not None and held.age_s < 60
        assert "host-a" in held.describe() and "pid 111" in held.describe()
        # b releasing what it does not hold removes nothing
        b.held = True
        b.release()
        assert owner.is_file()
        # renewal refreshes the time the staleness rule looks at
        old = time.time() - 3600
        os.utime(owner, (old, old))
        a.renew()
        assert owner.stat().st_mtime > old + 3000
        # not renewed for longer than the staleness limit: b breaks it and takes the lease
        os.utime(owner, (old, old))
        assert b.try_acquire() is None and b.held
        assert f"token={b.token}" in owner.read_text()
        # a finds out at its next renewal, and says who holds it now
        with pytest.raises(leases.LeaseLost, match="host-b"):
            a.renew()
        b.release()
        assert not (Path(workdir) / "lease").exists()
        # a lease left by a dead process of this host is stale at once (a killed run, resumed)
        dead = leases.DeviceLease(a_t, workdir, host="thishost", pid=_dead_pid())
        assert dead.try_acquire() is None
        again = leases.DeviceLease(b_t, workdir, host="thishost", pid=os.getpid())
        assert again.try_acquire() is None and again.held
        # ... but not one of a live process
        other = leases.DeviceLease(a_t, workdir, host="thishost", pid=os.getppid())
        assert other.try_acquire() is not None
    finally:
        a_t.close()
        b_t.close()


def _dead_pid() -> int:
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_host_lock_is_exclusive_per_serial(tmp_path):
    first, second = leases.HostLock(tmp_path, "127.0.0.1:5555"), leases.HostLock(tmp_path, "127.0.0.1:5555")
    other = leases.HostLock(tmp_path, "R5CT1234")
    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.holder_pid() == os.getpid()
    assert other.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()
    other.release()


# ---------------------------------------------------------------------------
# edgequant run on several phones


@pytest.mark.slow
def test_two_phones_in_parallel_store_every_rung(tiny_checkpoint, farm_env, adb_peer_factory, arm64_runner,
                                                 tmp_path):
    env, profile = farm_env
    a, b = _phones(adb_peer_factory, 2)
    pool = _pool(tmp_path, (a, b), labels=("phone-a", "phone-b"))
    res = run_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", f"pool:{pool}"), env=env,
                  timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    run = _last_run(env)
    assert run["status"] == "complete"
    statuses = _statuses(env, run["run_id"])
    assert statuses == {(f"adb:{p.serial}", q): "ok" for p in (a, b) for q in RUNGS}
    rows = db_rows(Path(env["EDGEQUANT_DB"]), "SELECT device_id, quant, measured_at FROM measurements "
                                             "WHERE run_id = ? AND metric = 'tg_tps'", run["run_id"])
    assert len(rows) == 4 and all(r["quant"] in RUNGS for r in rows)
    # in parallel, not one phone after the other: each phone finished a rung before the other's last one
    done = {p: sorted(r["measured_at"] for r in rows if r["device_id"] == f"adb:{p.serial}") for p in (a, b)}
    assert done[a][0] < done[b][-1] and done[b][0] < done[a][-1]
    # each phone got each file once, and its lease is gone at the end
    for peer in (a, b):
        sends = [e for e in peer.events_of("sync") if e.startswith("SEND")]
        assert len([s for s in sends if ".gguf" in s]) == len(RUNGS), sends
        assert not (Path(_workdir(peer)) / "lease").exists()
    # the summary names each phone by its label with what ran
    summary = res.stderr[res.stderr.index("farm: 2 phone(s)"):]
    for label in ("phone-a", "phone-b"):
        line = next(ln for ln in summary.splitlines() if label in ln)
        assert "done" in line and "BF16" in line


@pytest.mark.slow
def test_a_busy_phone_makes_the_second_run_wait_or_refuse(tiny_checkpoint, farm_env, adb_peer_factory,
                                                          arm64_runner):
    env, profile = farm_env
    (peer,) = _phones(adb_peer_factory, 1)
    workdir = _workdir(peer)
    holder_transport = _transport(peer)
    other = leases.DeviceLease(holder_transport, workdir, "nightly-7", host="rack-host-2", pid=4242)
    try:
        assert other.try_acquire() is None
        # short wait: refused with one line naming the holder; nothing stored, nothing pushed
        refused = run_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", peer.serial,
                                     "--device-dir", workdir, "--lease-wait", "1"), env=env, timeout=300)
        assert refused.returncode == 1
        assert_one_line_error(refused.stderr, peer.serial, "rack-host-2", "pid 4242", "--lease-wait")
        assert not Path(env["EDGEQUANT_DB"]).exists() or not db_rows(Path(env["EDGEQUANT_DB"]),
                                                                     "SELECT * FROM runs")
        assert not [e for e in peer.events_of("sync") if e.startswith("SEND")]
        # another edgequant process of this host holds the phone: refused too, naming that process
        host_lock = leases.HostLock(Path(env["EDGEQUANT_CACHE_DIR"]), peer.serial)
        assert host_lock.try_acquire()
        try:
            local = run_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", peer.serial,
                                       "--device-dir", workdir, "--lease-wait", "0"), env=env, timeout=300)
        finally:
            host_lock.release()
        assert local.returncode == 1
        assert_one_line_error(local.stderr, peer.serial, f"process of this host (pid {os.getpid()})")
        # a longer wait: the run waits until the holder is done, then runs
        timer = threading.Timer(4.0, other.release)
        timer.start()
        waited = run_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", peer.serial,
                                    "--device-dir", workdir, "--lease-wait", "300"), env=env, timeout=1500)
        timer.join()
    finally:
        holder_transport.close()
    assert waited.returncode == 0, waited.stderr[-3000:]
    assert re.search(r"is in use by edgequant on rack-host-2 .*waiting", waited.stderr.replace("\n", " "))
    run = _last_run(env)
    assert run["status"] == "complete"
    assert _statuses(env, run["run_id"]) == {(f"adb:{peer.serial}", q): "ok" for q in RUNGS}
    assert not (Path(workdir) / "lease").exists()


@pytest.mark.slow
def test_a_dropped_phone_is_retried_then_failed_while_the_other_finishes(tiny_checkpoint, farm_env,
                                                                         adb_peer_factory, arm64_runner, tmp_path):
    env, profile = farm_env
    flaky, doomed = _phones(adb_peer_factory, 2)
    pool = _pool(tmp_path, (flaky, doomed))
    # flaky drops once in the middle of its first model push (its runner is installed beforehand);
    # reconnected after a backoff, it finishes every rung
    transport = _transport(flaky)
    try:
        pusher = Pusher(transport, _workdir(flaky))
        for rel in arm64_runner.files():
            pusher.push(arm64_runner.path / rel, dest=rel, executable=rel.startswith("bin/"))
    finally:
        transport.close()
    flaky.faults.drop_send_after = 64 * 1024
    flaky.faults.drop_send_times = 1
    proc = start_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", f"pool:{pool}"), env=env)

    # doomed goes away for good once it has finished its first rung: when its second model is pushed
    def doomed_pushes_its_second_rung():
        return any("Q4_0" in e for e in doomed.events_of("sync") if e.startswith("SEND"))

    try:
        wait_for(doomed_pushes_its_second_rung, timeout=900, what="the doomed phone's second push", proc=proc)
        doomed.close()
        out, err = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert res.returncode == 1, err[-3000:]
    line = assert_one_line_error(res.stderr, "1 phone(s) failed", doomed.serial, "--resume")
    run_row = _last_run(env)
    assert run_row["status"] == "partial" and run_row["run_id"] in line
    assert doomed.serial in run_row["status_detail"] and flaky.serial not in run_row["status_detail"]
    statuses = _statuses(env, run_row["run_id"])
    assert {q for (d, q), s in statuses.items() if d == f"adb:{flaky.serial}" and s == "ok"} == RUNGS
    assert len([1 for (d, _q) in statuses if d == f"adb:{doomed.serial}"]) == 1
    assert [e for e in flaky.events if e[0] == "drop"], "the flaky phone never dropped"
    assert f"{flaky.serial}: reconnected, 2 rung(s) to go" in res.stderr
    # retried with backoff before giving up; the summary says what did not run and why
    assert "retry 3/3" in res.stderr and "gave up after 3 retries" in res.stderr
    summary = res.stderr[res.stderr.index("farm: 2 phone(s)"):]
    assert "not run: the phone failed" in summary


@pytest.mark.slow
def test_a_killed_farm_run_resumes_past_its_own_stale_lease(tiny_checkpoint, farm_env, adb_peer_factory,
                                                            arm64_runner, tmp_path):
    env, profile = farm_env
    a, b = _phones(adb_peer_factory, 2)
    pool = _pool(tmp_path, (a, b))
    proc = start_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", f"pool:{pool}"), env=env)
    db = Path(env["EDGEQUANT_DB"])

    def a_rung_is_stored():
        try:
            return bool(db_rows(db, "SELECT * FROM rung_status"))
        except sqlite3.OperationalError:  # the database is still being created
            return False

    try:
        wait_for(a_rung_is_stored, timeout=900, what="a stored rung", proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)     # no chance to release anything
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = _last_run(env)
    stored = _statuses(env, run["run_id"])
    assert 1 <= len(stored) < 4
    # the killed process left its leases on the phones
    for peer in (a, b):
        assert f"pid={proc.pid}" in (Path(_workdir(peer)) / "lease" / "owner").read_text()
    # its process is gone, on this host: the resume takes the leases at once, without waiting
    resumed = run_cli("run", "--resume", run["run_id"], "--lease-wait", "0", env=env, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _last_run(env)["status"] == "complete"
    assert _statuses(env, run["run_id"]) == {(f"adb:{p.serial}", q): "ok" for p in (a, b) for q in RUNGS}
    counts = db_rows(db, "SELECT device_id, quant, COUNT(*) AS n FROM measurements WHERE run_id = ? "
                         "AND metric = 'tg_tps' GROUP BY device_id, quant", run["run_id"])
    assert [r["n"] for r in counts] == [1, 1, 1, 1]     # nothing measured twice
    for peer in (a, b):
        assert not (Path(_workdir(peer)) / "lease").exists()


def test_live_view_and_summary_render_each_phone(tmp_path):
    from rich.console import Console

    from edgequant.pipeline.host import RungOutcome

    class Art:
        def __init__(self, quant):
            self.quant = quant

    ok = farm.Phone(select.Target("10.0.0.5:5555", "direct"), "/data/local/tmp/eq", "shelf 1",
                    state="running", rung="Q4_0", phase="push 40% 12.0 MB/s", total=3, done=1)
    ok.outcomes = [RungOutcome(Art("BF16"), "ok"),
                   RungOutcome(Art("Q8_0"), "skipped", "the file does not fit in the RAM")]
    bad = farm.Phone(select.Target("R5CT1234", "server"), "/data/local/tmp/eq", None, state="failed", total=3,
                     retries=3)
    bad.outcomes = [RungOutcome(Art("BF16"), "oom", "killed")]
    bad.not_run = [("Q8_0", "not run: the phone failed"), ("Q4_0", "not run: the phone failed")]
    bad.failure = "device R5CT1234 stopped answering (gave up after 3 retries)"
    console = Console(record=True, width=160, file=open(os.devnull, "w"))
    console.print(farm.FarmView([ok, bad]).table())
    live = console.export_text()
    row = next(ln for ln in live.splitlines() if "10.0.0.5:5555 (shelf 1)" in ln)
    assert "running" in row and "Q4_0" in row and "1/3" in row and "push 40%" in row
    assert "failed" in next(ln for ln in live.splitlines() if "R5CT1234" in ln)
    farm.render_summary(farm.FarmResult([ok, bad], 12.0), console)
    text = console.export_text()
    assert "farm: 2 phone(s) in 12 s" in text
    ok_row = next(ln for ln in text.splitlines() if "10.0.0.5:5555 (shelf 1)" in ln)
    assert "BF16" in ok_row and "Q8_0: skipped (the file does not fit in the RAM)" in ok_row
    assert "Q8_0: not run: the phone failed" in text and "phone failed: device R5CT1234 stopped answering" in text
    assert "BF16: oom (killed)" in text
    assert farm.FarmResult([ok, bad], 1).failed_rungs == ["BF16 on R5CT1234 oom"]
    assert [p.serial for p in farm.FarmResult([ok, bad], 1).lost] == ["R5CT1234"]


@pytest.mark.slow
def test_one_bad_phone_stops_the_others_before_anything_starts(tiny_checkpoint, farm_env, adb_peer_factory,
                                                               arm64_runner, tmp_path):
    env, profile = farm_env
    good, busy = _phones(adb_peer_factory, 2)
    x86 = adb_peer_factory(props={"ro.product.cpu.abi": "x86_64", "ro.product.cpu.abilist": "x86_64,x86"})
    holder_transport = _transport(busy)
    other = leases.DeviceLease(holder_transport, _workdir(busy), host="rack-host-2", pid=4242)
    try:
        assert other.try_acquire() is None
        pool = _pool(tmp_path, (good, busy, x86))
        # busy would be waited for a long time; the wrong-ABI phone ends the wait at once
        res = run_cli(*_run_args(tiny_checkpoint, profile, arm64_runner, "--device", f"pool:{pool}",
                                 "--lease-wait", "1200"), env=env, timeout=300)
        assert res.returncode != 0
        assert_one_line_error(res.stderr, x86.serial, "arm64")
        # nothing started, and the phone that was taken is free again; busy's holder keeps its lease
        assert not Path(env["EDGEQUANT_DB"]).exists() or not db_rows(Path(env["EDGEQUANT_DB"]),
                                                                     "SELECT * FROM runs")
        assert not (Path(_workdir(good)) / "lease").exists()
        assert not (Path(_workdir(x86)) / "lease").exists()
        assert "host=rack-host-2" in (Path(_workdir(busy)) / "lease" / "owner").read_text()
        assert not [e for e in good.events_of("sync") if e.startswith("SEND") and ".gguf" in e]
    finally:
        holder_transport.close()
