"""[sustained] (issue 18): back-to-back generation runs of one rung with no cool-down, the thermal state
after each, through the real CLI on the tiny Gemma 3 (this host) and the ADB peer (a phone that warms up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli

RUNS = 5


def sustained_profile(folder: Path, runs=RUNS, extra: str = "") -> Path:
    path = folder / "s.toml"
    path.write_text('[profile]\nname = "s"\n[quantize]\ntypes = ["Q8_0"]\n'
                    '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nwarmup = 0\n'
                    f'[sustained]\nruns = {runs}\nn_gen = 8\nrung = "Q8_0"\n' + extra)
    return path


def sustained_rows(db: Path, run_id: str) -> dict[str, dict]:
    out = {}
    for r in db_rows(db, "SELECT quant, metric, value, detail, params, device_id FROM measurements"
                         " WHERE run_id = ?", run_id):
        params = json.loads(r["params"])
        if params.get("stage") == "sustained":
            out[r["metric"]] = {"value": r["value"], "detail": json.loads(r["detail"]) if r["detail"] else None,
                                "params": params, "quant": r["quant"], "device_id": r["device_id"]}
    return out


def check_curve(rows: dict[str, dict], runs: int) -> list[dict]:
    """The summary rows against the per-run curve, recomputed here."""
    curve = rows["sustained_tg_tps"]["detail"]["runs"]
    assert [c["run"] for c in curve] == list(range(1, runs + 1))
    assert all(c["tg_tps"] > 0 for c in curve)
    first, last = curve[0]["tg_tps"], curve[-1]["tg_tps"]
    assert rows["sustained_runs"]["value"] == runs
    assert rows["sustained_tg_tps"]["value"] == pytest.approx(last)
    assert rows["sustained_first_tg_tps"]["value"] == pytest.approx(first)
    assert rows["sustained_drop"]["value"] == pytest.approx(100 * (first - last) / first)
    below = [c["run"] for c in curve if c["tg_tps"] < 0.9 * first]
    assert rows["sustained_below90_run"]["value"] == (below[0] if below else 0)
    return curve


def test_sustained_runs_on_this_host(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    res = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile",
                  str(sustained_profile(tmp_path)), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = db_rows(tmp_path / "results.db", "SELECT run_id FROM runs")
    rows = sustained_rows(tmp_path / "results.db", run["run_id"])
    assert {r["quant"] for r in rows.values()} == {"Q8_0"}
    assert rows["sustained_tg_tps"]["params"]["n_gen"] == 8 and rows["sustained_tg_tps"]["params"]["runs"] == RUNS
    curve = check_curve(rows, RUNS)
    assert all("cpu_khz" in c and "celsius" in c for c in curve)   # read after each run (None: not readable)
    # the rung's own bench rows are unchanged: its parameters are the bench stage's, its status ok
    statuses = {s["quant"]: s["status"] for s in db_rows(tmp_path / "results.db", "SELECT * FROM rung_status")}
    assert statuses == {"BF16": "ok", "Q8_0": "ok"}
    assert "sustained: back-to-back" in res.stdout and "first run < 90 %" in res.stdout
    js = json.loads(run_cli("report", "last", "--format", "json", env=env).stdout)
    (rec,) = js["sustained"]
    assert rec["quant"] == "Q8_0" and len(rec["runs"]) == RUNS
    assert js["params"].get("stage") is None        # the header describes the bench stage, not the sustained one
    md = run_cli("report", "last", "--format", "md", env=env).stdout
    assert "**sustained: back-to-back generation runs, no cool-down**" in md and "| Q8_0 |" in md
    html = tmp_path / "r.html"
    assert run_cli("report", "last", "--html", str(html), env=env).returncode == 0
    page = html.read_text()
    assert "back-to-back generation runs, no cool-down" in page
    assert 'alt="generation tokens/s of each back-to-back run' in page      # the curve


@pytest.mark.parametrize("text, field", [
    ("[sustained]\nruns = 0\n", "sustained.runs"),
    ('[sustained]\nrung = "Q2_K"\n', "sustained.rung"),
])
def test_bad_sustained_settings_are_one_line_exit_2(tiny_checkpoint, tmp_path, text, field):
    env = cli_env(tmp_path)
    profile = tmp_path / "bad.toml"
    profile.write_text('[quantize]\ntypes = ["Q8_0"]\n' + text)
    res = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, field)


# ---------------------------------------------------------------------------
# on a phone: the ADB peer, warming up while llama-bench runs (the real linux-arm64 build under qemu)

from test_device_run import _run_args, _run_row  # noqa: E402,F401


@pytest.mark.slow
def test_sustained_runs_on_a_phone_that_warms_up(tiny_checkpoint, phone, arm64_runner):
    peer, workdir, env, profile = phone
    text = profile.read_text().replace('types = ["Q8_0", "Q4_0"]', 'types = ["Q8_0"]')
    profile.write_text(text + '\n[sustained]\nruns = 4\nn_gen = 8\nrung = "Q8_0"\n')
    peer.simulate_heat(rise_c_per_s=6.0, fall_c_per_s=1.0)
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    run = _run_row(env)
    rows = sustained_rows(Path(env["EDGEQUANT_DB"]), run["run_id"])
    assert rows["sustained_tg_tps"]["device_id"] == f"adb:{peer.serial}"
    assert rows["sustained_tg_tps"]["params"]["runner"] == "device"
    curve = check_curve(rows, 4)
    before = rows["sustained_tg_tps"]["detail"]["before"]
    # no cool-down between the runs: the phone is hotter after the last run than before the first
    assert curve[-1]["celsius"] > before["celsius"]
    assert curve[-1]["thermal_status"] >= before["thermal_status"] and curve[-1]["thermal_status"] > 0
    assert curve[-1]["battery_celsius"] > before["battery_celsius"]
    assert all(c["sensor"] == "cpu4-big-usr" for c in curve)           # the hottest sensor is named
    # one llama-bench generation run per sustained run, back to back
    gens = [c for c in peer.events_of("process") if "bin/llama-bench" in c and "-p 0 -n 8 " in c]
    assert len(gens) == 4, gens
    # and at rest the peer cools down again
    hot = peer.heat_celsius
    peer.wait_for(lambda: peer.heat_celsius < hot - 1.0, timeout=10, what="the phone cooling down")
