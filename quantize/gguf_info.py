"""Read what an artifact is from the GGUF itself (with the ``gguf`` package)."""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgequant.core.errors import RunFailed
from edgequant.core.hashing import file_sha256  # noqa: F401  (artifact code imports it from here)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    file_type: int | None
    n_params: int
    tensor_bytes: int
    tensor_types: dict[str, int]

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.n_params if self.n_params else 0.0


class BadGGUF(RunFailed):
    """A file that is not a readable GGUF; the message names the file and the problem, callers add the advice
    that fits (a cached artifact is rebuilt, a user's file is refused)."""


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise BadGGUF(f"{self.path}: truncated GGUF header (cut short or damaged)") from None
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise BadGGUF(f"{self.path}: truncated GGUF header (cut short or damaged)")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


@dataclass(frozen=True)
class GGUFLayout:
    """Where a GGUF's parts are: its metadata (scalars and strings; arrays as None), the byte ranges of the
    key-value section and of the tensor table, and the tensors' types and element counts."""

    version: int
    n_kv: int
    meta: dict
    kv_end: int                         # the metadata ends (the tensor table starts) here
    table_end: int                      # the tensor table ends here; the data starts at the next alignment
    tensors: list                       # (quant type name, elements) per tensor
    array_lengths: dict = field(default_factory=dict)   # metadata key of an array -> its element count

    @property
    def alignment(self) -> int:
        value = self.meta.get("general.alignment")
        return int(value) if isinstance(value, int) and value > 0 else 32

    @property
    def data_offset(self) -> int:
        return -(-self.table_end // self.alignment) * self.alignment


def read_gguf_layout(path: Path) -> GGUFLayout:
    """Walk a GGUF header directly, with the ``gguf`` package's value-type and quant-type enums.

    ``gguf.GGUFReader`` builds Python objects for every metadata array element,
    which for a 262k-token vocabulary takes tens of seconds per file, while only
    the offsets, the scalar metadata and the tensor table are needed here.
    """

    import gguf

    # scalar value types -> struct formats (little-endian), decoded by type: INT32 signed, FLOAT32 a float, ...
    formats = {gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
               gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
               gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
               gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d"}
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise BadGGUF(f"{path}: not a GGUF file (bad magic)")
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise BadGGUF(f"{path}: empty or unreadable GGUF") from None
    try:
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise BadGGUF(f"{path}: GGUF version {version} is not supported (2 or 3; big-endian files are not)")
        n_tensors, n_kv = cur.take("<QQ")
        meta: dict[str, object] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", "replace")
            vtype = gguf.GGUFValueType(cur.take("<I"))
            if vtype == gguf.GGUFValueType.STRING:
                value: object = cur.string().decode("utf-8", "replace")
            elif vtype == gguf.GGUFValueType.ARRAY:
                etype = gguf.GGUFValueType(cur.take("<I"))
                count = cur.take("<Q")
                lengths[key] = count
                if etype == gguf.GGUFValueType.STRING:
                    unpack, pos = struct.Struct("<Q").unpack_from, cur.pos
                    for _ in range(count):
                        pos += 8 + unpack(buf, pos)[0]
                    if pos > len(buf):
                        raise BadGGUF(f"{path}: truncated GGUF header (cut short or damaged)")
                    cur.pos = pos
                    value = None
                elif etype == gguf.GGUFValueType.ARRAY:
                    raise BadGGUF(f"{path}: nested arrays in GGUF metadata are not supported")
                else:
                    cur.pos += struct.calcsize(formats[etype]) * count
                    value = None
            else:
                value = cur.take(formats[vtype])
            meta[key] = value
        kv_end = cur.pos
        tensors = []
        for _ in range(n_tensors):
            cur.string()
            n_dims = cur.take("<I")
            dims = [cur.take("<Q") for _ in range(n_dims)]
            qtype = gguf.GGMLQuantizationType(cur.take("<I"))
            cur.take("<Q")  # offset
            n = 1
            for d in dims:
                n *= d
            tensors.append((qtype.name, n))
        if cur.pos > len(buf):
            raise BadGGUF(f"{path}: truncated GGUF header (cut short or damaged)")
    except struct.error:       # a count or length pointing past the end of the file
        raise BadGGUF(f"{path}: truncated GGUF header (cut short or damaged)") from None
    except (ValueError, KeyError) as exc:  # an unknown enum value
        raise BadGGUF(f"{path}: unreadable GGUF header ({exc})") from None
    finally:
        buf.close()
    return GGUFLayout(version, n_kv, meta, kv_end, cur.pos, tensors, lengths)


def read_gguf_info(path: Path) -> GGUFInfo:
    """Count an artifact's tensors by type from its GGUF header; bits/weight = tensor bytes * 8 / parameters."""
    import gguf

    layout = read_gguf_layout(path)
    counts: Counter[str] = Counter()
    n_params = n_bytes = 0
    for qtype, n in layout.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        counts[qtype] += 1
        n_params += n
        n_bytes += n // block * type_size
    arch = layout.meta.get("general.architecture")
    ftype = layout.meta.get("general.file_type")
    return GGUFInfo(architecture=str(arch) if arch is not None else "?",
                    file_type=int(ftype) if isinstance(ftype, int) else None,
                    n_params=n_params, tensor_bytes=n_bytes, tensor_types=dict(sorted(counts.items())))


def add_metadata(path: Path, values: dict[str, str | int]) -> None:
    """Add key-value pairs to a GGUF's metadata (strings, and integers as INT32, as llama-quantize writes its
    ``quantize.imatrix.*`` keys).  The tensor table and data are copied unchanged (tensor offsets count from
    the data section); the file is rewritten under a temporary name beside it, then renamed over it."""

    import gguf

    layout = read_gguf_layout(path)
    clash = sorted(k for k in values if k in layout.meta)
    if clash:
        raise RunFailed(f"{path}: metadata {', '.join(clash)} already present")
    extra = bytearray()
    for key, value in values.items():
        name = key.encode("utf-8")
        extra += struct.pack("<Q", len(name)) + name
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"GGUF metadata {key}: a str or an int, not {type(value).__name__}")
        if isinstance(value, str):
            text = value.encode("utf-8")
            extra += struct.pack("<IQ", gguf.GGUFValueType.STRING, len(text)) + text
        else:
            extra += struct.pack("<Ii", gguf.GGUFValueType.INT32, value)
    tmp = path.with_name(f".{path.name}.meta-tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            head = src.read(layout.table_end)
            dst.write(head[:16] + struct.pack("<Q", layout.n_kv + len(values)) + head[24:layout.kv_end])
            dst.write(extra)
            dst.write(head[layout.kv_end:])
            end = layout.table_end + len(extra)
            dst.write(b"\0" * (-end % layout.alignment))
            src.seek(layout.data_offset)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def estimated_bits_per_weight(quant: str) -> float:
    """An upper estimate of a quant type's bits/weight, from gguf's block sizes.

    The K-quant mixes (_S/_M/_L) keep some tensors at a higher type, so one bit is
    added to the base type's bits; float types are exact.
    """
    import gguf

    if quant in ("F32", "F16", "BF16"):
        return {"F32": 32.0, "F16": 16.0, "BF16": 16.0}[quant]
    base = quant
    for suffix in ("_S", "_M", "_L", "_XL"):
        if base.endswith(suffix) and base[: -len(suffix)] in gguf.GGMLQuantizationType.__members__:
            base = base[: -len(suffix)]
            break
    qtype = gguf.GGMLQuantizationType.__members__.get(base)
    if qtype is None:
        return 16.0
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return type_size * 8 / block + 1.0
