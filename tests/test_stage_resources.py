"""Every stage's own resources as rows (issue 19): a quantization's own memory (not the pages its forked
process shares with edgequant), the ONNX export and variants, and a phone's push and measuring step.

Each figure is checked against a measure of its own: what the test's work allocated, psutil's view of the
forked process, the sizes of the tensors and files, the bytes of the file pushed, the test's wall clock and
the tokens/s the phone reported.
"""

from __future__ import annotations

import io
import json
import mmap
import threading
import time
from pathlib import Path

import psutil
import pytest

from test_cli import tiny_profile

from edgequant.results.store import Store

MiB = 2 ** 20


# The kernel's resident-size counters are batched per CPU, so a VmRSS read is exact only to a few dozen pages
# (CI once read a 32 MiB growth as 31.96 MiB); the bounds below allow that much and no more.
SLACK = 1 * MiB


def _touch(n_bytes: int) -> mmap.mmap:
    # fresh anonymous pages, never memory malloc freed earlier in this process and still resident (a bytearray
    # may reuse it, and then the child grows by less than it allocated)
    buf = mmap.mmap(-1, n_bytes)
    for i in range(0, n_bytes, 4096):      # resident: every page written
        buf[i] = 1
    return buf


# ---------------------------------------------------------------------------
# a quantization's own memory


def test_a_forked_stage_counts_its_own_memory_not_the_pages_it_shares():
    from edgequant.quantize.ladder import run_forked

    held = _touch(192 * MiB)                # edgequant's memory at fork: shared with the child, not its own
    uss: list[int] = []
    me = psutil.Process()

    def work() -> tuple[int, str]:
        mine = _touch(48 * MiB)
        time.sleep(1.5)                     # long enough for psutil to see it from outside
        return len(mine) and 0, "done"

    def tick() -> None:                     # psutil's view of the child: its unique set (pages only it maps)
        for child in me.children():
            try:
                uss.append(child.memory_full_info().uss)
            except psutil.Error:
                pass

    code, said, meter = run_forked(work, tick)
    assert (code, said) == (0, "0\ndone")
    # the 48 MiB it wrote, plus the little the child's Python and its pipe add; not the 192 MiB it shares
    assert 48 * MiB - SLACK <= meter.peak_rss_bytes < 48 * MiB + 16 * MiB, meter.peak_rss_bytes / MiB
    assert uss, "psutil never saw the child"
    # psutil's unique set size also counts the pages the child copied on write: close, never far below ours
    assert abs(max(uss) - meter.peak_rss_bytes) < 16 * MiB, (max(uss) / MiB, meter.peak_rss_bytes / MiB)
    assert len(held) == 192 * MiB


def test_a_killed_forked_stage_still_has_its_own_peak():
    import os
    import signal

    from edgequant.quantize.ladder import run_forked

    held = _touch(128 * MiB)

    def work() -> tuple[int, str]:
        _touch(32 * MiB)
        os.kill(os.getpid(), signal.SIGKILL)     # as the OOM killer would, after it grew
        return 0, ""

    code, said, meter = run_forked(work, lambda: None)
    assert code == -signal.SIGKILL and said == ""
    assert 32 * MiB - SLACK <= meter.peak_rss_bytes < 32 * MiB + 16 * MiB, meter.peak_rss_bytes / MiB
    assert len(held) == 128 * MiB


@pytest.fixture(scope="module")
def tiny_q8(tiny_checkpoint, tmp_path_factory):
    from edgequant.pipeline.prepare import ResolvedModel, build_ladder
    from edgequant.pipeline.scope import NullReporter
    from edgequant.profiles import load_profile
    from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint

    tmp = tmp_path_factory.mktemp("own")
    profile = load_profile(str(tiny_profile(tmp, types=["Q8_0"])))
    ckpt = open_checkpoint(tiny_checkpoint)
    resolved = ResolvedModel(ckpt, checkpoint_hash(ckpt, tmp / "hashes.json"))
    arts = build_ladder(resolved, profile, tmp / "cache", NullReporter())
    return {"tmp": tmp, "artifacts": arts, "rss_after": psutil.Process().memory_info().rss}


@pytest.mark.slow
def test_a_quantizations_peak_is_its_own_memory_bounded_by_the_tensors(tiny_q8):
    import gguf

    from edgequant.pipeline.prepare import record_build_stages
    from edgequant.quantize.ladder import OWN_MEMORY

    ref, q8 = tiny_q8["artifacts"]
    assert q8.quant == "Q8_0" and q8.build["stage"] == "quantize" and q8.build["detail"] == OWN_MEMORY
    tensors = gguf.GGUFReader(ref.path).tensors
    largest = max(int(t.n_elements) for t in tensors)
    peak = q8.build["peak_rss_bytes"]
    # llama.cpp converts each BF16 tensor to f32 before quantizing it: the largest one's f32 copy at least;
    # at most the source and the output it writes, that f32 copy and the threads' stacks
    assert 4 * largest <= peak <= ref.size_bytes + q8.size_bytes + 4 * largest + 32 * MiB, peak / MiB
    # edgequant itself (torch, transformers and llama.cpp loaded) is far larger: the figure is not that
    assert peak < tiny_q8["rss_after"] / 4
    store = Store(tiny_q8["tmp"] / "r.db")
    run = store.start_run("edgequant run", "tiny", "m", "h")
    record_build_stages(store, run, tiny_q8["artifacts"])
    rows = {r["stage"]: r for r in store.stage_resources(run)}
    assert rows["quantize"]["peak_rss_bytes"] == peak and rows["quantize"]["detail"] == OWN_MEMORY
    assert rows["convert"]["detail"] is None     # the converter's figure is its whole process tree's


# ---------------------------------------------------------------------------
# the ONNX export and variants


@pytest.mark.slow
def test_the_onnx_export_and_each_variant_are_stage_rows_of_their_worker(tiny_onnx, tiny_checkpoint, tmp_path):
    from edgequant.pipeline.onnx_rungs import record_onnx_stages
    from edgequant.quantize.onnx_export import WORKER_MEMORY, model_files

    arts, ladder, _ = tiny_onnx
    store = Store(tmp_path / "r.db")
    run = store.start_run("edgequant run", "tiny", "m", "h")
    record_onnx_stages(store, run, list(arts.values()))
    rows = store.stage_resources(run)
    # the export once (the fp32 and fp32-ext rungs' source), then every variant made from it
    assert [(r["stage"], r["quant"]) for r in rows] == \
        [("onnx-export", "ONNX")] + [("onnx-quantize", a.quant) for v, a in arts.items() if v != "fp32"]
    fp32_bytes = sum(f.stat().st_size for f in model_files(arts["fp32"].path.parent))
    weights = sum(f.stat().st_size for f in tiny_checkpoint.glob("*.safetensors"))
    for r in rows:
        assert r["status"] == "ok" and not r["reused"] and r["detail"] == WORKER_MEMORY
        assert r["seconds"] > 0 and r["peak_rss_bytes"] < psutil.virtual_memory().total
        # every worker holds the fp32 model it reads or writes: its file's bytes at least
        assert r["peak_rss_bytes"] > fp32_bytes, r
    # the exporter holds the checkpoint's weights in fp32 (twice their bf16 bytes) and torch: more than that
    export = rows[0]
    assert export["peak_rss_bytes"] > 2 * weights + 100 * MiB
    # built again: every one reused, with the figures recorded in its manifest when it was built
    again = ladder.build()
    run2 = store.start_run("edgequant run", "tiny", "m", "h")
    record_onnx_stages(store, run2, again)
    rows2 = store.stage_resources(run2)
    assert [(r["stage"], r["quant"], r["seconds"], r["peak_rss_bytes"]) for r in rows2] == \
        [(r["stage"], r["quant"], r["seconds"], r["peak_rss_bytes"]) for r in rows]
    assert all(r["reused"] for r in rows2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_stage_rows_bytes_round_trip_on_both_backends(backend, request, tmp_path):
    from edgequant.estimate import stage_row

    url = str(tmp_path / "r.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    with Store(url) as store:
        run = store.start_run("edgequant run", "tiny", "m", "h")
        sent = 8_600_000_123            # a 4B model's BF16 file: past what a 32-bit float holds exactly
        store.record_stages(run, [stage_row("push", "BF16", "adb:X", 4_300_000_000, 61.5, None, "ok", False,
                                            "bytes sent", sent),
                                  stage_row("convert", "BF16", "host:a", 4_300_000_000, 300.0, 9.5e9)])
        push, convert = store.stage_resources(run)
    assert (push["stage"], push["data_bytes"], push["peak_rss_bytes"]) == ("push", sent, None)
    assert (convert["stage"], convert["data_bytes"], convert["peak_rss_bytes"]) == ("convert", None, 9.5e9)


# ---------------------------------------------------------------------------
# a phone's push and measuring step (the ADB peer running the real llama-bench under qemu)


@pytest.mark.slow
def test_a_phones_push_and_measuring_step_are_stage_rows_with_its_place(tiny_checkpoint, phone, arm64_runner,
                                                                         tmp_path):
    from rich.console import Console

    from adbpeer.peer import LmkRule

    from edgequant.devices import select
    from edgequant.pipeline import device_run
    from edgequant.pipeline import prepare as pipeline
    from edgequant.pipeline.phone_stages import MEASURE_DETAIL, PUSH_DETAIL, PhoneStages
    from edgequant.pipeline.scope import NullReporter, RunScope
    from edgequant.profiles import load_profile
    from edgequant.results import report

    peer, workdir, env, profile_path = phone
    profile = load_profile(profile_path)
    cache = tmp_path / "cache"
    resolved = pipeline.resolve_model(str(tiny_checkpoint), cache, NullReporter())
    arts = [a for a in pipeline.build_ladder(resolved, profile, cache, NullReporter())
            if a.quant in ("Q8_0", "Q4_0")]
    # the phone's low-memory killer takes Q8_0's llama-bench: its measuring step is a row with that status
    peer.faults.lmk = [LmkRule(r"^\S*qemu-aarch64\S* .*llama-bench .*Q8_0\.gguf", delay=0.0)]
    ctx = device_run.open_device(select.Target(peer.serial, "direct"), workdir, str(arm64_runner.path), cache,
                                 NullReporter())
    store = Store(tmp_path / "r.db")
    run = store.start_run("edgequant run", profile.name, "tiny", resolved.model_hash)
    try:
        t0 = time.monotonic()
        device_run.bench_rungs_on_device(RunScope(store, run, "tiny", resolved.model_hash, NullReporter()), arts,
                                         profile, ctx)
        wall = time.monotonic() - t0
        # the same file pushed again: the phone holds its bytes, nothing is sent
        q4 = arts[1]
        again = PhoneStages(store, run, ctx.device_id)
        again.push(q4, ctx.pusher, lambda: ctx.pusher.push(q4.path, q4.sha256, name=f"{q4.quant}.gguf"))
    finally:
        ctx.close()
    rows = store.stage_resources(run)
    assert [(r["stage"], r["quant"], r["status"]) for r in rows] == [
        ("push", "Q8_0", "ok"), ("bench", "Q8_0", "oom"), ("push", "Q4_0", "ok"), ("bench", "Q4_0", "ok"),
        ("push", "Q4_0", "ok")]
    assert {r["device_id"] for r in rows} == {f"adb:{peer.serial}"}
    push8, oom8, push4, bench4, again4 = rows
    # the bytes sent are the files' bytes; the second push sent none
    assert (push8["data_bytes"], push4["data_bytes"], again4["data_bytes"]) == \
        (arts[0].path.stat().st_size, q4.path.stat().st_size, 0)
    assert push4["detail"] == PUSH_DETAIL and push4["peak_rss_bytes"] is None
    assert "low-memory killer" in oom8["detail"] and oom8["peak_rss_bytes"] is None
    # the measuring step's peak is the one llama-bench's Max RSS row holds, read on the phone
    m = {r["metric"]: r for r in store.conn.execute(
        "SELECT metric, value, repetitions FROM measurements WHERE run_id = ? AND quant = 'Q4_0'", (run,))}
    assert bench4["peak_rss_bytes"] == m["peak_rss"]["value"] and bench4["detail"] == MEASURE_DETAIL
    # its time: at least the repetitions' own pp and tg time (tokens / the t/s the phone reported), at most
    # the test's wall clock around the whole ladder
    n = profile.bench
    timed = n.repetitions * (n.n_prompt / m["pp_tps"]["value"] + n.n_gen / m["tg_tps"]["value"])
    assert timed < bench4["seconds"] < wall
    assert sum(r["seconds"] for r in rows[:4]) < wall
    # report's resources table shows them with the phone as the place
    console = Console(file=io.StringIO(), width=200, record=True)
    report.render_table(report.summarize(store, run), console)
    table = console.export_text().split("resources: peak RSS and time of each stage", 1)[1]
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in table.splitlines() if "│" in ln]
    push_rows = [c for c in cells if c[:2] == ["push", "Q4_0"]]
    assert push_rows and push_rows[0][2] == f"adb:{peer.serial}"
    assert push_rows[0][5] == f"{q4.path.stat().st_size / MiB:,.1f}" and push_rows[1][5] == "0.0"


def test_an_eval_session_reads_a_quantized_rung_that_may_be_repacked(tiny_q8, tiny_bf16_gguf):
    """llama.cpp copies repacked weights out of the file; mapped, the file's pages stayed resident beside the
    copy (a 4B Q4_0 loaded in 4.0 GiB mapped, 2.3 GiB read).  So with repacking on an eval session reads a
    quantized file and maps a float one (never repacked); an explicit choice stands.  Whether the file was
    mapped is read from /proc/self/maps."""
    import subprocess
    import sys

    q8 = next(a.path for a in tiny_q8["artifacts"] if a.quant == "Q8_0")
    script = """
import json, sys
import llama_cpp as L
from edgequant.bench.eval_worker import Session, WorkerLog
seen = []
for path, extra in ((sys.argv[1], {"repack": True}), (sys.argv[1], {"repack": False}),
                    (sys.argv[1], {"repack": True, "mmap": True}), (sys.argv[2], {"repack": True})):
    s = Session(L, dict({"path": path, "threads": 1}, **extra), WorkerLog(L, echo=False))
    with open("/proc/self/maps") as fh:
        seen.append(path in fh.read())
    s.close()
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", script, str(q8), str(tiny_bf16_gguf)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True, True, True]
