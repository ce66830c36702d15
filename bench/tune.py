"""The search behind ``edgequant tune``: the smallest rung that passes every gate, then the fastest.

Candidates are base quant types x importance matrix on/off x a small set of
per-tensor overrides.  Each combination of modifiers is a *variant*; the
search walks the base types from high to low precision, level by level, and
measures every live variant at each level:

* a candidate larger than one that already passed is not measured (it cannot
  win on size);
* a variant that failed the quality gates is not retried at a lower precision
  (lower precision is assumed not to fix what higher precision broke); one
  rejected only for speed (``--min-tg``, or its benchmark failed: killed, or
  too large for the device) is, since lower precision is smaller and faster;
* a candidate over ``--max-size`` is not measured.

Building and measuring are callables, so the same search runs on the host or
on a phone (``edgequant.pipeline.calibrate.tune``): ``build(spec) -> artifact``
(anything with ``size_bytes``) and ``measure(spec, artifact) -> Measured``.
Nothing here touches llama.cpp, files or the store; the caller records the
evidence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from edgequant.bench.quality_stats import non_inferiority_table
from edgequant.core.errors import BadInput
from edgequant.profiles import NEEDS_IMATRIX
from edgequant.profiles.rungs import RungSpec, parse_rung
from edgequant.profiles.suite_records import Gate

# High to low precision: the walk's levels.
DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
# Modifier sets tried at every level ("" = the stock type).
DEFAULT_VARIANTS = ("", "+imatrix", "+emb=Q8_0", "+imatrix+emb=Q8_0")


@dataclass
class Measured:
    size_bytes: int
    metrics: dict[str, float]            # quality metrics by gate name (xml_parse_rate, mean_kld, ...)
    tg_tps: float | None = None
    pp_tps: float | None = None
    speed_failure: str | None = None     # why speed was not measured (the benchmark was killed, skipped, ...)
    paired: dict[str, list[int]] = field(default_factory=dict)  # metric -> paired table against the reference


@dataclass
class Tried:
    name: str
    variant: str
    base: str
    verdict: str                         # pass | fail | skipped
    reasons: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    measured: Measured | None = None
    gaps: dict[str, float] = field(default_factory=dict)  # gate -> signed margin (>= 0 passes)

    def record(self) -> dict[str, Any]:
        m = self.measured
        return {"rung": self.name, "verdict": self.verdict, "reasons": self.reasons, "size_bytes": self.size_bytes,
                "tg_tps": m.tg_tps if m else None, "pp_tps": m.pp_tps if m else None,
                "metrics": dict(m.metrics) if m else {}}


@dataclass
class TuneResult:
    best: Tried | None
    tried: list[Tried]

    @property
    def measured(self) -> list[Tried]:
        return [t for t in self.tried if t.measured is not None]

    def closest(self) -> tuple[str, float, Tried] | None:
        """The failing gate with the smallest shortfall, and the candidate it was measured on."""
        best = None
        for t in self.measured:
            for gate, gap in t.gaps.items():
                if gap < 0 and (best is None or gap > best[1]):
                    best = (gate, gap, t)
        return best


def parse_size(text: str) -> int:
    """``300M``, ``1.5G``, ``250MiB``, ``1e9`` -> bytes (K/M/G are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise BadInput(f"--max-size {text!r} is not a size; write it like 300M, 1.5G or 250MiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise BadInput(f"--max-size {text!r} must be more than zero")
    return int(value)


def gate_margin(gate: Gate, value: float | None) -> float:
    """Signed distance from the threshold, >= 0 when the gate passes (strict ops need > 0)."""
    if value is None or math.isnan(value):
        return -math.inf
    margin = value - gate.value if gate.op in (">=", ">") else gate.value - value
    if gate.op in (">", "<") and margin == 0:
        return -1e-12
    return margin


def relative_margin(gate: Gate, table: list[int] | None) -> tuple[float, str]:
    """A relative gate's signed margin (>= 0 only for PASS: the interval's lower bound above -margin)
    and its verdict in words; INCONCLUSIVE never passes."""
    if not table:
        return -math.inf, "not measured against the reference"
    ni = non_inferiority_table(*table, margin=gate.value)
    gap = ni.low + ni.margin
    if ni.verdict != "PASS" and gap >= 0:
        gap = -1e-12
    if ni.verdict == "INCONCLUSIVE":
        return gap, "INCONCLUSIVE" + (f" (~{ni.needed} cases would tell)" if ni.needed else "")
    return gap, f"{ni.verdict} ({100 * ni.delta:+.1f} pp)"


def candidates(types: tuple[str, ...] = DEFAULT_TYPES, variants: tuple[str, ...] = DEFAULT_VARIANTS
               ) -> list[list[RungSpec]]:
    """Levels (high to low precision) of candidate specs, one per variant; redundant ones dropped."""
    levels = []
    for base in types:
        level = []
        for variant in variants:
            spec = parse_rung(base + variant, "tune candidate")
            if spec.token_embedding_type and spec.token_embedding_type == spec.base:
                continue  # e.g. Q8_0+emb=Q8_0: the stock Q8_0 already
            if spec.base in NEEDS_IMATRIX and not spec.imatrix:
                continue  # llama.cpp cannot make it without one
            level.append(spec)
        levels.append(level)
    return levels


def _variant(spec: RungSpec) -> str:
    return spec.name[len(spec.base):]


def search(levels: list[list[RungSpec]], gates: list[Gate], build: Callable[[RungSpec], Any],
           measure: Callable[[RungSpec, Any], Measured], min_tg: float | None = None,
           max_size: int | None = None, say: Callable[[str], None] = lambda _m: None) -> TuneResult:
    tried: list[Tried] = []
    failed_variant: dict[str, str] = {}     # variant -> the candidate where it failed
    best: Tried | None = None
    for level in levels:
        for spec in level:
            variant = _variant(spec)
            t = Tried(spec.name, variant, spec.base, "skipped")
            tried.append(t)
            if variant in failed_variant:
                t.reasons.append(f"not tried: {failed_variant[variant]} already failed the gates at a higher "
                                 f"precision")
                continue
            art = build(spec)
            t.size_bytes = int(art.size_bytes)
            if max_size is not None and t.size_bytes > max_size:
                t.reasons.append(f"not measured: {t.size_bytes / 2**20:.1f} MiB is over --max-size "
                                 f"{max_size / 2**20:.1f} MiB")
                continue
            if best is not None and t.size_bytes > best.size_bytes:
                t.reasons.append(f"not measured: larger than {best.name} ({best.size_bytes / 2**20:.1f} MiB), "
                                 f"which already passes")
                continue
            say(f"measuring {spec.name} ({t.size_bytes / 2**20:.1f} MiB)")
            m = measure(spec, art)
            t.measured = m
            quality_failed = False
            for gate in gates:
                if gate.relative:
                    gap, why = relative_margin(gate, m.paired.get(gate.metric))
                    t.gaps[str(gate)] = gap
                    if gap < 0:
                        t.reasons.append(f"{gate}: {why}")
                        quality_failed = True
                    continue
                value = m.metrics.get(gate.metric)
                t.gaps[str(gate)] = gap = gate_margin(gate, value)
                if gap < 0:
                    shown = "not measured" if value is None else f"{value:.3f}"
                    t.reasons.append(f"{gate}: {shown}")
                    quality_failed = True
            if m.speed_failure:
                t.reasons.append(m.speed_failure)   # a rung that cannot run where it is meant to ship
            elif min_tg is not None:
                tg_gate = Gate("tg_tps", ">=", min_tg)
                t.gaps[f"tg_tps >= {min_tg:g}"] = gap = gate_margin(tg_gate, m.tg_tps)
                if gap < 0:
                    t.reasons.append(f"tg {m.tg_tps or 0:.1f} t/s is under --min-tg {min_tg:g}")
            if t.reasons:
                t.verdict = "fail"
                if quality_failed:      # too slow or too big is not inherited by smaller, faster types
                    failed_variant[variant] = spec.name
                continue
            t.verdict = "pass"
            if best is None or (t.size_bytes, -(m.tg_tps or 0)) < (best.size_bytes, -(best.measured.tg_tps or 0)):
                best = t
    return TuneResult(best, tried)


def no_pass_message(result: TuneResult, gates: list[Gate]) -> str:
    """One line: why nothing passed, naming the closest gate and the candidate where it was closest."""
    if not result.measured:
        reasons = {r for t in result.tried for r in t.reasons}
        return "no candidate could be measured: " + ("; ".join(sorted(reasons))[:300] or "none built")
    closest = result.closest()
    n = len(result.measured)
    if closest is None:
        reasons = sorted({r for t in result.measured for r in t.reasons})
        return f"no candidate passed ({n} measured): " + "; ".join(reasons)[:300]
    gate, gap, t = closest
    value = gap  # signed shortfall
    return (f"no candidate passes every gate ({n} measured); the closest was gate {gate} at {t.name} "
            f"(short by {abs(value):.3g}); relax that gate or add candidates")
