"""Adding metadata to a GGUF (the quantize.imatrix.* provenance of +imatrix rungs): everything else is kept
byte for byte, as the gguf package's own writer and reader see it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgequant.core.errors import RunFailed
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


# one key per GGUF scalar type, with a value whose bits read as another type would differ (negative integers,
# a float that is not an integer, a top-bit unsigned value), and the value each type must come back as
V = gguf.GGUFValueType
SCALARS = [
    ("t.u8", V.UINT8, 250, 250),
    ("t.i8", V.INT8, -7, -7),
    ("t.u16", V.UINT16, 65000, 65000),
    ("t.i16", V.INT16, -12345, -12345),
    ("t.u32", V.UINT32, 4_000_000_000, 4_000_000_000),
    ("t.i32", V.INT32, -2, -2),
    ("t.u64", V.UINT64, 2**63 + 5, 2**63 + 5),
    ("t.i64", V.INT64, -(2**40), -(2**40)),
    ("t.f32", V.FLOAT32, -1.5, -1.5),             # exactly representable in 32 bits
    ("t.f32b", V.FLOAT32, 1e-6, float(np.float32(1e-6))),
    ("t.f64", V.FLOAT64, 3.141592653589793, 3.141592653589793),
    ("t.true", V.BOOL, True, True),
    ("t.false", V.BOOL, False, False),
]


def test_metadata_scalars_are_decoded_by_their_gguf_type(tmp_path):
    from edgequant.quantize.gguf_info import read_gguf_layout

    path = tmp_path / "scalars.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.ints_before", [1, 2, 3])     # arrays in between: the walker must skip them by element size
    for key, vtype, value, _ in SCALARS:
        w.add_key_value(key, value, vtype)
        w.add_key_value(key + ".arr", [value, value], V.ARRAY, sub_type=vtype)
    w.add_string("t.after", "still in step")
    w.add_tensor("a.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    meta = read_gguf_layout(path).meta
    reader = gguf.GGUFReader(str(path))            # the gguf package's own reader agrees on each type
    for key, vtype, _, expected in SCALARS:
        assert reader.fields[key].types == [vtype], key
        got = meta[key]
        assert type(got) is type(expected), (key, got)
        assert got == expected, (key, got)
        assert reader.fields[key].contents() == expected, key
        assert meta[key + ".arr"] is None          # arrays are skipped, not decoded
    assert meta["t.after"] == "still in step"
    assert meta["general.architecture"] == "llama"
