"""The variants of a rung a profile measures: context depth x KV cache type (llama-bench ``-d``, ``-ctk/-ctv``).

A rung measured in more than llama-bench's default setting (depth 0, f16
cache) is stored once per variant, under the rung's name with a suffix, so
every table, ``compare`` and ``pick`` treat a variant as a rung of its own:

    Q4_K_M            depth 0, f16 K/V (the plain rung)
    Q4_K_M@d512       512 tokens in the context before each pp/tg test
    Q4_K_M@kv=q8_0    K and V cache in q8_0 (flash attention on)
    Q4_K_M@d312,kv=q8_0

The variant's settings are in the rows' parameters too (``n_depth``,
``cache_type``, ``flash_attn``), only where they differ from the default, so
the plain rung's rows pair with those of runs made before variants existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgequant.profiles import FLOAT_CACHE_TYPES, SUITE_DEPTH, BenchSettings

SEPARATOR = "@"


@dataclass(frozen=True)
class BenchVariant:
    depth: int = 0
    cache_type: str = "f16"
    depth_source: str | None = None     # e.g. "suite triage: xml prefix" for a depth given as "suite"

    @property
    def quantized_v(self) -> bool:
        return self.cache_type not in FLOAT_CACHE_TYPES

    @property
    def plain(self) -> bool:
        return self.depth == 0 and self.cache_type == "f16"

    @property
    def suffix(self) -> str:
        parts = ([f"d{self.depth}"] if self.depth else []) + \
                ([f"kv={self.cache_type}"] if self.cache_type != "f16" else [])
        return SEPARATOR + ",".join(parts) if parts else ""

    def name(self, quant: str) -> str:
        return quant + self.suffix

    def flash_attn(self, settings: BenchSettings) -> str:
        """llama.cpp runs a quantized V cache only with flash attention: forced on (a profile that turns it
        off with a quantized cache type is refused when it loads)."""
        return "on" if self.quantized_v else settings.flash_attn

    def params(self, base: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
        """The rows' parameters: ``base`` plus what this variant changes."""
        out = dict(base)
        if self.depth:
            out["n_depth"] = self.depth
            if self.depth_source:
                out["depth_source"] = self.depth_source
        if self.cache_type != "f16":
            out["cache_type"] = self.cache_type
            out["flash_attn"] = self.flash_attn(settings)
        return out

    def request(self, settings: BenchSettings) -> dict[str, Any]:
        """The worker's (``bench.host_worker``) description of this variant."""
        return {"n_depth": self.depth, "cache_type": self.cache_type, "flash_attn": self.flash_attn(settings)}


def base_quant(name: str) -> str:
    """The rung a variant's name belongs to (``Q4_K_M@d512`` -> ``Q4_K_M``)."""
    return name.split(SEPARATOR, 1)[0]


def variant_suffix(name: str) -> str:
    return name[len(base_quant(name)):]


def needs_suite_depths(settings: BenchSettings) -> bool:
    return SUITE_DEPTH in settings.depths


def expand(settings: BenchSettings, suite_depths: dict[str, int] | None = None,
           suite_name: str = "") -> list[BenchVariant]:
    """The variants of ``settings``: cache types outer, depths inner (a depth's filled context is reused
    across repetitions of one cache type).  ``suite_depths`` (format -> prefix tokens) resolves ``"suite"``;
    formats with the same prefix length are one depth.  A numeric depth equal to a suite prefix is one
    variant too."""
    depths: dict[int, list[str]] = {}
    for d in settings.depths:
        if d == SUITE_DEPTH:
            if suite_depths is None:
                raise ValueError("depth \"suite\" needs the suite's prefix lengths")
            for fmt, n in suite_depths.items():
                depths.setdefault(int(n), []).append(fmt)
        else:
            depths.setdefault(int(d), [])
    out = []
    for t in settings.cache_types:
        for d, formats in depths.items():
            source = f"suite {suite_name}: {', '.join(formats)} prefix" if formats else None
            out.append(BenchVariant(d, t, source))
    return out
