"""The MoE law L(N, D, E): recovery of known parameters, the effective-parameter multiplier, the
compute-optimal frontier against Chinchilla's closed form, and bad input."""

import numpy as np
import pytest

from moe_morpheus.report.moe_scaling import NAMES, MoEFit, fit_moe_law
from moe_morpheus.report.scaling import ChinchillaFit

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
    assert fit.samples.shape == (20, len(NAMES))


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


def test_compute_optimal_matches_chinchillas_closed_form_when_gamma_is_zero():
    # With gamma = 0, E experts scale A by E^-delta: Hoffmann et al.'s eq. 4 with that A.
    fit = MoEFit(a=np.log(400.0), b=np.log(1500.0), e=np.log(1.8), alpha=0.33, beta=0.30, delta=0.1, gamma=0.0,
                 n0=N0, loss=0.0, n_runs=0, converged=True)
    dense = ChinchillaFit(a=np.log(400.0 / 8 ** 0.1), b=np.log(1500.0), e=np.log(1.8), alpha=0.33, beta=0.30,
                          loss=0.0, n_runs=0, delta=1e-3, n_starts=0, converged=True)
    c = np.array([1e18, 1e21])
    n_opt, d_opt, l_opt = fit.compute_optimal(c, 8)
    n_ref, d_ref = dense.compute_optimal(c)
    np.testing.assert_allclose(n_opt, n_ref, rtol=4e-3)
    np.testing.assert_allclose(n_opt * d_opt, c / 6, rtol=1e-12)
    np.testing.assert_allclose(l_opt, dense.predict(n_ref, d_ref), rtol=1e-6)


@pytest.mark.parametrize("e,message", [([1.0] * 12, ">= 2 expert counts"), ([0.5] + [8.0] * 11, "E must give"),
                                       ([1.0, 8.0] * 5, "E must give")])
def test_bad_input(e, message):
    n = np.repeat([1e6, 2e6, 4e6], 4)
    with pytest.raises(ValueError, match=message):
        fit_moe_law(n, n * 20, e, np.full(12, 3.0))
    with pytest.raises(ValueError, match="at least 8"):
        fit_moe_law(n[:7], n[:7] * 20, [1, 8] * 3 + [1], np.full(7, 3.0))
