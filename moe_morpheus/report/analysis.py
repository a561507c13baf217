"""Pure analysis of collected runs: matched-compute comparison with a seed-spread verdict,
upcycling crossover, epochs, expert-load health and the Chinchilla scaling fit.

Numbers only, no MLflow and no plotting, so every function is unit-tested on small arrays.
Conventions:
* The compute axis of comparisons is a run's **total** detailed FLOPs: its own cumulative
  ``flops`` plus, for an upcycled run, the dense parent's sunk FLOPs (``sunk.flops``), so
  upcycling is charged for the dense training it started from.
* Loss at a compute C is interpolated linearly in log C between a run's validation points
  (loss curves are close to straight on a log-FLOPs axis, not on a linear one) and never
  extrapolated: a run that did not reach C has no value there.
* Seeds: runs with the same configuration (``group``) are averaged; their spread is max - min.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moe_morpheus.scaling import ChinchillaFit, fit_chinchilla

# Scaling-fit requirements (issue 9): five parameters need >= 5 runs, and alpha is only
# identified when N varies over >= 3 distinct sizes.
MIN_SCALING_RUNS = 5
MIN_SCALING_SIZES = 3


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


def compute_points(series: dict[str, tuple[np.ndarray, np.ndarray]], n_points: int = 4) -> np.ndarray:
    """``n_points`` compute values, log-spaced, ending at the largest compute every run reaches
    (min over runs of their last x) and starting at the smallest compute every run has a point
    at (max over runs of their first x). Empty when the runs' ranges do not overlap."""
    firsts = [np.nanmin(x[x > 0]) for x, _ in series.values() if np.any(x > 0)]
    lasts = [np.nanmax(x) for x, _ in series.values() if np.any(x > 0)]
    if not lasts or len(lasts) < len(series):
        return np.array([])
    lo, hi = max(firsts), min(lasts)
    if hi < lo:
        return np.array([])
    if hi == lo or n_points == 1:
        return np.array([hi])
    return np.geomspace(lo, hi, n_points)


@dataclass
class Verdict:
    """Which group has the lower mean loss at one compute, and whether seeds can tell.

    kind: "winner" (margin > the larger seed spread of the two best groups), "no verdict"
    (margin <= that spread), or "unmeasured" (neither of the two has more than one seed, so
    the spread is unknown and the winner is stated with that caveat).
    """

    winner: str
    runner_up: str
    margin: float
    spread: float
    kind: str

    def sentence(self, compute: float) -> str:
        at = f"at {compute:.3g} FLOPs"
        if self.kind == "winner":
            return (f"**{self.winner}** has the lower validation loss {at}, by {self.margin:.4f} nats over "
                    f"{self.runner_up}, larger than the seed-to-seed spread ({self.spread:.4f}).")
        if self.kind == "no verdict":
            return (f"**No verdict** {at}: {self.winner} is ahead of {self.runner_up} by {self.margin:.4f} nats, "
                    f"within the seed-to-seed spread ({self.spread:.4f}).")
        return (f"**{self.winner}** has the lower validation loss {at}, by {self.margin:.4f} nats over "
                f"{self.runner_up}; with one seed per variant the seed-to-seed spread is not measured, "
                "so this is not a verdict until more seeds run.")


def verdict(stats: pd.DataFrame) -> Verdict | None:
    """Verdict from per-group ``mean``, ``spread`` and ``n`` (seeds) at one compute; None with
    fewer than two groups having a value."""
    stats = stats[np.isfinite(stats["mean"])].sort_values("mean")
    if len(stats) < 2:
        return None
    best, second = stats.iloc[0], stats.iloc[1]
    margin = float(second["mean"] - best["mean"])
    measured = [s for s in (best, second) if s["n"] > 1]
    spread = max((float(s["spread"]) for s in measured), default=float("nan"))
    if not measured:
        kind = "unmeasured"
    else:
        kind = "winner" if margin > spread else "no verdict"
    return Verdict(str(best.name), str(second.name), margin, spread, kind)


@dataclass
class MatchedCompute:
    """Loss at matched compute. ``table``: one row per (compute point, group) with ``mean``,
    ``spread`` (max - min over seeds), ``n`` (seeds) and ``runs``; ``verdicts``: per compute
    point, the verdict there (the last point is the headline: the largest compute all reach)."""

    points: np.ndarray
    table: pd.DataFrame
    verdicts: list[Verdict | None]

    @property
    def headline(self) -> Verdict | None:
        return self.verdicts[-1] if self.verdicts else None


def matched_compute(series: dict[str, tuple[np.ndarray, np.ndarray]], groups: dict[str, str],
                    n_points: int = 4) -> MatchedCompute:
    """Compare groups of runs at equal compute.

    series: run id -> (compute, valid loss) points; groups: run id -> configuration label.
    Each run's loss is interpolated at the shared compute points (:func:`compute_points`), then
    averaged over the runs of a group.
    """
    points = compute_points(series, n_points)
    rows = []
    for i, c in enumerate(points):
        values: dict[str, list[float]] = {}
        for rid, (x, y) in series.items():
            values.setdefault(groups[rid], []).append(float(loss_at(x, y, c)[0]))
        for group, vals in values.items():
            v = np.array(vals)
            rows.append({"point": i, "compute": c, "group": group, "mean": v.mean(),
                         "spread": v.max() - v.min(), "n": len(v)})
    table = pd.DataFrame(rows, columns=["point", "compute", "group", "mean", "spread", "n"])
    verdicts = [verdict(table[table["point"] == i].set_index("group")) for i in range(len(points))]
    return MatchedCompute(points, table, verdicts)


def mean_curve(series: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> np.ndarray:
    """Mean over runs of their loss interpolated (log x) on ``grid``; NaN where any run lacks a
    value, so a mean is never made of a subset of seeds."""
    if not series:
        return np.full(len(grid), np.nan)
    return np.mean([loss_at(x, y, grid) for x, y in series], axis=0)


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
    """A Chinchilla fit on one variant's runs: the law and, per run, observed vs predicted loss."""

    variant: str
    fit: ChinchillaFit
    runs: pd.DataFrame  # run_id, N, D, C (= 6ND), observed, predicted, residual

    def law(self) -> str:
        f = self.fit
        return (f"L(N, D) = {f.E:.3f} + {f.A:.4g} / N^{f.alpha:.3f} + {f.B:.4g} / D^{f.beta:.3f}")


def scaling_candidates(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs usable for a fit: FINISHED with finite, positive active params, final tokens and
    final validation loss."""
    cols = ["active_params", "final_tokens", "final_valid_loss"]
    ok = (runs["status"] == "FINISHED") & np.isfinite(runs[cols]).all(axis=1) & (runs[cols] > 0).all(axis=1)
    return runs[ok]


def scaling_fits(runs: pd.DataFrame) -> tuple[list[ScalingResult], list[str]]:
    """Chinchilla approach-3 fits, one per variant with enough runs, on N = active params
    (embeddings included, as Chinchilla counted them), D = final tokens, L = final validation
    loss; C = 6ND as in the paper. Returns (fits, reasons a variant was not fitted)."""
    fits, notes = [], []
    if runs.empty:
        return fits, notes
    usable = scaling_candidates(runs)
    for variant, sub in usable.groupby("variant", sort=False):
        sizes = sub["active_params"].nunique()
        if len(sub) < MIN_SCALING_RUNS or sizes < MIN_SCALING_SIZES:
            notes.append(f"{variant}: {len(sub)} finished run(s) at {sizes} model size(s); a scaling fit needs "
                         f">= {MIN_SCALING_RUNS} runs at >= {MIN_SCALING_SIZES} sizes.")
            continue
        n, d, l = (sub[c].to_numpy(float) for c in ("active_params", "final_tokens", "final_valid_loss"))
        fit = fit_chinchilla(n, d, l)
        pred = fit.predict(n, d)
        table = pd.DataFrame({"run_id": sub.index, "N": n, "D": d, "C": 6 * n * d, "observed": l,
                              "predicted": pred, "residual": l - pred})
        fits.append(ScalingResult(str(variant), fit, table))
    return fits, notes


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


def upcycling_parents(runs: pd.DataFrame) -> list[str]:
    """Run ids of the collected runs that are the dense parent of an upcycled run. Their compute
    is the upcycled runs' sunk compute and they stop at the handoff, so comparisons leave them
    out (they would cap the matched compute at the handoff)."""
    if runs.empty:
        return []
    parents = set(runs.loc[runs["variant"] == "upcycled", "upcycled_from"].dropna())
    return [rid for rid in runs.index if rid in parents]
