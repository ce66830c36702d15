"""Adding metadata to a GGUF (the quantize.imatrix.* provenance of +imatrix rungs): everything else is kept
byte for byte, as the gguf package's own writer and reader see it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgequant.errors import RunFailed
from edgequant.quantize.gguf_info import add_metadata, read_gguf_info


def _write(path, alignment: int | None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "meta-test")
    w.add_uint32("test.count", 7)
    w.add_array("test.words", ["alpha", "beta", "gamma"])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((64,)).astype(np.float16))
    w.add_tensor("c.weight", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fields(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = [bytes(f.parts[i]) for i in f.data]
    return out


@pytest.mark.parametrize("alignment", [None, 64])
def test_added_keys_are_read_back_and_nothing_else_changes(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    _write(path, alignment)
    before = gguf.GGUFReader(str(path))
    old_fields, old_tensors = _fields(before), {t.name: np.array(t.data) for t in before.tensors}
    info = read_gguf_info(path)
    add_metadata(path, {"quantize.imatrix.file": "imatrix.gguf (sha256 ab)", "quantize.imatrix.chunks_count": 12})
    after = gguf.GGUFReader(str(path))
    fields = _fields(after)
    assert bytes(fields.pop("quantize.imatrix.file")[0]).decode() == "imatrix.gguf (sha256 ab)"
    count = after.fields["quantize.imatrix.chunks_count"]
    assert count.types == [gguf.GGUFValueType.INT32] and int(count.parts[-1][0]) == 12
    fields.pop("quantize.imatrix.chunks_count")
    assert fields == old_fields
    assert after.alignment == (alignment or 32)
    assert {t.name: np.array(t.data) for t in after.tensors}.keys() == old_tensors.keys()
    for t in after.tensors:
        assert np.array_equal(np.array(t.data), old_tensors[t.name]), t.name
    assert read_gguf_info(path) == info
    assert not list(tmp_path.glob(".*tmp*"))   # no temporary file left


def test_a_key_already_present_or_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path, None)
    with pytest.raises(RunFailed, match="general.name"):
        add_metadata(path, {"general.name": "again"})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RunFailed, match="truncated"):
        add_metadata(path, {"x.y": 1})
