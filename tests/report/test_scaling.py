"""Chinchilla approach-3 fit: Epoch AI's replication, synthetic recovery, the optimiser, bad input."""

import time

import numpy as np
import pytest
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from moe_morpheus.report.scaling import (
    CHINCHILLA_CSV,
    ChinchillaFit,
    fit_chinchilla,
    grid_starts,
    huber_objective,
    lbfgsb_lockstep,
    load_chinchilla_runs,
)

# Hoffmann et al. (2022) approach 3, unrounded, in log space: A = e^a = 406.4, B = e^b = 410.7, E = e^e = 1.69.
PAPER = ChinchillaFit(a=6.0073404, b=6.0179186, e=0.5267228, alpha=0.33917084, beta=0.2849083, loss=0.0,
                      n_runs=0, delta=1e-3, n_starts=0, converged=True)

TRUE = {"E": 1.8, "A": 400.0, "B": 1500.0, "alpha": 0.33, "beta": 0.30}


@pytest.fixture(scope="module")
def epoch_runs():
    return load_chinchilla_runs()


@pytest.fixture(scope="module")
def epoch_fit(epoch_runs):
    start = time.perf_counter()
    fit = fit_chinchilla(*epoch_runs, bootstrap=100)
    print(f"\nEpoch fit + 100 bootstrap replicates: {time.perf_counter() - start:.2f} s")
    return fit


def synthetic_runs(noise=1e-3, seed=0):
    # 8 model sizes x 8 token counts, log-normal noise on the loss (sd 0.1%).
    n, d = np.meshgrid(np.logspace(7, 10, 8), np.logspace(9, 12, 8))
    n, d = n.ravel(), d.ravel()
    law = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    return n, d, law * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.size))


def test_load_chinchilla_runs():
    n, d, loss = load_chinchilla_runs()
    assert len(n) == len(d) == len(loss) == 240
    n_all, d_all, loss_all = load_chinchilla_runs(drop_highest_loss=0)
    assert len(n_all) == 245
    assert loss.max() < np.sort(loss_all)[-5]  # the 5 dropped are the highest losses
    # First data row of the CSV: N = 6795600349.29, C = 9.9939e18, so D = C / (6 N).
    first = CHINCHILLA_CSV.read_text().splitlines()[1].split(",")
    assert n_all[0] == float(first[3]) and d_all[0] == pytest.approx(float(first[4]) / (6 * float(first[3])))


def test_grid_starts():
    starts = grid_starts()
    assert starts.shape == (4500, 5) == (5 * 5 * 5 * 6 * 6, 5)
    assert len(np.unique(starts, axis=0)) == 4500
    assert starts.min(0).tolist() == [0, 0, -1, 0, 0] and starts.max(0).tolist() == [25, 25, 1, 2, 2]


def test_epoch_fit_reproduces_published_values(epoch_fit):
    fit = epoch_fit
    print(f"E={fit.E:.4f} A={fit.A:.1f} B={fit.B:.0f} alpha={fit.alpha:.4f} beta={fit.beta:.4f} "
          f"loss={fit.loss:.6g}; 95% CI {fit.intervals}")
    assert fit.n_runs == 240 and fit.n_starts == 4500 and fit.converged
    assert abs(fit.E - 1.817) < 0.005
    assert abs(fit.alpha - 0.347) < 0.005
    assert abs(fit.beta - 0.367) < 0.005
    assert fit.A == pytest.approx(477.8, rel=0.01)
    assert fit.B == pytest.approx(2143, rel=0.01)


def test_bootstrap_intervals(epoch_fit):
    ci = epoch_fit.intervals
    assert epoch_fit.bootstrap_samples.shape == (100, 5)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert ci[name][0] < getattr(epoch_fit, name) < ci[name][1], name
    # Besiroglu et al.'s 95% intervals (maximum-likelihood fit): E (1.769, 1.871), alpha
    # (0.317, 0.373), beta (0.331, 0.415). The Huber-fit bootstrap should be about as wide.
    for name, (lo, hi) in {"E": (1.769, 1.871), "alpha": (0.317, 0.373), "beta": (0.331, 0.415)}.items():
        assert ci[name][0] == pytest.approx(lo, abs=0.02) and ci[name][1] == pytest.approx(hi, abs=0.02), name


@pytest.fixture(scope="module")
def synthetic_fit():
    start = time.perf_counter()
    fit = fit_chinchilla(*synthetic_runs(), bootstrap=2, seed=3)
    print(f"\nsynthetic fit (64 runs, 4500 starts, 2 replicates): {time.perf_counter() - start:.2f} s")
    return fit


def test_bootstrap_replicate_is_the_resample_optimum(synthetic_fit):
    # The reduced restarts of a replicate (from the full-data basins, tight tolerances) must land
    # where L-BFGS from the grid (every 9th start) lands on the same resample.
    n, d, loss = synthetic_runs()
    counts = np.random.default_rng(3).multinomial(len(n), [1 / len(n)] * len(n), size=2)
    idx = np.repeat(np.arange(len(n)), counts[0])
    log_n, log_d, log_l = np.log(n[idx]), np.log(d[idx]), np.log(loss[idx])
    ends, _ = lbfgsb_lockstep(lambda x, rows: huber_objective(x, log_n, log_d, log_l, 1e-3), grid_starts()[::9])
    a, b, e, alpha, beta = ends[np.argmin(huber_objective(ends, log_n, log_d, log_l, 1e-3)[0])]
    np.testing.assert_allclose(synthetic_fit.bootstrap_samples[0], [np.exp(e), np.exp(a), np.exp(b), alpha, beta], rtol=1e-4)


def test_synthetic_recovery(synthetic_fit):
    fit = synthetic_fit
    print(f"E={fit.E:.4f} A={fit.A:.1f} B={fit.B:.1f} alpha={fit.alpha:.4f} beta={fit.beta:.4f}")
    assert fit.E == pytest.approx(TRUE["E"], abs=0.01)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.005)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=0.005)
    assert fit.A == pytest.approx(TRUE["A"], rel=0.05)
    assert fit.B == pytest.approx(TRUE["B"], rel=0.05)


def test_compute_optimal(epoch_fit):
    # The Epoch fit (docs/design.md#scaling-fits) at C = 1e21 -> N = 2.79B, D = 59.7B; 5.76e23 -> 73.2B, 1.31T.
    n_opt, d_opt = epoch_fit.compute_optimal(1e21)
    print(f"C=1e21: N_opt={n_opt:.4g}, D_opt={d_opt:.4g}")
    assert n_opt == pytest.approx(2.79e9, rel=0.01) and d_opt == pytest.approx(59.7e9, rel=0.01)
    assert 6 * n_opt * d_opt == pytest.approx(1e21)
    n_opt, d_opt = epoch_fit.compute_optimal(5.76e23)
    assert n_opt == pytest.approx(73.2e9, rel=0.01) and d_opt == pytest.approx(1.31e12, rel=0.01)
    # The closed form is the minimum of L along the iso-compute curve D = C / (6N).
    grid_n = np.logspace(8, 11, 30001)
    losses = epoch_fit.predict(grid_n, 1e21 / (6 * grid_n))
    assert grid_n[np.argmin(losses)] == pytest.approx(epoch_fit.compute_optimal(1e21)[0], rel=1e-3)
    n_arr, _ = epoch_fit.compute_optimal(np.array([1e20, 1e22]))
    assert n_arr.shape == (2,)
    with pytest.raises(ValueError, match="positive"):
        epoch_fit.compute_optimal(0.0)


def test_paper_law_predict_and_exponents():
    assert (PAPER.E, PAPER.A, PAPER.B) == pytest.approx((1.69, 406.4, 410.7), rel=3e-3)
    # Chinchilla itself: 70B params, 1.4T tokens.
    expected = np.exp(0.5267228) + np.exp(6.0073404) / 70e9 ** 0.33917084 + np.exp(6.0179186) / 1.4e12 ** 0.2849083
    assert PAPER.predict(70e9, 1.4e12) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.921, abs=1e-3)  # 1.693 + 0.085 + 0.142
    # Approach 3's exponents: N_opt ~ C^0.46, D_opt ~ C^0.54.
    a, b = PAPER.compute_optimal_exponents
    assert (round(a, 2), round(b, 2)) == (0.46, 0.54)


def test_lockstep_equals_scipy_minimize(epoch_runs):
    log_n, log_d, log_l = (np.log(x) for x in epoch_runs)

    def one(p):
        f, g = huber_objective(p[None], log_n, log_d, log_l, 1e-3)
        return f[0], g[0]

    starts = grid_starts()[::450]  # 10 starts spread over the grid
    ends, converged = lbfgsb_lockstep(lambda x, rows: huber_objective(x, log_n, log_d, log_l, 1e-3), starts)
    # One BLAS thread for the reference too: threaded OpenBLAS makes each setulb call ~100x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        refs = [minimize(one, start, jac=True, method="L-BFGS-B") for start in starts]
    for end, conv, ref in zip(ends, converged, refs):
        np.testing.assert_allclose(end, ref.x, rtol=0, atol=1e-9)
        assert conv == ref.success


def test_lockstep_iteration_limit(epoch_runs):
    # maxiter stops a start as minimize() does: same point after 3 iterations, not converged.
    log_n, log_d, log_l = (np.log(x) for x in epoch_runs)
    start = grid_starts()[1234]
    ends, converged = lbfgsb_lockstep(lambda x, rows: huber_objective(x, log_n, log_d, log_l, 1e-3),
                                      start[None], maxiter=3)
    with threadpool_limits(limits=1, user_api="blas"):
        ref = minimize(lambda p: tuple(v[0] for v in huber_objective(p[None], log_n, log_d, log_l, 1e-3)),
                       start, jac=True, method="L-BFGS-B", options={"maxiter": 3})
    assert ref.nit == 3 and not ref.success and not converged[0]
    np.testing.assert_allclose(ends[0], ref.x, rtol=0, atol=1e-12)


def test_gradient_matches_finite_differences(epoch_runs):
    log_n, log_d, log_l = (np.log(x) for x in epoch_runs)
    rng = np.random.default_rng(0)
    # Random points near the optimum (residuals on both sides of delta) and far from it.
    theta = np.concatenate([[6.17, 7.67, 0.6, 0.347, 0.367] + rng.normal(0, 0.05, (4, 5)),
                            grid_starts()[rng.integers(0, 4500, 4)] + rng.normal(0, 0.1, (4, 5))])
    weights = rng.integers(0, 3, (len(theta), len(log_n))).astype(float)
    for w in (None, weights):
        _, grad = huber_objective(theta, log_n, log_d, log_l, 1e-3, w)
        h = 1e-6
        for j in range(5):
            step = np.zeros(5)
            step[j] = h
            f_plus, _ = huber_objective(theta + step, log_n, log_d, log_l, 1e-3, w)
            f_minus, _ = huber_objective(theta - step, log_n, log_d, log_l, 1e-3, w)
            np.testing.assert_allclose(grad[:, j], (f_plus - f_minus) / (2 * h), rtol=1e-4,
                                       atol=1e-6 * np.abs(grad).max())


def test_huber_objective_value():
    # One run, one parameter row, written out: LSE of (a - alpha log N, b - beta log D, e).
    n, d, loss = np.array([1e9]), np.array([2e10]), np.array([2.5])
    theta = np.array([[6.0, 7.0, 0.5, 0.3, 0.35]])
    r = np.log(np.exp(6 - 0.3 * np.log(1e9)) + np.exp(7 - 0.35 * np.log(2e10)) + np.exp(0.5)) - np.log(2.5)
    f, _ = huber_objective(theta, np.log(n), np.log(d), np.log(loss), 1e-3)
    assert abs(r) > 1e-3 and f[0] == pytest.approx(1e-3 * (abs(r) - 0.5e-3))  # linear part
    f, _ = huber_objective(theta, np.log(n), np.log(d), np.log(loss), 1.0)
    assert f[0] == pytest.approx(0.5 * r * r)  # quadratic part


def test_bad_input():
    n, d, loss = synthetic_runs()
    with pytest.raises(ValueError, match="one entry per run"):
        fit_chinchilla(n, d[:-1], loss)
    with pytest.raises(ValueError, match="finite and positive"):
        fit_chinchilla(n, np.where(np.arange(len(d)) == 3, 0.0, d), loss)
    with pytest.raises(ValueError, match="finite and positive"):
        fit_chinchilla(n, d, np.where(np.arange(len(loss)) == 0, np.nan, loss))
    with pytest.raises(ValueError, match="1-D"):
        fit_chinchilla(n.reshape(8, 8), d, loss)
    with pytest.raises(ValueError, match="4 runs cannot determine"):
        fit_chinchilla(n[:4], d[:4], loss[:4])
    with pytest.raises(ValueError, match="delta"):
        fit_chinchilla(n, d, loss, delta=0.0)
    with pytest.raises(ValueError, match="confidence"):
        fit_chinchilla(n, d, loss, bootstrap=10, confidence=1.5)
