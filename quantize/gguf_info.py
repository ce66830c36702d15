"""Read what an artifact is from the GGUF itself (with the ``gguf`` package)."""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import RunFailed
from edgequant.hashing import file_sha256  # noqa: F401  (artifact code imports it from here)

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


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise RunFailed(f"{self.path}: truncated GGUF header; delete it and re-run") from None
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise RunFailed(f"{self.path}: truncated GGUF header; delete it and re-run")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


def read_gguf_info(path: Path) -> GGUFInfo:
    """Count an artifact's tensors by type from its GGUF header; bits/weight = tensor bytes * 8 / parameters.

    The header is walked directly, with the ``gguf`` package's value-type and
    quant-type enums and block sizes: ``gguf.GGUFReader`` builds Python objects
    for every metadata array element, which for a 262k-token vocabulary takes
    tens of seconds per file, while only the tensor table is needed here.
    """
    import mmap

    import gguf

    sizes = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.UINT16: 2,
             gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4,
             gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.BOOL: 1, gguf.GGUFValueType.UINT64: 8,
             gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise RunFailed(f"{path}: not a GGUF file (bad magic); delete it and re-run")
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise RunFailed(f"{path}: empty or unreadable GGUF; delete it and re-run") from None
    try:
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise RunFailed(f"{path}: GGUF version {version} is not supported (2 or 3; big-endian files are not)")
        n_tensors, n_kv = cur.take("<QQ")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", "replace")
            vtype = gguf.GGUFValueType(cur.take("<I"))
            if vtype == gguf.GGUFValueType.STRING:
                value: object = cur.string().decode("utf-8", "replace")
            elif vtype == gguf.GGUFValueType.ARRAY:
                etype = gguf.GGUFValueType(cur.take("<I"))
                count = cur.take("<Q")
                if etype == gguf.GGUFValueType.STRING:
                    unpack, pos = struct.Struct("<Q").unpack_from, cur.pos
                    for _ in range(count):
                        pos += 8 + unpack(buf, pos)[0]
                    if pos > len(buf):
                        raise RunFailed(f"{path}: truncated GGUF header; delete it and re-run")
                    cur.pos = pos
                    value = None
                elif etype == gguf.GGUFValueType.ARRAY:
                    raise RunFailed(f"{path}: nested arrays in GGUF metadata are not supported")
                else:
                    cur.pos += sizes[etype] * count
                    value = None
            else:
                fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[sizes[vtype]]
                value = cur.take(fmt)
            meta[key] = value
        counts: Counter[str] = Counter()
        n_params = n_bytes = 0
        for _ in range(n_tensors):
            cur.string()
            n_dims = cur.take("<I")
            dims = [cur.take("<Q") for _ in range(n_dims)]
            qtype = gguf.GGMLQuantizationType(cur.take("<I"))
            cur.take("<Q")  # offset
            n = 1
            for d in dims:
                n *= d
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            counts[qtype.name] += 1
            n_params += n
            n_bytes += n // block * type_size
    except ValueError as exc:  # an unknown enum value
        raise RunFailed(f"{path}: unreadable GGUF header ({exc}); delete it and re-run") from None
    finally:
        buf.close()
    arch = meta.get("general.architecture")
    ftype = meta.get("general.file_type")
    return GGUFInfo(architecture=str(arch) if arch is not None else "?",
                    file_type=int(ftype) if isinstance(ftype, int) else None,
                    n_params=n_params, tensor_bytes=n_bytes, tensor_types=dict(sorted(counts.items())))


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
