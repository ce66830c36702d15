"""Speculative verification in the eval (bench.eval_spec): every rung's outputs taken from the teacher pass equal
plain greedy generation, computed here independently with llama-cpp-python's own ``Llama`` API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, run_cli
from tiny_model import SPECIAL_IDS, make_tiny_gemma3

SUITE = '''
[suite]
name = "spec"
cases = "spec.jsonl"

[refusal]
text = "Not in scope."

[formats.xml]
max_tokens = 24
stop = ["e"]
system = "Answer with one <triage> packet."
few_shot = "Case: {prompt}\\nPacket:"

[formats.prose]
max_tokens = 3
stop = ["\\nCase:"]
system = "Answer in four sections."
few_shot = "Case: {prompt}\\nAnswer:"

[formats.esi]
max_tokens = 20
stop = ["\\nCase:"]
system = "State the ESI level."
few_shot = "Case: {prompt}\\nAnswer:"
'''

CASES = [
    {"id": "x1", "format": "xml", "prompt": "child with fever and convulsions", "gold": {"referral": True}},
    {"id": "x2", "format": "xml", "prompt": "adult with mild cough", "gold": {"referral": False}},
    {"id": "p1", "format": "prose", "prompt": "infant not feeding with fever"},
    {"id": "p2", "format": "prose", "prompt": "old man who fell at home"},
    {"id": "e1", "format": "esi", "prompt": "man with crushing chest pain, BP 80/50", "gold": {"esi": 1}},
    {"id": "e2", "format": "esi", "prompt": "sore throat for two days, vitals normal", "gold": {"esi": 5}},
    {"id": "e3", "format": "esi", "prompt": "woman in labour, contractions every two minutes", "gold": {"esi": 2}},
    {"id": "e4", "format": "esi", "prompt": "cut finger, bleeding stopped", "gold": {"esi": 5}},
]


def _lively(path: Path, eos_scale: float = 3.0, post_norm: float = 15.0) -> Path:
    """The tiny checkpoint made to generate varied text: its random layers' outputs scaled up (the post-attention
    and post-feed-forward norms' weights raised by ``post_norm``), else the (scaled) input embedding dominates
    the residual stream and every model just repeats the prompt's last token; and the <eos> row of the (tied)
    embedding scaled by ``eos_scale``, so that cases also end at the end-of-generation token."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    for name, t in tensors.items():
        if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            tensors[name] = (t.float() + post_norm).to(torch.bfloat16)
        elif name.endswith("embed_tokens.weight"):
            emb = t.clone()
            emb[SPECIAL_IDS["<eos>"]] = (emb[SPECIAL_IDS["<eos>"]].float() * eos_scale).to(torch.bfloat16)
            tensors[name] = emb
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path


def _ladder(ckpt: Path, tmp: Path, types: list[str]) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    profile = tmp / "p.toml"
    profile.write_text(f'[profile]\nname = "p"\n[quantize]\ntypes = {json.dumps(types)}\n')
    res = run_cli("quantize", "--model", str(ckpt), "--profile", str(profile), "--json", env=cli_env(tmp))
    assert res.returncode == 0, res.stderr[-3000:]
    return {a["quant"]: a["path"] for a in json.loads(res.stdout)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    ref = _ladder(_lively(make_tiny_gemma3(tmp / "seed0" / "tiny-gemma3", seed=0)), tmp / "a", ["Q4_0"])
    other = _ladder(_lively(make_tiny_gemma3(tmp / "seed1" / "tiny-gemma3", seed=1)), tmp / "b", ["Q8_0"])
    (tmp / "spec.jsonl").write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    (tmp / "spec.toml").write_text(SUITE)
    return {"tmp": tmp, "BF16": ref["BF16"], "Q4_0": ref["Q4_0"], "other": other["BF16"],
            "other_q8": other["Q8_0"], "suite": tmp / "spec.toml"}


def _plain_greedy(path: str, suite) -> dict[str, dict]:
    """Greedy generation with llama-cpp-python's ``Llama`` (its own context, sampler and detokenizer), with
    the eval's prompt (completion prompting: system, blank line, the few-shot block around the case; the
    prefix tokenized with BOS and decoded first, the case without) and its stop rules (end-of-generation
    token, stop string: output cut before it, max_tokens)."""
    import llama_cpp
    from llama_cpp import Llama

    # flash attention on, as llama.cpp's "auto" (the eval's setting) picks on the CPU: it changes the last bits
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0, flash_attn=True, swa_full=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = {}
    for case in suite.cases:
        spec = suite.formats[case.format]
        head, _, tail = spec.few_shot.partition("{prompt}")
        prefix = llm.tokenize((spec.system + "\n\n" + head).encode(), add_bos=True, special=True)
        tokens = prefix + llm.tokenize((case.prompt + tail).encode(), add_bos=False, special=True)
        text, toks, stopped = b"", [], "max_tokens"
        # the shared prefix decoded first, then the case's tokens in one batch after it (generate() keeps the
        # evaluated prefix), as the eval decodes a prompt: a near tie can fall either way with another split
        llm.reset()
        llm.eval(prefix)
        for tok in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            toks.append(tok)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                stopped = "eog"
                break
            text += llm.detokenize([tok])
            hit = next((s.encode() for s in spec.stop if s and s.encode() in text), None)
            if hit is not None:
                text = text[:text.index(hit)]
                stopped = "stop"
                break
            if len(toks) >= spec.max_tokens:
                break
        out[case.id] = {"tokens": toks, "text": text, "stopped": stopped}
    llm.close()
    return out


def _reference(models, suite):
    from edgequant.bench.quality import reference_outputs

    return reference_outputs(Path(models["BF16"]), "sha-" + Path(models["BF16"]).stem, "BF16", suite,
                             models["tmp"] / "cache", 2, None, "completion", 900, lambda p: None)


@pytest.mark.slow
def test_speculative_outputs_equal_plain_greedy_generation(models):
    """For the reference itself, a 4-bit rung and a different model (which departs from the draft at once),
    the outputs from the teacher pass equal llama-cpp-python's greedy generation on every case, with every
    stop rule met somewhere."""
    import base64

    from edgequant.bench.quality import teacher_pass
    from edgequant.profiles.suites import load_suite

    suite = load_suite(str(models["suite"]))
    ref = _reference(models, suite)
    paths = [Path(models["BF16"]), Path(models["Q4_0"]), Path(models["other"])]
    scores, made = teacher_pass(ref, paths, suite, 2, None, 900, lambda p: None, generate=True)
    hows = {}
    for path in paths:
        expected = _plain_greedy(str(path), suite)
        got = {c["id"]: c for c in made[path]["cases"]}
        assert set(got) == {c["id"] for c in CASES}
        for cid, want in expected.items():
            assert got[cid]["tokens"] == want["tokens"], (path.name, cid, got[cid]["spec"])
            assert base64.b64decode(got[cid]["output_b64"]) == want["text"], (path.name, cid)
            assert got[cid]["stopped"] == want["stopped"], (path.name, cid)
        hows[path] = [got[c["id"]]["spec"] for c in CASES]
        # the KLD figures come from the same pass, one per reference output token
        assert all(len(scores[path][cid]["kld"]) == len(ref.tokens[cid]) for cid in ref.tokens)
    # the reference as a rung never departs from its own outputs (a near tie goes to plain decoding, which
    # decides it as the reference's own generation did); a case it agrees on costs no single-token decode
    assert not [h for h in hows[paths[0]] if h["how"] == "departs"], hows[paths[0]]
    assert all(h["single"] == 0 for h in hows[paths[0]] if h["how"] == "agrees")
    assert made[paths[0]]["speculative"]["agrees"] >= len(CASES) // 2, hows[paths[0]]
    # another model departs early (its first tokens are its own), and is still plain generation's output
    early = [h for h in hows[paths[2]] if h["how"] == "departs" and h["agreed"] <= 1]
    assert len(early) >= len(CASES) // 2, [(h, len(ref.tokens[c["id"]])) for h, c in zip(hows[paths[2]], CASES)]
    assert made[paths[2]]["speculative"]["single_tokens"] > 0
    stops = {c["stopped"] for p in paths for c in made[p]["cases"]}
    assert stops == {"eog", "stop", "max_tokens"}


def test_departure_finds_the_first_departure_or_near_tie():
    from edgequant.bench.eval_spec import departure, top2

    rows = np.array([[0.0, 3.0, 1.0], [2.0, 0.5, 2.01], [5.0, 1.0, 0.0]], dtype=np.float32)
    top, margin = top2(rows)
    assert top.tolist() == [1, 2, 0]
    assert margin == pytest.approx([2.0, 0.01, 4.0], abs=1e-6)
    assert departure([1, 2, 0], top.tolist(), margin.tolist(), 0.0) == (3, "agrees")
    assert departure([1, 0, 0], top.tolist(), margin.tolist(), 0.0) == (1, "departs")
    # a margin below the tie margin stops the fast path even where the argmax agrees
    assert departure([1, 2, 0], top.tolist(), margin.tolist(), 0.02) == (1, "near_tie")
    assert departure([2, 2, 0], top.tolist(), margin.tolist(), 0.02) == (0, "departs")


@pytest.mark.slow
def test_the_wide_route_equals_plain_greedy_generation(models):
    """Every case of a format side by side (the wide route: the 4 ESI cases in one batch) gives
    llama-cpp-python's one-case greedy generation on every case, for a 4-bit rung and another model."""
    import base64

    from edgequant.bench.quality import generate_rung, wide_slots
    from edgequant.profiles.suites import load_suite

    suite = load_suite(str(models["suite"]))
    assert wide_slots(suite) == 4
    ref = _reference(models, suite)
    for path in (models["Q4_0"], models["other"]):
        got = {c["id"]: c for c in generate_rung(Path(path), suite, ref, 2, None, 900, lambda p: None,
                                                  slots=wide_slots(suite))["cases"]}
        expected = _plain_greedy(str(path), suite)
        assert set(got) == set(expected) == {c["id"] for c in CASES}
        for cid, want in expected.items():
            assert got[cid]["tokens"] == want["tokens"], (path, cid)
            assert base64.b64decode(got[cid]["output_b64"]) == want["text"], (path, cid)
        esi = [len(expected[c["id"]]["tokens"]) for c in CASES if c["format"] == "esi"]
        assert sum(esi) > 4


@pytest.mark.slow
def test_eval_wide_stores_plain_greedy_outputs(models, tmp_path):
    """``eval --generation wide`` stores, for the reference and a rung, llama-cpp-python's one-case greedy
    outputs on every case."""
    from conftest import db_rows

    from edgequant.profiles.suites import load_suite

    suite = load_suite(str(models["suite"]))
    res = run_cli("eval", "--artifact", models["BF16"], "--artifact", models["Q4_0"], "--suite", str(models["suite"]),
                  "--prompting", "completion", "--generation", "wide", env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    stored = {}
    for c in db_rows(tmp_path / "results.db", "SELECT quant, case_id, output FROM eval_cases"):
        stored.setdefault(c["quant"], {})[c["case_id"]] = c["output"]
    for quant in ("BF16", "Q4_0"):
        want = {cid: w["text"].decode("utf-8", "replace") for cid, w in _plain_greedy(models[quant], suite).items()}
        assert stored[quant] == want, quant
    (row,) = db_rows(tmp_path / "results.db", "SELECT detail FROM measurements WHERE metric = 'eval_tg_tps' "
                                              "AND quant = 'Q4_0'")
    assert json.loads(row["detail"])["slots"] == 4      # the 4 ESI cases side by side


@pytest.mark.slow
def test_eval_check_mode_compares_with_plain_generation_and_logs_each_rung(models, tmp_path):
    """``eval --generation check`` generates every rung both ways, says per rung how many cases differ, stores
    plain generation's outputs with the comparison; with stderr not a terminal every rung and the reference
    pass get one plain line with a time."""
    import re

    from conftest import db_rows

    env = cli_env(tmp_path)
    res = run_cli("eval", "--artifact", models["BF16"], "--artifact", models["Q4_0"],
                  "--artifact", models["other_q8"], "--suite", str(models["suite"]), "--prompting", "completion",
                  "--generation", "check", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"BF16 reference outputs: ready in \d+\.\d s", res.stderr)
    n = len(CASES)
    lines = re.findall(r"(\S+): speculative outputs equal plain generation on (\d+)/(\d+) cases", res.stderr)
    assert len(lines) == 2 and all(int(a) == int(b) == n for _, a, b in lines), res.stderr[-3000:]
    for quant in ("Q4_0", "Q8_0"):
        assert re.search(rf"• eval spec {quant}: ok in \d+\.\d s", res.stderr), res.stderr[-3000:]
    rows = db_rows(tmp_path / "results.db", "SELECT quant, detail FROM measurements WHERE metric = 'eval_tg_tps'")
    checked = {r["quant"]: json.loads(r["detail"]) for r in rows}
    rungs = [q for q in checked if q != "BF16"]
    assert len(rungs) == 2
    for q in rungs:
        assert checked[q]["method"] == "plain"
        assert checked[q]["check"]["cases"] == n and checked[q]["check"]["differ"] == 0
        assert checked[q]["check"]["diffs"] == []
    # the other model's outputs are its own (not the reference's), as stored
    cases = db_rows(tmp_path / "results.db", "SELECT quant, case_id, output FROM eval_cases")
    by = {}
    for c in cases:
        by.setdefault(c["quant"], {})[c["case_id"]] = c["output"]
    assert by["Q8_0"] != by["BF16"]


def test_a_generating_teacher_counts_each_rungs_kv_cache(tiny_bf16_gguf, tmp_path):
    """With generation in the teacher pass, each rung's context holds up to 8 whole cases: its KV cache is
    counted beside the file size when rungs are grouped under the 60 % rule."""
    from edgequant.bench.quality import EVAL_SLOTS, context_kv_bytes, teacher_groups
    from edgequant.profiles.suites import load_suite
    from tiny_model import TINY_DIMS

    (tmp_path / "spec.jsonl").write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    (tmp_path / "spec.toml").write_text(SUITE)
    suite = load_suite(str(tmp_path / "spec.toml"))
    kv = context_kv_bytes(tiny_bf16_gguf, suite, EVAL_SLOTS)
    # f16 K and V of every layer: layers x kv heads x (key + value length) x 2 bytes per cell
    head_dim = TINY_DIMS["head_dim"]
    per_cell = TINY_DIMS["num_hidden_layers"] * TINY_DIMS["num_key_value_heads"] * 2 * head_dim * 2
    assert per_cell == 1024 and kv % per_cell == 0
    assert kv >= per_cell * EVAL_SLOTS * (24 + max(len(c["prompt"]) for c in CASES))
    # two rungs whose files fit beside the reference, but not with their caches: two groups
    size = 1000
    assert teacher_groups(size, [("a", size), ("b", size)], available=int((3 * size + kv) / 0.6)) == [["a", "b"]]
    assert teacher_groups(size, [("a", size + kv), ("b", size + kv)],
                          available=int((3 * size + kv) / 0.6)) == [["a"], ["b"]]


def test_the_teacher_counts_each_models_context_beside_its_file(tiny_bf16_gguf, tmp_path):
    """The 60 % rule groups rungs by what each model costs the teacher process: its file, its KV cache and two
    blocks of 64 full-vocabulary logit rows in f32; on the 4B-shaped model the contexts were 2.6 GiB of a
    15.99 GiB peak that file sizes alone put at 13.4."""
    from edgequant.bench.quality import EVAL_SLOTS, context_kv_bytes, teacher_context_bytes, teacher_groups_for
    from edgequant.profiles.suites import load_suite
    from tiny_model import TINY_DIMS

    (tmp_path / "spec.jsonl").write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    (tmp_path / "spec.toml").write_text(SUITE)
    suite = load_suite(str(tmp_path / "spec.toml"))
    logits = 2 * 64 * TINY_DIMS["vocab_size"] * 4          # 512 KiB: two blocks of 64 rows of 1,024 f32 logits
    one, eight = context_kv_bytes(tiny_bf16_gguf, suite, 1), context_kv_bytes(tiny_bf16_gguf, suite, EVAL_SLOTS)
    assert 0 < one < eight
    assert teacher_context_bytes(tiny_bf16_gguf, suite) == one + logits
    assert teacher_context_bytes(tiny_bf16_gguf, suite, generating=True) == eight + logits
    # grouped with their contexts: two rungs whose files fit beside the reference in 60 %, but not with them
    size = 1000
    files_only = int(3 * size / 0.6) + 1
    with_contexts = int((3 * size + 3 * (one + logits)) / 0.6) + 1
    rungs = [("a", tiny_bf16_gguf, size), ("b", tiny_bf16_gguf, size)]
    assert teacher_groups_for((tiny_bf16_gguf, size), rungs, suite, available=files_only) == [["a"], ["b"]]
    assert teacher_groups_for((tiny_bf16_gguf, size), rungs, suite, available=with_contexts) == [["a", "b"]]
