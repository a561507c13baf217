"""Report sections for scaling: a Chinchilla approach-3 fit per family (dense, and each variant at
each expert count) with bootstrap intervals, and the MoE law L(N, D, E) over all of them with the
effective-parameter multiplier of each expert count at each model size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_morpheus.report import analysis, figures
from moe_morpheus.report.collect import Collection
from moe_morpheus.report.render import (
    Block,
    Bullets,
    Figure,
    Heading,
    Para,
    Table,
    count,
    file_name,
    num,
    sci,
)

CHINCHILLA_PUBLISHED = ("Hoffmann et al. 2022: alpha 0.34, beta 0.28; Besiroglu et al. 2024's refit of their data: "
                        "alpha 0.35, beta 0.37")


def _interval(fit, name: str, digits: int = 3) -> str:
    value = getattr(fit, name)
    if not fit.intervals:
        return f"{value:.{digits}g}"
    lo, hi = fit.intervals[name]
    return f"{value:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def multiplier_cell(value: float, lo: float, hi: float) -> str:
    """'1.11 [0.52, 1.79]'; bounds in 3 significant digits, so an interval that a fit leaves open
    reads '[0.05, 7.1e+23]', not 24 digits."""
    return f"{value:.2f} [{lo:.3g}, {hi:.3g}]"


def scaling_section(c: Collection, out: Path) -> list[Block]:
    fits, notes = analysis.scaling_fits(c.runs)
    blocks: list[Block] = [Heading("Scaling law (Chinchilla approach 3)")]
    if not fits:
        return blocks + [Para("Not fitted: " + " ".join(notes) if notes else "Not fitted: no finished runs.")]
    blocks.append(Para("Per family (dense; a MoE variant at one expert count), `fit_chinchilla` on N = active params "
                       "(embeddings included), D = final tokens, L = final validation loss: summed Huber(1e-3) on "
                       f"log L, L-BFGS from the 4500-start grid; 95% intervals from {analysis.BOOTSTRAP} bootstrap "
                       f"resamples of the runs. Compute-optimal frontier with C = 6ND. Published: "
                       f"{CHINCHILLA_PUBLISHED}."))
    if notes:
        blocks.append(Bullets(notes))
    for res in fits:
        f = res.fit
        cs = [res.runs["C"].min(), res.runs["C"].max(), 10 * res.runs["C"].max()]
        n_opt, d_opt = f.compute_optimal(cs)
        a, b = f.compute_optimal_exponents
        blocks += [
            Heading(f"{res.family}: {len(res.runs)} runs", 3),
            Para(f"`{res.law()}` (fit converged: {f.converged}; Huber loss {f.loss:.3g}; "
                 f"RMS residual {np.sqrt(np.mean(res.runs['residual'] ** 2)):.4f} nats)."),
            Table(["parameter", "value [95% interval]"],
                  [[name, _interval(f, name)] for name in ("E", "A", "B", "alpha", "beta")]
                  + [["N_opt ~ C^a, D_opt ~ C^b", f"a = {a:.3f}, b = {b:.3f}"]]),
            Table(["C (FLOPs)", "N_opt", "D_opt", "D_opt / N_opt", "predicted loss"],
                  [[sci(C), count(n), count(d), num(d / n, 1), num(float(f.predict(n, d)))]
                   for C, n, d in zip(cs, n_opt, d_opt)]),
            Table(["run id", "N", "D", "observed", "predicted", "residual"],
                  [[f"`{r['run_id']}`", count(r["N"]), count(r["D"]), num(r["observed"]), num(r["predicted"]),
                    num(r["residual"])] for _, r in res.runs.iterrows()]),
            Figure(figures.scaling(res, out / f"scaling_{file_name(res.family)}.png"),
                   f"{res.family}: compute-optimal frontier with the runs, and predicted vs observed loss."),
        ]
    return blocks


def moe_law_section(c: Collection, out: Path) -> list[Block]:
    """Only for collections with MoE runs: the law over every finished run, dense included."""
    if c.runs.empty or not (c.runs["variant"] == "moe").any():
        return []
    result, why = analysis.moe_law(c.runs)
    blocks: list[Block] = [Heading("MoE scaling law: L(N, D, E)")]
    if result is None:
        return blocks + [Para(f"Not fitted: {why}")]
    f, t = result.fit, result.runs
    blocks.append(Para(
        "`L(N, D, E) = L0 + A / (N^alpha E^(delta + gamma ln(N / N0))) + B / D^beta` over every finished dense and "
        "MoE-from-scratch run (N active params, D final tokens, E experts per MoE layer, 1 for dense): Clark et al. (2022)'s expert "
        "terms in Chinchilla's form, the same Huber fit from 9,000 starts, 95% intervals from "
        f"{analysis.BOOTSTRAP} bootstrap resamples of the runs. N0 = {count(f.n0)} (the runs' geometric mean). "
        "A dense model of `multiplier x N` parameters has the loss of an E-expert model of N active parameters "
        "at any D. Clark et al. report the benefit of experts shrinking with size, which is gamma < 0 here."))
    blocks.append(Para(f"`{f.law()}` (fit converged: {f.converged}; {f.n_runs} runs; RMS residual "
                       f"{np.sqrt(np.mean(t['residual'] ** 2)):.4f} nats)."))
    blocks.append(Table(["parameter", "value [95% interval]"],
                        [[name, _interval(f, name)] for name in ("L0", "A", "B", "alpha", "beta", "delta", "gamma")]))
    sizes = sorted(t["N"].unique())
    counts = [e for e in sorted(t["E"].unique()) if e > 1]
    rows = []
    for n in sizes:
        row = [count(n)]
        for e in counts:
            lo, hi = f.multiplier_interval(n, e) if f.bootstrap_samples is not None else (np.nan, np.nan)
            row.append(multiplier_cell(f.multiplier(n, e), lo, hi))
        rows.append(row)
    blocks.append(Table(["active params N", *(f"multiplier, {e:g} experts" for e in counts)], rows))
    cs = [t["C"].min(), t["C"].max(), 10 * t["C"].max()]
    frontier = []
    for e in sorted(t["E"].unique()):
        label = "dense" if e == 1 else f"{e:g} experts"
        try:
            n_opt, d_opt, l_opt = f.compute_optimal(cs, e)
        except ValueError as error:  # alpha + gamma ln E <= 0: loss falls without end in N
            frontier.append([label, "-", "-", "-", str(error)])
            continue
        frontier += [[label, sci(C), count(n), count(d), num(loss)] for C, n, d, loss in zip(cs, n_opt, d_opt, l_opt)]
    blocks.append(Table(["experts", "C (FLOPs)", "N_opt (active)", "D_opt", "loss at the frontier"], frontier))
    blocks.append(Table(["run id", "family", "N", "D", "observed", "predicted", "residual"],
                        [[f"`{r['run_id']}`", r["family"], count(r["N"]), count(r["D"]), num(r["observed"]),
                          num(r["predicted"]), num(r["residual"])] for _, r in t.iterrows()]))
    blocks.append(Figure(figures.moe_law(result, out / "moe_law.png"),
                         "Compute-optimal active parameters and loss per expert count, and the effective-parameter "
                         "multiplier with its 95% bootstrap band."))
    return blocks
