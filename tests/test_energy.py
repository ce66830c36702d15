"""Energy per generated token on a phone (issue 18): the battery's current_now x voltage_now sampled
during each llama-bench run, through the ADB peer (whose battery draws more under load and whose USB
charging can be switched) and the real linux-arm64 llama-bench under qemu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli
from test_device_run import _run_args, _run_row  # noqa: F401

from edgequant.devices.measured import parse_power, window_energy

BUSY_W = 1.5 * 3.95      # the peer's battery under load: 1.5 A at 3.95 V
IDLE_W = 0.3 * 3.95


def energy_rows(env, run_id) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in db_rows(Path(env["EDGEQUANT_DB"]), "SELECT quant, metric, value, detail FROM measurements"
                                                " WHERE run_id = ? AND metric IN ('energy_per_token', 'avg_power')",
                     run_id):
        out.setdefault(r["quant"], {})[r["metric"]] = {"value": r["value"],
                                                       "detail": json.loads(r["detail"]) if r["detail"] else None}
    return out


def test_power_samples_parse_and_integrate():
    text = "100.00 -1000000 4000000\n100.20 -1000000 4000000\ngarbage\n100.40 -500000 4000000\n100.60  4000000\n"
    samples = parse_power(text)
    assert samples == [(100.0, 4.0), (100.2, 4.0), (100.4, 2.0)]
    watts, joules, n = window_energy(samples, 0.4)
    assert n == 3 and watts == pytest.approx(10 / 3) and joules == pytest.approx(10 / 3 * 0.4)
    assert window_energy(samples[:1], 1.0) is None


@pytest.mark.slow
def test_energy_on_a_phone_charging_then_on_battery(tiny_checkpoint, phone, arm64_runner):
    peer, workdir, env, profile = phone
    supply = peer.power_supply()
    text = (profile.read_text().replace('types = ["Q8_0", "Q4_0"]', 'types = ["Q8_0"]')
            .replace("n_gen = 4", "n_gen = 48"))
    profile.write_text(text + f'energy = true\npower_supply = "{supply}"\n')    # appended to [device]
    peer.simulate_heat()
    # on the USB cable (the peer starts plugged in): stored as not measured, with the reason; the run succeeds
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = energy_rows(env, _run_row(env)["run_id"])
    assert set(rows) == {"BF16", "Q8_0"}
    for r in rows.values():
        assert "avg_power" not in r and "charging (usb powered)" in r["energy_per_token"]["detail"]["not_measured"]
    assert "not measured" in res.stdout and "adb tcpip" in res.stdout
    # cable out: joules per generated token from the battery's own current and voltage
    peer.set_charging(False)
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = energy_rows(env, _run_row(env)["run_id"])
    for quant, r in rows.items():
        d = r["energy_per_token"]["detail"]
        assert d["tokens"] == 48 * 3 and d["samples"] >= 2
        assert IDLE_W <= r["avg_power"]["value"] <= BUSY_W + 1e-9
        assert r["avg_power"]["value"] > (IDLE_W + BUSY_W) / 2        # the tail of the run is the busy tg test
        assert r["energy_per_token"]["value"] == pytest.approx(r["avg_power"]["value"] * d["seconds"] / d["tokens"])
    assert "J/token" in res.stdout


def test_energy_on_this_host_is_refused_with_one_line(tiny_checkpoint, tmp_path):
    env = cli_env(tmp_path)
    profile = tmp_path / "e.toml"
    profile.write_text('[quantize]\ntypes = ["Q8_0"]\n[device]\nenergy = true\n')
    res = run_cli("run", "--no-quality", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "device.energy", "--device")
