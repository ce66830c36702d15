"""The embedded default, end to end: the real Gemma 3 270M from PyPI through
`edgequant run` with no arguments (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import db_rows as rows, assert_one_line_error, cli_env, ctrl_c, run_cli, start_cli, wait_for

DEFAULT_LADDER = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default_run")
    env = cli_env(tmp)
    # the whole built-in suite over nine rungs takes tens of minutes at 2 cores; the speed ladder runs here
    # in full and the quality path is checked on the real model below with a subset of the suite
    result = run_cli("run", "--no-quality", env=env, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"tmp": tmp, "env": env, "result": result}



@pytest.mark.slow
def test_default_run_measures_the_whole_ladder(default_run):
    db = default_run["tmp"] / "results.db"
    (run,) = rows(db, "SELECT * FROM runs")
    assert run["status"] == "complete" and run["profile"] == "default"
    assert run["model_id"].startswith("gemma-3-270m")
    ms = rows(db, "SELECT quant, metric, value, stddev, repetitions FROM measurements")
    got = {(m["quant"], m["metric"]): m for m in ms}
    for quant in DEFAULT_LADDER:
        for metric in ("pp_tps", "tg_tps", "ttft", "load_time", "peak_rss", "peak_rss_anon", "size", "bpw"):
            assert (quant, metric) in got, (quant, metric)
        assert got[(quant, "tg_tps")]["repetitions"] == 3 and got[(quant, "tg_tps")]["value"] > 0
    params = json.loads(rows(db, "SELECT params FROM measurements LIMIT 1")[0]["params"])
    assert params["n_prompt"] == 512 and params["n_gen"] == 128
    # Gemma 3 270M has 268M parameters (the tied embedding is stored once)
    n_params = got[("BF16", "n_params")]["value"]
    assert 2.6e8 < n_params < 2.8e8
    # quantized files are smaller than the reference, in ladder order at the ends
    sizes = {q: got[(q, "size")]["value"] for q in DEFAULT_LADDER}
    assert sizes["BF16"] > sizes["Q8_0"] > sizes["Q4_K_M"] > sizes["Q2_K"]
    out = default_run["result"].stdout
    assert "BF16 (ref)" in out and "IQ4_XS" in out
    assert "dequantized from a Q4_K_M" in out  # the default's caveat is printed under its table


def _suite_subset(folder: Path) -> Path:
    """The built-in triage suite with its first 3 cases of each format and one refusal."""
    import shutil

    from edgequant.profiles.suites import load_suite

    suite = load_suite("triage")
    shutil.copy(suite.path, folder / suite.path.name)
    lines = suite.cases_path.read_text().splitlines()
    keep, per_format, refusal = [], {}, False
    for line in lines:
        case = json.loads(line)
        refuse = case.get("gold", {}).get("refuse", False)
        if refuse and not refusal:
            keep.append(line)
            refusal = True
        elif not refuse and per_format.get(case["format"], 0) < 3:
            keep.append(line)
            per_format[case["format"]] = per_format.get(case["format"], 0) + 1
    (folder / suite.cases_path.name).write_text("\n".join(keep) + "\n")
    return folder / suite.path.name


@pytest.mark.slow
def test_quality_on_the_real_model(default_run):
    tmp = default_run["tmp"]
    suite = _suite_subset(tmp)
    profile = tmp / "q8-q2.toml"
    profile.write_text('[profile]\nname = "q8-q2"\n[quantize]\ntypes = ["Q8_0", "Q2_K"]\n')
    res = run_cli("eval", "--profile", str(profile), "--suite", str(suite), "--format", "json",
                  env=default_run["env"], timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout)
    assert data["quality_params"]["prompting"] == "completion"  # the default is a base model: few-shot
    q = {r["quant"]: r for r in data["quality"]}
    assert set(q) == {"BF16", "Q8_0", "Q2_K"}
    for quant in ("Q8_0", "Q2_K"):
        assert q[quant]["mean_kld"] > 0 and 0 < q[quant]["top1_agreement"] <= 1
        assert "xml_parse_rate" in q[quant] and "gates_pass" in q[quant]
    # the field's ordering, which this model shows too: 8 bits diverge far less than 2 bits
    assert q["Q8_0"]["mean_kld"] < q["Q2_K"]["mean_kld"]
    db = tmp / "results.db"
    (run,) = rows(db, "SELECT run_id FROM runs WHERE command LIKE '%eval%'")
    n_cases = len((tmp / "triage_cases.jsonl").read_text().splitlines())
    cases = rows(db, "SELECT quant, COUNT(*) AS n FROM eval_cases WHERE run_id = ? GROUP BY quant", run["run_id"])
    assert {c["quant"]: c["n"] for c in cases} == {"BF16": n_cases, "Q8_0": n_cases, "Q2_K": n_cases}


@pytest.mark.slow
def test_materialized_checkpoint_is_bf16_safetensors_matching_the_gguf(default_run):
    import llama_cpp
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = list((default_run["tmp"] / "cache" / "models").iterdir())
    assert len(models) == 1
    ckpt = models[0]
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["Gemma3ForCausalLM"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}

    # greedy text from the bf16 checkpoint (transformers) and from the BF16 GGUF (llama.cpp) agree
    db = default_run["tmp"] / "results.db"
    (bf16,) = rows(db, "SELECT path FROM artifacts WHERE quant = 'BF16'")
    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    hf_ids = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=bf16["path"], n_ctx=128, verbose=False, seed=0)
    lc = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    assert tok.decode(hf_ids, skip_special_tokens=True).strip()[:12] == lc["choices"][0]["text"].strip()[:12]


@pytest.mark.slow
def test_rerun_reuses_every_artifact(default_run):
    res = run_cli("quantize", "--json", env=default_run["env"])
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert [a["quant"] for a in listed] == DEFAULT_LADDER and all(a["reused"] for a in listed)


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_llama_quantize(default_run):
    """IQ4_XS of the 270M takes seconds in llama_model_quantize: interrupt it there."""
    tmp = default_run["tmp"]
    profile = tmp / "iq4-pure.toml"
    profile.write_text('[profile]\nname = "iq4-pure"\n[quantize]\ntypes = ["IQ4_XS"]\n'
                       '[quantize.options]\npure = true\n')
    proc = start_cli("quantize", "--profile", str(profile), env=default_run["env"])
    arts = tmp / "cache" / "artifacts"
    before = {p.name for p in arts.rglob("*.gguf")}
    wait_for(lambda: any(p.name.startswith(".IQ4_XS") and ".partial" in p.name for p in arts.rglob("*")),
             300, "IQ4_XS quantization to start", proc)
    out, err = ctrl_c(proc)
    assert proc.returncode == 130
    assert_one_line_error(err, "interrupted while quantizing")
    assert {p.name for p in arts.rglob("*.gguf")} == before
    assert not [p for p in arts.rglob("*") if ".partial" in p.name]


def test_a_materialized_default_is_reused_without_rebuilding(tmp_path):
    """Fast: a complete checkpoint folder under the package's name is returned as is (nothing assembled)."""
    from edgequant.quantize.default_model import default_checkpoint_dir, materialize_default

    folder = default_checkpoint_dir(tmp_path)
    assert folder.parent == tmp_path / "models" and folder.name.startswith("gemma-3-270m-bf16-")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    steps: list[str] = []
    assert materialize_default(tmp_path, steps.append) == folder
    assert steps == [] and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
