#!/usr/bin/env python
"""Write a random-weight bf16 checkpoint shaped like MedGemma 1.5 4B (run by hand; the tests import it).

MedGemma 1.5 4B is a ``Gemma3ForConditionalGeneration``: a 34-layer Gemma 3 text
model (hidden 2560, FFN 10240, 8 query / 4 KV heads of 256, vocabulary 262,208,
sliding window 1024 with every 6th layer global) plus a SigLIP vision tower
(27 layers, hidden 1152, 896 px images in 14 px patches) and a projector into the
text model.  This script writes that configuration with random weights, so that
edgequant's whole job can be run at the real model's size without downloading it:

- the tensors carry the names and shapes of the hub checkpoint's safetensors
  (``language_model.model.*``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.*``; the output matrix is tied to the embedding and not
  stored), taken from transformers' own model class built on the meta device;
- weights are written shard by shard (``--shard-gb``, default 2): only one shard is
  ever in memory, never the whole model;
- the tokenizer is the Gemma tokenizer of edgequant's embedded default model
  (materialized in the cache on first use), with the image processor and
  processor files of a Gemma 3 checkpoint beside it;
- shards are written under temporary names and the folder is renamed when
  complete.

``--layers N`` keeps every width and writes fewer text layers (the test suite's
smaller variant); ``--vision-layers`` does the same for the vision tower.

    .venv/bin/python benchmarks/make_medgemma_shaped.py DEST [--layers 34] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# MedGemma 1.5 4B's configuration (the hub checkpoint's config.json, in the
# field names transformers' Gemma3Config takes).
TEXT_CONFIG = {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 262208,
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "hidden_activation": "gelu_pytorch_tanh",
}
VISION_CONFIG = {
    "hidden_size": 1152,
    "image_size": 896,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": False,
    "layer_norm_eps": 1e-6,
}
TOP_CONFIG = {
    "mm_tokens_per_image": 256,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "image_token_index": 262144,
    "eos_token_id": [1, 106],
}
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}
PROCESSOR_CONFIG = {"image_seq_length": 256, "processor_class": "Gemma3Processor"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def hub_name(name: str) -> str | None:
    """The hub checkpoint's name for a parameter of transformers' in-memory model (None: not stored)."""
    if name == "lm_head.weight":
        return None  # tied to the embedding, like the hub checkpoint
    for ours, hub in (("model.language_model.", "language_model.model."),
                      ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                      ("model.vision_tower.", "vision_tower.vision_model."),
                      ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(ours):
            return hub + name[len(ours):]
    return name


def build_config(layers: int, vision_layers: int):
    from transformers import Gemma3Config

    text = dict(TEXT_CONFIG, num_hidden_layers=layers)
    vision = dict(VISION_CONFIG, num_hidden_layers=vision_layers)
    config = Gemma3Config(text_config=text, vision_config=vision, **TOP_CONFIG)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.dtype = "bfloat16"
    return config


def tensor_plan(config) -> list[tuple[str, tuple[int, ...]]]:
    """(hub name, shape) of every stored tensor, from the model class built on the meta device."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    plan = []
    for name, tensor in model.state_dict().items():
        hub = hub_name(name)
        if hub is not None:
            plan.append((hub, tuple(tensor.shape)))
    return plan


def _random(shape: tuple[int, ...], name: str, generator):
    import torch

    if name.endswith("norm.weight") and "language_model" in name:
        # Gemma's RMSNorm scales by (1 + w): small w keeps activations sane
        return torch.zeros(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
    if name.endswith(".bias") or "layer_norm" in name or "post_layernorm" in name:
        return torch.zeros(shape, dtype=torch.bfloat16) + (1.0 if name.endswith("weight") else 0.0)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = min(0.02, fan_in ** -0.5)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)


def write_medgemma_shaped(dest: Path, tokenizer_dir: Path, layers: int = 34, vision_layers: int = 27,
                          shard_bytes: int = 2 * 2**30, seed: int = 0,
                          progress=lambda msg: None) -> Path:
    """Write the checkpoint into ``dest`` (which must not exist) and return it."""
    import torch
    from safetensors.torch import save_file

    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; remove it or pick another folder")
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = build_config(layers, vision_layers)
    plan = tensor_plan(config)
    # shards of about shard_bytes each, in the model's own order
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        n = 2
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random(shape, name, generator) for name, shape in shard}
        nbytes = sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        total += nbytes
        for name, _ in shard:
            weight_map[name] = fname
        progress(f"shard {i}/{len(shards)}: {fname} ({nbytes / 2**30:.2f} GiB)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (tmp / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}, indent=2))
    (tmp / "EDGEQUANT_SOURCE.json").write_text(json.dumps(
        {"shape": "MedGemma 1.5 4B (Gemma3ForConditionalGeneration)", "text_layers": layers,
         "vision_layers": vision_layers, "seed": seed, "weights": "random (not a usable model)",
         "tokenizer": "edgequant's embedded default (Gemma 3)", "parameters": total // 2}, indent=2))
    tmp.rename(dest)
    return dest


def default_tokenizer_dir(cache_root: Path | None = None) -> Path:
    from edgequant.core.paths import cache_dir
    from edgequant.quantize.default_model import materialize_default

    return materialize_default(cache_root or cache_dir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path, help="folder to create")
    ap.add_argument("--layers", type=int, default=TEXT_CONFIG["num_hidden_layers"],
                    help="text layers (default 34, MedGemma's; fewer keeps every width)")
    ap.add_argument("--vision-layers", type=int, default=VISION_CONFIG["num_hidden_layers"],
                    help="vision tower layers (default 27)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GiB (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.layers < 1 or args.vision_layers < 1:
        print("make_medgemma_shaped: --layers and --vision-layers must be at least 1", file=sys.stderr)
        return 2
    if args.dest.exists():
        print(f"make_medgemma_shaped: {args.dest} exists; remove it or pick another folder", file=sys.stderr)
        return 2
    start = time.monotonic()
    tok = default_tokenizer_dir()
    import resource

    out = write_medgemma_shaped(args.dest, tok, args.layers, args.vision_layers,
                                int(args.shard_gb * 2**30), args.seed,
                                progress=lambda m: print(m, flush=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    info = json.loads((out / "EDGEQUANT_SOURCE.json").read_text())
    print(f"wrote {out}: {info['parameters'] / 1e9:.2f} B parameters in "
          f"{time.monotonic() - start:.0f} s, peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
