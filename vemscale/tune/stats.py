"""Seed statistics: per-arm mean, sample standard deviation and n, and two-sided Mann-Whitney U between arms.

Mann-Whitney U makes no normality assumption, which suits a handful of seeds per arm (RETINA compares
pre-training arms this way). With 3 vs 3 seeds the smallest two-sided p-value possible is 0.1, with 2 vs 2 it
is 1/3: a few seeds can show a consistent ordering, not a significant one.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Sequence


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """mean, std (sample, ddof=1; None below 2 values), min, max, n over the finite values."""
    xs = _finite(values)
    n = len(xs)
    mean = sum(xs) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(xs) if xs else None, "max": max(xs) if xs else None}


def arm_stats(by_arm: dict[str, Sequence[float | None]]) -> dict[str, dict[str, Any]]:
    return {arm: describe(values) for arm, values in by_arm.items()}


def mann_whitney(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    """Two-sided Mann-Whitney U of a vs b (scipy's exact test when it applies): U of a, p, the sizes.

    U and p are None when either side has no values.
    """
    from scipy.stats import mannwhitneyu

    xa, xb = _finite(a), _finite(b)
    if not xa or not xb:
        return {"u": None, "p": None, "n_a": len(xa), "n_b": len(xb)}
    res = mannwhitneyu(xa, xb, alternative="two-sided")
    p = float(res.pvalue)
    return {"u": float(res.statistic), "p": p if math.isfinite(p) else None, "n_a": len(xa), "n_b": len(xb)}


def pairwise(by_arm: dict[str, Sequence[float | None]]) -> list[dict[str, Any]]:
    """Mann-Whitney U between each pair of arms, in the arms' order."""
    return [{"arm_a": a, "arm_b": b, **mann_whitney(by_arm[a], by_arm[b])} for a, b in combinations(by_arm, 2)]
