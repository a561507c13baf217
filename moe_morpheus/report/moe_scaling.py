"""A MoE scaling law: final loss as a function of active parameters N, tokens D and experts E.

    L(N, D, E) = L0 + A / (N^alpha * E^(delta + gamma ln(N / N0))) + B / D^beta

(docs/design.md#moe-scaling-law). E = 1 is the dense model, which makes the law Chinchilla's
approach 3 (Hoffmann et al. 2022) for dense runs: one fit over the dense and the MoE ladders
shares L0, B, beta and alpha, and the experts act only on the parameter term.

Why this form. The parameter term is Clark et al. (2022, "Unified Scaling Laws for Routed
Language Models") in Chinchilla's additive shape: their law, log L = a log N + b log E +
c log N log E + d, fitted at one token count, makes the loss a power of E (b < 0) whose slope
changes with size (c > 0: the benefit shrinks as N grows). Here the power acts on the parameter
term only: delta plays the part of -b and gamma of -c (so gamma < 0 is their finding), measured
around N0 (the geometric mean of the runs' N, so that delta is the exponent at the ladder's own
scale, not at N = 1). Clark's saturation of E
(E_hat, which matters from about E = 256) is left out: the ladders have E <= 64. Krajewski et al.
(2024)'s law varies granularity at a fixed expansion rate (E = 64), while these ladders vary E at
granularity 2, so its G term could not be identified from them.

Effective parameters: a dense model matches an E-expert model of N active parameters (at any D)
when it has ``multiplier(N, E) = E^((delta + gamma ln(N / N0)) / alpha)`` times N parameters. At
a fixed E the law is Chinchilla's with alpha_E = alpha + gamma ln E (``at_experts``), which gives
the compute-optimal frontier per E in closed form.

The fit is :func:`moe_morpheus.report.scaling.fit_law` (summed Huber(1e-3) on log L, L-BFGS from
Chinchilla's 4500-start grid, here times delta in {0, 0.5}: 9,000 starts, gamma from 0) with
the expert terms as two features of the parameter term; intervals are percentile bootstrap
intervals over runs resampled with replacement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moe_morpheus.report.scaling import (
    ChinchillaFit,
    LogCoefficients,
    as_runs,
    distinct_levels,
    fit_law,
    grid_starts,
    percentile_intervals,
)

NAMES = ("L0", "A", "B", "alpha", "beta", "delta", "gamma")
DELTA_STARTS = (0.0, 0.5)


@dataclass(frozen=True)
class MoEFit(LogCoefficients):
    """A fitted L(N, D, E); see the module doc. ``a``, ``b``, ``e``: log A, log B, log L0.
    ``intervals``: bootstrap percentile intervals of NAMES; ``bootstrap_samples``: the replicates
    as rows of NAMES (None without bootstrap)."""

    a: float
    b: float
    e: float
    alpha: float
    beta: float
    delta: float
    gamma: float
    n0: float
    loss: float
    n_runs: int
    converged: bool
    intervals: dict[str, tuple[float, float]] | None = None
    bootstrap_samples: np.ndarray | None = field(default=None, repr=False)

    @property
    def L0(self) -> float:
        return float(np.exp(self.e))

    def law(self) -> str:
        return (f"L(N, D, E) = {self.L0:.3f} + {self.A:.4g} / (N^{self.alpha:.3f} E^({self.delta:.3f} "
                f"{self.gamma:+.3f} ln(N/{self.n0:.3g}))) + {self.B:.4g} / D^{self.beta:.3f}")

    def predict(self, N, D, E):
        """L(N, D, E), arrays broadcast."""
        return _predict(np.array([self.L0, self.A, self.B, self.alpha, self.beta, self.delta, self.gamma]),
                        self.n0, N, D, E)

    def multiplier(self, N, E):
        """Effective-parameter multiplier: dense parameters per active parameter of an E-expert model."""
        return _multiplier(np.array([self.alpha, self.delta, self.gamma]), self.n0, N, E)

    def multiplier_interval(self, N: float, E: float, confidence: float = 0.95) -> tuple[float, float]:
        """Percentile bootstrap interval of ``multiplier(N, E)`` at one size N."""
        if self.bootstrap_samples is None:
            raise ValueError("fit with bootstrap > 0 for intervals")
        values = _multiplier(self.bootstrap_samples[:, [3, 5, 6]].T, self.n0, float(N), E)
        (lo, hi), = percentile_intervals(values[:, None], ["m"], confidence).values()
        return lo, hi

    def at_experts(self, E: float) -> ChinchillaFit:
        """The law at a fixed E as Chinchilla's: E^-(delta + gamma ln(N/N0)) = E^-delta N0^(gamma ln E)
        N^-(gamma ln E), so alpha_E = alpha + gamma ln E and A_E = A E^-delta N0^(gamma ln E)."""
        log_e = float(np.log(E))
        alpha_e = self.alpha + self.gamma * log_e
        if not alpha_e > 0:
            raise ValueError(f"at E={E:g} the parameter exponent alpha + gamma ln E = {alpha_e:.3g} is not positive: "
                             f"the law has no compute-optimal size there")
        return ChinchillaFit(a=self.a - self.delta * log_e + self.gamma * log_e * np.log(self.n0), b=self.b, e=self.e,
                             alpha=alpha_e, beta=self.beta, loss=self.loss, n_runs=self.n_runs, delta=1e-3,
                             n_starts=0, converged=self.converged)

    def compute_optimal(self, C, E) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N_opt, D_opt, L_opt) minimising L(N, C / (6N), E) at compute C = 6 N D: Hoffmann et
        al.'s eq. 4 on :meth:`at_experts`."""
        law = self.at_experts(E)
        n_opt, d_opt = law.compute_optimal(np.atleast_1d(np.asarray(C, float)))
        return n_opt, d_opt, law.predict(n_opt, d_opt)


def _predict(params: np.ndarray, n0: float, N, D, E):
    l0, A, B, alpha, beta, delta, gamma = params
    N, D, E = (np.asarray(v, float) for v in (N, D, E))
    return l0 + A / (N ** alpha * E ** (delta + gamma * np.log(N / n0))) + B / D ** beta


def _multiplier(params, n0: float, N, E):
    alpha, delta, gamma = params
    return np.asarray(E, float) ** ((delta + gamma * np.log(np.asarray(N, float) / n0)) / alpha)


def starts() -> np.ndarray:
    """Chinchilla's 4500 starts x delta in DELTA_STARTS, gamma 0: rows (a, b, e, alpha, beta, delta, gamma)."""
    grid = grid_starts()
    return np.concatenate([np.column_stack([grid, np.full(len(grid), d), np.zeros(len(grid))])
                           for d in DELTA_STARTS])


def fit_moe_law(N, D, E, L, *, n0: float | None = None, bootstrap: int = 0, confidence: float = 0.95,
                seed: int = 0, huber_delta: float = 1e-3) -> MoEFit:
    """Fit L(N, D, E) to runs: N active parameters, D tokens, E experts (1 for dense), L final loss.

    Needs >= 8 runs (7 parameters), >= 2 expert counts, >= 3 sizes and >= 3 token counts
    (:func:`~moe_morpheus.report.scaling.distinct_levels`); ``n0`` defaults to the
    geometric mean of N."""
    n_arr, d_arr, l_arr = as_runs(N, D, L)
    e_arr = np.asarray(E, float)
    if e_arr.shape != n_arr.shape or np.any(~np.isfinite(e_arr)) or np.any(e_arr < 1):
        raise ValueError(f"E must give every run's number of experts (>= 1; 1 for dense), got {E!r}")
    if len(n_arr) < len(NAMES) + 1:
        raise ValueError(f"{len(n_arr)} runs cannot determine the law's {len(NAMES)} parameters: need at least "
                         f"{len(NAMES) + 1}")
    sizes, budgets = distinct_levels(n_arr), distinct_levels(d_arr)
    if len(np.unique(e_arr)) < 2 or sizes < 3 or budgets < 3:
        raise ValueError(f"the runs have {len(np.unique(e_arr))} expert count(s), {sizes} size(s) and {budgets} "
                         f"token count(s) (values within 10% are one): the law needs >= 2 expert counts (dense "
                         f"counts as 1) and >= 3 of each of the others")
    n0 = float(np.exp(np.mean(np.log(n_arr)))) if n0 is None else float(n0)
    log_e = np.log(e_arr)
    extra = np.stack([log_e, log_e * np.log(n_arr / n0)])
    best, loss, converged, boot = fit_law(np.log(n_arr), np.log(d_arr), np.log(l_arr), starts(), delta=huber_delta,
                                          extra=extra, bootstrap=bootstrap, confidence=confidence, seed=seed)
    a, b, e, alpha, beta, dl, gm = (float(v) for v in best)
    fit = MoEFit(a, b, e, alpha, beta, dl, gm, n0=n0, loss=loss, n_runs=len(n_arr), converged=converged)
    if boot is None:
        return fit
    samples = np.column_stack([np.exp(boot[:, 2]), np.exp(boot[:, 0]), np.exp(boot[:, 1]), boot[:, 3:]])
    return MoEFit(a, b, e, alpha, beta, dl, gm, n0=n0, loss=loss, n_runs=len(n_arr), converged=converged,
                  intervals=percentile_intervals(samples, NAMES, confidence), bootstrap_samples=samples)
