"""Statistics for judging answer quality across quant rungs.

Rates get a Wilson score interval; a rung is compared with the reference on
the same cases by McNemar's exact test on the discordant pairs (the two runs
answer the same prompts, so the comparison is paired) and, for relative gates,
by non-inferiority: Newcombe's hybrid score interval for the paired difference
against a margin (PASS, FAIL, or INCONCLUSIVE with the suite size that would
settle it); set answers such as a differential are compared with the Jaccard
index.  Token-level figures are summarized as llama-perplexity
--kl-divergence prints them (``kld_statistics``).
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


# ---------------------------------------------------------------------------
# paired differences and non-inferiority


def newcombe_paired_interval(a: float, b: float, c: float, d: float, z: float = Z_95) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval (1998, method 10) for a difference of paired proportions.

    The 2x2 table of paired outcomes: ``a`` both right, ``b`` first right and second wrong,
    ``c`` first wrong and second right, ``d`` both wrong.  Returns (theta, lower, upper) for
    theta = p1 - p2 = (b - c) / n, built from the Wilson intervals of p1 = (a + b) / n and
    p2 = (a + c) / n and the correlation of the pairs (phi, with Newcombe's correction: an
    ad - bc between 0 and n/2 counts as 0, above n/2 it is reduced by n/2).  Counts may be
    fractional (a table scaled to another size keeps its rates).  (0, -1, 1) when n is 0.
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"paired counts must be >= 0, got a={a}, b={b}, c={c}, d={d}")
    n = a + b + c + d
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins > 0:
        cross = a * d - b * c
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    theta = p1 - p2
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    low = theta - math.sqrt(max(0.0, dl1 * dl1 - 2 * phi * dl1 * du2 + du2 * du2))
    high = theta + math.sqrt(max(0.0, dl2 * dl2 - 2 * phi * dl2 * du1 + du1 * du1))
    return theta, max(-1.0, low), min(1.0, high)


def paired_table(ref_outcomes: Sequence[bool], rung_outcomes: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both right, rung right and reference wrong, reference right and rung wrong, both wrong)."""
    ref, rung = list(ref_outcomes), list(rung_outcomes)
    if len(ref) != len(rung):
        raise ValueError(f"paired outcomes need equal lengths, got {len(ref)} and {len(rung)}")
    a = sum(1 for r, q in zip(ref, rung) if r and q)
    b = sum(1 for r, q in zip(ref, rung) if q and not r)
    c = sum(1 for r, q in zip(ref, rung) if r and not q)
    return a, b, c, len(ref) - a - b - c


VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


def combined_verdict(verdicts) -> str:
    """Several gates' verdicts as one: FAIL if any fails, else INCONCLUSIVE if any is, else PASS."""
    seen = set(verdicts)
    return "FAIL" if "FAIL" in seen else ("INCONCLUSIVE" if "INCONCLUSIVE" in seen else "PASS")
MAX_CASES_NEEDED = 10_000_000


@dataclass(frozen=True)
class NonInferiority:
    """A rung against the reference on the same cases, with a non-inferiority margin.

    ``delta`` = rung rate − reference rate of right answers (negative = the rung is worse),
    ``low``/``high`` its 95 % interval (Newcombe's method 10), ``margin`` the largest drop
    that still counts as no worse.  PASS: low > −margin (shown no worse than the margin);
    FAIL: high < −margin (shown worse); INCONCLUSIVE otherwise: the suite cannot tell, and
    ``needed`` says how many paired cases would settle it at the observed rates (None when no
    suite size would: the observed change sits on the margin).
    """

    delta: float
    low: float
    high: float
    margin: float
    verdict: str
    n: int
    needed: int | None = None

    @property
    def label(self) -> str:
        text = (f"{self.verdict}: {100 * self.delta:+.1f} pp (95 % CI {100 * self.low:+.1f} to "
                f"{100 * self.high:+.1f}) vs margin −{100 * self.margin:g} pp on {self.n} cases")
        if self.verdict == "INCONCLUSIVE":
            text += (f"; about {self.needed} cases would settle it at these rates" if self.needed
                     else "; the observed change sits on the margin")
        return text


def _settles(table: tuple[float, float, float, float], margin: float, z: float) -> str:
    _theta, low, high = newcombe_paired_interval(*table, z=z)
    return "PASS" if low > -margin else ("FAIL" if high < -margin else "INCONCLUSIVE")


def cases_needed(a: int, b: int, c: int, d: int, margin: float, z: float = Z_95) -> int | None:
    """The smallest suite size at which the same rates (the table scaled) would give PASS or FAIL."""
    n = a + b + c + d
    if n == 0:
        return None
    theta = (b - c) / n
    if abs(theta + margin) < 1e-12:
        return None

    def settled(size: int) -> bool:
        s = size / n
        return _settles((a * s, b * s, c * s, d * s), margin, z) != "INCONCLUSIVE"

    lo, hi = n, n
    while not settled(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_CASES_NEEDED:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if settled(mid) else (mid, hi)
    return hi


def non_inferiority(ref_outcomes: Sequence[bool], rung_outcomes: Sequence[bool], margin: float,
                    z: float = Z_95) -> NonInferiority:
    """Is the rung no worse than the reference by more than ``margin``?  Outcomes: True = right."""
    return non_inferiority_table(*paired_table(ref_outcomes, rung_outcomes), margin=margin, z=z)


def non_inferiority_table(a: int, b: int, c: int, d: int, margin: float, z: float = Z_95) -> NonInferiority:
    """``non_inferiority`` from the paired table (``paired_table``'s order: both right, only the rung
    right, only the reference right, both wrong)."""
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be between 0 and 1 (exclusive), got {margin}")
    theta, low, high = newcombe_paired_interval(a, b, c, d, z)
    verdict = _settles((a, b, c, d), margin, z)
    needed = cases_needed(a, b, c, d, margin, z) if verdict == "INCONCLUSIVE" else None
    return NonInferiority(delta=theta, low=low, high=high, margin=margin, verdict=verdict, n=a + b + c + d,
                          needed=needed)


# ---------------------------------------------------------------------------
# token-level statistics, as llama-perplexity --kl-divergence prints them

# our metric name -> llama-perplexity's label
LLAMA_PERPLEXITY_NAMES = {
    "mean_kld": "Mean    KLD", "median_kld": "Median  KLD", "p90_kld": "90.0%   KLD", "p95_kld": "95.0%   KLD",
    "p99_kld": "99.0%   KLD", "p999_kld": "99.9%   KLD", "max_kld": "Maximum KLD", "rms_dp": "RMS Δp",
    "same_top_p": "Same top p",
}


def llama_percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """llama-perplexity's percentile of sorted values: linear between the two nearest ranks,
    at position fraction * (n - 1)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    pos = fraction * (len(sorted_values) - 1)
    i = int(pos)
    frac = pos - i
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - frac) * sorted_values[i] + frac * sorted_values[j])


def kld_statistics(kld: Sequence[float], p_diff: Sequence[float] | None,
                   same_top: Sequence[bool]) -> dict[str, float]:
    """Mean, median, 90/95/99/99.9th percentile and maximum KLD, RMS Δp and the same-top share.

    Mirrors llama-perplexity: the median is the middle value (the mean of the two middle values
    for an even count), percentiles as ``llama_percentile``, RMS Δp = sqrt(mean(Δp²)) where Δp
    is the probability the rung gives the next token minus the probability the reference gives
    it, and "same top p" the share of positions whose most likely token is the same.
    """
    values = sorted(float(x) for x in kld)
    if not values:
        return {}
    n = len(values)
    mid = n // 2
    out = {
        "mean_kld": math.fsum(values) / n,
        "median_kld": values[mid] if n % 2 else 0.5 * (values[mid - 1] + values[mid]),
        "p90_kld": llama_percentile(values, 0.90),
        "p95_kld": llama_percentile(values, 0.95),
        "p99_kld": llama_percentile(values, 0.99),
        "p999_kld": llama_percentile(values, 0.999),
        "max_kld": values[-1],
    }
    if p_diff:
        out["rms_dp"] = math.sqrt(math.fsum(float(x) * float(x) for x in p_diff) / len(p_diff))
    if same_top:
        out["same_top_p"] = sum(1 for s in same_top if s) / len(same_top)
    return out
