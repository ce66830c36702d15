"""ONNX rungs measured and judged like the GGUF rungs: the onnxruntime host bench, the eval suite against
the bf16 reference GGUF's outputs and logits, and `edgequant run` storing onnxruntime rows beside GGUF ones."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import db_rows, run_cli, cli_env
from test_quality import CASES, write_suite

from edgequant.core.errors import BenchError
from edgequant.bench.onnx_host import measure_onnx
from edgequant.profiles import BenchSettings

SMALL = BenchSettings(n_prompt=24, n_gen=6, repetitions=3, warmup=1, threads=1, timeout=300.0)


@pytest.mark.slow
def test_host_bench_of_an_int4_rung(tiny_onnx):
    arts, _, _ = tiny_onnx
    phases: list[str] = []
    res = measure_onnx(arts["int4"].path, SMALL, on_progress=phases.append)
    for s in (res.pp, res.tg, res.ttft_ms):
        assert s.n == SMALL.repetitions and all(v > 0 for v in s.samples)
    # TTFT is the prefill time: pp t/s = n_prompt / TTFT, repetition by repetition
    for tps, ms in zip(res.pp.samples, res.ttft_ms.samples):
        assert tps == pytest.approx(SMALL.n_prompt / (ms / 1000.0), rel=1e-9)
    assert res.raw["execution_provider"] == "CPUExecutionProvider"
    assert (res.threads, res.raw["intra_op_threads"], res.raw["inter_op_threads"]) == (1, 1, 1)
    assert res.load_s > 0 and res.peak_rss_bytes >= res.peak_rss_anon_bytes > 0
    assert res.peak_rss_bytes > res.baseline_rss_bytes
    assert res.model_size_bytes == arts["int4"].size_bytes
    assert phases[0] == "load" and phases[-1] == "done"
    assert "pp 3/3" in phases and "tg 3/3" in phases and "warmup pp 1/1" in phases


@pytest.mark.slow
def test_a_corrupt_model_fails_as_a_rung_not_as_a_crash(tiny_onnx, tmp_path):
    arts, _, _ = tiny_onnx
    folder = tmp_path / "broken"
    shutil.copytree(arts["int8"].path.parent, folder)
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:5000])
    with pytest.raises(BenchError) as err:
        measure_onnx(model, SMALL)
    assert err.value.status == "failed" and "corrupt or truncated" in str(err.value)


@pytest.fixture(scope="module")
def onnx_quality(tiny_onnx, tiny_bf16_gguf, tmp_path_factory):
    from edgequant.bench.onnx_eval import evaluate_onnx_rung
    from edgequant.bench.quality import reference_outputs
    from edgequant.profiles.suites import load_suite

    arts, _, _ = tiny_onnx
    tmp = tmp_path_factory.mktemp("onnx_quality")
    suite = load_suite(str(write_suite(tmp)))
    ref = reference_outputs(tiny_bf16_gguf, "f" * 64, "BF16", suite, tmp / "cache", 1, None, "auto", 300,
                            lambda p: None)
    out = {v: evaluate_onnx_rung(arts[v].path, arts[v].quant, suite, ref, 1, 300, lambda p: None)
           for v in ("fp32", "int4")}
    return out, ref, suite


@pytest.mark.slow
def test_onnx_rungs_get_the_gguf_quality_metrics(onnx_quality):
    out, ref, suite = onnx_quality
    for q in out.values():
        m = {x.metric: x for x in q.metrics}
        for name in ("xml_parse_rate", "array_parse_rate", "prose_parse_rate", "esi_parse_rate",
                     "refusal_compliance", "esi_exact", "esi_adjacent", "referral_accuracy",
                     "mean_kld", "p99_kld", "top1_agreement", "eval_tg_tps"):
            assert name in m, name
        # degradation against the reference, paired by case (McNemar)
        assert {"p_value", "discordant", "delta_pp"} <= set(m["xml_parse_rate"].detail)
        assert len(q.cases) == len(CASES) and q.prompting == ref.prompting
        # KLD at every position of the reference's own output, case by case
        for c in q.cases:
            assert len(c.kld) == len(c.top1) == len(ref.tokens[c.case.id])
            assert all(k >= 0 for k in c.kld)


@pytest.mark.slow
def test_fp32_export_agrees_with_the_bf16_reference_and_int4_less(onnx_quality):
    out, ref, _ = onnx_quality
    fp32 = {m.metric: m.value for m in out["fp32"].metrics}
    int4 = {m.metric: m.value for m in out["int4"].metrics}
    assert fp32["top1_agreement"] >= 0.95 and fp32["mean_kld"] < 0.01
    assert int4["mean_kld"] > fp32["mean_kld"]
    same = [c.output == ref.cases[c.case.id].output for c in out["fp32"].cases]
    assert sum(same) >= 0.8 * len(same)
    # same prompts, same tokenizer: the first generated token follows the same prompt tokens
    assert all(c.tokens[:1] == ref.tokens[c.case.id][:1] for c in out["fp32"].cases
               if c.top1 and c.top1[0])


def test_the_checkpoint_backend_is_the_checkpoint_through_its_cache(tiny_checkpoint):
    """CheckpointModel (the faithfulness reference) gives transformers' own full forward pass, through the
    chunked prefill and one-token steps the eval uses, and starting twice from one prefix cache is the same."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgequant.bench.checkpoint_model import CheckpointModel

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    toks = [2] + np.random.default_rng(1).integers(10, 1000, 179).tolist()   # past the 128-token window
    with torch.no_grad():
        want = hf(torch.tensor([toks])).logits[0].numpy()
    m = CheckpointModel(str(tiny_checkpoint), 1)
    _last, prefix = m.prefill(toks[:40], m.empty_cache(), 0)
    for _ in range(2):   # the shared prefix cache is not consumed by a case
        rows = [lg for lg, _c in m.chunks(toks[40:150], prefix, 40, size=32)]
        logits, cache = m.prefill(toks[40:150], prefix, 40)
        for pos, tok in enumerate(toks[150:], start=150):
            step, cache = m.step([tok], cache, pos)
            rows.append(step)
        got = np.concatenate(rows)
        assert got.shape == want[40:].shape
        assert np.abs(got - want[40:]).max() < 1e-4 * max(1.0, np.abs(want).max())
        assert np.allclose(logits[0], got[109], atol=1e-4)


@pytest.mark.slow
def test_fp32_export_decodes_what_the_checkpoint_decodes(onnx_quality, tiny_checkpoint):
    """The export's faithfulness target, on the tiny model: the fp32 ONNX rung's greedy outputs are the
    checkpoint's own (transformers, float32), case for case."""
    from edgequant.bench.onnx_eval import checkpoint_outputs

    out, ref, suite = onnx_quality
    ckpt = checkpoint_outputs(tiny_checkpoint, suite, ref, 1, 300, lambda p: None)
    want = {c.case.id: c for c in ckpt.cases}
    assert len(want) == len(CASES)
    assert all(want[c.case.id].tokens for c in out["fp32"].cases)
    assert [c.tokens for c in out["fp32"].cases] == [want[c.case.id].tokens for c in out["fp32"].cases]
    assert [c.output for c in out["fp32"].cases] == [want[c.case.id].output for c in out["fp32"].cases]
    # the int4 rung is not the checkpoint: the comparison can tell them apart
    assert [c.tokens for c in out["int4"].cases] != [want[c.case.id].tokens for c in out["int4"].cases]


@pytest.mark.slow
def test_a_checkpoint_without_safetensors_is_refused_not_unpickled(onnx_quality, tiny_checkpoint, tmp_path):
    from edgequant.bench.onnx_eval import checkpoint_outputs
    from edgequant.bench.quality import EvalError

    _out, ref, suite = onnx_quality
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, folder)
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(EvalError) as err:
        checkpoint_outputs(folder, suite, ref, 1, 300, lambda p: None)
    assert "no .safetensors weights" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_run_stores_onnxruntime_rows_beside_gguf_rows(tiny_checkpoint, tiny_onnx, tmp_path):
    _, _, cache = tiny_onnx
    prof = tmp_path / "p.toml"
    prof.write_text('[profile]\nname = "mixed"\n[quantize]\ntypes = []\n[onnx]\nvariants = ["int4"]\n'
                    '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nthreads = 1\n')
    env = cli_env(tmp_path)
    res = run_cli("run", "--model", str(tiny_checkpoint), "--profile", str(prof), "--no-quality",
                  "--cache-dir", str(cache), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = db_rows(tmp_path / "results.db", "SELECT quant, runtime, metric, value, repetitions, params"
                                            " FROM measurements")
    by = {}
    for r in rows:
        by.setdefault((r["quant"], r["runtime"]), {})[r["metric"]] = r
    assert set(by) == {("BF16", "llama.cpp"), ("ONNX-INT4", "onnxruntime")}
    onnx_rows, gguf_rows = by[("ONNX-INT4", "onnxruntime")], by[("BF16", "llama.cpp")]
    assert set(gguf_rows) <= set(onnx_rows)                      # every GGUF figure exists for ONNX too
    assert onnx_rows["pp_tps"]["repetitions"] == 3
    assert json.loads(onnx_rows["pp_tps"]["params"])["execution_provider"] == "CPUExecutionProvider"
    art = db_rows(tmp_path / "results.db", "SELECT format, quant FROM artifacts WHERE quant = 'ONNX-INT4'")
    assert art == [{"format": "onnx", "quant": "ONNX-INT4"}]
    assert "ONNX-INT4" in res.stdout and "onnxruntime" in res.stdout
    # the export and the variant it reused are stage rows of the run, with the figures of their build
    stages = {(r["stage"], r["quant"]): r for r in db_rows(tmp_path / "results.db", "SELECT * FROM stage_resources")}
    for key in (("onnx-export", "ONNX"), ("onnx-quantize", "ONNX-INT4")):
        assert stages[key]["reused"] == 1 and stages[key]["seconds"] > 0 and stages[key]["peak_rss_bytes"] > 0


def test_the_checkpoint_decodes_the_suite_through_the_onnx_eval_worker(tiny_checkpoint, tiny_bf16_gguf, tmp_path):
    """Fast (no ONNX export): the onnx_eval worker with the checkpoint backend decodes every case with the
    reference's prompts and is scored like a rung, without token-level figures (no logits against the GGUF)."""
    from edgequant.bench.onnx_eval import checkpoint_outputs
    from edgequant.bench.quality import reference_outputs
    from edgequant.profiles.suites import load_suite

    suite = load_suite(str(write_suite(tmp_path)))
    ref = reference_outputs(tiny_bf16_gguf, "e" * 64, "BF16", suite, tmp_path / "cache", 1, None, "auto", 300,
                            lambda p: None)
    phases: list[str] = []
    got = checkpoint_outputs(tiny_checkpoint, suite, ref, 1, 300, phases.append)
    assert got.quant == "checkpoint" and got.prompting == ref.prompting
    assert [c.case.id for c in got.cases] == [c["id"] for c in CASES]
    for case in got.cases:
        assert case.stopped in ("eog", "stop", "max_tokens")
        assert case.kld == [] and case.top1 == []
    names = {m.metric for m in got.metrics}
    assert {"xml_parse_rate", "esi_parse_rate"} <= names and "mean_kld" not in names
    assert phases, "the worker reported no progress"
