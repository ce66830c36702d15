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
