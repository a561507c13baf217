"""The MoE law L(N, D, E): recovery of known parameters, the effective-parameter multiplier, the
compute-optimal frontier against Chinchilla's closed form, and bad input."""

import numpy as np
import pytest

from moe_morpheus.report.moe_scaling import NAMES, MoEFit, fit_moe_law
from moe_morpheus.report.scaling import distinct_levels

# Chinchilla-like values with a MoE term: 64 experts are worth 64^(0.1 / 0.33) = 3.5x the
# parameters at N0 = 1e8, less at larger N (gamma < 0, the trend Clark et al. 2022 report).
TRUE = {"L0": 1.8, "A": 400.0, "B": 1500.0, "alpha": 0.33, "beta": 0.30, "delta": 0.10, "gamma": -0.01}
N0 = 1e8


def law(n, d, e):
    t = TRUE
    return t["L0"] + t["A"] / (n ** t["alpha"] * e ** (t["delta"] + t["gamma"] * np.log(n / N0))) + t["B"] / d ** t["beta"]


@pytest.fixture(scope="module")
def synthetic():
    # 4 sizes x 4 token counts x {dense, 8, 64 experts}; log-normal noise of 0.05% on the loss.
    n, d, e = (a.ravel() for a in np.meshgrid(np.logspace(7, 10, 4), np.logspace(9, 12, 4), [1, 8, 64]))
    loss = law(n, d, e) * np.exp(np.random.default_rng(0).normal(0.0, 5e-4, n.size))
    return n, d, e, loss, fit_moe_law(n, d, e, loss, n0=N0, bootstrap=20)


def test_known_parameters_are_recovered_within_2_percent(synthetic):
    *_, fit = synthetic
    print(fit.law(), fit.intervals)
    assert fit.converged and fit.n_runs == 48
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=0.02), name
    for name in ("alpha", "beta", "delta", "gamma"):
        lo, hi = fit.intervals[name]
        assert lo < getattr(fit, name) < hi and hi - lo < 0.1 * abs(TRUE[name]), name
    assert fit.bootstrap_samples.shape == (20, len(NAMES))


def test_predictions_and_the_effective_parameter_multiplier(synthetic):
    n, d, e, loss, fit = synthetic
    assert np.max(np.abs(np.log(fit.predict(n, d, e) / loss))) < 3e-3
    # A dense model of multiplier x N parameters has the loss of the E-expert model of N.
    for size in (1e7, 1e9):
        m = fit.multiplier(size, 64)
        assert fit.predict(m * size, 1e10, 1) == pytest.approx(fit.predict(size, 1e10, 64), rel=1e-12)
        exact = 64 ** ((TRUE["delta"] + TRUE["gamma"] * np.log(size / N0)) / TRUE["alpha"])
        assert m == pytest.approx(exact, rel=0.03)
        lo, hi = fit.multiplier_interval(size, 64)
        assert lo <= m <= hi
    assert fit.multiplier(1e7, 64) > fit.multiplier(1e9, 64) > 1 and fit.multiplier(1e8, 1) == 1


def test_compute_optimal_is_the_brute_force_minimum_at_equal_compute(synthetic):
    # Against an independent search: the loss on a fine grid of sizes at each compute, with the
    # fitted gamma != 0 (which moves the parameter exponent to alpha + gamma ln E).
    *_, fit = synthetic
    assert abs(fit.gamma) > 0.005
    for e in (1, 8, 64):
        for c in (1e18, 1e21):
            n_opt, d_opt, l_opt = fit.compute_optimal(c, e)
            grid = np.geomspace(n_opt[0] / 30, n_opt[0] * 30, 20001)
            losses = fit.predict(grid, c / (6 * grid), e)
            assert n_opt[0] == pytest.approx(grid[np.argmin(losses)], rel=1e-3)
            assert l_opt[0] == pytest.approx(losses.min(), rel=1e-9) and n_opt[0] * d_opt[0] == pytest.approx(c / 6)


def test_gamma_zero_is_chinchilla_with_a_scaled_by_e_to_the_minus_delta():
    fit = MoEFit(a=np.log(400.0), b=np.log(1500.0), e=np.log(1.8), alpha=0.33, beta=0.30, delta=0.1, gamma=0.0,
                 n0=N0, loss=0.0, n_runs=0, converged=True)
    law = fit.at_experts(8)
    assert law.A == pytest.approx(400.0 / 8 ** 0.1) and law.alpha == 0.33 and law.B == pytest.approx(1500.0)
    with pytest.raises(ValueError, match="not positive"):
        MoEFit(a=0.0, b=0.0, e=0.0, alpha=0.1, beta=0.3, delta=0.0, gamma=-0.1, n0=N0, loss=0.0, n_runs=0,
               converged=True).at_experts(64)


def test_a_one_size_study_is_not_a_ladder():
    """Study 1's shape: dense and two MoE variants at one size (their active params 1% apart,
    the router's) and one budget, 3 seeds each. Exact-value counting saw 2-3 sizes and fitted a
    law with a negative alpha; within 10% they are one level, and the fit refuses."""
    n = np.repeat([1.9108e6, 1.9108e6, 1.9272e6], 3)
    d = n * 2.0
    e = np.repeat([1.0, 8.0, 64.0], 3)
    with pytest.raises(ValueError, match="1 size.*1 token count"):
        fit_moe_law(n, d, e, np.linspace(4.8, 5.1, 9))
    assert distinct_levels([1.0, 1.05, 1.2, 1.3, 2.0]) == 3  # 1.0/1.05, 1.2/1.3, 2.0
    assert distinct_levels([]) == 0


@pytest.mark.parametrize("e,message", [([1.0] * 12, ">= 2 expert counts"), ([0.5] + [8.0] * 11, "E must give"),
                                       ([1.0, 8.0] * 5, "E must give")])
def test_bad_input(e, message):
    n = np.repeat([1e6, 2e6, 4e6], 4)
    with pytest.raises(ValueError, match=message):
        fit_moe_law(n, n * 20, e, np.full(12, 3.0))
    with pytest.raises(ValueError, match="at least 8"):
        fit_moe_law(n[:7], n[:7] * 20, [1, 8] * 3 + [1], np.full(7, 3.0))
