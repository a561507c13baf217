"""The one verdict rule of reports, sweep summaries and conclusions: paired seeds, a t-interval.

Two arms of a comparison (configurations, or roles of a staged sweep) that ran with the same
seed are paired: the seed fixes initialisation, data order and span sampling, so seed-to-seed
noise that both arms share cancels in the difference. For the n seeds present in both arms,
d_i = loss_A(seed i) - loss_B(seed i); the mean paired difference d has the 95% Student-t
interval d +- t(0.975, n - 1) * s / sqrt(n), s the sample standard deviation of the d_i
(ddof 1). A verdict ("A beats B by ...") needs n >= 3 and an interval that excludes 0;
otherwise the comparison is "no verdict", with the interval when one exists (n >= 2). A seed
present in one arm only has no partner: it is dropped and the text says so.

Losses: lower is better, so A beats B when the interval of loss_A - loss_B lies below 0.

Several rivals at once (``rank_and_compare``): the best arm is picked by its observed mean and
then compared with each of the m others, so m intervals are read together and the pick itself
favours arms whose noise was lucky. Each of those intervals is widened to 1 - 0.05 / m
(Bonferroni), which keeps the chance of any false verdict among the m at or below 5%
whichever arm was picked; with two arms (m = 1) it is the plain 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
MIN_SEEDS = 3


@dataclass(frozen=True)
class PairedResult:
    """loss_A - loss_B over the seeds both arms have.

    diff: mean paired difference (NaN without a pair); lo, hi: its CONFIDENCE t-interval (NaN
    with fewer than two pairs); n: pairs; seeds: the paired seeds; only_a / only_b: seeds one
    arm has and the other lacks (dropped).
    """

    diff: float
    lo: float
    hi: float
    n: int
    seeds: tuple
    only_a: tuple = ()
    only_b: tuple = ()
    confidence: float = CONFIDENCE

    @property
    def decided(self) -> bool:
        """A verdict: enough pairs and an interval that excludes 0."""
        return self.n >= MIN_SEEDS and (self.hi < 0 or self.lo > 0)

    @property
    def a_wins(self) -> bool:
        """A has the lower loss and it is a verdict."""
        return self.decided and self.hi < 0


def _finite(values: Mapping) -> dict:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def paired_interval(a: Mapping, b: Mapping, confidence: float = CONFIDENCE) -> PairedResult:
    """Pair ``a`` and ``b`` (seed -> final loss; non-finite values count as missing) on their
    common seeds and return the mean of a - b with its Student-t interval (n - 1 dof)."""
    a, b = _finite(a), _finite(b)
    seeds = tuple(sorted(set(a) & set(b)))
    only_a = tuple(sorted(set(a) - set(b)))
    only_b = tuple(sorted(set(b) - set(a)))
    d = np.array([a[s] - b[s] for s in seeds])
    n = len(d)
    if n == 0:
        return PairedResult(float("nan"), float("nan"), float("nan"), 0, seeds, only_a, only_b, confidence)
    mean = float(d.mean())
    if n == 1:
        return PairedResult(mean, float("nan"), float("nan"), 1, seeds, only_a, only_b, confidence)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return PairedResult(mean, mean - half, mean + half, n, seeds, only_a, only_b, confidence)


def _seeds(seeds: tuple) -> str:
    return ", ".join(f"{s:g}" if isinstance(s, float) else str(s) for s in seeds)


def interval_text(r: PairedResult, digits: int = 4) -> str:
    """'d [lo, hi] (n=..)', the parts that exist."""
    if r.n == 0:
        return "(n=0)"
    if r.n == 1:
        return f"{r.diff:+.{digits}f} (n=1, no interval)"
    return f"{r.diff:+.{digits}f} [{r.lo:+.{digits}f}, {r.hi:+.{digits}f}] ({_level(r)}n={r.n})"


def _level(r: PairedResult) -> str:
    """'' at the usual 95%, else the level of a widened (Bonferroni) interval, e.g. '97.5%, '."""
    return "" if math.isclose(r.confidence, CONFIDENCE) else f"{100 * r.confidence:.3g}%, "


def verdict_text(r: PairedResult, a: str, b: str, digits: int = 4) -> str:
    """One sentence: "A beats B by d [lo, hi] (n=..)" (d > 0: how much lower A's loss is) when
    the interval excludes 0 with n >= 3; else "no verdict: A - B = d [lo, hi] (n=..)" or
    "no verdict (n<3): ..."; unpaired seeds are named as dropped."""
    if r.decided:
        win, lose, sign = (a, b, -1.0) if r.a_wins else (b, a, 1.0)
        lo, hi = sorted((sign * r.lo, sign * r.hi))
        text = (f"{win} beats {lose} by {sign * r.diff:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] "
                f"({_level(r)}n={r.n})")
    elif r.n < MIN_SEEDS:
        text = f"no verdict (n<{MIN_SEEDS}): {a} - {b} = {interval_text(r, digits)}"
    else:
        text = f"no verdict: {a} - {b} = {interval_text(r, digits)}"
    dropped = [f"seed(s) {_seeds(s)} only in {name}" for s, name in ((r.only_a, a), (r.only_b, b)) if s]
    if dropped:
        text += f"; unpaired, dropped: {'; '.join(dropped)}"
    return text


def rank_and_compare(arms: Mapping[str, Mapping]) -> tuple[list[str], list[tuple[str, str, PairedResult]]]:
    """Arms (name -> seed -> final loss) ordered by their mean loss, best first (an arm without
    a finite value is left out), and the best arm paired against each other arm:
    ``(best, other, paired_interval(best, other))``, each interval at 1 - 0.05 / m for m
    comparisons (Bonferroni: see the module docstring). Only arms that are rivals belong here
    (configurations at one compute), never two budgets of one configuration."""
    means = {name: float(np.mean(list(v.values()))) for name, losses in arms.items() if (v := _finite(losses))}
    ranking = sorted(means, key=means.__getitem__)
    if not ranking:
        return [], []
    best, others = ranking[0], ranking[1:]
    confidence = 1 - (1 - CONFIDENCE) / max(len(others), 1)
    return ranking, [(best, other, paired_interval(arms[best], arms[other], confidence)) for other in others]
