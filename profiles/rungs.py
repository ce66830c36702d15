"""Rung specs: a llama.cpp quant type plus an importance matrix and per-tensor type overrides.

A rung is named the way it is written in a profile, and that name is shown in
every table::

    Q4_K_M                      the stock type
    Q4_K_M+imatrix              quantized with the suite's importance matrix
    Q4_K_M+emb=Q8_0             token embedding kept at Q8_0   (llama-quantize --token-embedding-type)
    Q4_K_M+out=Q6_K             output tensor at Q6_K           (llama-quantize --output-tensor-type)
    Q4_K_M+attn_v=Q6_K          tensors whose name matches the regular expression attn_v
                                (llama-quantize --tensor-type attn_v=q6_k; the first matching pattern wins)

Modifiers combine (``Q3_K_M+imatrix+emb=Q8_0``); the canonical name puts them
in the order imatrix, emb, out, then the patterns as written.  Override types
are ggml tensor types (``gguf.GGMLQuantizationType``: Q8_0, Q6_K, Q4_K, F16, ...).
Every modifier is part of the artifact's cache key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from edgequant.core.errors import BadInput

IMATRIX = "imatrix"
EMB = "emb"
OUT = "out"
# a tensor-name regular expression without the separators '+' and '='
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.\\*?\[\]^$|(){}-]{1,100}$")


@lru_cache(maxsize=1)
def tensor_types() -> dict[str, int]:
    """ggml tensor type name -> ggml_type value, from gguf's enum (which mirrors ggml's)."""
    import gguf

    return {t.name: int(t.value) for t in gguf.GGMLQuantizationType}


@dataclass(frozen=True)
class RungSpec:
    base: str                                  # llama_ftype name, e.g. Q4_K_M
    imatrix: bool = False
    token_embedding_type: str | None = None    # ggml type name
    output_tensor_type: str | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()  # (pattern, ggml type name), first match wins

    @property
    def name(self) -> str:
        parts = [self.base]
        if self.imatrix:
            parts.append(IMATRIX)
        if self.token_embedding_type:
            parts.append(f"{EMB}={self.token_embedding_type}")
        if self.output_tensor_type:
            parts.append(f"{OUT}={self.output_tensor_type}")
        parts += [f"{p}={t}" for p, t in self.tensor_types]
        return "+".join(parts)

    @property
    def has_overrides(self) -> bool:
        return bool(self.token_embedding_type or self.output_tensor_type or self.tensor_types)

    def as_key(self) -> dict:
        """What goes into the artifact's cache key besides the base type."""
        return {"imatrix": self.imatrix, "token_embedding_type": self.token_embedding_type,
                "output_tensor_type": self.output_tensor_type, "tensor_types": [list(x) for x in self.tensor_types]}

    def __str__(self) -> str:
        return self.name


def _ggml_type(value: str, where: str, label: str) -> str:
    known = tensor_types()
    name = value.strip().upper()
    if name not in known:
        raise BadInput(f"{label}: {where} has unknown tensor type {value!r}; valid ggml types: "
                       f"{', '.join(sorted(known))}")
    return name


def parse_rung(text: str, label: str = "rung") -> RungSpec:
    """Parse ``BASE[+imatrix][+emb=T][+out=T][+PATTERN=T]...``; the base type is checked by the caller.

    Errors are BadInput naming ``label`` (e.g. ``profile p.toml: field 'quantize.types[2]'``).
    """
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"{label}: expected a quant type like 'Q4_K_M' or 'Q4_K_M+imatrix+emb=Q8_0', got {text!r}")
    base, *mods = [p.strip() for p in text.strip().split("+")]
    spec = {"base": base.upper(), "imatrix": False, "emb": None, "out": None}
    patterns: list[tuple[str, str]] = []
    for mod in mods:
        if mod.lower() == IMATRIX:
            if spec["imatrix"]:
                raise BadInput(f"{label}: '+imatrix' is given twice in {text!r}")
            spec["imatrix"] = True
            continue
        if "=" not in mod:
            raise BadInput(f"{label}: modifier {mod!r} in {text!r} is not 'imatrix', 'emb=TYPE', 'out=TYPE' "
                           f"or 'PATTERN=TYPE'")
        key, value = (s.strip() for s in mod.split("=", 1))
        if key.lower() in (EMB, OUT):
            slot = key.lower()
            if spec[slot] is not None:
                raise BadInput(f"{label}: '{slot}=' is given twice in {text!r}")
            spec[slot] = _ggml_type(value, f"'{slot}=' in {text!r}", label)
            continue
        if not _PATTERN_RE.match(key):
            raise BadInput(f"{label}: tensor-name pattern {key!r} in {text!r} must be 1-100 characters of "
                           f"letters, digits and regular-expression characters (no '+' or '=')")
        try:
            re.compile(key)
        except re.error as exc:
            raise BadInput(f"{label}: tensor-name pattern {key!r} in {text!r} is not a valid regular "
                           f"expression ({exc})") from None
        if any(p == key for p, _ in patterns):
            raise BadInput(f"{label}: pattern {key!r} is given twice in {text!r}")
        patterns.append((key, _ggml_type(value, f"pattern {key!r} in {text!r}", label)))
    return RungSpec(base=spec["base"], imatrix=spec["imatrix"], token_embedding_type=spec["emb"],
                    output_tensor_type=spec["out"], tensor_types=tuple(patterns))
