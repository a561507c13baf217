"""Assemble a report from a :class:`Collection`: sections of tables, verdicts and figures.

Section order: problems first (what was skipped must not be missed), then the run tables,
curves, matched compute, FLOPs accounting, epochs, MoE health, upcycling, the scaling fits and the
MoE law (report/scaling_sections.py).
A section whose input is absent says so in one line instead of disappearing silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

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
    pct,
    sci,
    write,
)
from moe_morpheus.report.roles import EQUAL_EXTRA, compare_per_extra
from moe_morpheus.report.scaling_sections import moe_law_section, scaling_section
from moe_morpheus.report.stats import MIN_SEEDS, verdict_text

CROSSOVER_GRID = 200


def _experts(run: pd.Series) -> str:
    if run["variant"] == "dense" or not np.isfinite(run["num_experts"]) or run["num_experts"] <= 0:
        return "-"
    k = f"{run['top_k']:g}" if np.isfinite(run["top_k"]) else "?"
    return f"{run['num_experts']:g} / top-{k}"


def run_table(runs: pd.DataFrame) -> Table:
    """One row per run: sizes, tokens (positions and target tokens), compute, budget, losses
    with the validation standard error, speed, status, id."""
    header = ["run", "config", "seed", "status", "total params", "active params", "non-emb params",
              "experts / top-k", "positions", "target tokens", "positions / active param", "FLOPs (detailed)",
              "FLOPs (6ND)", "FLOPs incl. sunk", "Chinchilla budget used", "final valid loss", "valid loss SE",
              "best valid loss", "tokens/s", "run id"]
    rows = []
    for rid, r in runs.iterrows():
        sunk = sci(r["total_flops"]) if r["sunk_flops"] > 0 else "-"
        rows.append([r["name"], r["group"], "-" if not np.isfinite(r["seed"]) else f"{r['seed']:g}", r["status"],
                     count(r["total_params"]), count(r["active_params"]), count(r["non_embedding_params"]),
                     _experts(r), count(r["tokens_reached"]), count(r["target_tokens"]),
                     sci(r["tokens_per_active_param"]), sci(r["flops_reached"]), sci(r["final_flops_6nd"]), sunk,
                     pct(r["chinchilla_fraction_used"]), num(r["final_valid_loss"]), num(r["valid_loss_se"]),
                     num(r["best_valid_loss"]), count(r["final_tokens_per_s"]), f"`{rid}`"])
    return Table(header, rows)


def runs_section(c: Collection) -> list[Block]:
    """The run table, after a sentence on what makes a configuration and where they differ."""
    n = c.runs["group"].nunique()
    differ = ", ".join(f"`{k}`" for k in c.config_keys) or "nothing"
    return [Heading("Runs"),
            Para(f"{n} configuration(s); configurations differ in: {differ}. A configuration is every param "
                 "that changes the model, the data or the schedule; runs that differ only in seeds (every "
                 "`*.seed` param) are seeds of one configuration, and how a run is executed or logged "
                 "(tracking, parallel layout, checkpoints, log and eval intervals) does not count. Positions are "
                 "the tokens processed (Part A, Part B and padding: what budgets and FLOPs count); target tokens "
                 "are the positions with a loss. `-`: not logged by that run."),
            run_table(c.runs)]


def set_table(runs: pd.DataFrame, sets: list[str]) -> Table:
    header = ["run", "config"] + [f"{s} final / best" for s in sets]
    rows = [[r["name"], r["group"]] + [f"{num(r[f'final:{s}'])} / {num(r[f'best:{s}'])}" for s in sets]
            for _, r in runs.iterrows()]
    return Table(header, rows)


def overview(c: Collection) -> list[Block]:
    runs = c.runs
    by_variant = ", ".join(f"{n} {v}" for v, n in runs["variant"].value_counts(sort=False).items())
    by_status = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items())
    sweeps = sorted({s for s in runs["sweep"].dropna()})
    text = (f"{len(runs)} training runs ({by_variant}; {by_status}) from {c.scope}"
            + (f"; sweep(s): {', '.join(sweeps)}" if sweeps else "") + ". "
            "Losses are validation cross entropy in nats per target token; `valid/loss` pools the targets of "
            f"all validation sets ({', '.join(c.valid_sets) or 'none logged'}), so each set weighs by its "
            "target count. Intermediate points of a run may come from a fixed subset of the sets "
            "(`trainer.eval_subset`); the final point is always the full sets.")
    return [Para(text)]


def problems(c: Collection) -> list[Block]:
    if not c.problems:
        return [Heading("Problems"), Para("None: every run finished and logged what the report needs.")]
    return [Heading("Problems"), Para("What was skipped or is doubtful, and why:"), Bullets(c.problems)]


def curves_section(c: Collection, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("Validation loss")]
    fig = figures.loss_curves(c.runs, c.curves, out / "loss_curves.png")
    if fig is None:
        return blocks + [Para("No run logged `valid/loss` with `tokens_seen` or `flops`: no curves.")]
    blocks.append(Figure(fig, "Validation loss (per target token, sets pooled) vs tokens, vs detailed FLOPs (upcycled runs "
                              "shifted by their sunk dense FLOPs) and vs 6ND FLOPs. Seeds of a configuration "
                              "share a colour; dashed runs did not finish."))
    if c.valid_sets:
        blocks.append(set_table(c.runs, c.valid_sets))
        fig = figures.valid_sets(c.runs, c.curves, c.valid_sets, out / "valid_sets.png")
        if fig is not None:
            blocks.append(Figure(fig, "Validation loss per set vs tokens."))
    return blocks


def _verdicts(comparisons) -> list[str]:
    """Verdict sentences, a decided one in bold."""
    return [f"**{t}**" if r.decided else t for a, b, r in comparisons for t in [verdict_text(r, a, b)]]


def _seed_cells(losses: dict) -> str:
    return ", ".join(f"{s:g}: {v:.4f}" for s, v in sorted(losses.items())) or "-"


def level_table(level: analysis.Level) -> Table:
    rows = [[g, sci(t["compute"]), num(t["mean"]), _seed_cells(t["losses"]), num(t["se"]), str(int(t["n"]))]
            for g in level.ranking for t in [level.table.loc[g]]]
    return Table(["config (best first)", "total FLOPs", "final valid loss (mean)", "per seed", "valid loss SE",
                  "runs"], rows)


def matched_section(c: Collection, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("Loss at matched compute")]
    levels = analysis.matched_final(analysis.final_points(c.runs))
    if not levels:
        return blocks + [Para("No finished run has a final validation loss and FLOPs: no comparison.")]
    blocks.append(Para(
        "Runs are compared only at the end of their own schedules (final validation loss), at equal total "
        "compute: detailed FLOPs including the sunk FLOPs of a dense checkpoint a run started from. "
        f"Configurations whose total compute agrees within {analysis.COMPUTE_TOLERANCE:.0%} are one compute "
        "level and rivals there; two budgets of one configuration never are. At each level the best "
        "configuration (lowest seed-mean loss) is paired with each other one on their common seeds: the mean "
        "paired difference of final losses with its Student-t interval, 95% for one comparison and widened "
        "(Bonferroni) to 1 - 5%/m for m comparisons at a level, as the bullets say. A verdict (\"A beats B by d "
        f"[lo, hi]\") needs >= {MIN_SEEDS} paired seeds and an interval that excludes 0; otherwise no verdict. "
        "Mid-schedule losses (the curves above) are not compared."))
    compared = [lv for lv in levels if len(lv.table) > 1]
    alone = [lv for lv in levels if len(lv.table) == 1]
    if not compared:
        blocks.append(Para(f"No two configurations end at the same total compute (within "
                           f"{analysis.COMPUTE_TOLERANCE:.0%}): no comparison."))
    for lv in compared:
        blocks += [Heading(f"{sci(lv.compute)} FLOPs", 3), Bullets(_verdicts(lv.comparisons) or
                                                                   ["No seeds to pair: no verdict."]),
                   level_table(lv)]
    if alone:
        blocks.append(Para("Alone at their total compute (no other configuration within "
                           f"{analysis.COMPUTE_TOLERANCE:.0%}): "
                           + "; ".join(f"{lv.ranking[0]} ({sci(lv.compute)} FLOPs)" for lv in alone) + "."))
    fig = figures.matched(compared, c.runs, out / "matched_compute.png")
    if fig is not None:
        blocks.append(Figure(fig, "Final validation loss per configuration at each compute level (one label per "
                                  "level): small markers are seeds, large ones the seed mean."))
    return blocks


def flops_section(c: Collection) -> list[Block]:
    """Detailed vs 6ND FLOPs per configuration: for tiny models attention and logits make the
    detailed count several times 6N (docs/design.md#budgets), so an equal-6ND comparison is not equal compute."""
    rows = []
    for group, sub in c.runs.groupby("group", sort=False):
        r = sub.iloc[0]
        six_n = 6 * r["active_params"]
        ratio = r["flops_per_token"] / six_n if np.isfinite(six_n) and six_n > 0 else np.nan
        rows.append([group, count(r["active_params"]), sci(r["flops_per_token"]), sci(six_n), num(ratio, 2)])
    return [Heading("FLOPs: detailed count and 6ND"),
            Para("Runs log the detailed training FLOPs per token (`flops_per_token`: attention scores and "
                 "values, GeGLU, top-k experts, output logits; 3 x forward) and the cumulative 6 N_active D. "
                 "Comparisons use the detailed count; the Chinchilla fit uses C = 6ND as the paper does."),
            Table(["config", "active params", "FLOPs/token (detailed)", "6 N_active", "detailed / 6N"], rows)]


def epochs_section(c: Collection) -> list[Block]:
    t = analysis.epochs_table(c.runs)
    sources = [k for k in t.columns if k.startswith("epochs/")]
    if not sources:
        return [Heading("Epochs over the data"), Para("No run logged `epochs/<source>`.")]
    rows = [[r["name"], r["group"]] + [num(r[k], 2) for k in sources] + ["**yes**" if r["repeated"] else "no"]
            for _, r in t.iterrows()]
    n_rep = int(t["repeated"].sum())
    return [Heading("Epochs over the data"),
            Para(f"Passes over each corpus by the end of each run; {n_rep} of {len(t)} runs repeated data "
                 "(more than one pass over some source): their training loss flatters them, read the "
                 "validation loss."),
            Table(["run", "config"] + [k[len("epochs/"):] for k in sources] + ["repeated data"], rows)]


def evaluation_section(c: Collection) -> list[Block]:
    """Per-language perplexity of the [gMASK] sets (exp of the final loss) and the zero-shot
    tasks of the last evaluation: held-out translation (chrF, exact match) and last-word cloze."""
    runs = c.runs
    if not any(runs["eval"].map(bool)):
        return [Heading("Evaluation"), Para("No run logged zero-shot task metrics (eval/*).")]
    perplexity_sets = [s for s in c.valid_sets if s.endswith("_gmask")]
    tasks = ["mip_heldout/chrf", "mip_heldout/exact_match", "cloze_en/accuracy", "cloze_zh/accuracy"]
    header = ["run", "config"] + [f"{s} perplexity" for s in perplexity_sets] + tasks
    rows = []
    for _, r in runs.iterrows():
        ppl = [num(float(np.exp(r[f"final:{s}"])), 1) if np.isfinite(r[f"final:{s}"]) else "-" for s in perplexity_sets]
        rows.append([r["name"], r["group"], *ppl, *[num(r["eval"].get(t, np.nan)) for t in tasks]])
    return [Heading("Evaluation"),
            Para("Perplexity = exp(final validation loss) of each language's [gMASK] (language-model) set; "
                 "translation is greedy continuation of held-out instruction templates and pairs, scored "
                 "with chrF (0-100); cloze is the share of held-out passages whose last word the model "
                 "generates first."),
            Table(header, rows)]


def moe_section(c: Collection, out: Path) -> list[Block]:
    moe_runs = c.runs[c.runs["variant"] != "dense"]
    if moe_runs.empty:
        return []
    blocks: list[Block] = [Heading("MoE health")]
    rows, heatmaps = [], []
    for rid, r in moe_runs.iterrows():
        cur = c.curves.get(rid, pd.DataFrame())
        drop = [k for k in cur if k.startswith("moe/layer") and k.endswith("/drop_rate")]
        bal = [k for k in cur if k.startswith("moe/layer") and k.endswith("/balance_loss")]
        last_drop = cur[drop].ffill().iloc[-1].max() if drop and len(cur) else np.nan
        last_bal = cur[bal].ffill().iloc[-1].mean() if bal and len(cur) else np.nan
        load = c.moe_load.get(rid)
        imb = analysis.load_imbalance(load) if load else None
        rows.append([r["name"], r["group"], num(last_bal, 3), num(last_drop, 3),
                     num(imb["max_over_uniform"].max(), 2) if imb is not None else "-",
                     num(imb["entropy_ratio"].min(), 3) if imb is not None else "-"])
        if load:
            fig = figures.moe_load(load, f"{r['name']} ({r['group']}): expert load over training",
                                   out / f"moe_load_{file_name(r['name'])}_{rid[:8]}.png")
            if fig is not None:
                heatmaps.append(Figure(fig, f"Expert load per layer of {r['name']}: share of assignments x E "
                                            "(1 = uniform; red over-used, blue under-used)."))
    blocks.append(Para("Balance loss is E * sum_i f_i P_i (1 at uniform routing); drop rate is the share of "
                       "assignments dropped by capacity (0 when dropless); the load columns come from "
                       "`moe_load.json`: max over layers of E * max_i f_i (1 = balanced) and min over layers "
                       "of the load entropy / log E (1 = balanced)."))
    blocks.append(Table(["run", "config", "final balance loss (mean over layers)", "final drop rate (max layer)",
                         "load max / uniform (worst layer)", "load entropy ratio (worst layer)"], rows))
    fig = figures.moe_training(c.runs, c.curves, out / "moe_training.png")
    if fig is not None:
        blocks.append(Figure(fig, "Balance loss, drop rate and router z-loss (means over MoE layers) during training."))
    return blocks + heatmaps


def _catch_up_sentence(late: str, early: str, grid, m_late, m_early, at: float | None) -> str:
    """Where ``late`` catches up with ``early`` over their shared compute (at least one grid
    point where both have a value)."""
    both = np.isfinite(m_late) & np.isfinite(m_early)
    if at is not None:
        return f"**{late}** catches up with **{early}** at {at:.3g} total FLOPs and stays at or below it."
    g = grid[both]
    if (m_late[both] <= m_early[both]).all():
        return f"{late} is at or below {early} over all their shared compute ({g[0]:.3g} to {g[-1]:.3g} FLOPs)."
    return f"{late} does not catch up with {early} up to {g[-1]:.3g} total FLOPs (the end of their shared range)."


def _equal_extra(runs: pd.DataFrame, points: pd.DataFrame) -> list[str]:
    """Verdicts at equal *extra* compute per extra budget of the staged sweep: dense continued,
    upcycled and scratch (equal extra), the dense stage's compute sunk."""
    losses = analysis.seed_losses(points)
    tagged = runs[runs["extra"].notna()]
    # One arm per configuration group, in the order of the runs (ties rank in that order).
    groups = dict.fromkeys(zip(tagged["extra"], tagged["role"], tagged["group"]))
    arms = [(extra, role, group, losses.get(group, {})) for extra, role, group in groups]
    out = []
    for extra, (_, comparisons) in compare_per_extra(arms, EQUAL_EXTRA).items():
        out += [f"+{extra}: {v}" for v in _verdicts(comparisons)] or [f"+{extra}: no finished runs to compare."]
    return out


def upcycling_section(c: Collection, out: Path) -> list[Block]:
    runs = c.runs
    if not (runs["variant"] == "upcycled").any():
        return []
    blocks: list[Block] = [Heading("Upcycling")]
    h = analysis.handoff_table(runs, c.curves)
    blocks.append(Para("Upcycled runs are charged their dense parent's compute (`sunk.flops`): total FLOPs = "
                       "own + sunk. At the handoff a function-preserving conversion starts at the parent's loss."))
    blocks.append(Table(["run", "dense parent", "parent final loss", "first valid loss", "sunk tokens", "sunk FLOPs"],
                        [[r["name"], f"`{r['dense_parent']}`", num(r["parent_final_loss"]),
                          num(r["first_valid_loss"]), count(r["sunk_tokens"]), sci(r["sunk_flops"])]
                         for _, r in h.iterrows()]))
    points = analysis.final_points(runs)
    extra = _equal_extra(runs, points)
    if extra:
        blocks += [Para("At equal **extra** compute (+x: the extra budget, a fraction of the dense model's "
                        "Chinchilla budget; the dense stage's compute sunk, as for someone who already has the "
                        "dense checkpoint), same verdict rule; at equal total compute see the section above."),
                   Bullets(extra)]
    lines = analysis.arm_lines(points)
    if not lines:
        return blocks + [Para("No finished run has a final validation loss: no crossover.")]
    variant_of = dict(zip(runs["arm"], runs["variant"]))
    xs = np.concatenate([x for x, _ in lines.values()])
    grid = np.geomspace(xs.min(), xs.max(), CROSSOVER_GRID)
    at_grid = {arm: analysis.loss_at(x, y, grid) for arm, (x, y) in lines.items()}
    marks, sentences = {}, []
    for up in [a for a in lines if variant_of[a] == "upcycled"]:
        for late in [a for a in lines if variant_of[a] in ("moe", "dense")]:
            if not (np.isfinite(at_grid[late]) & np.isfinite(at_grid[up])).any():
                continue  # no shared total compute
            at = analysis.crossover(grid, at_grid[late], at_grid[up])
            sentences.append(_catch_up_sentence(late, up, grid, at_grid[late], at_grid[up], at))
            if at is not None:
                marks[f"{late} catches up with {up}"] = at
    blocks.append(Para("Crossover, read from final losses only: each arm's seed-mean final loss at its budgets, "
                       "interpolated linearly in log total compute between budgets (every point is a run at the "
                       "end of its own schedule). A description of seed means, not a verdict."))
    blocks.append(Bullets(sentences) if sentences else
                  Para("No dense or MoE-from-scratch arm shares a total-compute range with an upcycled arm."))
    fig = figures.final_points(lines, points, runs, marks, out / "upcycling_crossover.png")
    blocks.append(Figure(fig, "Final validation loss vs total FLOPs (incl. the sunk dense compute): one line per arm "
                              "through its budgets' seed means, small markers are seeds; dashed verticals mark "
                              "catch-ups, the dotted one the dense handoff."))
    return blocks


def make_report(c: Collection, out: Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out``; returns (md, html)."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"{c.experiment}: {c.scope.replace('`', '')}"
    if c.runs.empty:
        return write(title, problems(c), out)
    blocks = overview(c) + problems(c) + runs_section(c)
    blocks += curves_section(c, out) + matched_section(c, out) + flops_section(c) + epochs_section(c)
    blocks += evaluation_section(c) + moe_section(c, out) + upcycling_section(c, out)
    blocks += scaling_section(c, out) + moe_law_section(c, out)
    return write(title, blocks, out)
