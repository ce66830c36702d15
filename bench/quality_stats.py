"""Statistics for judging answer quality across quant rungs.

Rates get a Wilson score interval; a rung is compared with the reference on
the same cases by McNemar's exact test on the discordant pairs (the two runs
answer the same prompts, so the comparison is paired); set answers such as a
differential are compared with the Jaccard index.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

Z_95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denom = 1 + z2 / n
    low, high = (centre - half) / denom, (centre + half) / denom
    # the exact bounds at 0 and n are 0 and 1; keep rounding from leaving [0, 1]
    return (0.0 if successes == 0 else max(0.0, low)), (1.0 if successes == n else min(1.0, high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(b + c, 1/2) test on the discordant pairs.

    ``b`` counts cases the reference got right and the rung wrong, ``c`` the
    reverse.  p = min(1, 2 * P(X <= min(b, c))); 1 when there are no discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def _format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


@dataclass(frozen=True)
class Degradation:
    """How a rung's success rate differs from the reference's on the same cases.

    ``delta_pp`` is rung rate minus reference rate in percentage points
    (negative = the rung is worse); ``b`` = reference right and rung wrong,
    ``c`` = reference wrong and rung right, ``n`` = paired cases.
    """

    delta_pp: float
    p_value: float
    significant: bool
    b: int
    c: int
    n: int
    alpha: float = 0.05

    @property
    def label(self) -> str:
        sign = "\u2212" if self.delta_pp < 0 else ("+" if self.delta_pp > 0 else "")
        verdict = "significant" if self.significant else "within noise"
        return f"{sign}{abs(self.delta_pp):.1f} pp, {verdict} ({_format_p(self.p_value)})"


def paired_degradation(ref_outcomes: Sequence[bool], rung_outcomes: Sequence[bool],
                       alpha: float = 0.05) -> Degradation:
    """Compare per-case outcomes (True = right) of a rung with the reference's."""
    ref, rung = list(ref_outcomes), list(rung_outcomes)
    if len(ref) != len(rung):
        raise ValueError(f"paired outcomes need equal lengths, got {len(ref)} and {len(rung)}")
    b = sum(1 for r, q in zip(ref, rung) if r and not q)
    c = sum(1 for r, q in zip(ref, rung) if q and not r)
    n = len(ref)
    delta = 100.0 * (c - b) / n if n else 0.0
    p = mcnemar_exact(b, c)
    return Degradation(delta_pp=delta, p_value=p, significant=p < alpha, b=b, c=c, n=n, alpha=alpha)


_TRIM = string.punctuation + string.whitespace + "\u2013\u2014\u2019\u2018\u201c\u201d\u2022"


def normalize_item(item: str) -> str:
    """Lower-cased, inner whitespace collapsed, punctuation trimmed from both ends."""
    return " ".join(item.lower().split()).strip(_TRIM)


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard index of two item collections after ``normalize_item``; both empty -> 1.0."""
    sa = {x for x in (normalize_item(i) for i in a) if x}
    sb = {x for x in (normalize_item(i) for i in b) if x}
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
