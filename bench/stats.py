"""Summary statistics of repeated measurements."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Summary:
    """Mean, spread and range of one measured quantity over its repetitions.

    ``stddev`` is the sample standard deviation (divisor n-1), as llama-bench
    reports it, and 0.0 for a single value.  ``samples`` keeps the raw values in
    the order they were measured.
    """

    mean: float
    stddev: float
    n: int
    min: float
    max: float
    median: float
    samples: tuple[float, ...]

    @classmethod
    def from_values(cls, values: Iterable[float]) -> "Summary":
        samples = tuple(float(v) for v in values)
        if not samples:
            raise ValueError("Summary.from_values needs at least one value")
        if not all(math.isfinite(v) for v in samples):
            raise ValueError(f"Summary.from_values got a non-finite value: {samples}")
        return cls(
            mean=statistics.fmean(samples),
            stddev=statistics.stdev(samples) if len(samples) > 1 else 0.0,
            n=len(samples),
            min=min(samples),
            max=max(samples),
            median=statistics.median(samples),
            samples=samples,
        )

    @property
    def cv(self) -> float:
        """Coefficient of variation (stddev / mean); 0.0 when the mean is 0."""
        return self.stddev / self.mean if self.mean else 0.0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "stddev": self.stddev, "n": self.n, "min": self.min,
                "max": self.max, "median": self.median, "samples": list(self.samples)}


# ---------------------------------------------------------------------------
# Mann-Whitney U: is one set of samples stochastically smaller than another?

# the exact null distribution is counted up to this many samples in all (C(40, 20) paths: quick);
# beyond it, or with ties, the normal approximation with tie and continuity corrections
EXACT_MAX_N = 40


@dataclass(frozen=True)
class RankTest:
    """One-sided Mann-Whitney U test of "``lower`` tends to be smaller than ``higher``".

    ``u`` counts the pairs (h, l) with h > l, ties counting one half; ``p`` is the
    probability of a ``u`` at least this large when both samples come from one
    distribution; ``min_p`` the smallest ``p`` these sample sizes can give (a
    test that cannot reach ``alpha`` has too few samples).
    """

    u: float
    n_higher: int
    n_lower: int
    p: float
    min_p: float
    method: str  # "exact" | "normal"


def _u_counts(m: int, n: int) -> list[int]:
    """counts[u] = how many of the C(m+n, m) orderings of m and n samples give U = u (no ties)."""
    # f[i][j] = distribution for i and j samples; f(i, j, u) = f(i-1, j, u-j) + f(i, j-1, u)
    prev_row = [[1] for _ in range(n + 1)]          # i = 0: only u = 0
    for i in range(1, m + 1):
        row = [[1]]                                   # j = 0: only u = 0
        for j in range(1, n + 1):
            size = i * j + 1
            dist = [0] * size
            for u, c in enumerate(prev_row[j]):       # the largest sample is one of the i: it beats all j
                dist[u + j] += c
            for u, c in enumerate(row[j - 1]):        # the largest sample is one of the j
                dist[u] += c
            row.append(dist)
        prev_row = row
    return prev_row[n]


def mann_whitney_greater(higher: Iterable[float], lower: Iterable[float]) -> RankTest:
    """One-sided Mann-Whitney U test that ``higher`` tends to exceed ``lower`` (e.g. baseline t/s over candidate)."""
    h, lo = [float(v) for v in higher], [float(v) for v in lower]
    m, n = len(h), len(lo)
    if m == 0 or n == 0:
        raise ValueError("mann_whitney_greater needs at least one sample on each side")
    u = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in h for b in lo)
    ties = len(set(h + lo)) < m + n
    total = math.comb(m + n, m)
    if m + n <= EXACT_MAX_N:
        counts = _u_counts(m, n)
        min_p = counts[-1] / total
        if not ties:
            return RankTest(u, m, n, sum(counts[int(u):]) / total, min_p, "exact")
    else:
        min_p = 1.0 / total
    # normal approximation, variance corrected for ties, continuity correction 0.5
    mean = m * n / 2.0
    pooled = sorted(h + lo)
    groups: dict[float, int] = {}
    for v in pooled:
        groups[v] = groups.get(v, 0) + 1
    N = m + n
    var = m * n / 12.0 * ((N + 1) - sum(t ** 3 - t for t in groups.values()) / (N * (N - 1)))
    if var <= 0:
        return RankTest(u, m, n, 1.0, min_p, "normal")
    z = (u - mean - 0.5) / math.sqrt(var)
    return RankTest(u, m, n, 0.5 * math.erfc(z / math.sqrt(2.0)), min_p, "normal")
