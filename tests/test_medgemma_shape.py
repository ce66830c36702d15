"""MedGemma 1.5 4B's shape, end to end: the smaller variant (every width of the real model, two text
layers) written by benchmarks/make_medgemma_shaped.py, checked by transformers (a loader we did not
write), then quantized, benchmarked and evaluated (a subset of the suite) through the real CLI.

Also the checkpoint checks a sharded download needs (an index naming a missing shard) and the suite
subset that ``eval --limit`` takes."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli
from edgequant.core.errors import BadInput
from edgequant.profiles.suites import load_suite
from edgequant.quantize.checkpoint import open_checkpoint

sys.path.insert(0, str(REPO / "benchmarks"))
import make_medgemma_shaped as mg  # noqa: E402

# MedGemma 1.5 4B's text model, written out by hand from its published configuration (not read back
# from the script under test): per layer q, k, v, o projections, gate/up/down, and four norms plus
# the two per-head q/k norms of Gemma 3; the embedding; the final norm.
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2560, 10240, 8, 4, 256, 262208
PER_LAYER = (HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2 + HIDDEN * FFN * 3
             + HIDDEN * 4 + HEAD_DIM * 2)
EMBEDDING = VOCAB * HIDDEN


def test_the_real_shape_has_medgemmas_parameter_count():
    """The 34-layer plan (no weights written) counts MedGemma 1.5 4B's published 3.88 B text and
    0.42 B vision parameters (4.3 B in all)."""
    config = mg.build_config(layers=34, vision_layers=27)
    plan = mg.tensor_plan(config)
    count = {"text": 0, "other": 0}
    for name, shape in plan:
        n = 1
        for d in shape:
            n *= d
        count["text" if name.startswith("language_model.") else "other"] += n
    assert count["text"] == 34 * PER_LAYER + EMBEDDING + HIDDEN
    assert 3.8e9 < count["text"] < 3.95e9
    assert 0.40e9 < count["other"] < 0.45e9
    assert all(not n.startswith("model.") and n != "lm_head.weight" for n, _ in plan)  # the hub's layout


@pytest.fixture(scope="module")
def medgemma_small(tmp_path_factory) -> Path:
    from edgequant.core.paths import cache_dir

    tok = mg.default_tokenizer_dir(cache_dir())
    return mg.write_medgemma_shaped(tmp_path_factory.mktemp("mg") / "medgemma-2l", tok, layers=2,
                                    vision_layers=2, shard_bytes=700 * 2**20)


@pytest.mark.slow
def test_small_variant_loads_in_transformers_and_is_sharded(medgemma_small):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    index = json.loads((medgemma_small / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2  # 700 MiB shards of a 1.7 GiB checkpoint
    model, info = Gemma3ForConditionalGeneration.from_pretrained(str(medgemma_small), dtype=torch.bfloat16,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.vocab_size, text.sliding_window) == (HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM,
                                                                     VOCAB, 1024)
    ckpt = open_checkpoint(medgemma_small)
    assert ckpt.architecture == "Gemma3ForConditionalGeneration"
    assert ckpt.n_params_estimate == 2 * PER_LAYER + EMBEDDING + HIDDEN
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal" in n)
    assert ckpt.n_params_outside_ladder == vision > 0


@pytest.mark.slow
def test_small_variant_whole_job_quantize_run_and_eval(medgemma_small, tmp_path):
    env = cli_env(tmp_path)
    q = run_cli("quantize", "--model", str(medgemma_small), "--profile", "quick", "--json", env=env,
                timeout=1800)
    assert q.returncode == 0, q.stderr[-2000:]
    assert "vision tower and projector" in q.stderr and "not part of any rung" in q.stderr
    arts = json.loads(q.stdout)
    quants = [a["quant"] for a in arts]
    assert quants == ["BF16", "Q8_0", "Q4_K_M", "Q4_0"]
    # the GGUF holds the language model only: two blocks, no vision tensors
    from gguf import GGUFReader

    reader = GGUFReader(next(a["path"] for a in arts if a["quant"] == "BF16"))
    names = [t.name for t in reader.tensors]
    assert not any(n.startswith(("v.", "mm.")) for n in names)
    assert sorted({n.split(".")[1] for n in names if n.startswith("blk.")}) == ["0", "1"]

    r = run_cli("run", "--model", str(medgemma_small), "--profile", "quick", "--no-quality",
                "-p", "16", "-n", "4", "-r", "3", "--warmup", "0", env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    # not a terminal: every finished rung printed one plain line with its time
    for quant in quants:
        assert any(line.startswith("• ") and f" {quant}: ok in " in line for line in r.stderr.splitlines()), \
            r.stderr[-3000:]

    # the eval on the reference and the smallest rung (a random model decodes every case to its token
    # limit, so two rungs keep the test's time down): one case per format
    path = {a["quant"]: a["path"] for a in arts}
    e = run_cli("eval", "--artifact", path["BF16"], "--artifact", path["Q4_0"], "--limit", "1", env=env,
                timeout=3600)
    assert e.returncode == 0, e.stderr[-2000:]
    quants = ["BF16", "Q4_0"]
    db = sqlite3.connect(tmp_path / "results.db")
    db.row_factory = sqlite3.Row
    run_id = db.execute("SELECT run_id FROM runs WHERE command LIKE '% eval %' ORDER BY started_at DESC").fetchone()[0]
    cases = db.execute("SELECT quant, COUNT(*) AS n FROM eval_cases WHERE run_id = ? GROUP BY quant",
                       (run_id,)).fetchall()
    formats = {c.format for c in load_suite("triage").cases}
    assert {row["quant"]: row["n"] for row in cases} == {q_: len(formats) for q_ in quants}


def test_an_index_naming_a_missing_shard_is_refused_in_one_line(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    (root / "tokenizer.json").write_text("{}")
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.zeros(2)}, str(root / "model-00001-of-00003.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors"}}))
    with pytest.raises(BadInput) as err:
        open_checkpoint(root)
    msg = str(err.value)
    assert "model-00002-of-00003.safetensors and 1 more" in msg and "1 of 3 shards present" in msg
    assert "\n" not in msg
    # and through the CLI: one line, exit 2, no traceback
    proc = run_cli("quantize", "--model", str(root), env=cli_env(tmp_path))
    assert proc.returncode == 2
    assert "model-00002-of-00003.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_suite_limit_takes_the_first_cases_of_each_format_and_changes_its_identity():
    suite = load_suite("triage")
    small = suite.limited(2)
    expected = []
    per: dict[str, int] = {}
    for case in suite.cases:  # the rule, applied independently of the method
        if per.get(case.format, 0) < 2:
            per[case.format] = per.get(case.format, 0) + 1
            expected.append(case.id)
    assert [c.id for c in small.cases] == expected
    assert small.sha256 != suite.sha256
    assert suite.limited(10_000) is suite
    with pytest.raises(BadInput):
        suite.limited(0)
