"""`edgequant run --device ... --quality-on-device`: the eval suite through the phone's own
llama-completion (the ADB device peer running the linux-arm64 runner under qemu as a Cortex-A53),
checked against the host eval's greedy outputs for the same GGUF and prompts; then the reading
of what comes back from the phone, which is untrusted bytes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from adbpeer.peer import LmkRule
from conftest import assert_one_line_error, db_rows, phone_profile_text, run_cli

from edgequant.pipeline import device_quality as dq

SUITE = '''
[suite]
name = "phone-mini"
cases = "phone-mini.jsonl"
gates = ["xml_parse_rate >= 0.95"]

[formats.xml]
max_tokens = 6
stop = ["\\nCase:"]
system = "Answer with one <triage> packet."
few_shot = "Case: fever\\nPacket: <triage><referral>No</referral></triage>\\n\\nCase: {prompt}\\nPacket:"

[formats.esi]
max_tokens = 6
stop = ["\\nCase:"]
system = "State the ESI level."
few_shot = "Case: {prompt}\\nAnswer:"
'''

CASES = [
    {"id": "x1", "format": "xml", "prompt": "child with fever and convulsions", "gold": {"referral": True}},
    {"id": "x2", "format": "xml", "prompt": "adult with mild cough, \\n not \"escaped\"", "gold": {"referral": False}},
    {"id": "e1", "format": "esi", "prompt": "man with crushing chest pain, BP 80/50", "gold": {"esi": 1}},
]


def _host_outputs(gguf: Path, suite_path: Path) -> dict[str, dict]:
    """The host eval's own greedy outputs for this GGUF (its worker, batched, in-process llama.cpp)."""
    from edgequant.bench.quality import base_request, call_worker
    from edgequant.profiles.suites import load_suite

    suite = load_suite(suite_path)
    data = call_worker(base_request(gguf, suite, 2, None, "auto"), 600, lambda p: None)
    return {c["id"]: {"output": base64.b64decode(c["output_b64"]).decode("utf-8", "replace"),
                      "stopped": c["stopped"], "n_tokens": len(c["tokens"])} for c in data["cases"]}


@pytest.fixture
def device_eval(tiny_checkpoint, phone, arm64_runner, tmp_path):
    peer, workdir, env, _profile = phone
    profile = tmp_path / "phone-eval.toml"
    profile.write_text(phone_profile_text("phone-eval", description="the reference and two rungs, the smallest "
                                          "llama-bench run", n_prompt=8, n_gen=2))
    (tmp_path / "phone-mini.jsonl").write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    suite = tmp_path / "phone-mini.toml"
    suite.write_text(SUITE)
    # the low-memory killer takes Q4_0's llama-completion (not its llama-bench): that rung's eval fails.
    # The rule matches the program itself (qemu running it) and fires at once: the kill does not depend on
    # how long the tiny model's completion takes ((?s): a stop string is "\n...")
    peer.faults.lmk = [LmkRule(r"(?s)^\S*qemu-aarch64\S* .*llama-completion .*Q4_0", delay=0.0)]
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
                  "--device-dir", workdir, "--runner-dir", str(arm64_runner.path), "--suite", str(suite),
                  "--quality-on-device", env=env, timeout=1500)
    assert res.returncode == 1, res.stderr[-3000:]
    db = Path(env["EDGEQUANT_DB"])
    (run,) = db_rows(db, "SELECT run_id, status FROM runs")
    return {"peer": peer, "res": res, "db": db, "run": run, "suite": suite,
            "artifacts": {a["quant"]: Path(a["path"]) for a in db_rows(db, "SELECT quant, path FROM artifacts")}}


@pytest.mark.slow
def test_quality_on_device_matches_the_host_eval_and_is_stored_as_the_phones(device_eval):
    d = device_eval
    db, run_id, device_id = d["db"], d["run"]["run_id"], f"adb:{d['peer'].serial}"
    assert d["run"]["status"] == "complete"
    # Q4_0's eval was killed: one line says so, its status says why, the other rungs are whole
    assert_one_line_error(d["res"].stderr, "Q4_0")
    statuses = {s["quant"]: s for s in db_rows(db, "SELECT * FROM rung_status WHERE run_id = ?", run_id)}
    assert statuses["Q4_0"]["status"] == "oom" and "quality on device" in statuses["Q4_0"]["detail"]
    assert statuses["BF16"]["status"] == statuses["Q8_0"]["status"] == "ok"
    assert d["peer"].lmk_kills
    quality = [r for r in db_rows(db, "SELECT * FROM measurements WHERE run_id = ?", run_id)
               if json.loads(r["params"]).get("stage") == "quality"]
    assert {r["quant"] for r in quality} == {"BF16", "Q8_0"}
    # measured on the phone, and said so: no host quality stage ran for it
    for r in quality:
        params = json.loads(r["params"])
        assert r["device_id"] == device_id and params["where"] == "device" and params["runner"] == "device"
        assert params["prompt_tokens_differ"] == 0      # llama-completion saw the host's prompt tokens
    metrics = {(r["quant"], r["metric"]): r for r in quality}
    assert not {m for _q, m in metrics} & {"mean_kld", "p99_kld", "top1_agreement"}   # text only: no logits
    cases = db_rows(db, "SELECT * FROM eval_cases WHERE run_id = ?", run_id)
    assert {c["device_id"] for c in cases} == {device_id}
    by = {(c["quant"], c["case_id"]): c for c in cases}
    assert len(by) == 2 * len(CASES)

    # the real check: the phone's greedy outputs for the reference are the host eval's outputs
    host = _host_outputs(d["artifacts"]["BF16"], d["suite"])
    for case in CASES:
        mine = by[("BF16", case["id"])]
        assert mine["output"] == host[case["id"]]["output"], case["id"]
        assert mine["stopped"] == host[case["id"]]["stopped"], case["id"]
        assert mine["n_tokens"] == host[case["id"]]["n_tokens"], case["id"]

    # the rates follow the stored per-case rows, and the rung is compared with the phone's own reference
    for quant in ("BF16", "Q8_0"):
        xml = [by[(quant, c["id"])] for c in CASES if c["format"] == "xml"]
        stat = metrics[(quant, "xml_parse_rate")]
        assert stat["value"] == pytest.approx(sum(c["ok"] and not c["refusal"] for c in xml) / len(xml))
        assert stat["repetitions"] == len(xml)
    ref_ok = [bool(by[("BF16", c["id"])]["ok"]) for c in CASES if c["format"] == "xml"]
    q8_ok = [bool(by[("Q8_0", c["id"])]["ok"]) for c in CASES if c["format"] == "xml"]
    detail = json.loads(metrics[("Q8_0", "xml_parse_rate")]["detail"])
    assert detail["delta_pp"] == pytest.approx(100 * (sum(q8_ok) - sum(ref_ok)) / len(ref_ok))
    assert detail["discordant"] == [sum(a and not b for a, b in zip(ref_ok, q8_ok)),
                                    sum(b and not a for a, b in zip(ref_ok, q8_ok))]
    assert "delta_pp" not in json.loads(metrics[("BF16", "xml_parse_rate")]["detail"])

    # the table shows the phone's quality as measured there, without KLD
    out = " ".join(d["res"].stdout.split())       # the caption wraps
    print(d["res"].stdout)
    assert "quality against the reference" in out
    assert f"measured on {device_id} with llama-completion" in out
    assert "KLD/top-1 not measured on the device" in out
    assert "same GGUF bytes" not in out


# ---------------------------------------------------------------------------
# what comes back from the phone: untrusted bytes


def _record(kind: str, i: int, rc: int, payload: bytes, full: int | None = None) -> bytes:
    return f"#EQ {kind} {i} {rc} 3 {len(payload)} {len(payload) if full is None else full}\n".encode() + payload + b"\n"


def test_results_file_is_read_by_its_lengths_and_stops_at_anything_malformed():
    out = b"<triage>\n#EQ out 1 0 0 5 5\nfake</triage>\n\n"      # a header inside an output is just bytes
    data = _record("out", 0, 0, out) + _record("err", 0, 0, b"eval time = 10.0 ms / 3 runs")
    data += _record("out", 1, 0, b"ok\n\n") + b"#EQ out 2 0 0 999999 1\nshort"
    runs = dq.read_results(data, 3)
    assert set(runs) == {0, 1}
    assert runs[0].output == out and runs[0].rc == 0 and b"3 runs" in runs[0].log
    assert dq.read_results(b"garbage\n" + data, 3) == {}
    assert dq.read_results(_record("out", 7, 0, b"x"), 3) == {}           # an index the plan never had


def test_completion_output_becomes_what_the_host_eval_returns():
    log = b"prompt eval time = 20.00 ms / 40 tokens\n       eval time = 50.00 ms /    5 runs\n"
    eog = dq.case_from_run(dq.CaseRun(0, 1, b"<triage></triage>" + dq.EOG_MARK + b"\n\n", 40, log), [b"\nCase:"])
    assert (eog.output, eog.stopped, eog.n_tokens, eog.parsed) == (b"<triage></triage>", "eog", 6, None)
    assert eog.seconds == pytest.approx(0.07)
    stop = dq.case_from_run(dq.CaseRun(0, 1, b"A\nCase: B\n\n", 12), [b"\nCase:"])
    assert (stop.output, stop.stopped) == (b"A", "stop")
    plain = dq.case_from_run(dq.CaseRun(0, 1, b"\xff\xfe not utf-8\n\n", 14), [b"\nCase:"])
    assert (plain.output, plain.stopped, plain.n_tokens) == (b"\xff\xfe not utf-8", "max_tokens", None)
    huge = dq.case_from_run(dq.CaseRun(0, 1, b"x" * 100, dq.OUTPUT_LIMIT + 1), [])
    assert huge.parsed is not None and not huge.parsed.ok and "larger than" in huge.parsed.reason
    cut = dq.case_from_run(dq.CaseRun(0, 1, b"no blank line at the end", 24), [])
    assert cut.parsed is not None and not cut.parsed.ok


def test_stop_strings_cut_where_the_host_decoder_stops():
    # the earliest complete stop wins, whatever its place in the list
    assert dq.cut_at_stops(b"a END b STOP c", [b"STOP", b"END"]) == (b"a ", True)
    assert dq.cut_at_stops(b"nothing here", [b"STOP"]) == (b"nothing here", False)


@pytest.mark.parametrize("rc, seconds, status", [(124, 5, "timeout"), (137, 30, "timeout"), (137, 1, "oom"),
                                                 (139, 1, "crashed"), (1, 1, "failed")])
def test_a_failed_case_names_how_it_failed(rc, seconds, status):
    got, what = dq.failure_status(dq.CaseRun(rc, seconds, b"", 0, b"error: failed to load model\n"), timeout=30)
    assert got == status and what


def test_the_script_quotes_every_argument():
    script = dq.build_script([(0, 0, 5, 30, ["bin/llama-completion", "-r", "\nCase: $(reboot)"])],
                             {"LD_LIBRARY_PATH": "/data/local/tmp/eq x/lib"})
    assert "'\nCase: $(reboot)'" in script
    assert "export LD_LIBRARY_PATH='/data/local/tmp/eq x/lib'" in script
