"""Chinchilla approach-3 scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta.

The procedure is Hoffmann et al. (2022) as they describe it, with nothing changed
(docs/design.md#scaling-fits): minimise the **summed** Huber(delta = 1e-3) loss of

    r_i = LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i,    A, B, E = exp(a), exp(b), exp(e)

with an analytic gradient and L-BFGS (scipy's L-BFGS-B, default tolerances) from every start of
the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}
(5 * 5 * 5 * 6 * 6 = 4500 starts), keeping the lowest loss. The summed loss matters: averaged
over the runs it is 240x smaller (~4e-6 at the optimum), and L-BFGS-B's ftol test (a change
<= 2.2e-9 * max(|f|, 1), absolute once f < 1) then ends runs early, near their starting points
(Besiroglu et al. 2024: how the published values came out off). On
Epoch AI's 240 runs this gives E = 1.817, A = 477.8, B = 2143, alpha = 0.347, beta = 0.367.

Speed: one ``scipy.optimize.minimize`` per start costs ~50 evaluations of ~100 us, so the grid
takes ~22 s (measured: 300 starts in 1.5 s). Instead all starts run in lockstep through scipy's
own L-BFGS-B routine (``setulb``, the reverse-communication core that ``minimize`` itself drives):
each round, every start that asks for f and g gets them from one vectorised numpy evaluation over
(starts x runs). The iterates are scipy's, start by start (a test compares them with
``minimize``). Measured on the 2-core development machine, busy with other jobs: 3.4 s of CPU
(4.9 s wall) for the 4500 starts on 240 runs, ~470k setulb calls and ~280k row evaluations.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# scipy's L-BFGS-B core, the routine scipy.optimize.minimize(method="L-BFGS-B") calls in a loop.
# Private API: its signature is that of scipy 1.17 (pinned in pyproject.toml);
# tests/test_scaling.py checks the lockstep driver against minimize() so a change shows up there.
from scipy.optimize import _lbfgsb
from threadpoolctl import threadpool_limits

PARAM_NAMES = ("a", "b", "e", "alpha", "beta")

# Hoffmann et al.'s grid of L-BFGS starts (docs/design.md#scaling-fits).
GRID = {
    "a": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "b": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "e": np.arange(-1.0, 1.0 + 1e-9, 0.5),
    "alpha": np.arange(0.0, 2.0 + 1e-9, 0.5),
    "beta": np.arange(0.0, 2.0 + 1e-9, 0.5),
}

CHINCHILLA_CSV = Path(__file__).resolve().parents[2] / "data" / "chinchilla" / \
    "chinchilla_fig4_epoch_svg_extracted.csv"


def grid_starts() -> np.ndarray:
    """The 4500 starts as rows (a, b, e, alpha, beta)."""
    return np.array(list(itertools.product(*(GRID[name] for name in PARAM_NAMES))))


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float, weights: np.ndarray | None = None,
                    extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss and its gradient for K parameter rows at once.

    theta: (K, 5 + m) rows (a, b, e, alpha, beta, theta_1..theta_m); weights: None or (K, n)
    per-run multiplicities (a bootstrap resample is integer weights); extra: None (m = 0) or (m, n)
    features x_j of the parameter term, which becomes a - alpha log N - sum_j theta_j x_j (the MoE
    law's expert terms, report/moe_scaling.py). Returns f (K,) and grad (K, 5 + m).

    With p_j = softmax of the three LSE terms and psi = clip(r, -delta, delta) = Huber'(r):
    df/da = sum psi p_1, df/dalpha = -sum psi p_1 log N, df/db = sum psi p_2,
    df/dbeta = -sum psi p_2 log D, df/de = sum psi p_3, df/dtheta_j = -sum psi p_1 x_j.
    """
    a, b, e, alpha, beta = (theta[:, j, None] for j in range(5))
    # In place where possible: at 4500 x 240 each temporary is 8.6 MB, and the objective is
    # most of the fit's time (~60 evaluations per start).
    w1 = alpha * log_n
    for j, x in enumerate(() if extra is None else extra):
        w1 += theta[:, 5 + j, None] * x
    np.subtract(a, w1, out=w1)  # a - alpha log N (- sum theta_j x_j)
    w2 = beta * log_d
    np.subtract(b, w2, out=w2)  # b - beta log D
    m = np.maximum(w1, w2)
    np.maximum(m, e, out=m)
    w1 -= m
    np.exp(w1, out=w1)
    w2 -= m
    np.exp(w2, out=w2)
    w3 = np.subtract(e, m)
    np.exp(w3, out=w3)
    total = w1 + w2
    total += w3
    r = np.log(total)
    r += m
    r -= log_l  # residual: LSE(...) - log L
    psi = np.clip(r, -delta, delta)
    r -= 0.5 * psi
    r *= psi  # Huber(r) = psi * (r - psi / 2): r^2 / 2 inside [-delta, delta], delta |r| - delta^2 / 2 outside
    psi /= total  # Huber'(r) / sum of exps: the softmax weights p_j = w_j / total
    if weights is not None:
        r *= weights
        psi *= weights
    w1 *= psi
    w2 *= psi
    w3 *= psi
    # Row sums, not matmuls: a row's result then does not depend on how many rows are evaluated
    # together, so lockstep iterates equal minimize()'s bit for bit.
    grad = np.stack([w1.sum(1), w2.sum(1), w3.sum(1), -(w1 * log_n).sum(1), -(w2 * log_d).sum(1),
                     *(-(w1 * x).sum(1) for x in (() if extra is None else extra))], axis=1)
    return r.sum(1), grad


def lbfgsb_lockstep(fun_and_grad, x0: np.ndarray, *, maxcor: int = 10, ftol: float = 2.2204460492503131e-09,
                    gtol: float = 1e-5, maxiter: int = 15000, maxfun: int = 15000,
                    maxls: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Unbounded L-BFGS-B from every row of x0, all in lockstep; defaults are minimize()'s.

    fun_and_grad(X, rows) -> (f, grad) evaluates the problems ``rows`` at the points X (one row
    each). Returns (x, converged): the final points (K, n) and whether each start met scipy's
    convergence test (task CONVERGENCE) rather than a limit or a line-search failure.
    """
    k_starts, n = x0.shape
    factr = ftol / np.finfo(float).eps
    zeros_f, nbd = np.zeros(n), np.zeros(n, np.int32)  # no bounds
    xs = [np.array(row, dtype=np.float64) for row in x0]
    gs = [np.zeros(n) for _ in range(k_starts)]
    fs = np.zeros(k_starts)
    state = [dict(wa=np.zeros(2 * maxcor * n + 5 * n + 11 * maxcor * maxcor + 8 * maxcor),
                  iwa=np.zeros(3 * n, np.int32), task=np.zeros(2, np.int32), lsave=np.zeros(4, np.int32),
                  isave=np.zeros(44, np.int32), dsave=np.zeros(29), ln_task=np.zeros(2, np.int32))
             for _ in range(k_starts)]
    nit, nfev = np.zeros(k_starts, int), np.zeros(k_starts, int)
    converged = np.zeros(k_starts, bool)
    running = list(range(k_starts))
    # setulb makes many tiny BLAS/LAPACK calls; OpenBLAS's threads cost ~100x their work there
    # (measured: 2.5 us per setulb call on one thread, 335 us with 2 threads on a busy machine).
    with threadpool_limits(limits=1, user_api="blas"):
        while running:
            wants_fg = []
            for k in running:
                st = state[k]
                while True:
                    _lbfgsb.setulb(maxcor, xs[k], zeros_f, zeros_f, nbd, fs[k], gs[k], factr, gtol, st["wa"],
                                   st["iwa"], st["task"], st["lsave"], st["isave"], st["dsave"], maxls,
                                   st["ln_task"])
                    task = st["task"][0]
                    if task == 3:  # FG: wants f and g at xs[k]
                        wants_fg.append(k)
                        break
                    if task != 1:  # CONVERGENCE (4), or a warning / abnormal line search: done
                        converged[k] = task == 4
                        break
                    nit[k] += 1  # NEW_X: one iteration done; minimize() checks its limits here
                    if nit[k] >= maxiter or nfev[k] > maxfun:
                        break
            if wants_fg:
                f, g = fun_and_grad(np.stack([xs[k] for k in wants_fg]), np.array(wants_fg))
                fs[wants_fg] = f
                for k, grad in zip(wants_fg, g):
                    gs[k][:] = grad
                nfev[wants_fg] += 1
            running = wants_fg
    return np.stack(xs), converged


# Sizes (or token counts) within 10% of each other are one level of a ladder: MoE variants of one
# size differ by their router's parameters (1.911M dense vs 1.927M with 64 experts on glm_tiny),
# and an exponent fitted across a 1% spread is noise, not a slope.
LEVEL_RATIO = 1.1


def distinct_levels(values, ratio: float = LEVEL_RATIO) -> int:
    """How many levels ``values`` take, values within ``ratio`` of the previous one counting as one."""
    levels, last = 0, None
    for v in np.sort(np.asarray(values, float)):
        if last is None or v > last * ratio:
            levels, last = levels + 1, v
    return levels


def as_runs(N, D, L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = []
    for name, values in (("N", N), ("D", D), ("L", L)):
        arr = np.asarray(values, dtype=float)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of runs, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must be finite and positive for every run (the fit takes logs); "
                             f"bad values at runs {np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))[:10].tolist()}")
        arrays.append(arr)
    if not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
        raise ValueError(f"N, D and L must have one entry per run: got {len(arrays[0])}, {len(arrays[1])}, "
                         f"{len(arrays[2])}")
    if len(arrays[0]) < len(PARAM_NAMES):
        raise ValueError(f"{len(arrays[0])} runs cannot determine the law's {len(PARAM_NAMES)} parameters "
                         f"(E, A, B, alpha, beta): need at least {len(PARAM_NAMES)}")
    return arrays[0], arrays[1], arrays[2]


class LogCoefficients:
    """A and B of a law fitted in log space as ``a`` and ``b`` (Chinchilla's and the MoE law's)."""

    a: float
    b: float

    @property
    def A(self) -> float:
        return float(np.exp(self.a))

    @property
    def B(self) -> float:
        return float(np.exp(self.b))


@dataclass(frozen=True)
class ChinchillaFit(LogCoefficients):
    """A fitted law L(N, D) = E + A / N^alpha + B / D^beta."""

    a: float  # log A
    b: float  # log B
    e: float  # log E
    alpha: float
    beta: float
    loss: float  # summed Huber loss at the optimum
    n_runs: int
    delta: float
    n_starts: int
    converged: bool  # the best start met L-BFGS-B's convergence test
    # Bootstrap percentile intervals for E, A, B, alpha, beta (None without bootstrap) and the
    # replicate fits as rows (E, A, B, alpha, beta).
    intervals: dict[str, tuple[float, float]] | None = None
    bootstrap_samples: np.ndarray | None = field(default=None, repr=False)

    @property
    def E(self) -> float:
        return float(np.exp(self.e))

    def predict(self, N, D):
        """Loss L(N, D) = E + A / N^alpha + B / D^beta (arrays broadcast)."""
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    @property
    def compute_optimal_exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ~ C^a, D_opt ~ C^b: beta / (alpha + beta), alpha / (alpha + beta)."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising L at compute C = 6 N D (Hoffmann et al. 2022, eq. 4).

        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
        G = (alpha A / (beta B))^(1/(alpha+beta)).
        """
        c6 = np.asarray(C, float) / 6.0
        if np.any(c6 <= 0):
            raise ValueError(f"compute budget C={C} must be positive")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        exp_n, exp_d = self.compute_optimal_exponents
        return g * c6 ** exp_n, c6 ** exp_d / g


def fit_chinchilla(N, D, L, delta: float = 1e-3, *, bootstrap: int = 0, confidence: float = 0.95,
                   bootstrap_starts: int = 5, seed: int = 0) -> ChinchillaFit:
    """Chinchilla approach 3 on runs (N parameters, D tokens, final loss L); see the module doc.

    bootstrap=n adds percentile confidence intervals from n fits on runs resampled with
    replacement. Each replicate does not rerun the 4500-start grid (n x ~3 s): it starts from the
    full-data fit and from the other distinct local minima the grid found on the full data (the
    ``bootstrap_starts`` lowest), since a resample moves the optimum within or between those basins,
    and runs L-BFGS to tight tolerances (see below). A resample is integer weights on the runs, so
    all replicates x starts run in one lockstep batch. Replicate j resamples with row j of
    ``np.random.default_rng(seed).multinomial(n_runs, [1 / n_runs] * n_runs, size=bootstrap)``.
    Measured on Epoch AI's 240 runs (bootstrap=200): E (1.775, 1.873), alpha (0.318, 0.369),
    beta (0.334, 0.420); their published 95% intervals: (1.769, 1.871), (0.317, 0.373), (0.331, 0.415).
    """
    n_arr, d_arr, l_arr = as_runs(N, D, L)
    starts = grid_starts()
    best, loss, converged, boot = fit_law(np.log(n_arr), np.log(d_arr), np.log(l_arr), starts, delta=delta,
                                          bootstrap=bootstrap, confidence=confidence, bootstrap_starts=bootstrap_starts,
                                          seed=seed)
    fit = ChinchillaFit(*(float(v) for v in best), loss=loss, n_runs=len(n_arr), delta=delta,
                        n_starts=len(starts), converged=converged)
    if boot is None:
        return fit
    a, b, e, alpha, beta = boot.T
    samples = np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)
    return replace(fit, intervals=percentile_intervals(samples, ("E", "A", "B", "alpha", "beta"), confidence),
                   bootstrap_samples=samples)


def percentile_intervals(samples: np.ndarray, names, confidence: float) -> dict[str, tuple[float, float]]:
    """Two-sided percentile intervals of the columns of ``samples`` (bootstrap replicates as rows)."""
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail], axis=0)
    return {name: (float(lo[j]), float(hi[j])) for j, name in enumerate(names)}


def fit_law(log_n, log_d, log_l, starts: np.ndarray, *, delta: float = 1e-3, extra: np.ndarray | None = None,
            bootstrap: int = 0, confidence: float = 0.95, bootstrap_starts: int = 5, seed: int = 0
            ) -> tuple[np.ndarray, float, bool, np.ndarray | None]:
    """The Huber fit behind :func:`fit_chinchilla` and the MoE law: L-BFGS from every row of
    ``starts`` (parameters a, b, e, alpha, beta and one per row of ``extra``, see
    :func:`huber_objective`). Returns the best parameters, their summed Huber loss, whether that
    start converged, and with ``bootstrap`` the replicates' best parameters as rows (else None)."""
    if not delta > 0:
        raise ValueError(f"delta={delta} must be positive (Chinchilla: 1e-3)")
    if bootstrap < 0 or not 0 < confidence < 1 or bootstrap_starts < 1:
        raise ValueError(f"bootstrap={bootstrap} must be >= 0, confidence={confidence} in (0, 1) and "
                         f"bootstrap_starts={bootstrap_starts} >= 1")

    def full_data(x, rows):
        return huber_objective(x, log_n, log_d, log_l, delta, extra=extra)

    ends, converged = lbfgsb_lockstep(full_data, starts)
    # Score every end point afresh: after a failed line search setulb restores x but the last f
    # it was handed may belong to the rejected trial point.
    losses, _ = full_data(ends, None)
    best = int(np.nanargmin(losses))
    if bootstrap == 0:
        return ends[best], float(losses[best]), bool(converged[best]), None

    # Distinct local minima of the full-data grid, lowest first (the best one is the fit itself).
    order = np.argsort(np.where(np.isfinite(losses), losses, np.inf))
    _, first = np.unique(np.round(ends[order], 3), axis=0, return_index=True)
    basins = ends[order[np.sort(first)][:bootstrap_starts]]
    n_runs, n_params = len(log_n), starts.shape[1]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=bootstrap)
    weights = np.repeat(counts.astype(float), len(basins), axis=0)  # problem = (replicate, basin)

    def resampled(x, rows):
        return huber_objective(x, log_n, log_d, log_l, delta, weights[rows], extra=extra)

    # Tight tolerances here: with the default ftol (a change of 2.2e-9 in a loss of ~1e-3) L-BFGS
    # started at an optimum stops before the parameters move to the resample's optimum; ftol = 0,
    # gtol = 1e-10 reach it (the same point as the full 4500-start grid on the resample).
    boot_ends, _ = lbfgsb_lockstep(resampled, np.tile(basins, (bootstrap, 1)), ftol=0.0, gtol=1e-10)
    boot_losses = resampled(boot_ends, np.arange(len(weights)))[0].reshape(bootstrap, len(basins))
    boot_best = boot_ends.reshape(bootstrap, len(basins), n_params)[np.arange(bootstrap), np.nanargmin(boot_losses, 1)]
    return ends[best], float(losses[best]), bool(converged[best]), boot_best


def load_chinchilla_runs(path: str | Path = CHINCHILLA_CSV,
                         drop_highest_loss: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) of Epoch AI's extraction of Chinchilla Figure 4 (data/chinchilla/README.md).

    D = C / (6 N). Besiroglu et al. (2024) drop the 5 highest-loss runs (outliers at the smallest
    compute) before fitting; 245 - 5 = 240 runs remain.
    """
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss, kind="stable")[:len(loss) - drop_highest_loss])
    return n[keep], c[keep] / (6.0 * n[keep]), loss[keep]
