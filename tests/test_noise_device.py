"""`edgequant noise --device SERIAL` and `compare --recheck` on a phone: the ADB device peer on loopback runs
the real linux-arm64 llama-bench under qemu-aarch64-static (the shared ``phone`` fixture).  The floor is
measured through a run's own device path (the GGUF pushed when the phone lacks it, the phone leased, the
measuring shell reading the phone's /proc/stat), stored under the phone's device id as a run stores its
rows, and used by `compare` for that phone's pairs; the re-check of a phone pair measures on the phone.
Bad input on a phone place is one line, exit 2, before anything is measured."""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, db_rows, phone_profile_text, run_cli

@pytest.fixture
def noise_phone(phone, tiny_checkpoint, tmp_path):
    """(peer, workdir, env, quiet profile, noisy profile, device args): the phone, with the one-rung ladder
    of the tiny model built in the test's cache (nothing on the phone yet)."""
    peer, workdir, env, _ = phone
    quiet, noisy = tmp_path / "quiet.toml", tmp_path / "noisy.toml"
    for path, threshold in ((quiet, 1024), (noisy, 0.1)):    # never noisy; noisy beside a busy app (a CPU burner)
        path.write_text(phone_profile_text("phone-noise", (), contention_threshold=threshold, contention_retries=0,
                                           contention_wait=0))
    res = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(quiet), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return peer, workdir, env, quiet, noisy


def _device_args(peer, workdir, runner) -> list[str]:
    return ["--device", peer.serial, "--device-dir", workdir, "--runner-dir", str(runner.path)]


def _benches(peer, folder: str) -> list[str]:
    """The llama-bench runs the phone started in runs/FOLDER (its shell's process log)."""
    return [c for c in peer.events_of("process") if "llama-bench" in c and f"/runs/{folder}" in c]


def _run(tiny_checkpoint, peer, workdir, env, runner, profile) -> str:
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--no-quality",
                  *_device_args(peer, workdir, runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    return db_rows(Path(env["EDGEQUANT_DB"]), "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")[0]["run_id"]


@pytest.mark.slow
def test_noise_and_recheck_measure_on_the_phone(tiny_checkpoint, noise_phone, arm64_runner, tmp_path):
    peer, workdir, env, quiet, noisy = noise_phone
    db = Path(env["EDGEQUANT_DB"])
    device_id = f"adb:{peer.serial}"
    model = ["--model", str(tiny_checkpoint)]

    # the floor, on a phone that holds nothing yet: runner installed, the GGUF pushed, measured twice there
    res = run_cli("noise", *model, "--profile", str(quiet), "--repeat", "2", *_device_args(peer, workdir, arm64_runner),
                  env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_benches(peer, "noise")) == 2
    art = db_rows(db, "SELECT sha256, path FROM artifacts WHERE quant = 'BF16'")[0]
    on_phone = Path(workdir) / "models" / f"{art['sha256'][:16]}-BF16.gguf"
    assert on_phone.read_bytes() == Path(art["path"]).read_bytes()
    assert not (Path(workdir) / "lease").exists()                 # the lease was taken and given back
    rows = {r["metric"]: r for r in db_rows(db, "SELECT * FROM noise_floors")}
    assert set(rows) == {"pp_tps", "tg_tps"}
    for metric, row in rows.items():
        medians = json.loads(row["medians"])
        assert row["device_id"] == device_id and row["quant"] == "BF16" and row["n_runs"] == 2
        # two medians: range |a - b| / mean; sd |a - b| / sqrt(2), so 3.0902 * sqrt(2) * sd = 3.0902 * |a - b|
        assert row["floor_pct"] == pytest.approx(3.0902 * 100 * abs(medians[0] - medians[1])
                                                 / statistics.fmean(medians), rel=1e-4)
        params = json.loads(row["params"])
        assert params["runner"] == "device" and params["threads"] == 2 and params["n_prompt"] == 16
    assert device_id in res.stdout

    # a quiet run and a run beside a busy app on the same phone
    baseline = _run(tiny_checkpoint, peer, workdir, env, arm64_runner, quiet)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        candidate = _run(tiny_checkpoint, peer, workdir, env, arm64_runner, noisy)
    finally:
        hog.kill()
        hog.wait()
    status = db_rows(db, "SELECT status FROM rung_status WHERE run_id = ?", candidate)[0]["status"]
    assert status == "noisy"

    # compare judges the phone's pairs against the phone's floor, not another place's
    from edgequant.devices.host import host_device_id
    from edgequant.results.store import Store

    with Store(db) as s:
        s.record_noise_floor(host_device_id(), "BF16", art["sha256"], {"runner": "host"},
                             {"pp_tps": (77.0, [1.0, 1.77]), "tg_tps": (77.0, [1.0, 1.77])})
    out = tmp_path / "aa.json"
    res = run_cli("compare", baseline, baseline, "--json", str(out), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    speed = {g["gate"]: g for g in json.loads(out.read_text())["gates"] if g["gate"].startswith("speed:")}
    assert set(speed) == {"speed:pp_tps", "speed:tg_tps"}
    for gate, g in speed.items():
        floor = rows[gate.split(":")[1]]["floor_pct"]
        assert g["device_id"] == device_id
        assert f"A/A noise floor of {device_id} (BF16)" in g["message"], g["message"]
        assert f"{floor:.3g} %" in g["message"], g["message"]

    # the re-check of the noisy pair measures on the phone, A, B, A, B
    res = run_cli("compare", baseline, candidate, "--recheck", "--rounds", "3", "--profile", str(quiet),
                  *_device_args(peer, workdir, arm64_runner)[2:], env=env, timeout=1500)
    assert len(_benches(peer, "recheck")) == 6
    lines = [ln for ln in res.stdout.splitlines() if "re-check, 3 alternated rounds" in ln]
    assert len(lines) == 2, res.stdout + res.stderr                     # pp and tg of the one rung
    assert all(f"BF16 on {device_id}" in ln and "judged on the rounds' medians" in ln for ln in lines), lines
    confirmed = [ln for ln in lines if ln.startswith("CONFIRMED")]
    assert all(ln.startswith(("CONFIRMED", "NOT CONFIRMED")) for ln in lines)
    assert res.returncode == (1 if confirmed else 0), res.stdout + res.stderr
    assert not (Path(workdir) / "lease").exists()


def _copy_db(db: Path, to: Path, *statements: tuple) -> Path:
    shutil.copy(db, to)
    conn = sqlite3.connect(to)
    with conn:
        for sql, *args in statements:
            conn.execute(sql, args)
    conn.close()
    return to


@pytest.mark.slow
def test_noise_and_recheck_bad_input_on_a_phone_is_one_line_exit_2(tiny_checkpoint, noise_phone, arm64_runner,
                                                                   tmp_path):
    peer, workdir, env, quiet, noisy = noise_phone
    dev = _device_args(peer, workdir, arm64_runner)
    m = ["--model", str(tiny_checkpoint), "--profile", str(quiet)]
    # noise: one measurement, one repetition, a phone that does not exist or does not answer
    r = run_cli("noise", *m, "--repeat", "1", *dev, env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "--repeat 1", "at least 2")
    r = run_cli("noise", *m, "-r", "1", *dev, env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "repetitions")
    r = run_cli("noise", *m, "--device", "pixel-nowhere", env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "pixel-nowhere", "edgequant devices")
    from adbpeer.pytest_fixtures import free_port

    gone = f"127.0.0.1:{free_port()}"
    r = run_cli("noise", *m, "--device", gone, "--device-dir", workdir, env=env, timeout=300)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, gone, "cannot be reached", "edgequant devices")
    # the rung not (or no longer) in the cache: said before the phone is touched
    r = run_cli("noise", *m, *dev, "--cache-dir", str(tmp_path / "empty"), env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "not built yet", "edgequant quantize")
    assert not _benches(peer, "noise") and not (Path(workdir) / "models").exists()

    # recheck: a quiet run and a noisy one on the phone (the noisy pair is flagged)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]
    try:
        runs = [_run(tiny_checkpoint, peer, workdir, env, arm64_runner, p) for p in (quiet, noisy)]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    db = Path(env["EDGEQUANT_DB"])
    args = ["--recheck", "--profile", str(quiet), *dev[2:]]
    r = run_cli("compare", runs[0], "no-such-run", *args, env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "no-such-run")
    r = run_cli("compare", *runs, *args, "--rounds", "1", env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "--rounds 1", "at least 3 rounds")
    # the artifact left the cache
    moved = _copy_db(db, tmp_path / "moved.db", ("UPDATE artifacts SET path = ?", str(tmp_path / "gone.gguf")))
    r = run_cli("compare", *runs, *args, "--db", str(moved), env=env)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "BF16", "gone.gguf", "edgequant quantize")
    # the phone the runs measured on is not reachable any more
    away = _copy_db(db, tmp_path / "away.db",
                    *((f"UPDATE {t} SET device_id = ? WHERE device_id = ?", f"adb:{gone}", f"adb:{peer.serial}")
                      for t in ("measurements", "rung_status")))
    r = run_cli("compare", *runs, *args, "--db", str(away), env=env, timeout=300)
    assert r.returncode == 2 and assert_one_line_error(r.stderr, "re-check of BF16", gone, "cannot be reached")
    assert not _benches(peer, "recheck")


def test_a_phone_pairs_stored_settings_are_measured_again_as_stored():
    """A re-check measures a phone pair with the settings its rows store: threads as resolved there, and
    "default" repack (llama.cpp's own choice) stays llama.cpp's own choice, not "on"."""
    from edgequant.bench.device_bench import device_repack
    from edgequant.pipeline.device_run import device_params
    from edgequant.noise import _settings_from
    from edgequant.profiles import BenchSettings

    contention = BenchSettings(contention_threshold=0.5)
    stored = {"runner": "device", "threads": 4, "n_prompt": 16, "n_gen": 4, "repetitions": 5, "repack": "default"}
    s = _settings_from(stored, contention)
    assert (s.threads, s.n_prompt, s.n_gen, s.repetitions, s.repack) == (4, 16, 4, 5, "auto")
    assert s.contention_threshold == 0.5
    assert device_params(s, 4, device_repack(s))["repack"] == "default"        # the same rows again
    assert _settings_from({**stored, "repack": False}, contention).repack == "off"
    assert _settings_from({**stored, "repack": True}, contention).repack == "on"


@pytest.mark.parametrize("spec", ["all", "pool:rack.toml"])
def test_noise_measures_on_one_place(spec):
    from edgequant.core.errors import BadInput
    from edgequant.noise import place_id

    with pytest.raises(BadInput, match="one place"):
        place_id(spec)
