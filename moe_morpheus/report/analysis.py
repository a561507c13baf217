"""Pure analysis of collected runs: configurations compared at the end of their schedules at
matched compute, upcycling crossover, epochs, expert-load health and the Chinchilla scaling fit.

Numbers only, no MLflow and no plotting, so every function is unit-tested on small arrays.
Conventions:
* Runs are compared only where each is at the end of its own schedule (its final validation
  loss): a run mid-cosine is not comparable to one that has annealed.
* The compute of a run is its **total** detailed FLOPs: its own plus, for a run started from a
  dense checkpoint (upcycled or dense continued), the sunk FLOPs of that checkpoint
  (``sunk.flops``), so a continuation is charged for the training it started from.
* Configurations whose compute agrees within ``COMPUTE_TOLERANCE`` are at one compute level
  and are rivals there; two budgets of one configuration never are.
* Seeds: the verdict rule of report/stats.py (paired seeds, 95% t-interval, n >= 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moe_morpheus.report.moe_scaling import MoEFit, fit_moe_law
from moe_morpheus.report.scaling import ChinchillaFit, distinct_levels, fit_chinchilla
from moe_morpheus.report.stats import PairedResult, rank_and_compare

# Scaling-fit requirements (issue 9): five parameters need >= 5 runs, and alpha (beta) is only
# identified when N (D) varies over >= 3 levels.
MIN_SCALING_RUNS = 5
MIN_SCALING_SIZES = 3
# Bootstrap replicates for the intervals of the scaling fits: a ladder of ~10 runs takes < 1 s.
BOOTSTRAP = 200


def loss_at(x: np.ndarray, loss: np.ndarray, targets) -> np.ndarray:
    """Loss interpolated linearly in log x at ``targets``; NaN outside [min x, max x].

    x must be positive (FLOPs or tokens) and is sorted here; duplicate x keep their first loss.
    """
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    keep = np.isfinite(x) & np.isfinite(loss) & (x > 0)
    x, loss = x[keep], loss[keep]
    order = np.argsort(x, kind="stable")
    x, loss = x[order], loss[order]
    x, first = np.unique(x, return_index=True)
    loss = loss[first]
    t = np.atleast_1d(np.asarray(targets, float))
    out = np.full(t.shape, np.nan)
    if len(x) == 0:
        return out
    inside = (t >= x[0]) & (t <= x[-1])
    out[inside] = np.interp(np.log(t[inside]), np.log(x), loss)
    return out


# Configurations whose final total compute agrees within 2% are compared as equal-compute
# rivals (budgets in Chinchilla fractions give equal tokens, and the detailed FLOPs per token
# of a dense model and its equal-active-parameter MoE differ by ~1%).
COMPUTE_TOLERANCE = 0.02


def final_points(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run at the end of its own schedule (FINISHED, finite final validation loss,
    positive total compute): ``group``, ``arm``, ``seed``, ``loss``, ``se`` (validation SE, NaN
    when not logged), ``compute`` (total FLOPs incl. sunk) and ``own`` (own FLOPs)."""
    cols = ["group", "arm", "seed", "loss", "se", "compute", "own"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    ok = ((runs["status"] == "FINISHED") & np.isfinite(runs["final_valid_loss"])
          & np.isfinite(runs["total_flops"]) & (runs["total_flops"] > 0))
    r = runs[ok]
    return pd.DataFrame({"group": r["group"], "arm": r["arm"], "seed": r["seed"], "loss": r["final_valid_loss"],
                         "se": r["valid_loss_se"], "compute": r["total_flops"], "own": r["flops_reached"]},
                        index=r.index, columns=cols)


def seed_losses(points: pd.DataFrame) -> dict[str, dict[float, float]]:
    """group -> {seed: final loss}; runs of one group sharing a seed (reruns) are averaged into
    one value, runs without a seed are left out (they cannot be paired)."""
    known = points[np.isfinite(points["seed"].astype(float))]
    return {g: sub.groupby("seed")["loss"].mean().to_dict() for g, sub in known.groupby("group", sort=False)}


def compute_levels(compute: dict[str, float], tol: float = COMPUTE_TOLERANCE) -> list[list[str]]:
    """Names grouped by equal compute: in increasing compute, a level takes every name whose
    compute is within (1 + tol) of the level's first (smallest); the next name starts a new
    level. Non-positive or non-finite computes are left out."""
    levels: list[list[str]] = []
    start = 0.0
    for name in sorted((n for n, c in compute.items() if np.isfinite(c) and c > 0), key=compute.__getitem__):
        if levels and compute[name] <= start * (1 + tol):
            levels[-1].append(name)
        else:
            levels.append([name])
            start = compute[name]
    return levels


@dataclass
class Level:
    """Configurations at one compute, at the end of their schedules.

    table: per configuration (index): ``compute`` (median over its runs), ``mean`` final loss,
    ``n`` runs, ``se`` (mean validation SE of its runs) and ``losses`` (seed -> loss);
    ranking: configurations by mean loss, best first; comparisons: the best against each other
    (report/stats.py).
    """

    compute: float
    table: pd.DataFrame
    ranking: list[str]
    comparisons: list[tuple[str, str, PairedResult]]


def matched_final(points: pd.DataFrame, axis: str = "compute", tol: float = COMPUTE_TOLERANCE) -> list[Level]:
    """Compute levels of the configurations in ``points`` (:func:`final_points`) on ``axis``
    (``compute``: total FLOPs, ``own``: without the sunk compute), in increasing compute; a
    level may hold a single configuration (nothing to compare it with)."""
    if points.empty:
        return []
    per_group = points.groupby("group", sort=False)
    compute = per_group[axis].median().to_dict()
    losses = seed_losses(points)
    out = []
    for names in compute_levels(compute, tol):
        table = pd.DataFrame({"compute": [compute[g] for g in names],
                              "mean": [per_group.get_group(g)["loss"].mean() for g in names],
                              "n": [len(per_group.get_group(g)) for g in names],
                              "se": [per_group.get_group(g)["se"].mean() for g in names],
                              "losses": [losses.get(g, {}) for g in names]}, index=names)
        ranking, comparisons = rank_and_compare({g: table.loc[g, "losses"] for g in names})
        ranking += [g for g in table.sort_values("mean").index if g not in ranking]  # groups without seeds
        out.append(Level(float(np.median(table["compute"])), table, ranking, comparisons))
    return out


def arm_lines(points: pd.DataFrame, axis: str = "compute") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """arm -> (compute, seed-mean final loss) of its configurations, in increasing compute: the
    end-of-schedule points of one arm at its budgets (each point a schedule of its own)."""
    out = {}
    for arm, sub in points.groupby("arm", sort=False):
        per = sub.groupby("group").agg(x=(axis, "median"), y=("loss", "mean")).sort_values("x")
        out[str(arm)] = (per["x"].to_numpy(float), per["y"].to_numpy(float))
    return out


def crossover(grid: np.ndarray, late: np.ndarray, early: np.ndarray) -> float | None:
    """The compute from which ``late`` (e.g. MoE from scratch) stays at or below ``early``
    (e.g. upcycled) to the end of their shared range: the last point where late - early goes
    from > 0 to <= 0, interpolated linearly in log compute. None when late ends above early,
    or was never above it (no catching up to do). Grid points where either is NaN are ignored.
    """
    diff = np.asarray(late, float) - np.asarray(early, float)
    ok = np.isfinite(diff)
    g, d = np.asarray(grid, float)[ok], diff[ok]
    if len(d) == 0 or d[-1] > 0 or not (d > 0).any():
        return None
    j = np.flatnonzero(d > 0)[-1]  # last point behind; j + 1 exists since d[-1] <= 0
    t = d[j] / (d[j] - d[j + 1])  # zero of the linear segment between j and j + 1
    return float(np.exp(np.log(g[j]) + t * (np.log(g[j + 1]) - np.log(g[j]))))


def epochs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Passes over each corpus per run (max of ``epochs/<source>``); ``repeated`` when any
    source was read more than once (1 + 1e-9: a float count of exactly one pass is not a repeat)."""
    rows = []
    for rid, run in runs.iterrows():
        epochs = run["epochs"] if isinstance(run["epochs"], dict) else {}
        row = {"run_id": rid, "name": run["name"], "group": run["group"]}
        row.update({f"epochs/{k}": v for k, v in sorted(epochs.items())})
        row["repeated"] = bool(epochs) and max(epochs.values()) > 1 + 1e-9
        rows.append(row)
    return pd.DataFrame(rows)


def load_imbalance(load: dict[str, list[float]]) -> pd.DataFrame:
    """Per layer: ``max_over_uniform`` = E * max_i f_i (1 = perfectly balanced, E = all
    assignments to one expert) and ``entropy_ratio`` = H(f) / log E (1 = balanced, 0 = one
    expert); f normalised to sum 1 first. Layers sorted by their number."""
    rows = []
    for layer in sorted(load, key=lambda k: int("".join(ch for ch in k if ch.isdigit()) or 0)):
        f = np.asarray(load[layer], float)
        f = f / f.sum() if f.sum() > 0 else f
        e = len(f)
        nz = f[f > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        rows.append({"layer": layer, "experts": e, "max_over_uniform": float(e * f.max()),
                     "entropy_ratio": entropy / np.log(e) if e > 1 else 1.0})
    return pd.DataFrame(rows, columns=["layer", "experts", "max_over_uniform", "entropy_ratio"])


@dataclass
class ScalingResult:
    """A Chinchilla fit on one family's runs (dense, or a variant at one expert count): the law,
    its bootstrap intervals and, per run, observed vs predicted loss."""

    family: str
    fit: ChinchillaFit
    runs: pd.DataFrame  # run_id, N, D, C (= 6ND), observed, predicted, residual

    def law(self) -> str:
        f = self.fit
        return (f"L(N, D) = {f.E:.3f} + {f.A:.4g} / N^{f.alpha:.3f} + {f.B:.4g} / D^{f.beta:.3f}")


@dataclass
class MoELawResult:
    """The MoE law over every family's runs, and per run its expert count and predicted loss."""

    fit: MoEFit
    runs: pd.DataFrame  # run_id, family, E, N, D, C, observed, predicted, residual


def experts(runs: pd.DataFrame) -> pd.Series:
    """Experts per MoE layer, 1 for dense runs (their moe.num_experts is absent or 0)."""
    e = runs["num_experts"].astype(float) if "num_experts" in runs else pd.Series(np.nan, index=runs.index)
    return e.where((runs["variant"] != "dense") & np.isfinite(e) & (e > 1), 1.0)


def scaling_family(runs: pd.DataFrame) -> pd.Series:
    """``dense``, or the variant and its expert count (``moe 8e``): runs of one family share a law."""
    e = experts(runs)
    return pd.Series([v if n == 1 else f"{v} {n:g}e" for v, n in zip(runs["variant"], e)], index=runs.index)


def scaling_candidates(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs usable for a fit: FINISHED with finite, positive active params, final tokens and
    final validation loss."""
    cols = ["active_params", "final_tokens", "final_valid_loss"]
    ok = (runs["status"] == "FINISHED") & np.isfinite(runs[cols]).all(axis=1) & (runs[cols] > 0).all(axis=1)
    return runs[ok]


def _ndl(sub: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(sub[c].to_numpy(float) for c in ("active_params", "final_tokens", "final_valid_loss"))


def scaling_fits(runs: pd.DataFrame, bootstrap: int = BOOTSTRAP) -> tuple[list[ScalingResult], list[str]]:
    """Chinchilla approach-3 fits, one per family (:func:`scaling_family`) with enough runs, on
    N = active params (embeddings included, as Chinchilla counted them), D = final tokens, L =
    final validation loss, with ``bootstrap`` replicates for intervals; C = 6ND as in the paper.
    Returns (fits, reasons a family was not fitted)."""
    fits, notes = [], []
    if runs.empty:
        return fits, notes
    usable = scaling_candidates(runs)
    for family, sub in usable.groupby(scaling_family(usable), sort=False):
        n, d, l = _ndl(sub)
        sizes, budgets = distinct_levels(n), distinct_levels(d)
        if len(sub) < MIN_SCALING_RUNS or min(sizes, budgets) < MIN_SCALING_SIZES:
            notes.append(f"{family}: {len(sub)} finished run(s) at {sizes} model size(s) and {budgets} token "
                         f"count(s); a scaling fit needs >= {MIN_SCALING_RUNS} runs at >= {MIN_SCALING_SIZES} sizes "
                         f"and token counts (values within 10% are one).")
            continue
        fit = fit_chinchilla(n, d, l, bootstrap=bootstrap)
        pred = fit.predict(n, d)
        table = pd.DataFrame({"run_id": sub.index, "N": n, "D": d, "C": 6 * n * d, "observed": l,
                              "predicted": pred, "residual": l - pred})
        fits.append(ScalingResult(str(family), fit, table))
    return fits, notes


def moe_law(runs: pd.DataFrame, bootstrap: int = BOOTSTRAP) -> tuple[MoELawResult | None, str | None]:
    """The MoE law L(N, D, E) (report/moe_scaling.py) over the usable dense (E = 1) and MoE runs;
    (None, why) when they cannot identify it. Upcycled runs are left out: their D leaves out the
    dense checkpoint's tokens, so they are not points of a from-scratch law."""
    usable = scaling_candidates(runs) if not runs.empty else runs
    if not usable.empty:
        known = (usable["variant"] == "dense") | ((usable["variant"] == "moe") & np.isfinite(
            usable["num_experts"].astype(float)))
        usable = usable[known]
    if usable.empty:
        return None, "no finished dense or MoE runs (with their expert count)."
    e = experts(usable).to_numpy(float)
    n, d, l = _ndl(usable)
    try:
        fit = fit_moe_law(n, d, e, l, bootstrap=bootstrap)
    except ValueError as error:
        return None, f"{error}."
    pred = fit.predict(n, d, e)
    table = pd.DataFrame({"run_id": usable.index, "family": scaling_family(usable).to_numpy(), "E": e, "N": n,
                          "D": d, "C": 6 * n * d, "observed": l, "predicted": pred, "residual": l - pred})
    return MoELawResult(fit, table), None


def handoff_table(runs: pd.DataFrame, curves: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Upcycled runs at the handoff: the dense parent's final validation loss (when the parent
    is among the collected runs), the upcycled run's first validation loss (equal to the parent's
    for a function-preserving conversion evaluated before any step), and the sunk compute."""
    rows = []
    for rid, run in runs[runs["variant"] == "upcycled"].iterrows():
        parent = run["upcycled_from"]
        valid = curves.get(rid, pd.DataFrame()).get("valid/loss", pd.Series(dtype=float)).dropna()
        parent_loss = runs.loc[parent, "final_valid_loss"] if parent in runs.index else np.nan
        rows.append({"run_id": rid, "name": run["name"], "dense_parent": parent or "-",
                     "parent_final_loss": parent_loss,
                     "first_valid_loss": valid.iloc[0] if len(valid) else np.nan,
                     "sunk_tokens": run["sunk_tokens"], "sunk_flops": run["sunk_flops"]})
    return pd.DataFrame(rows)


def loss_series(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], axis: str = "flops", *,
                loss_key: str = "valid/loss", add_sunk: bool = False,
                finished_only: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """run id -> (x, loss) at the run's validation steps, x = the ``axis`` metric (tokens_seen,
    flops or flops_6nd) plus the run's ``sunk_flops`` when ``add_sunk`` (total compute). Runs
    without that metric or loss, or (``finished_only``) not FINISHED, are left out."""
    out = {}
    for rid, run in runs.iterrows():
        c = curves.get(rid)
        if c is None or axis not in c or loss_key not in c:
            continue
        if finished_only and run["status"] != "FINISHED":
            continue
        pts = c[[axis, loss_key]].dropna()
        if pts.empty:
            continue
        x = pts[axis].to_numpy(float) + (run["sunk_flops"] if add_sunk else 0.0)
        out[rid] = (x, pts[loss_key].to_numpy(float))
    return out
