"""Read what an artifact is from the GGUF itself (with the ``gguf`` package)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import RunFailed

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    n_params: int
    tensor_bytes: int
    tensor_types: dict[str, int]

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.n_params if self.n_params else 0.0


def read_gguf_info(path: Path) -> GGUFInfo:
    """Check magic, then count tensors by type; bits/weight = tensor bytes * 8 / parameters."""
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise RunFailed(f"{path}: not a GGUF file (bad magic); delete it and re-run")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError) as exc:
        raise RunFailed(f"{path}: unreadable GGUF ({exc}); delete it and re-run") from None
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "?"
    counts: Counter[str] = Counter()
    n_params = n_bytes = 0
    for t in reader.tensors:
        counts[t.tensor_type.name] += 1
        n_params += int(t.n_elements)
        n_bytes += int(t.n_bytes)
    return GGUFInfo(architecture=str(arch), n_params=n_params, tensor_bytes=n_bytes,
                    tensor_types=dict(sorted(counts.items())))


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


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
