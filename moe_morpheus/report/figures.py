"""Report figures (matplotlib, Agg backend: no display needed). Each function writes one PNG and
returns its path, or None when there is nothing to draw.

Colours: one colour per configuration group, all seeds of a group in that colour; groups of a
variant share a hue (dense blues, MoE oranges, upcycled greens). Runs that did not finish are
dashed. Compute and token axes are logarithmic: the runs of a sweep span decades.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from moe_morpheus.report.analysis import Level, MoELawResult, ScalingResult, loss_series  # noqa: E402

HUES = {"dense": "Blues", "moe": "Oranges", "upcycled": "Greens"}
DPI = 110
# Curves with at most this many points get a marker on each (a single point is otherwise an
# invisible zero-length line).
MARKER_POINTS = 25


def group_colors(runs: pd.DataFrame) -> dict[str, tuple]:
    """group -> colour: shades of the variant's hue from 0.85 (first group) to 0.5."""
    colors = {}
    for variant, sub in runs.groupby("variant", sort=False):
        groups = list(dict.fromkeys(sub["group"]))
        cmap = plt.get_cmap(HUES.get(variant, "Greys"))
        for i, group in enumerate(groups):
            colors[group] = cmap(0.85 - 0.35 * i / max(len(groups) - 1, 1))
    return colors


def _legend(ax, runs: pd.DataFrame, colors: dict[str, tuple]) -> None:
    handles = [Line2D([], [], color=colors[g], lw=2, label=f"{g} (x{(runs['group'] == g).sum()})")
               for g in dict.fromkeys(runs["group"])]
    if (runs["status"] != "FINISHED").any():
        handles.append(Line2D([], [], color="grey", ls="--", label="not finished"))
    ax.legend(handles=handles, fontsize=8)


def _log_x(ax, label: str) -> None:
    """Log x axis (call after plotting) with short labels ("2e+12", "2.5e+12"): at 1, 2 and 5 per decade
    when the data span <= 2 decades, else at decades only. Matplotlib's default labels every
    minor tick on short ranges as "2x10^12", and on a 5-inch panel those overlap."""
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    subs = (1.0, 2.0, 5.0) if np.log10(hi / lo) <= 2 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(subs=subs))
    # Two significant digits: within one decade the locator may place 1.5e12 and 2.5e12, which
    # one digit would both print as "2e+12".
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, which="both")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _marker(n_points: int) -> dict:
    return {"marker": "o", "ms": 3.5} if n_points <= MARKER_POINTS else {}


def _draw_runs(ax, runs, series, colors) -> None:
    for rid, (x, y) in series.items():
        run = runs.loc[rid]
        ax.plot(x, y, color=colors[run["group"]], lw=1.4, alpha=0.85,
                ls="-" if run["status"] == "FINISHED" else "--", **_marker(len(x)))


def loss_curves(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Validation loss (per target token, all sets pooled) against tokens, detailed FLOPs (with sunk compute for
    upcycled runs) and 6ND FLOPs, every run overlaid; the corpus unigram entropy dotted (a run
    learned when its loss is clearly below it). The drawn runs are full-set evaluations
    (``valid/loss``); where a run evaluated a fixed subset in between (``valid_subset/loss``,
    ``trainer.eval_subset`` < 1), that curve is thin and dotted in the run's colour."""
    axes_spec = [("tokens_seen", False, "tokens seen"),
                 ("flops", True, "training FLOPs, detailed count (incl. sunk dense FLOPs)"),
                 ("flops_6nd", False, "training FLOPs, 6 N_active D")]
    panels = [(label, loss_series(runs, curves, a, add_sunk=s),
               loss_series(runs, curves, a, add_sunk=s, loss_key="valid_subset/loss")) for a, s, label in axes_spec]
    if not any(full for _, full, _ in panels):
        return None
    colors = group_colors(runs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    for ax, (label, series, subset) in zip(axes, panels):
        for rid, (x, y) in subset.items():
            ax.plot(x, y, color=colors[runs.loc[rid, "group"]], lw=0.9, ls=":", alpha=0.8)
        _draw_runs(ax, runs, series, colors)
        _log_x(ax, label)
    axes[0].set_ylabel("validation loss (nats/target token, sets pooled)")
    # The y range is the curves'; the unigram entropy is drawn only when inside it (a first
    # validation at ~ln V = 9 nats puts it there), else named, so it cannot squash the curves.
    ys = np.concatenate([y for _, full, subset in panels for part in (full, subset) for _, y in part.values()])
    lo, hi = float(ys.min()), float(ys.max())
    pad = 0.05 * (hi - lo) if hi > lo else 0.1
    axes[0].set_ylim(lo - pad, hi + pad)
    entropy = runs["unigram_entropy"].dropna()
    if len(entropy):
        h = float(entropy.median())
        if h <= hi + pad:
            for ax in axes:
                ax.axhline(h, color="k", ls=":", lw=1)
            note = f"dotted: unigram entropy {h:.2f}"
        else:
            note = f"unigram entropy {h:.2f}: above every curve"
        axes[0].text(0.02, 0.02, note, transform=axes[0].transAxes, fontsize=8)
    _legend(axes[0], runs, colors)
    fig.suptitle("Validation loss vs tokens and vs FLOPs")
    return _save(fig, path)


def valid_sets(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], sets: list[str], path: Path) -> Path | None:
    """One panel per validation set (``valid/<set>/loss``) against tokens."""
    if not sets:
        return None
    colors = group_colors(runs)
    cols = min(len(sets), 3)
    rows = -(-len(sets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, sets):
        _draw_runs(ax, runs, loss_series(runs, curves, "tokens_seen", loss_key=f"valid/{name}/loss"), colors)
        _log_x(ax, "tokens seen")
        ax.set_title(name)
        ax.set_ylabel("validation loss")
    for ax in list(axes.flat)[len(sets):]:
        ax.set_visible(False)
    _legend(axes.flat[0], runs, colors)
    return _save(fig, path)


def matched(levels: list[Level], runs: pd.DataFrame, path: Path) -> Path | None:
    """Dot plot of the final validation loss per configuration at each compute level: one
    x position and one label per level, the level's configurations side by side around it;
    small markers are seeds, a large one the seed mean."""
    if not levels:
        return None
    colors = group_colors(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.4 * len(levels)), 4.5))
    labelled = set()
    for i, level in enumerate(levels):
        k = len(level.ranking)
        for j, group in enumerate(level.ranking):
            t = level.table.loc[group]
            x = i + (j - (k - 1) / 2) * min(0.6 / k, 0.15)
            seeds = list(t["losses"].values())
            ax.scatter([x] * len(seeds), seeds, color=colors[group], s=14, alpha=0.6)
            ax.scatter([x], [t["mean"]], color=colors[group], s=60, edgecolor="k", zorder=3,
                       label=None if group in labelled else group)
            labelled.add(group)
    ax.set_xticks(range(len(levels)), [f"{lv.compute:.3g}" for lv in levels])
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_xlabel("total training FLOPs (detailed, incl. sunk), one level per label")
    ax.set_ylabel("final validation loss")
    ax.set_title("Configurations at equal total compute, end of schedule")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def moe_load(load: dict[str, list[float]], title: str, path: Path) -> Path | None:
    """Heatmap layers x experts of each expert's share of assignments times E (1 = uniform)."""
    layers = sorted(load, key=lambda k: int("".join(ch for ch in k if ch.isdigit()) or 0))
    width = max(len(load[k]) for k in layers) if layers else 0
    if not width:
        return None
    grid = np.full((len(layers), width), np.nan)
    for i, k in enumerate(layers):
        f = np.asarray(load[k], float)
        grid[i, : len(f)] = f / f.sum() * len(f) if f.sum() > 0 else f
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * width, 14), 1.2 + 0.45 * len(layers)))
    vmax = max(2.0, float(np.nanmax(grid)))
    # Diverging around 1 (uniform): blue = under-used, red = over-used experts.
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax))
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="load / uniform load")
    return _save(fig, path)


def moe_training(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Balance loss, drop rate and router z-loss, each the mean over the MoE layers
    (``moe/layer<i>/<name>``, what training logs), against tokens."""
    colors = group_colors(runs)
    specs = [("balance_loss", "balance loss, mean over layers (1 = uniform routing)"),
             ("drop_rate", "dropped assignments, mean over layers"),
             ("z_loss", "router z-loss, mean over layers")]
    drawn = False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (what, label) in zip(axes, specs):
        for rid, run in runs.iterrows():
            c = curves.get(rid)
            if c is None or "tokens_seen" not in c:
                continue
            keys = [k for k in c if k.startswith("moe/layer") and k.endswith("/" + what)]
            if not keys:
                continue
            y = c[keys].mean(axis=1)
            ok = y.notna() & c["tokens_seen"].notna()
            ax.plot(c["tokens_seen"][ok], y[ok], color=colors[run["group"]], lw=1.2,
                    ls="-" if run["status"] == "FINISHED" else "--", **_marker(int(ok.sum())))
            drawn = True
        _log_x(ax, "tokens seen")
        ax.set_ylabel(label, fontsize=9)
    if not drawn:
        plt.close(fig)
        return None
    _legend(axes[0], runs[runs["variant"] != "dense"], colors)
    fig.suptitle("MoE routing health over training")
    return _save(fig, path)


def final_points(lines: dict[str, tuple[np.ndarray, np.ndarray]], points: pd.DataFrame, runs: pd.DataFrame,
                 marks: dict[str, float], path: Path) -> Path:
    """Final validation loss against total FLOPs (incl. the sunk dense FLOPs): per arm (a role
    of the upcycling sweep, else a variant) a line through its budgets' seed means, the seeds
    as small markers; dashed verticals at catch-ups (``marks``: label -> FLOPs), a dotted one
    at the dense handoff."""
    group_color = group_colors(runs)
    arm_color = {arm: group_color[g] for arm, g in zip(runs["arm"], runs["group"])}
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, (x, y) in lines.items():
        ax.plot(x, y, color=arm_color[arm], lw=2, marker="o", ms=6, label=f"{arm} (seed mean)")
        seeds = points[points["arm"] == arm]
        ax.scatter(seeds["compute"], seeds["loss"], color=arm_color[arm], s=12, alpha=0.5)
    sunk = runs.loc[runs["variant"] == "upcycled", "sunk_flops"]
    if len(sunk) and sunk.max() > 0:
        ax.axvline(sunk.max(), color="grey", ls=":", lw=1, label="dense handoff (sunk FLOPs)")
    for label, c in marks.items():
        ax.axvline(c, color="k", ls="--", lw=1, label=f"{label} at {c:.3g}")
    _log_x(ax, "total training FLOPs, detailed (incl. the dense checkpoint's)")
    ax.set_ylabel("final validation loss")
    ax.set_title("Upcycling: end-of-schedule losses per arm")
    ax.legend(fontsize=8)
    return _save(fig, path)


def scaling(result: ScalingResult, path: Path) -> Path:
    """Left: the fitted compute-optimal N_opt(C) and D_opt(C) with the runs at (C = 6ND, N) and
    (C, D). Right: predicted vs observed final loss, with the identity line."""
    t, fit = result.runs, result.fit
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    c = np.geomspace(t["C"].min() / 3, t["C"].max() * 30, 100)
    n_opt, d_opt = fit.compute_optimal(c)
    a, b = fit.compute_optimal_exponents
    ax1.plot(c, n_opt, color="C0", label=f"N_opt ~ C^{a:.2f}")
    ax1.plot(c, d_opt, color="C1", label=f"D_opt ~ C^{b:.2f}")
    ax1.scatter(t["C"], t["N"], color="C0", marker="o", s=18, label="runs: N (active params)")
    ax1.scatter(t["C"], t["D"], color="C1", marker="s", s=18, label="runs: D (tokens)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax1.set_ylabel("parameters / tokens")
    ax1.set_title(f"{result.family}: compute-optimal frontier")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    lo = min(t["observed"].min(), t["predicted"].min())
    hi = max(t["observed"].max(), t["predicted"].max())
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    ax2.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", ls="--", lw=1, label="predicted = observed")
    sc = ax2.scatter(t["observed"], t["predicted"], c=np.log10(t["N"]), cmap="viridis", s=25)
    fig.colorbar(sc, ax=ax2, label="log10 N (active params)")
    ax2.set_xlabel("observed final validation loss")
    ax2.set_ylabel("predicted L(N, D)")
    ax2.set_title(result.law(), fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def moe_law(result: MoELawResult, path: Path) -> Path:
    """The MoE law: compute-optimal active parameters and loss against compute per expert count
    (with the runs at their compute), and the effective-parameter multiplier against size with
    its bootstrap interval."""
    t, fit = result.runs, result.fit
    counts = sorted(t["E"].unique())
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    c = np.geomspace(t["C"].min() / 3, t["C"].max() * 30, 60)
    sizes = np.geomspace(t["N"].min() / 2, t["N"].max() * 2, 40)
    for i, e in enumerate(counts):
        color, label = f"C{i}", "dense" if e == 1 else f"{e:g} experts"
        runs = t[t["E"] == e]
        ax1.scatter(runs["C"], runs["N"], color=color, s=16)
        ax2.scatter(runs["C"], runs["observed"], color=color, s=16)
        if fit.alpha + fit.gamma * np.log(e) > 0:  # else no compute-optimal size (the section says so)
            n_opt, _, l_opt = fit.compute_optimal(c, e)
            ax1.plot(c, n_opt, color=color, label=label)
            ax2.plot(c, l_opt, color=color, label=f"{label}: frontier")
        if e > 1:
            band = np.array([fit.multiplier_interval(n, e) for n in sizes]) if fit.bootstrap_samples is not None else None
            ax3.plot(sizes, fit.multiplier(sizes, e), color=color, label=label)
            if band is not None:
                ax3.fill_between(sizes, band[:, 0], band[:, 1], color=color, alpha=0.2)
    for ax in (ax1, ax2, ax3):
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set(xlabel="training compute C = 6 N D (FLOPs)", ylabel="compute-optimal active params N_opt",
            title="Compute-optimal size per expert count")
    ax2.set(xlabel="training compute C = 6 N D (FLOPs)", ylabel="final validation loss",
            title="Loss at the frontier (lines) and the runs (dots)")
    ax3.axhline(1.0, color="grey", ls="--", lw=1)
    # Log scale: 2x and 1/2x are equally far from 1. A bound the runs leave open (5e4 at 1.1M
    # active parameters on the committed ladder) would flatten everything else on a linear axis,
    # so the view stops at 1/10x and 10x and the band runs off it.
    ax3.set_yscale("log")
    low, high = ax3.get_ylim()
    ax3.set_ylim(max(low, 0.1), min(high, 10.0))
    ax3.set(xlabel="active params N", ylabel="dense params per active param",
            title="Effective-parameter multiplier (95% bootstrap band)")
    return _save(fig, path)
