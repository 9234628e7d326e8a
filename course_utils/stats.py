"""Uncertainty for the course's comparisons (SCIENCE.md section 10).

* ``bootstrap(statistic, *arrays)``: percentile bootstrap over items (images, features, pairs); the arrays
  are resampled jointly, so a paired difference keeps its pairs.
* ``mean_interval(values)`` and ``difference_interval(a, b)``: the two cases every notebook needs, e.g.
  the pointing-game hit rate of one method, or the per-image difference between two methods.
* ``spearman_test(x, y)``: Spearman's ρ with an exact (n ≤ 8) or permutation p-value.
* ``benjamini_hochberg(p, q)``: which of many tests survive a false-discovery-rate correction.

Every function returns plain numbers or a small frozen dataclass that formats itself, so a notebook's
claim reads ``f"... {interval} ..."`` -> ``"0.12 [0.05, 0.19] (95 % CI, 500 images)"``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _as_numpy(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=float if not np.asarray(values).dtype == bool else bool)
    if array.ndim == 0 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty sequence with one entry per item, got shape {array.shape}")
    if array.dtype != bool and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf values; drop or fix those items first")
    return array


@dataclass(frozen=True)
class Interval:
    """A statistic and its percentile bootstrap interval over ``n`` items.

    Attributes:
        value: the statistic on all items; low, high: the interval's ends; level: its coverage;
        n: the number of items (images, features, pairs) resampled; unit: what an item is.
    """

    value: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0
    unit: str = "images"

    def above(self, threshold: float = 0.0) -> bool:
        """True when the whole interval lies above ``threshold`` (a difference that is "significantly > 0")."""
        return self.low > threshold

    def below(self, threshold: float = 0.0) -> bool:
        """True when the whole interval lies below ``threshold``."""
        return self.high < threshold

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __format__(self, spec: str) -> str:
        """``f"{interval:.2f}"`` -> ``"0.12 [0.05, 0.19] (95 % CI, 500 images)"`` (default ``.2f``)."""
        spec = spec or ".2f"
        return (f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}] "
                f"({self.level * 100:.0f} % CI, {self.n} {self.unit})")

    def __str__(self) -> str:
        return format(self, "")


def bootstrap(statistic: Callable[..., float], *arrays: ArrayLike, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0, unit: str = "images") -> Interval:
    """``statistic(*arrays)`` with its percentile bootstrap interval, resampling items (the first axis)
    of all ``arrays`` jointly with replacement ``n_boot`` times.

    A resample on which ``statistic`` raises ``ValueError`` (e.g. AUROC of a resample with a single
    outcome) is drawn again, at most ``n_boot`` extra times.

    Example: ``bootstrap(lambda y, a, b: auroc(y, a) - auroc(y, b), correct, q_eps4, q_eps8)``.
    """
    if not arrays:
        raise ValueError("bootstrap needs at least one array of per-item values")
    data = [_as_numpy(a, f"array {i}") for i, a in enumerate(arrays)]
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ValueError(f"every array needs one entry per item; got lengths {[len(a) for a in data]}")
    if n_boot < 10 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 10 and 0 < level < 1, got {n_boot} and {level}")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    failures = 0
    while len(values) < n_boot:
        index = rng.integers(0, n, n)
        try:
            values.append(float(statistic(*(a[index] for a in data))))
        except ValueError:
            failures += 1
            if failures > n_boot:
                raise ValueError("the statistic failed on most bootstrap resamples (too few items?)") from None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(statistic(*data)), float(low), float(high), level, n, unit)


def mean_interval(values: ArrayLike, **options) -> Interval:
    """Mean of per-item values [N] (hits, IoUs, AUCs) with its bootstrap interval."""
    return bootstrap(np.mean, values, **options)


def difference_interval(a: ArrayLike, b: ArrayLike, **options) -> Interval:
    """Mean of ``a - b`` over paired items [N] (two methods scored on the same images) with its interval."""
    return bootstrap(lambda x, y: float(np.mean(x) - np.mean(y)), a, b, **options)


@dataclass(frozen=True)
class SpearmanTest:
    """Spearman's ρ of ``n`` pairs with a two-sided p-value (``exact``: all n! orderings enumerated)."""

    rho: float
    p: float
    n: int
    exact: bool

    @property
    def significant(self) -> bool:
        """p < 0.05, the protocol's bar for reporting a correlation as a finding."""
        return self.p < 0.05

    def __format__(self, spec: str) -> str:
        kind = "exact" if self.exact else "permutation"
        return f"ρ = {self.rho:+.2f} (p = {self.p:.3f}, {kind}, n = {self.n})"

    def __str__(self) -> str:
        return format(self, "")


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``a`` [n] with each row of ``b`` [..., n]."""
    a = a - a.mean()
    b = b - b.mean(-1, keepdims=True)
    return (b @ a) / np.sqrt((a @ a) * (b * b).sum(-1))


def spearman_test(x: ArrayLike, y: ArrayLike, n_perm: int = 10_000, seed: int = 0) -> SpearmanTest:
    """Spearman's ρ of paired values and its two-sided p-value under random pairing.

    With n ≤ 8 pairs every permutation is enumerated (exact); otherwise ``n_perm`` random permutations give
    p = (1 + #{|ρ_perm| ≥ |ρ|}) / (1 + n_perm).  Ties get average ranks.

    Raises:
        ValueError: fewer than 3 pairs, lengths differ, or one side is constant (ρ undefined).
    """
    a, b = _as_numpy(x, "x").astype(float), _as_numpy(y, "y").astype(float)
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"need at least 3 pairs of equal length, got {len(a)} and {len(b)}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise ValueError("one of the two sequences is constant, so its rank correlation is undefined")
    ra, rb = _ranks(a), _ranks(b)
    rho = float(_pearson(ra, rb[None])[0])
    n = len(a)
    exact = math.factorial(n) <= 40_320
    if exact:
        permuted = np.array([rb[list(order)] for order in itertools.permutations(range(n))])
        null = _pearson(ra, permuted)
        p = float(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    else:
        rng = np.random.default_rng(seed)
        permuted = np.array([rng.permutation(rb) for _ in range(n_perm)])
        null = _pearson(ra, permuted)
        p = float((1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + n_perm))
    return SpearmanTest(rho, p, n, exact)


def benjamini_hochberg(p_values: ArrayLike, q: float = 0.05) -> np.ndarray:
    """Which hypotheses are rejected at false-discovery rate ``q`` (Benjamini–Hochberg step-up), bool [m].

    The k smallest p-values are rejected for the largest k with p_(k) ≤ k q / m.
    """
    p = _as_numpy(p_values, "p_values").astype(float)
    if ((p < 0) | (p > 1)).any() or not 0 < q < 1:
        raise ValueError("p-values must lie in [0, 1] and 0 < q < 1")
    order = np.argsort(p)
    m = len(p)
    passed = p[order] <= q * np.arange(1, m + 1) / m
    rejected = np.zeros(m, dtype=bool)
    if passed.any():
        rejected[order[: np.nonzero(passed)[0].max() + 1]] = True
    return rejected
