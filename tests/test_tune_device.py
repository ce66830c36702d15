"""`edgequant tune --device`: each candidate's speed measured on a "phone" (the ADB device peer on
loopback running the real linux-arm64 llama-bench under qemu-aarch64-static, the `phone` fixture of
conftest), its quality on the host from the same GGUF; then the phone lost mid-search.

Kept cheap like the host tune tests: the tiny Gemma 3, two stock types, no imatrix, the small
calibration suite of test_imatrix, llama-bench with 16 prompt and 4 generated tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, db_rows, run_cli
from test_device_run import preload_runner_and_reference
from test_imatrix import write_suite

pytestmark = pytest.mark.slow   # tune with its speed measured on the emulated phone (qemu), end to end


def _tune_args(tiny_checkpoint, peer, workdir, profile, runner, suite, types, *extra):
    return ["tune", "--model", str(tiny_checkpoint), "--profile", str(profile), "--suite", str(suite),
            "--device", peer.serial, "--device-dir", workdir, "--runner-dir", str(runner.path),
            "--types", types, "--variants", "", *extra]


def _rows(env, run_id):
    rows = db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM measurements WHERE run_id = ?", run_id)
    for r in rows:
        r["params"] = json.loads(r["params"])
        r["detail"] = json.loads(r["detail"]) if r["detail"] else None
    return rows


def _only_run(env):
    (run,) = db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM runs")
    return run


def test_tune_on_a_phone_gates_on_the_phones_speed(tiny_checkpoint, phone, arm64_runner, tmp_path):
    peer, workdir, env, profile = phone
    device_id = f"adb:{peer.serial}"
    suite = write_suite(tmp_path / "suite")
    # every candidate passes the quality gate; none can reach 1e9 t/s: the min-tg gate decides, on the
    # phone's figures, and names the candidate that came closest (the fastest one there)
    res = run_cli(*_tune_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, suite, "Q8_0,Q4_0",
                              "--gate", "xml_parse_rate>=0", "--min-tg", "1e9"), env=env, timeout=1500)
    assert res.returncode == 2, res.stderr[-3000:]
    line = assert_one_line_error(res.stderr, "no candidate passes every gate", "tg_tps >= 1e+09 at")
    run = _only_run(env)
    assert run["status"] == "complete"
    rows = _rows(env, run["run_id"])

    # speed rows: measured on the phone by the on-device runner, for the reference and both candidates
    speed = [r for r in rows if r["metric"] in ("pp_tps", "tg_tps", "peak_rss")]
    assert {r["quant"] for r in speed} == {"BF16", "Q8_0", "Q4_0"}
    for r in speed:
        assert r["device_id"] == device_id and r["params"]["runner"] == "device", r
        assert r["params"]["n_prompt"] == 16 and r["params"]["threads"] == 2
    assert {r["quant"] for r in rows if r["metric"] == "throttled" and r["device_id"] == device_id} == \
        {"BF16", "Q8_0", "Q4_0"}
    tg = {r["quant"]: r["value"] for r in rows if r["metric"] == "tg_tps"}
    assert all(v > 0 for v in tg.values())

    # quality rows: computed on the host (not the phone), on the evaluation half
    quality = [r for r in rows if r["params"].get("stage") == "quality"]
    assert {r["quant"] for r in quality} >= {"Q8_0", "Q4_0"}
    assert all(r["device_id"] != device_id and r["params"]["runner"] == "host" for r in quality)
    assert all(r["params"]["split_side"] == "evaluation" for r in quality)

    # the search's verdicts are the phone's rows; each names the phone's own tg figure
    verdicts = {r["quant"]: r for r in rows if r["metric"] == "tune_pass"}
    assert set(verdicts) == {"Q8_0", "Q4_0"}     # a speed failure did not stop Q4_0 from being tried
    for quant, r in verdicts.items():
        assert r["device_id"] == device_id
        assert r["params"]["runner"] == "device" and r["params"]["min_tg"] == 1e9
        assert r["value"] == 0 and r["detail"]["reasons"] == [f"tg {tg[quant]:.1f} t/s is under --min-tg 1e+09"]
    statuses = {s["quant"]: s for s in db_rows(Path(env["EDGEQUANT_DB"]),
                                               "SELECT * FROM rung_status WHERE run_id = ?", run["run_id"])}
    assert {q: (s["status"], s["device_id"]) for q, s in statuses.items() if q != "BF16"} == \
        {"Q8_0": ("rejected", device_id), "Q4_0": ("rejected", device_id)}
    closest = max(("Q8_0", "Q4_0"), key=lambda q: tg[q])
    assert f"at {closest} " in line
    assert f"speed on {device_id}" in res.stdout     # the table says where speed was measured


    # a reachable --min-tg: the smallest candidate wins, on the phone (artifacts and pushes are reused)
    res = run_cli(*_tune_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, suite, "Q8_0,Q4_0",
                              "--gate", "xml_parse_rate>=0", "--min-tg", "0.01"), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = db_rows(Path(env["EDGEQUANT_DB"]), "SELECT * FROM runs WHERE run_id != ?", run["run_id"])
    rows = _rows(env, run["run_id"])
    size = {r["quant"]: r["value"] for r in rows if r["metric"] == "size"}
    smallest = min(("Q8_0", "Q4_0"), key=lambda q: size[q])
    tg = {r["quant"]: r["value"] for r in rows if r["metric"] == "tg_tps" and r["device_id"] == device_id}
    assert run["status_detail"] == f"tune chose {smallest}"
    assert f"chosen: {smallest} " in res.stdout and f"tg {tg[smallest]:.1f} t/s on {device_id}" in res.stdout
    chosen = [r for r in rows if r["metric"] == "tune_pass" and r["detail"]["chosen"]]
    assert [(r["quant"], r["device_id"], r["params"]["runner"]) for r in chosen] == [(smallest, device_id, "device")]

    # report and pick see the run under the phone, with the host's quality joined to its rows
    rep = run_cli("report", run["run_id"], "--format", "json", env=env)
    assert rep.returncode == 0, rep.stderr
    assert device_id in rep.stdout
    pick = run_cli("pick", "--run", run["run_id"], "--device", peer.serial, "--gate", "xml_parse_rate>=0",
                   "--json", env=env)
    assert pick.returncode == 0, pick.stderr
    picked = json.loads(pick.stdout)
    assert picked["device_id"] == device_id and picked["pick"] is not None
    by_quant = {r["quant"]: r for r in picked["rungs"]}
    assert by_quant[smallest]["tg_tps"] == tg[smallest]       # the phone's figure
    assert by_quant[smallest]["quality"] is not None          # the host's quality, joined to the phone's row


def test_a_phone_lost_mid_search_leaves_a_partial_run(tiny_checkpoint, phone, arm64_runner, tmp_path):
    peer, workdir, env, profile = phone
    suite = write_suite(tmp_path / "suite")
    # the runner and the reference are on the phone already; the first push tune makes is the Q8_0
    # candidate's, and every push of a model drops the connection
    preload_runner_and_reference(tiny_checkpoint, peer, workdir, env, profile, arm64_runner)
    peer.faults.drop_send_after = 4096
    peer.faults.drop_send_times = None
    res = run_cli(*_tune_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, suite, "Q8_0,Q4_0",
                              "--gate", "xml_parse_rate>=0"), env=env, timeout=1500)
    peer.faults.drop_send_after = None
    assert res.returncode == 1, res.stderr[-3000:]
    line = assert_one_line_error(res.stderr, peer.serial, "Q8_0", "partial")
    run = _only_run(env)
    assert run["run_id"] in line
    assert run["status"] == "partial" and peer.serial in run["status_detail"]
    # what was measured before the phone went is kept: the reference's speed on the phone
    rows = _rows(env, run["run_id"])
    assert {r["quant"] for r in rows if r["metric"] == "tg_tps"} == {"BF16"}
    assert {r["device_id"] for r in rows if r["metric"] == "tg_tps"} == {f"adb:{peer.serial}"}
