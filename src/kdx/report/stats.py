"""Two rows of seeds compared, with scipy: Welch's t, its p-value and 95 % interval of the
difference, a paired t-test over the seeds both rows ran, and how many seeds per row would resolve
the observed difference.

Seeds needed (:func:`seeds_needed`): the smallest n per row at which a two-sided two-sample t-test
(α = 0.05, df = 2n − 2) has power ≥ 0.8 against the observed standardised difference
d = |Δ| / sqrt((s_a² + s_b²) / 2); the power is 1 − F(t_crit) + F(−t_crit) for the noncentral t
distribution F with noncentrality d·sqrt(n/2) (``scipy.stats.nct``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000  # above this, "more than 1000"


@dataclass
class Comparison:
    """``a`` against ``b``: Δ = mean(a) − mean(b)."""

    delta: float = math.nan
    t: float = math.nan
    df: float = math.nan
    p: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    paired_t: float = math.nan
    paired_p: float = math.nan
    paired_n: int = 0  # seeds both rows ran (the pairs)
    seeds_needed: float = math.nan  # per row; inf when Δ = 0, NaN when it cannot be estimated


def _std(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def seeds_needed(
    delta: float, std_a: float, std_b: float, alpha: float = ALPHA, power: float = POWER
) -> float:
    """Seeds per row for a two-sided two-sample t-test to detect ``delta`` with ``power`` (see the
    module docstring); ``inf`` for no difference, NaN without both stds, ``MAX_SEEDS + 1`` beyond."""
    from scipy import stats

    if any(math.isnan(x) for x in (delta, std_a, std_b)):
        return math.nan
    if delta == 0:
        return math.inf
    pooled = math.sqrt((std_a**2 + std_b**2) / 2)
    if pooled == 0:
        return 2.0
    d = abs(delta) / pooled
    for n in range(2, MAX_SEEDS + 1):
        df = 2 * n - 2
        crit = stats.t.ppf(1 - alpha / 2, df)
        nc = d * math.sqrt(n / 2)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return float(n)
    return float(MAX_SEEDS + 1)


def compare(a: Mapping[object, float], b: Mapping[object, float], confidence: float = 0.95) -> Comparison:
    """Row ``a`` against row ``b``, each ``{seed: value}``: Welch's test (``ttest_ind(equal_var=False)``)
    with its interval, the paired test (``ttest_rel``) on the seeds both hold when there are two or
    more, and the seeds needed. Figures a side with fewer than two values cannot give are NaN."""
    from scipy import stats

    xa, xb = list(a.values()), list(b.values())
    out = Comparison()
    if not xa or not xb:
        return out
    out.delta = sum(xa) / len(xa) - sum(xb) / len(xb)
    if len(xa) >= 2 and len(xb) >= 2 and (_std(xa) > 0 or _std(xb) > 0):
        res = stats.ttest_ind(xa, xb, equal_var=False)
        ci = res.confidence_interval(confidence)
        out.t, out.df, out.p = float(res.statistic), float(res.df), float(res.pvalue)
        out.ci_low, out.ci_high = float(ci.low), float(ci.high)
    shared = sorted(set(a) & set(b), key=str)
    out.paired_n = len(shared)
    if len(shared) >= 2:
        diffs = [a[s] - b[s] for s in shared]
        if any(d != diffs[0] for d in diffs):
            res = stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared])
            out.paired_t, out.paired_p = float(res.statistic), float(res.pvalue)
    out.seeds_needed = seeds_needed(out.delta, _std(xa), _std(xb))
    return out
