"""`edgequant run --device SERIAL --quality-on-device` with ONNX rungs and no host in the device list: the
GGUF rungs are evaluated on the "phone" (the ADB peer, the linux-arm64 runner's llama-completion under qemu),
and the ONNX rungs, which onnxruntime_perf_test cannot evaluate (it only times Run), on the host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import db_rows, phone_profile_text, run_cli
from test_device_quality import CASES, SUITE

from edgequant.devices.host import host_device_id

pytestmark = pytest.mark.slow   # a phone run with quality on the emulated phone (qemu) and ONNX rungs, end to end

NOTE = "ONNX rungs: quality computed on the host; onnxruntime_perf_test only times Run"


def test_onnx_rungs_get_host_quality_in_a_phone_only_quality_on_device_run(tiny_checkpoint, phone,
                                                                           arm64_runner, tmp_path):
    peer, workdir, env, _ = phone
    profile = tmp_path / "phone-onnx-eval.toml"
    profile.write_text(phone_profile_text("phone-onnx-eval", (), onnx=("int4",), threads=1, n_prompt=8, n_gen=2))
    (tmp_path / "phone-mini.jsonl").write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    suite = tmp_path / "phone-mini.toml"
    suite.write_text(SUITE)
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
                  "--device-dir", workdir, "--runner-dir", str(arm64_runner.path), "--suite", str(suite),
                  "--quality-on-device", env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]     # the ONNX rung's speed on the phone: skipped, no failure
    assert NOTE in " ".join(res.stderr.split())
    db = Path(env["EDGEQUANT_DB"])
    quality = [r for r in db_rows(db, "SELECT * FROM measurements")
               if json.loads(r["params"]).get("stage") == "quality"]
    by_quant: dict[str, dict[str, dict]] = {}
    for r in quality:
        by_quant.setdefault(r["quant"], {})[r["metric"]] = r
    assert set(by_quant) == {"BF16", "ONNX-INT4"}
    # the GGUF reference was evaluated on the phone ...
    assert {r["device_id"] for r in by_quant["BF16"].values()} == {f"adb:{peer.serial}"}
    assert {json.loads(r["params"])["where"] for r in by_quant["BF16"].values()} == {"device"}
    # ... the ONNX rung on the host, by onnxruntime, against the GGUF reference, with logits (KLD) there
    onnx = by_quant["ONNX-INT4"]
    assert {r["device_id"] for r in onnx.values()} == {host_device_id()}
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    assert json.loads(onnx["xml_parse_rate"]["params"])["reference"] == "BF16"
    assert onnx["xml_parse_rate"]["repetitions"] == sum(c["format"] == "xml" for c in CASES)
    assert "mean_kld" in onnx and onnx["mean_kld"]["value"] >= 0
    cases = db_rows(db, "SELECT quant, device_id, case_id FROM eval_cases WHERE quant = 'ONNX-INT4'")
    assert sorted(c["case_id"] for c in cases) == sorted(c["id"] for c in CASES)
    assert {c["device_id"] for c in cases} == {host_device_id()}
