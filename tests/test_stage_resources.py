"""Every stage's own resources as rows (issue 19): a quantization's own memory (not the pages its forked
process shares with edgequant), the ONNX export and variants, and a phone's push and measuring step.

Each figure is checked against a measure of its own: what the test's work allocated, psutil's view of the
forked process, the sizes of the tensors and files, the bytes of the file pushed, the test's wall clock and
the tokens/s the phone reported.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import psutil
import pytest

from test_cli import tiny_profile

from edgequant.results.store import Store

MiB = 2 ** 20


def _touch(n_bytes: int) -> bytearray:
    buf = bytearray(n_bytes)
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
    assert 48 * MiB <= meter.peak_rss_bytes < 48 * MiB + 16 * MiB, meter.peak_rss_bytes / MiB
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
    assert 32 * MiB <= meter.peak_rss_bytes < 32 * MiB + 16 * MiB, meter.peak_rss_bytes / MiB
    assert len(held) == 128 * MiB


@pytest.fixture(scope="module")
def tiny_q8(tiny_checkpoint, tmp_path_factory):
    from edgequant.pipeline.host import NullReporter, ResolvedModel, build_ladder
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

    from edgequant.pipeline.host import record_build_stages
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
