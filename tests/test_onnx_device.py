"""ONNX rungs on a phone with onnxruntime_perf_test: the input sets run on this host through onnxruntime's
Python API (so the sets and the arithmetic are checked against the model itself), the tool's output
parsed from garbage, and the whole device path (push, links, run under `toybox time` and the /proc
poller, result file) through the ADB device peer with a stand-in tool honouring the same command line.
The stand-in is not the real tool: phone figures need onnxruntime_perf_test built for Android."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest


from edgequant.devices.measured import DeviceOutputError
from edgequant.bench.onnx_device import (RemoteTool, make_input_sets, parse_perf_stdout, parse_result_file,
                                         perf_test_args, read_input_set, read_model_inputs, run_onnx_device_bench,
                                         run_set_on_host, stage_sets)
from edgequant.bench.onnx_host import KVModel
from edgequant.core.errors import BadInput
from edgequant.profiles import BenchSettings

STANDIN = Path(__file__).with_name("onnx_perf_standin.py")


@pytest.mark.slow
def test_input_sets_have_the_models_shapes(tiny_onnx):
    arts, _, _ = tiny_onnx
    info = read_model_inputs(arts["int4"].path)
    assert (info.kv_heads, info.head_dim, info.n_vocab) == (1, 64, 1024)      # the tiny model's config
    pre, dec = make_input_sets(info, n_prompt=20, n_cached=33, seed=3)
    assert (pre.name, pre.n_tokens, pre.n_cached, dec.name, dec.n_tokens, dec.n_cached) == \
        ("prefill", 20, 0, "decode", 1, 33)
    assert pre.arrays["input_ids"].shape == (1, 20) and pre.arrays["attention_mask"].shape == (1, 20)
    assert dec.arrays["input_ids"].shape == (1, 1) and dec.arrays["attention_mask"].shape == (1, 34)
    for name in info.past_names:
        assert pre.arrays[name].shape == (1, 1, 0, 64) and dec.arrays[name].shape == (1, 1, 33, 64)
    assert list(pre.arrays) == list(info.names)           # graph order, as input_<i>.pb numbers them
    again = make_input_sets(info, n_prompt=20, n_cached=33, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(pre.arrays.values(), again[0].arrays.values()))
    with pytest.raises(BadInput, match="at least one"):
        make_input_sets(info, n_prompt=0, n_cached=5)


@pytest.mark.slow
def test_input_sets_run_on_the_host_and_give_the_models_own_logits(tiny_onnx, tmp_path):
    arts, _, _ = tiny_onnx
    model = arts["int4"].path
    folders = stage_sets(model, 12, 12, tmp_path, seed=1)
    feeds = read_input_set(folders["prefill"])
    logits, seconds = run_set_on_host(model, folders["prefill"], reps=2)
    assert logits.shape == (1, 12, 1024) and len(seconds) == 2 and all(s > 0 for s in seconds)
    # the prefill set is a real prompt: the KV-cache loop on the same tokens gives the same logits
    m = KVModel(str(model), 1)
    want, _ = m.step(feeds["input_ids"][0].tolist(), m.empty_cache(), 0)
    assert np.allclose(logits[0], want, atol=1e-4)
    # the decode set is one token after 12 cached ones
    dec_logits, _ = run_set_on_host(model, folders["decode"])
    assert dec_logits.shape == (1, 1, 1024) and np.isfinite(dec_logits).all()
    assert read_input_set(folders["decode"])["attention_mask"].shape == (1, 13)


def test_perf_test_command_line():
    assert perf_test_args("/d/m/model.onnx", "out.csv", 5, 4) == \
        ["-e", "cpu", "-m", "times", "-r", "5", "-x", "4", "-y", "1", "/d/m/model.onnx", "out.csv"]


def test_result_file_and_stdout_parse_and_reject_garbage():
    text = "prefill,0.25,1000,50,0\nprefill,0.5,1000,50,1\n\nMin Latency: 0.25 s\n"
    assert parse_result_file(text, 2) == [0.25, 0.5]
    for bad, n in (("", 1), ("prefill,0.25,1000,50,0\n", 2), ("p,-1,1,1,0\n", 1), ("p,nan,1,1,0\n", 1),
                   ("p,1e9,1,1,0\n", 1), ("x" * (2 << 20), 1)):
        with pytest.raises(DeviceOutputError):
            parse_result_file(bad, n)
    out = parse_perf_stdout("Session creation time cost: 0.125 s\nPeak working set size: 4096 bytes\n")
    assert out == {"session_s": 0.125, "peak_working_set": 4096.0}
    with pytest.raises(DeviceOutputError, match="Session creation"):
        parse_perf_stdout("there is no test data for model prefill\n")


@pytest.fixture
def peer_transport(adb_peer, adb_host_key, monkeypatch):
    from edgequant.devices.direct import DirectTransport

    monkeypatch.setenv("ANDROID_USER_HOME", str(adb_host_key.home / ".android"))
    monkeypatch.delenv("ADB_VENDOR_KEYS", raising=False)
    t = DirectTransport(adb_peer.serial, io_timeout=30)
    yield t
    t.close()


@pytest.mark.slow
def test_device_run_through_the_adb_peer_with_a_standin_tool(tiny_onnx, adb_peer, peer_transport, tmp_path):
    from edgequant.devices.push import Pusher

    arts, _, _ = tiny_onnx
    art = arts["fp32-ext"]                       # model.onnx + model.onnx_data: both pushed and linked
    workdir = str(adb_peer.sandbox / "eq")
    tool_local = tmp_path / "onnxruntime_perf_test"
    tool_local.write_text(f"#!{sys.executable}\n" + STANDIN.read_text())
    tool = Pusher(peer_transport, workdir).push(tool_local, dest="bin/onnxruntime_perf_test", executable=True)
    settings = BenchSettings(n_prompt=16, repetitions=3, threads=1, timeout=300.0)
    phases: list[str] = []
    res = run_onnx_device_bench(peer_transport, RemoteTool(tool.remote), art.path, art.sha256, settings,
                                workdir=workdir, staging=tmp_path / "sets", on_progress=phases.append)
    assert phases == ["inputs", "push", "prefill", "decode", "done"]
    # the arithmetic, from the tool's own result files on the device
    runs = sorted((adb_peer.sandbox / "eq" / "runs" / "onnx").glob("*/*/run/perf_result.csv"))
    assert [p.parent.parent.name for p in runs] == ["decode", "prefill"]
    lat = {p.parent.parent.name: [float(line.split(",")[1]) for line in p.read_text().splitlines()] for p in runs}
    assert res.pp.samples == pytest.approx([16 / s for s in lat["prefill"]])
    assert res.tg.samples == pytest.approx([1 / s for s in lat["decode"]])
    assert res.ttft_ms.samples == pytest.approx([s * 1000 for s in lat["prefill"]])
    assert res.pp.n == res.tg.n == 3 and res.pp.stddev >= 0
    assert res.load_s > 0 and res.peak_rss_bytes > 0 and res.peak_working_set_bytes > 0
    # what reached the "device": the decode run saw one token after 16 cached
    seen = (runs[0].parent / "standin_seen.txt").read_text()
    assert "attention_mask [1, 17] int64" in seen and "past_key_values.0.key [1, 1, 16, 64] float32" in seen
    assert all("-m times -r 3 -x 1" in c for c in res.commands)
    # the model went to models/ once, content-addressed, with its external data
    pushed = sorted(p.name.split("-", 1)[1] for p in (adb_peer.sandbox / "eq" / "models").iterdir())
    assert pushed == ["model.onnx", "model.onnx_data"]


@pytest.mark.slow
def test_missing_inputs_on_the_device_are_a_failed_rung(tiny_onnx, adb_peer, peer_transport, tmp_path):
    from edgequant.devices.measured import run_measured
    from edgequant.core.errors import BenchError
    from edgequant.bench.onnx_device import tool_failure

    arts, _, _ = tiny_onnx
    folder = adb_peer.sandbox / "bare"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(arts["int4"].path)
    run = run_measured(peer_transport, [sys.executable, str(STANDIN)] + perf_test_args(
        str(folder / "model.onnx"), "r.csv", 2, 1), str(adb_peer.sandbox / "eq-run"), deadline_s=120)
    err = tool_failure(run, "onnxruntime_perf_test (prefill)")
    assert isinstance(err, BenchError) and err.status == "failed"
    assert "status 255" in str(err) and "there is no test data" in str(err)


@pytest.mark.slow
def test_device_rows_are_stored_like_host_rows(tiny_onnx, adb_peer, peer_transport, tmp_path):
    from conftest import db_rows

    from edgequant.bench.onnx_device import open_perf_test
    from edgequant.pipeline.device_run import DeviceContext, bench_onnx_rungs_on_device
    from edgequant.devices.facts import collect_facts
    from edgequant.devices.push import Pusher
    from edgequant.devices.select import Target
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import Profile, QuantSpec
    from edgequant.results.store import Store

    arts, ladder, _ = tiny_onnx
    workdir = str(adb_peer.sandbox / "eq")
    tool_local = tmp_path / "onnxruntime_perf_test"
    tool_local.write_text(f"#!{sys.executable}\n" + STANDIN.read_text())
    tool_local.chmod(0o755)
    # the phone without a llama.cpp runner: only the ONNX tool runs on it
    ctx = DeviceContext(Target(adb_peer.serial, "direct"), peer_transport, collect_facts(peer_transport, workdir),
                        workdir, None, None, None, None, Pusher(peer_transport, workdir))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(arts["int8"].path.read_bytes()[:4000])
    bad = type(arts["int8"])(**{**arts["int8"].__dict__, "path": broken / "model.onnx", "quant": "ONNX-BROKEN"})
    # built broken (its record names these bytes), not damaged later: the tool on the phone must reject it
    bad.sha256, bad.checked = bad.content_sha256(), bad.signature()
    profile = Profile("p", tmp_path / "p.toml", "", QuantSpec(), BenchSettings(n_prompt=8, repetitions=3,
                                                                                 threads=1, timeout=300.0))
    db = tmp_path / "r.db"
    store = Store(db)
    run_id = store.start_run("test", "p", "tiny", ladder.model_hash)
    out = bench_onnx_rungs_on_device(RunScope(store, run_id, "tiny", ladder.model_hash, NullReporter()),
                                     [arts["int4"], bad], profile, ctx, tmp_path / "sets", open_perf_test(tool_local))
    assert [o.status for o in out.outcomes] == ["ok", "failed"]
    rows = db_rows(db, "SELECT quant, runtime, device_id, metric, repetitions FROM measurements")
    int4 = {r["metric"]: r for r in rows if r["quant"] == "ONNX-INT4"}
    assert {"pp_tps", "tg_tps", "ttft", "load_time", "peak_rss", "peak_rss_anon", "size", "bpw"} <= set(int4)
    assert {r["runtime"] for r in rows} == {"onnxruntime"}
    assert {r["device_id"] for r in rows} == {f"adb:{adb_peer.serial}"}
    assert int4["pp_tps"]["repetitions"] == 3
    st = db_rows(db, "SELECT quant, status, detail FROM rung_status")
    assert {r["quant"]: r["status"] for r in st} == {"ONNX-INT4": "ok", "ONNX-BROKEN": "failed"}
    assert "corrupt or truncated" in next(r["detail"] for r in st if r["quant"] == "ONNX-BROKEN")
