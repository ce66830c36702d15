"""The Hugging Face checkpoint itself, run by transformers: the faithfulness reference of an ONNX export.

The ONNX rungs are judged against the bf16 GGUF like every rung, but that
reference is llama.cpp's arithmetic (bf16 weights, its own kernels).  Whether
the *export* is faithful is a separate question, asked of the checkpoint: the
fp32 ONNX rung should decode what transformers decodes from the same weights.
``CheckpointModel`` runs the checkpoint in float32 on the CPU (bf16 weights
widen to float32 exactly) behind the interface of ``onnx_host.KVModel`` (``KVStepper``), so the
ONNX eval worker (``bench.onnx_eval``) runs the suite through it with the same
prompts, token ids, stop rules and greedy loop as through the ONNX model.

Weights are read from safetensors only; a checkpoint without them is refused,
never unpickled.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from edgequant.bench.onnx_host import KVStepper


class CheckpointModel(KVStepper):
    """A causal LM checkpoint in transformers, float32, with a ``DynamicCache``.

    ``step`` extends the cache it is given (transformers' caches grow in place), so ``chunks`` and
    ``prefill``, which the eval starts from a shared prefix cache once per case, work on a copy."""

    def __init__(self, folder: str, threads: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        if not any(Path(folder).glob("*.safetensors")):
            raise ValueError(f"{folder} has no .safetensors weights (pickled checkpoints are not loaded)")
        torch.set_num_threads(max(1, int(threads)))
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        self.model.eval()
        text = self.model.config.get_text_config()
        self.n_vocab = int(getattr(text, "vocab_size", 0) or 0)
        self.provider = f"transformers {transformers.__version__} (torch {torch.__version__}, float32, CPU)"

    def empty_cache(self) -> Any:
        return None

    def chunks(self, tokens, cache: Any, past_len: int, size: int = 256):
        yield from super().chunks(tokens, copy.deepcopy(cache), past_len, size)

    def step(self, tokens, cache: Any, past_len: int):
        """Run ``tokens`` after ``past_len`` cached ones: (logits [n, vocab] as float32 numpy, the cache)."""
        from transformers import DynamicCache

        torch = self.torch
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        n = len(tokens)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(tokens)], dtype=torch.long),
                             attention_mask=torch.ones((1, past_len + n), dtype=torch.long),
                             position_ids=torch.arange(past_len, past_len + n, dtype=torch.long)[None, :],
                             cache=cache, use_cache=True)
        return out.logits[0].float().numpy(), cache   # a DynamicCache grows in place
