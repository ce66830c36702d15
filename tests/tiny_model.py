"""A tiny random-weight Gemma 3 checkpoint, built on disk in about a second.

The checkpoint is laid out the way real Gemma 3 text checkpoints are:

* ``config.json`` for ``Gemma3ForCausalLM`` (``model_type`` ``gemma3_text``),
  ``dtype``/``torch_dtype`` bfloat16, plus ``generation_config.json``;
* ``model.safetensors`` holding bf16 weights (embeddings tied to the output);
* a real SentencePiece BPE tokenizer (byte fallback, split digits, no dummy
  prefix, identity normalization -- Gemma's kind) trained here on the text
  below: ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``
  with a Gemma-style ``chat_template``, and ``special_tokens_map.json``.

Sizes are chosen so that every 2-D weight has rows whose length is a multiple
of 256, which is what llama.cpp's K-quants and IQ4_XS need to really apply
(otherwise they fall back to other types):

========================  ====================================
hidden_size               256
intermediate_size         768
layers                    4 (all sliding-window, as both HF and
                          llama.cpp derive from the 5:1 pattern)
attention heads / kv      4 / 1, head_dim 64 (o_proj rows = 256)
sliding_window            128
max_position_embeddings   2048
vocab                     1024 (SentencePiece)
========================  ====================================

Special tokens: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, then the
user-defined symbols ``<mask>``, ``<start_of_turn>``, ``<end_of_turn>``,
``"\\n"`` and ``"\\t"`` (see :data:`SPECIAL_IDS`), then the 256 byte tokens.

The tokenizer does not depend on the seed; the weights do, and the same seed
gives byte-identical ``model.safetensors``.

Besides :func:`make_tiny_gemma3`, this module makes the deliberately bad
checkpoints used by bad-input tests: :func:`make_pickle_only_checkpoint`,
:func:`make_checkpoint_without_tokenizer` and
:func:`make_unsupported_arch_checkpoint`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

__all__ = [
    "TINY_DIMS",
    "SPECIAL_IDS",
    "CHAT_TEMPLATE",
    "TOKENIZER_FILES",
    "make_tiny_gemma3",
    "make_pickle_only_checkpoint",
    "make_checkpoint_without_tokenizer",
    "make_unsupported_arch_checkpoint",
]

TINY_DIMS = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "query_pre_attn_scalar": 64,  # = head_dim, which is what llama.cpp assumes
    "sliding_window": 128,
    "max_position_embeddings": 2048,
}

# Token ids fixed by the SentencePiece trainer settings below.
SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 5,
    "<end_of_turn>": 6,
    "\n": 7,
    "\t": 8,
}

# Pieces the trainer must keep whole; order gives ids 4.. (see SPECIAL_IDS).
_USER_DEFINED = ["<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\t"]
# Of those, the ones that are special (control) tokens, as in real Gemma.
_SPECIAL_USER_DEFINED = {"<mask>", "<start_of_turn>", "<end_of_turn>"}

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

# Gemma's turn format: <start_of_turn>{user|model}\n{text}<end_of_turn>\n, a
# system message folded into the first user turn, and "<start_of_turn>model\n"
# as the generation prompt.  Content may be a string or a list of typed parts.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + (text | trim) + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] in ['assistant', 'model'] else 'user' -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (ns.system if role == 'user' else '')"
    " + (text | trim) + '<end_of_turn>\\n' -}}"
    "{%- if role == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# Training text for the tokenizer: plain English and clinical-note prose.
_CORPUS = """
The patient is a 64-year-old woman who presented to the emergency department with two days of worsening shortness of breath.
She reports a productive cough with yellow sputum, subjective fevers, and chills. She denies chest pain, palpitations, or leg swelling.
Past medical history is notable for type 2 diabetes mellitus, hypertension, and chronic kidney disease stage 3.
Home medications include metformin 500 mg twice daily, lisinopril 10 mg daily, and atorvastatin 40 mg at bedtime.
On examination her temperature was 38.4 C, heart rate 104 beats per minute, blood pressure 132/78 mmHg, and oxygen saturation 91% on room air.
Crackles were heard at the right lung base. The abdomen was soft and non-tender. There was no peripheral edema.
Laboratory studies showed a white blood cell count of 14.2, hemoglobin 11.8, and creatinine 1.6, which is close to her baseline.
A chest radiograph demonstrated a right lower lobe consolidation consistent with community-acquired pneumonia.
She was started on ceftriaxone and azithromycin, given intravenous fluids, and placed on two liters of oxygen by nasal cannula.
Metformin was held because of her kidney function and the possible need for contrast imaging.
Assessment and plan: community-acquired pneumonia without sepsis. Continue antibiotics, monitor oxygen requirement, repeat labs in the morning.
Discharge instructions: take the full course of antibiotics, drink plenty of fluids, and return if breathing becomes harder or the fever does not improve.
Follow up with your primary care doctor within one week. Call the clinic if you have questions about your medicines.
The nurse reviewed inhaler technique with the patient and her daughter, who will help with medications at home.
Blood glucose readings ranged from 140 to 210 mg/dL during the admission and were managed with a sliding scale of insulin.
A 45-year-old man with a history of asthma came to the clinic for a routine visit. He uses his rescue inhaler about twice a week.
His lungs were clear, and his peak flow was 85% of predicted. We discussed triggers such as smoke, dust, pollen, and cold air.
The plan is to continue the daily inhaled steroid and to schedule spirometry in three months.
Headache, nausea, dizziness, and fatigue are common side effects. Stop the medicine and seek care if you notice a rash or swelling of the face.
Hand hygiene is the single most important way to prevent the spread of infection in the hospital.
Informed consent was obtained after the risks, benefits, and alternatives of the procedure were explained in plain language.
The child was brought in by his mother for ear pain and fever that started yesterday. The left tympanic membrane was red and bulging.
Amoxicillin was prescribed for ten days, with acetaminophen or ibuprofen for pain. The family was told to return if symptoms persist.
Electrocardiogram showed normal sinus rhythm at 78 beats per minute with no acute ST segment changes.
Troponin was negative on two occasions six hours apart, and the chest pain was judged most likely musculoskeletal.
Wound care: keep the incision clean and dry, change the dressing every day, and watch for redness, warmth, or drainage.
The physical therapist recommended walking three times a day with a walker and avoiding stairs for the first week.
Vital signs remained stable overnight. The patient slept well, tolerated a regular diet, and had no further episodes of vomiting.
Allergies: penicillin causes hives. No known food allergies. Social history: former smoker, quit ten years ago, drinks alcohol rarely.
Family history is significant for coronary artery disease in her father and breast cancer in her mother.
Review of systems is otherwise negative for weight loss, night sweats, abdominal pain, blood in the stool, or changes in urination.
Small language models can run on phones and laptops when their weights are stored with fewer bits.
Quantization trades a little accuracy for a large saving in memory and often a faster response.
Each layer of the network reads the hidden state, attends to earlier tokens, and passes the result through a feed-forward block.
The tokenizer splits text into pieces, maps each piece to a number, and adds a special token at the start of the sequence.
Please summarize the following note in two sentences for the patient, using simple words and no abbreviations.
What is the normal range for a fasting blood sugar? How often should I check my blood pressure at home?
The weather was cold and clear in the morning, and by the afternoon the rain had started again over the hills.
She opened the window, made a cup of tea, and read the letter twice before she put it back in the envelope.
Numbers and units appear often in notes: 5 mg, 10 mL, 0.9% saline, 120/80, 37.0 C, 72 kg, 1.65 m, and 2024-03-15.
"""

# Standard deviations of the random weights.  The embedding is a bit wider than
# the projections so the (tied) output logits are not nearly flat, which keeps
# top-token and divergence metrics between quantization levels meaningful.
_EMBED_STD = 0.06
_LINEAR_STD = 0.02
_NORM_STD = 0.1  # Gemma norms are stored as (scale - 1); the converter adds 1


# ---------------------------------------------------------------- tokenizer


def _train_sentencepiece() -> bytes:
    """Train the Gemma-style SentencePiece BPE model; returns its bytes."""
    import sentencepiece as spm

    lines = [line for line in _CORPUS.strip().splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=TINY_DIMS["vocab_size"],
        hard_vocab_limit=True,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=_USER_DEFINED,
        # single-threaded and unshuffled: the same model bytes every time
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


def _added_token(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _tokenizer_config() -> dict:
    decoder = {}
    for piece, idx in SPECIAL_IDS.items():
        special = piece.startswith("<") and (idx <= 3 or piece in _SPECIAL_USER_DEFINED)
        decoder[str(idx)] = _added_token(piece, special)
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<bos>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "mask_token": "<mask>",
        "model_max_length": TINY_DIMS["max_position_embeddings"],
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict:
    out = {}
    for key, piece in (
        ("bos_token", "<bos>"),
        ("eos_token", "<eos>"),
        ("mask_token", "<mask>"),
        ("pad_token", "<pad>"),
        ("unk_token", "<unk>"),
    ):
        tok = _added_token(piece, True)
        del tok["special"]
        out[key] = tok
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(dest: Path) -> None:
    """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json,
    then tokenizer.json as transformers converts it from the SentencePiece model."""
    (dest / "tokenizer.model").write_bytes(_train_sentencepiece())
    _write_json(dest / "tokenizer_config.json", _tokenizer_config())
    _write_json(dest / "special_tokens_map.json", _special_tokens_map())

    from transformers import GemmaTokenizer

    # With no tokenizer.json yet, this converts tokenizer.model (the same path
    # transformers takes for an original Gemma checkpoint).
    tok = GemmaTokenizer.from_pretrained(str(dest))
    spec = json.loads(tok.backend_tokenizer.to_str())
    # Turn markers are control tokens in Gemma; the converted file may not say so.
    for added in spec.get("added_tokens", []):
        if added["content"] in _SPECIAL_USER_DEFINED:
            added["special"] = True
    (dest / "tokenizer.json").write_text(
        json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


# ------------------------------------------------------------------- model


def _config():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        **TINY_DIMS,
        architectures=["Gemma3ForCausalLM"],
        pad_token_id=SPECIAL_IDS["<pad>"],
        eos_token_id=SPECIAL_IDS["<eos>"],
        bos_token_id=SPECIAL_IDS["<bos>"],
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    return cfg


def _build_model(seed: int):
    """A Gemma3ForCausalLM in bf16 whose weights come only from ``seed``."""
    import torch
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM(_config())
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        # named_parameters() lists the tied lm_head/embedding once, in a fixed order.
        for name, param in model.named_parameters():
            if param.ndim == 1:
                std = _NORM_STD
            elif "embed_tokens" in name:
                std = _EMBED_STD
            else:
                std = _LINEAR_STD
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            param.copy_(values)
    model = model.to(torch.bfloat16)
    model.eval()
    eot = SPECIAL_IDS["<end_of_turn>"]
    model.generation_config.eos_token_id = [SPECIAL_IDS["<eos>"], eot]
    model.generation_config.bos_token_id = SPECIAL_IDS["<bos>"]
    model.generation_config.pad_token_id = SPECIAL_IDS["<pad>"]
    return model


def _patch_config_dtype(dest: Path) -> None:
    """Name the dtype under both keys: transformers 5 writes ``dtype``, older
    readers look for ``torch_dtype``."""
    path = dest / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    _write_json(path, cfg)


def _fix_modes(dest: Path) -> None:
    """Make the weights 0644: the safetensors writer leaves them 0600."""
    for path in dest.glob("*.safetensors"):
        path.chmod(0o644)


def _prepare(dest: Path | str) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


# --------------------------------------------------------------- public API


def make_tiny_gemma3(dest: Path | str, seed: int = 0) -> Path:
    """Write the tiny bf16 Gemma 3 checkpoint into ``dest`` and return it."""
    dest = _prepare(dest)
    model = _build_model(seed)
    # transformers >= 5 always writes safetensors (safe_serialization is gone);
    # 4.x defaults to safe_serialization=True.
    model.save_pretrained(str(dest))
    _fix_modes(dest)
    _patch_config_dtype(dest)
    _write_tokenizer(dest)
    return dest


def make_pickle_only_checkpoint(dest: Path | str, seed: int = 0) -> Path:
    """Same config and tokenizer, but weights only as a pickled
    ``pytorch_model.bin`` (torch.save); no safetensors file."""
    import torch

    dest = _prepare(dest)
    model = _build_model(seed)
    model.config.save_pretrained(str(dest))
    model.generation_config.save_pretrained(str(dest))
    _patch_config_dtype(dest)
    # Like save_pretrained, leave out the output matrix tied to the embedding.
    state = {
        k: v.clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    torch.save(state, dest / "pytorch_model.bin")
    _write_tokenizer(dest)
    for stray in dest.glob("*.safetensors*"):
        stray.unlink()
    return dest


def make_checkpoint_without_tokenizer(dest: Path | str, seed: int = 0) -> Path:
    """Config and bf16 safetensors weights, but no tokenizer files at all."""
    dest = _prepare(dest)
    model = _build_model(seed)
    model.save_pretrained(str(dest))
    _fix_modes(dest)
    _patch_config_dtype(dest)
    for name in TOKENIZER_FILES + ("chat_template.jinja", "added_tokens.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


def make_unsupported_arch_checkpoint(
    dest: Path | str, architecture: str = "BertModel", model_type: str = "bert"
) -> Path:
    """A small but real BERT encoder (config.json + model.safetensors), whose
    ``architectures`` entry can be overridden to any other unsupported name."""
    import torch
    from safetensors.torch import save_file

    dest = _prepare(dest)
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": 128,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }
    _write_json(dest / "config.json", cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]

    def rnd(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {
        "embeddings.word_embeddings.weight": rnd(cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": rnd(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": rnd(2, h),
        "embeddings.LayerNorm.weight": torch.ones(h, dtype=torch.bfloat16),
        "embeddings.LayerNorm.bias": torch.zeros(h, dtype=torch.bfloat16),
    }
    pre = "encoder.layer.0."
    for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        tensors[pre + part + ".weight"] = rnd(h, h)
        tensors[pre + part + ".bias"] = torch.zeros(h, dtype=torch.bfloat16)
    tensors[pre + "attention.output.LayerNorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors[pre + "attention.output.LayerNorm.bias"] = torch.zeros(h, dtype=torch.bfloat16)
    tensors[pre + "intermediate.dense.weight"] = rnd(ff, h)
    tensors[pre + "intermediate.dense.bias"] = torch.zeros(ff, dtype=torch.bfloat16)
    tensors[pre + "output.dense.weight"] = rnd(h, ff)
    tensors[pre + "output.dense.bias"] = torch.zeros(h, dtype=torch.bfloat16)
    tensors[pre + "output.LayerNorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors[pre + "output.LayerNorm.bias"] = torch.zeros(h, dtype=torch.bfloat16)
    tensors["pooler.dense.weight"] = rnd(h, h)
    tensors["pooler.dense.bias"] = torch.zeros(h, dtype=torch.bfloat16)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    _fix_modes(dest)
    return dest
