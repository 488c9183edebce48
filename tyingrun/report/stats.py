"""Statistics: over seeds, mean, sample std and a two-sided 95% t-interval, and paired differences on shared seeds;
between two samples, Welch's t."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Hashable, List, Mapping, Optional, Sequence

from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """``n`` values summarised. With one value there is no sample std and no interval: both are None."""

    n: int
    mean: float
    std: Optional[float]
    halfwidth: Optional[float]

    @property
    def low(self) -> Optional[float]:
        return None if self.halfwidth is None else self.mean - self.halfwidth

    @property
    def high(self) -> Optional[float]:
        return None if self.halfwidth is None else self.mean + self.halfwidth

    @property
    def contains_zero(self) -> Optional[bool]:
        """Whether the interval contains 0 (None without an interval)."""
        return None if self.halfwidth is None else self.low <= 0.0 <= self.high


def t_halfwidth(std: float, n: int) -> float:
    """Half the width of the two-sided t-interval of a mean: t_{0.975, n-1} * std / sqrt(n)."""
    return float(student_t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)


def estimate(values: Sequence[float]) -> Estimate:
    """Mean, sample std and the 95% t-interval of the mean of ``values`` (at least one)."""
    if not values:
        raise ValueError("estimate() needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Estimate(1, mean, None, None)
    std = statistics.stdev(values)
    return Estimate(len(values), mean, std, t_halfwidth(std, len(values)))


def paired_differences(values: Mapping[Hashable, float], reference: Mapping[Hashable, float]) -> List[float]:
    """``values[key] - reference[key]`` for every key both have (the seeds they share), in key order."""
    return [values[key] - reference[key] for key in sorted(values.keys() & reference.keys())]


def welch_t(first: Sequence[float], second: Sequence[float]) -> Optional[float]:
    """Welch's t-statistic of mean(first) - mean(second) (each at least two values): the difference over
    sqrt(var1 / n1 + var2 / n2) with sample variances. Without any variance: +-inf for different means, None for
    equal ones."""
    difference = statistics.fmean(first) - statistics.fmean(second)
    spread = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(second) / len(second))
    if spread > 0:
        return difference / spread
    return None if difference == 0 else math.copysign(math.inf, difference)
