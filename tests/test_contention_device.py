"""The other load on a phone: the ADB device peer on loopback runs the real linux-arm64 llama-bench under
qemu-aarch64-static, so the "phone's" /proc/stat is this machine's.  A background app is a real CPU burner
started beside the peer (one per CPU, for the whole run): the rung is stored noisy with its contention
row.  The quiet case sets a threshold no machine reaches and checks the row is there and sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import db_rows, phone_profile_text, run_cli

def _run(tiny_checkpoint, phone, runner, tmp_path, threshold: float):
    peer, workdir, env, _ = phone          # conftest's phone; this module writes its own profile
    profile = tmp_path / f"p{threshold:g}.toml"
    profile.write_text(phone_profile_text("phone-contention", (), contention_threshold=threshold,
                                          contention_retries=1, contention_wait=0))
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
                  "--device-dir", workdir, "--runner-dir", str(runner.path), "--no-quality", env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    db = Path(env["EDGEQUANT_DB"])
    run_id = db_rows(db, "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")[0]["run_id"]
    rows = {r["metric"]: r for r in db_rows(db, "SELECT * FROM measurements WHERE run_id = ? AND quant = 'BF16'",
                                            run_id)}
    status = db_rows(db, "SELECT status, detail FROM rung_status WHERE run_id = ? AND quant = 'BF16'", run_id)[0]
    return rows, status


@pytest.mark.slow
def test_a_quiet_phone_rung_has_a_sane_contention_row(tiny_checkpoint, phone, arm64_runner, tmp_path):
    rows, status = _run(tiny_checkpoint, phone, arm64_runner, tmp_path, threshold=1024)
    assert status["status"] == "ok"
    row = rows["contention"]
    detail = json.loads(row["detail"])
    assert row["unit"] == "cores" and detail["n_cpus"] == (os.cpu_count() or 1)
    assert 0 <= row["value"] <= detail["n_cpus"] + 0.5
    assert detail["own_cores"] > 0 and detail["window_s"] > 0     # llama-bench's own CPU time was read
    assert len(json.loads(rows["tg_tps"]["detail"])["samples"]) == 3      # and its raw samples kept


@pytest.mark.slow
def test_a_phone_rung_run_beside_a_busy_app_is_stored_noisy(tiny_checkpoint, phone, arm64_runner, tmp_path):
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        rows, status = _run(tiny_checkpoint, phone, arm64_runner, tmp_path, threshold=0.1)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert status["status"] == "noisy" and "other cores busy" in status["detail"]
    detail = json.loads(rows["contention"]["detail"])
    assert len(detail["attempts"]) == 2 and all(a > 0.1 for a in detail["attempts"])
    assert detail["noisy"].startswith("noisy:")
    pids = {h.pid for h in hogs}
    assert any(p["pid"] in pids for p in detail["top_other"]), detail["top_other"]   # the busy "app", named
    assert "tg_tps" in rows                                       # measured and marked, not dropped
