"""ONNX rungs of the tiny Gemma 3, made for real: optimum's export, onnxruntime's quantizers, the cache,
the files on disk, the export checked against the PyTorch model, and every bad input as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import assert_one_line_error, cli_env, run_cli
from onnx_fixtures import ONNX_TABLE, shared_cache

from edgequant.bench.onnx_host import KVModel
from edgequant.core.errors import BadInput
from edgequant.profiles import _Checker, parse_onnx
from edgequant.quantize.checkpoint import open_checkpoint
from edgequant.quantize.onnx_export import OnnxLadder, check_onnx_model, folder_sha256


def _ops(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


@pytest.mark.slow
def test_every_variant_is_built_with_its_quantized_ops(tiny_onnx):
    arts, ladder, _ = tiny_onnx
    assert [a.quant for a in arts.values()] == ["ONNX-FP32", "ONNX-FP16", "ONNX-INT8", "ONNX-INT4",
                                                "ONNX-INT4-EMB", "ONNX-FP32-EXT"]
    ops = {name: _ops(a.path) for name, a in arts.items()}
    assert "MatMulNBits" not in ops["fp32"] and "MatMulInteger" not in ops["fp32"]
    assert ops["int8"].get("MatMulInteger", 0) > 0
    assert ops["int4"].get("MatMulNBits", 0) > 0 and "GatherBlockQuantized" not in ops["int4"]
    assert ops["int4-emb"].get("GatherBlockQuantized") == 1            # the token embedding, quantized too
    nbits = [n for n in onnx.load(str(arts["int4-emb"].path), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {64}
    fp16_inits = {i.data_type for i in onnx.load(str(arts["fp16"].path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in fp16_inits
    # smaller kinds really are smaller, and the embedding makes the difference it should
    size = {k: a.size_bytes for k, a in arts.items()}
    assert size["fp32"] > size["fp16"] > size["int8"] > size["int4"] > size["int4-emb"]


@pytest.mark.slow
def test_artifact_records_match_the_files(tiny_onnx):
    arts, ladder, _ = tiny_onnx
    n_params = ladder.ckpt.n_params_estimate
    for a in arts.values():
        files = [p for p in a.path.parent.iterdir() if p.name.startswith("model.onnx")]
        assert a.size_bytes == sum(p.stat().st_size for p in files)
        assert a.bits_per_weight == pytest.approx(a.size_bytes * 8 / n_params)
        rec = a.record()
        assert rec["format"] == "onnx" and rec["sha256"] == a.sha256 and len(a.sha256) == 64
        assert a.cache_key[:16] in a.path.parent.name       # content-addressed folder
        manifest = json.loads(a.path.parent.with_name(a.path.parent.name + ".json").read_text())
        assert manifest["sha256"] == a.sha256
    # different options, different keys; the plain fp32 variant is the export itself
    assert len({a.cache_key for a in arts.values()}) == len(arts)
    assert arts["fp32"].path.parent == ladder.export_plan().folder
    assert not list(ladder.folder.glob(".*partial*"))       # nothing left half-written


@pytest.mark.slow
def test_external_data_variant_loads_and_matches_fp32(tiny_onnx):
    arts, _, _ = tiny_onnx
    ext = arts["fp32-ext"]
    assert ext.external_data and (ext.path.parent / "model.onnx_data").is_file()
    assert ext.path.stat().st_size < arts["fp32"].size_bytes / 4      # the weights are in the data file
    a, b = KVModel(str(arts["fp32"].path), 1), KVModel(str(ext.path), 1)
    toks = [2, 40, 41, 42, 43]
    la, _ = a.step(toks, a.empty_cache(), 0)
    lb, _ = b.step(toks, b.empty_cache(), 0)
    assert np.array_equal(la, lb)


@pytest.mark.slow
def test_second_build_reuses_every_artifact(tiny_onnx):
    arts, ladder, cache = tiny_onnx
    stamps = {p: p.stat().st_mtime_ns for p in ladder.folder.rglob("model.onnx*")}
    again = OnnxLadder(ladder.ckpt, ladder.model_hash, ladder.spec, cache).build()
    assert all(a.reused for a in again)
    assert [a.sha256 for a in again] == [a.sha256 for a in arts.values()]
    assert {p: p.stat().st_mtime_ns for p in ladder.folder.rglob("model.onnx*")} == stamps


@pytest.mark.slow
def test_fp32_export_matches_the_pytorch_model(tiny_onnx, tiny_checkpoint):
    """The export is faithful: the same logits as transformers' own forward pass of the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    arts, _, _ = tiny_onnx
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    # 200 tokens: past the tiny model's 128-token sliding window, where a mask traced wrongly would show
    toks = [2] + np.random.default_rng(0).integers(10, 1000, 199).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([toks])).logits[0].numpy()
    tol = 1e-3 * max(1.0, np.abs(want).max())
    m = KVModel(str(arts["fp32"].path), 1)
    got, _ = m.step(toks, m.empty_cache(), 0)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() < tol
    # and through the KV cache, one token at a time after a 100-token prompt
    logits, cache = m.step(toks[:100], m.empty_cache(), 0)
    rows = list(logits)
    for pos, tok in enumerate(toks[100:], start=100):
        logits, cache = m.step([tok], cache, pos)
        rows.append(logits[0])
    assert np.abs(np.stack(rows) - want).max() < tol


@pytest.mark.slow
def test_kv_cache_steps_give_the_logits_of_one_full_pass(tiny_onnx):
    arts, _, _ = tiny_onnx
    m = KVModel(str(arts["fp32"].path), 1)
    toks = [2, 11, 12, 13, 14, 15, 16, 17]
    full, _ = m.step(toks, m.empty_cache(), 0)
    logits, cache = m.step(toks[:3], m.empty_cache(), 0)
    rows = list(logits)
    for pos, tok in enumerate(toks[3:], start=3):
        logits, cache = m.step([tok], cache, pos)
        rows.append(logits[0])
    assert np.allclose(np.stack(rows), full, atol=1e-4)
    # the chunked prefill the eval uses (bounded logits) gives the same rows and last row
    chunked = np.concatenate([lg for lg, _c in m.chunks(toks, m.empty_cache(), 0, size=3)])
    assert np.allclose(chunked, full, atol=1e-4)
    last, _ = m.prefill(toks, m.empty_cache(), 0)
    assert np.allclose(last[0], full[-1], atol=1e-4)


# ---------------------------------------------------------------------------
# bad input


def _copy_model(art, dest: Path) -> Path:
    folder = dest / "m"
    shutil.copytree(art.path.parent, folder)
    return folder / "model.onnx"


@pytest.mark.slow
def test_truncated_onnx_is_one_line(tiny_onnx, tmp_path):
    arts, _, _ = tiny_onnx
    model = _copy_model(arts["int4"], tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 3])
    with pytest.raises(BadInput, match="corrupt or truncated") as err:
        check_onnx_model(model)
    assert str(model) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_truncated_or_missing_external_data_is_one_line(tiny_onnx, tmp_path):
    arts, _, _ = tiny_onnx
    model = _copy_model(arts["fp32-ext"], tmp_path)
    data = model.with_name("model.onnx_data")
    full = data.read_bytes()
    data.write_bytes(full[: len(full) - 1000])
    with pytest.raises(BadInput, match="model.onnx_data is truncated"):
        check_onnx_model(model)
    data.unlink()
    with pytest.raises(BadInput, match="model.onnx_data is missing"):
        check_onnx_model(model)
    assert folder_sha256(model.parent)  # the folder is still readable for hashing


def test_unknown_variant_and_bad_options_name_the_field():
    c = _Checker(Path("p.toml"))
    with pytest.raises(BadInput, match=r"onnx.variants\[1\].*unknown ONNX variant 'int3'.*fp32, fp16, int8, int4"):
        parse_onnx(c, {"variants": ["fp32", "int3"]})
    with pytest.raises(BadInput, match=r"onnx.int4.block_size.*32, 64, 128.*48"):
        parse_onnx(c, {"variants": ["int4"], "int4": {"block_size": 48}})
    with pytest.raises(BadInput, match=r"onnx.int8.group_size.*not a known field"):
        parse_onnx(c, {"variants": ["int8"], "int8": {"group_size": 4}})
    with pytest.raises(BadInput, match=r"onnx.fp16.*which onnx.variants does not list"):
        parse_onnx(c, {"variants": ["fp32"], "fp16": {}})
    spec = parse_onnx(c, ONNX_TABLE)
    assert [v.kind for v in spec.variants] == ["fp32", "fp16", "int8", "int4", "int4", "fp32"]


def test_unknown_variant_through_the_cli_is_one_line(tmp_path, tiny_checkpoint):
    prof = tmp_path / "p.toml"
    prof.write_text('[profile]\nname = "p"\n[onnx]\nvariants = ["int4", "int2"]\n')
    res = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(prof), env=cli_env(tmp_path))
    assert res.returncode == 2
    assert_one_line_error(res.stderr, str(prof), "unknown ONNX variant 'int2'")


@pytest.mark.slow
def test_an_architecture_optimum_cannot_export_is_named(tiny_checkpoint, tmp_path):
    folder = tmp_path / "gemma3n"
    shutil.copytree(tiny_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gemma3n_text"
    (folder / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(folder)
    spec = parse_onnx(_Checker(Path("t.toml")), {"variants": ["int4"]})
    ladder = OnnxLadder(ckpt, "c" * 64, spec, shared_cache(tmp_path))
    with pytest.raises(BadInput) as err:
        ladder.build()
    msg = str(err.value)
    assert "Gemma3ForCausalLM" in msg and "gemma3n_text" in msg and "cannot be exported" in msg
    assert not list(ladder.folder.glob("onnx-*/model.onnx"))


def test_memory_and_disk_are_checked_before_starting(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint)
    spec = parse_onnx(_Checker(Path("t.toml")), {"variants": ["fp32", "int4"]})
    ladder = OnnxLadder(ckpt, "d" * 64, spec, tmp_path / "cache")
    memory, disk = ladder.needs()
    n = ckpt.n_params_estimate
    assert memory >= n * 4 * 2 and disk >= n * 4       # at least the fp32 model twice in memory, once on disk
    with pytest.raises(BadInput, match=r"needs about .* GiB of memory and only 0\.1 GiB"):
        ladder.check_resources(free_memory=100 * 2**20, free_disk=100 * 2**30)
    with pytest.raises(BadInput, match=r"ONNX rungs need about .* only 0\.00 GiB is free"):
        ladder.check_resources(free_memory=64 * 2**30, free_disk=1024)
    ladder.check_resources(free_memory=64 * 2**30, free_disk=100 * 2**30)
    assert not (tmp_path / "cache" / "artifacts").exists()   # nothing was started
