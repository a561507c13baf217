"""Report tests: pure analysis on small arrays, and whole reports from synthetic MLflow stores.

One SQLite store (creating one costs ~8 s of MLflow migrations) holds an experiment per case,
written with MlflowClient exactly as the run contract says the trainer logs: tags, dotted params,
metrics against the step, final/ summaries, moe_load.json. Synthetic validation loss is a power
law in the detailed FLOPs, L(C) = 2 + 5 (C / 1e10)^-0.3, plus per-variant and per-seed offsets,
so the paired differences of final losses, and their t-intervals, are known in advance.
"""

from __future__ import annotations

import itertools
import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from scipy import stats as scipy_stats

from moe_morpheus.report import analysis, build, figures, render, scaling_sections, stats
from moe_morpheus.report.__main__ import main
from moe_morpheus.report.collect import CURVE_PREFIXES, Collection, SelectionError, collect, curve_frame
from moe_morpheus.report.configs import config_signature, group_labels, sweep_role

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 30
TOKENS_PER_STEP = 1e5
TARGETS_PER_STEP = 0.3e5  # supervised positions (Part B) of the 1e5 positions of a step
N_ACTIVE = 1e6
# Detailed FLOPs/token, 12x 6N; the MoE a little more (within the 2% of one compute level).
FPT = {"dense": 1.2e7, "moe": 1.21e7, "upcycled": 1.21e7}
SEEDS = (1, 2, 3)


def base_loss(c):
    return 2.0 + 5.0 * (np.asarray(c, float) / 1e10) ** -0.3


def log_run(client, exp_id, *, variant, seed=0, offset=0.0, sweep=None, parent=None, status="FINISHED",
            steps=STEPS, loss=base_loss, fpt=None, n_active=N_ACTIVE, sunk_flops=0.0, upcycled_from=None,
            finals=True, load=None, params=None, name=None, epochs_corpus=2e6, tags=None, targets=False):
    """One training run following the contract; returns its id. ``loss`` maps total FLOPs (own +
    sunk) to the validation loss before ``offset``; ``targets``: also log ``target_tokens_seen``
    and ``valid/loss_se`` (newer runs)."""
    fpt = fpt or FPT[variant]
    run_tags = {"variant": variant, "experiment": f"{variant}_tiny", "parallel_layout": "tp1-pp1-ep1-dp1"}
    if sweep:
        run_tags["sweep"] = sweep
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    if upcycled_from:
        run_tags["upcycled_from_run"] = upcycled_from
    run_tags.update(tags or {})
    run = client.create_run(exp_id, tags=run_tags, run_name=name or f"{variant}-s{seed}")
    rid = run.info.run_id
    p = {"model.num_layers": "2", "model.hidden_size": "64", "model.num_attention_heads": "4",
         "model.vocab_size": "8000", "model.seq_length": "128", "moe.layer_freq": "0" if variant == "dense" else "2",
         "moe.num_experts": "0" if variant == "dense" else "8", "moe.top_k": "2", "moe.gate": "naive",
         "trainer.seed": str(seed), "trainer.global_batch_size": "8", "budget.chinchilla_fraction": "1.0",
         "budget.tokens_per_param": "20", "count.total_params": str(n_active * (1 if variant == "dense" else 3)),
         "count.active_params": str(n_active), "count.embedding_params": str(0.5 * n_active),
         "count.non_embedding_params": str(0.5 * n_active * (1 if variant == "dense" else 5)),
         "budget.chinchilla_tokens": str(20 * n_active), "budget.planned_tokens": str(steps * TOKENS_PER_STEP),
         "flops_per_token": str(fpt), "tracking.run_name": name or rid, "checkpoint.dir": f"/ckpt/{rid}"}
    if sunk_flops:
        p.update({"sunk.tokens": str(sunk_flops / FPT["dense"]), "sunk.flops": str(sunk_flops),
                  "init.from_dense": f"/runs/s{seed}/dense/checkpoints"})
    p.update(params or {})
    metrics = []
    for step in range(1, steps + 1):
        tokens = step * TOKENS_PER_STEP
        flops = tokens * fpt
        m = {"tokens_seen": tokens, "flops": flops, "flops_6nd": 6 * n_active * tokens,
             "budget_fraction": tokens / (20 * n_active), "train/loss": float(loss(flops + sunk_flops)) + offset,
             "epochs/en_books": tokens / epochs_corpus, "epochs/zh_books": tokens / (4 * epochs_corpus)}
        if targets:
            m["target_tokens_seen"] = step * TARGETS_PER_STEP
        if step % 2 == 0 or step == 1 or step == steps:
            v = float(loss(flops + sunk_flops)) + offset
            m.update({"valid/loss": v, "valid/en_mask/loss": v + 0.1, "valid/zh_gmask/loss": v - 0.1})
            if targets:
                m["valid/loss_se"] = 0.0123
        if variant != "dense":
            m.update({"moe/layer1/balance_loss": 1 + 0.2 * math.exp(-step / 10), "moe/layer1/drop_rate": 0.0,
                      "moe/layer1/z_loss": 3.0 - step / 100})
        metrics += [Metric(k, v, 0, step) for k, v in m.items()]
    if finals:
        v = float(loss(steps * TOKENS_PER_STEP * fpt + sunk_flops)) + offset
        f = {"final/valid_loss": v, "best/valid_loss": v, "final/tokens": steps * TOKENS_PER_STEP,
             "final/flops": steps * TOKENS_PER_STEP * fpt, "final/tokens_per_s": 1.5e4, "final/unigram_entropy": 7.0}
        metrics += [Metric(k, val, 0, steps) for k, val in f.items()]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in p.items()])
    if load is not None:
        client.log_dict(rid, load, "moe_load.json")
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


def sweep_parent(client, exp_id, sweep):
    run = client.create_run(exp_id, tags={"sweep": sweep}, run_name=sweep)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


LOAD = {"layer1": [0.25, 0.05, 0.1, 0.1, 0.15, 0.1, 0.1, 0.15], "layer3": [0.125] * 8}
SCALING_LAW = {"E": 1.8, "A": 400.0, "B": 1000.0, "alpha": 0.34, "beta": 0.28}
MOE_DELTA = 0.1  # 8 experts multiply the parameters by 8^(0.1 / 0.34) = 1.84
# Per-seed offsets: "clear" has MoE 0.05 below dense with small per-run noise (a verdict), "tied"
# MoE 0.004 below with noise of 0.01 (no verdict).
CLEAR = {"dense": (-0.004, 0.0, 0.004), "moe": (-0.052, -0.047, -0.049)}
TIED = {"dense": (-0.01, 0.0, 0.01), "moe": (-0.004 + 0.01, -0.004 - 0.01, -0.004)}
# Staged upcycling sweep: dense stage of DENSE_STEPS, extra budgets (tag value -> steps).
DENSE_STEPS = 10
EXTRA = {"0.006": 10, "0.012": 20}
SEED_NOISE = {1: 0.02, 2: -0.015, 3: 0.0}  # shared by every arm of a seed: cancels in paired differences


def upcycle_losses(f0, c_max):
    """Loss of each role against total compute C: dense continued and upcycled gain over the
    power law quickly after the handoff (upcycled a little more), scratch gains as 0.3 t^2 with
    t = (C - f0) / (c_max - f0), so scratch at equal total compute overtakes upcycled between
    the two extra budgets."""
    def gain(c, amount):
        return amount * (1 - np.exp(-(np.asarray(c) - f0) / (0.3 * f0)))

    def scratch(c):
        return base_loss(c) - 0.3 * (np.clip(np.asarray(c) - f0, 0, None) / (c_max - f0)) ** 2

    return {"dense_continued": lambda c: base_loss(c) - gain(c, 0.12), "upcycled": lambda c: base_loss(c) - gain(c, 0.15),
            "scratch_extra": scratch, "scratch_total": scratch}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """uri, {case: run ids} for the cases: clear (MoE wins, 3 seeds), tied (within the noise),
    crash, empty, steps (one model at two lengths), upcycle (the staged sweep), scaling."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    def experiment(name):
        return client.create_experiment(name, artifact_location=str(root / "artifacts" / name))

    ids = {}
    exp = experiment("clear")
    parent = sweep_parent(client, exp, "dvm")
    ids["clear"] = [log_run(client, exp, variant=v, seed=s, offset=o, sweep="dvm", parent=parent, targets=True,
                            load=LOAD if v == "moe" else None)
                    for v in ("dense", "moe") for s, o in zip(SEEDS, CLEAR[v])]
    ids["clear_parent"] = parent
    # A run from another sweep in the same experiment: left out by --sweep, a "mixed sweeps" problem otherwise.
    ids["clear_stray"] = log_run(client, exp, variant="dense", seed=7, sweep="older", name="stray")

    exp = experiment("tied")
    ids["tied_parents"] = [sweep_parent(client, exp, "t") for _ in range(2)]  # the sweep launched twice
    ids["tied"] = [log_run(client, exp, variant=v, seed=s, offset=o, sweep="t", load=LOAD if v == "moe" else None)
                   for v in ("dense", "moe") for s, o in zip(SEEDS, TIED[v])]

    exp = experiment("crash")
    ids["crash"] = [log_run(client, exp, variant="dense", sweep="c"),
                    log_run(client, exp, variant="dense", sweep="c", name="dense-rerun"),  # same seed 0
                    log_run(client, exp, variant="moe", sweep="c", status="FAILED", steps=12, finals=False),
                    client.create_run(exp, tags={"variant": "moe", "sweep": "c"}, run_name="killed").info.run_id]
    client.create_run(exp, run_name="notebook")  # no variant tag: not a training run

    experiment("empty")

    # One dense model at two lengths (trainer.steps), three seeds each; seeds, run names, checkpoint
    # folders and the progress bar differ per run and do not make configurations.
    exp = experiment("steps")
    ids["steps"] = {n: [log_run(client, exp, variant="dense", seed=s, steps=n, sweep="len",
                                params={"trainer.steps": str(n), "data.seed": str(100 + s), "upcycle.seed": str(s),
                                        "trainer.progress": str(s == 1)})
                        for s in SEEDS] for n in (20, 30)}

    # The staged upcycling sweep (moe_morpheus/upcycle/sweep.py): per seed a dense stage, then per
    # extra budget dense continued, upcycled, scratch (equal extra) and scratch (equal total). The
    # driver's role tags are on every run but the dense stages (older runs: read from the run name).
    exp = experiment("upcycle")
    f0 = DENSE_STEPS * TOKENS_PER_STEP * FPT["dense"]
    c_max = (DENSE_STEPS + EXTRA["0.012"]) * TOKENS_PER_STEP * FPT["moe"]
    losses = upcycle_losses(f0, c_max)
    up = {"f0": f0, "c_max": c_max, "dense": {}, "runs": {}}
    for s in SEEDS:
        up["dense"][s] = log_run(client, exp, variant="dense", sweep="up", steps=DENSE_STEPS, seed=s,
                                 offset=SEED_NOISE[s], name=f"up/s{s}/dense",
                                 params={"budget.chinchilla_fraction": "0.012"})
        for x, steps in EXTRA.items():
            for role, variant, n, sunk in (("dense_continued", "dense", steps, f0),
                                           ("upcycled", "upcycled", steps, f0),
                                           ("scratch_extra", "moe", steps, 0.0),
                                           ("scratch_total", "moe", DENSE_STEPS + steps, 0.0)):
                up["runs"][(s, x, role)] = log_run(
                    client, exp, variant=variant, sweep="up", steps=n, seed=s, sunk_flops=sunk, loss=losses[role],
                    offset=SEED_NOISE[s] + 0.001 * ((s * 7 + n) % 3), name=f"up/s{s}/x{x}/{role}",
                    upcycled_from=up["dense"][s] if role == "upcycled" else None,
                    load=LOAD if variant != "dense" else None, tags={"sweep_role": role, "sweep_extra": x},
                    params={"budget.chinchilla_fraction": str(float(x) + (0.012 if role == "scratch_total" else 0))})
    ids["upcycle"] = up

    # Scaling: final losses exactly from a known law at 4 sizes x 3 token counts, dense and with 8
    # experts (the MoE law's E^-delta on the parameter term, delta = MOE_DELTA, gamma = 0).
    exp = experiment("scaling")
    law = SCALING_LAW
    runs = []
    for e, n, d in itertools.product((1, 8), (1e6, 3e6, 1e7, 3e7), (2e7, 6e7, 2e8)):
        loss = law["E"] + law["A"] / (n ** law["alpha"] * e ** MOE_DELTA) + law["B"] / d ** law["beta"]
        rid = client.create_run(exp, tags={"variant": "dense" if e == 1 else "moe", "sweep": "ladder"}).info.run_id
        client.log_batch(rid, params=[Param("count.active_params", str(n)), Param("trainer.seed", "0"),
                                      Param("model.hidden_size", str(int(n ** 0.5))),
                                      Param("moe.num_experts", str(e if e > 1 else 0))],
                         metrics=[Metric("final/valid_loss", loss, 0, 1), Metric("final/tokens", d, 0, 1),
                                  Metric("valid/loss", loss, 0, 1), Metric("tokens_seen", d, 0, 1),
                                  Metric("flops", 6 * n * d, 0, 1)],
                         tags=[RunTag("mlflow.runName", f"E{e}-N{n:.0e}-D{d:.0e}")])
        client.set_terminated(rid, "FINISHED")
        runs.append(rid)
    ids["scaling"] = runs
    return uri, ids


def report(tmp_path, uri, *args):
    out = tmp_path / "report"
    assert main([f"tracking_uri={uri}", f"out={out}", *args]) == 0
    return out, (out / "report.md").read_text(), (out / "report.html").read_text()


def run_table_rows(md: str) -> list[str]:
    lines = md.split("## Runs", 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("| ") and "`" in line]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def t_interval(a: dict, b: dict, rivals: int = 1) -> tuple[float, float, float]:
    """Independent reference: mean of a - b over common seeds and its Student-t interval, 95%
    for one comparison, 1 - 0.05 / rivals when the best of several arms meets each rival."""
    d = np.array([a[k] - b[k] for k in sorted(set(a) & set(b))])
    half = scipy_stats.t.ppf(1 - 0.025 / rivals, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def finals(uri, run_ids) -> dict[int, float]:
    """seed -> final/valid_loss, read back from MLflow."""
    client = MlflowClient(tracking_uri=uri)
    runs = [client.get_run(r) for r in run_ids]
    return {int(r.data.params["trainer.seed"]): r.data.metrics["final/valid_loss"] for r in runs}


# --- whole reports -----------------------------------------------------------------------------------

def test_clear_winner_report(tmp_path, store):
    uri, ids = store
    out, md, page = report(tmp_path, uri, "experiment=clear", "sweep=dvm")
    rows = run_table_rows(md)
    assert len(rows) == 6 and all(any(rid in r for r in rows) for rid in ids["clear"])
    assert ids["clear_stray"] not in md and ids["clear_parent"] not in rows[0]
    # Paired over seeds 1-3: MoE below dense, the 95% interval of moe - dense entirely below 0.
    d, lo, hi = t_interval(finals(uri, ids["clear"][3:]), finals(uri, ids["clear"][:3]))
    assert hi < 0
    assert f"**moe beats dense by {-d:.4f} [{-hi:.4f}, {-lo:.4f}] (n=3)**" in md
    # Both token counts and the validation SE: 30 steps of 1e5 positions, 3e4 of them targets.
    assert all("| 3M | 900k | 3 |" in r and "| 0.0123 |" in r for r in rows)
    assert "| 15% |" in rows[0]  # 3M tokens of a 20M-token Chinchilla budget
    for name in ("loss_curves.png", "valid_sets.png", "matched_compute.png", "moe_training.png"):
        assert_png(out / name)
    heatmaps = sorted(out.glob("moe_load_*.png"))
    assert len(heatmaps) == 3
    assert_png(heatmaps[0])
    # Self-contained: every figure is embedded, none linked.
    assert page.count('src="data:image/png;base64,') == 7 and ".png\"" not in page
    assert "zh_gmask final / best" in md and "repeated data" in md and "detailed / 6N" in md
    # Runs read 3e6 tokens of a 2e6-token corpus: 1.5 epochs of en_books, marked.
    assert "| 1.50 | 0.38 | **yes** |" in md
    assert "Scaling law" in md and "Not fitted" in md


# The remaining store cases check one section each: a figure costs ~0.5 s, a full report several.

def md_text(blocks) -> str:
    return render.to_markdown("t", blocks)


def test_mixed_sweeps_are_reported(store):
    uri, ids = store
    c = collect(uri, "clear")
    assert len(c.runs) == 7 and any("mixed sweeps" in p for p in c.problems)


def test_parent_selection(store):
    uri, ids = store
    c = collect(uri, "clear", parent=ids["clear_parent"])
    assert sorted(c.runs.index) == sorted(ids["clear"]) and not c.problems
    assert c.runs["group"].tolist() == ["dense"] * 3 + ["moe"] * 3


def test_no_verdict_within_the_noise(tmp_path, store):
    uri, ids = store
    c = collect(uri, "tied", sweep="t")
    assert len(c.runs) == 6 and c.problems == [
        f"sweep 't' was launched 2 times (parent runs {', '.join(sorted(ids['tied_parents']))}); the runs of all launches "
        "are included together."]
    md = md_text(build.matched_section(c, tmp_path))
    d, lo, hi = t_interval(finals(uri, ids["tied"][3:]), finals(uri, ids["tied"][:3]))
    assert lo < d < 0 < hi  # MoE ahead on the mean, the interval straddles 0
    assert f"no verdict: moe - dense = {d:+.4f} [{lo:+.4f}, {hi:+.4f}] (n=3)" in md
    # Runs from before target_tokens_seen and valid/loss_se: "-" in those columns.
    row = build.run_table(c.runs).rows[0]
    assert row[9] == "-" and row[16] == "-" and row[8] == "3M"


def test_crashed_and_stray_runs_are_problems(tmp_path, store):
    uri, ids = store
    out, md, _ = report(tmp_path, uri, "experiment=crash")
    problems = md.split("## Problems", 1)[1].split("\n## ", 1)[0]
    assert f"run `{ids['crash'][2]}`" in problems and "ended FAILED" in problems
    assert "2 runs of dense share seed 0" in problems and "averaged into one value" in problems
    assert "still RUNNING" in problems and "logged no valid/loss" in problems
    assert "no variant tag" in problems and "no moe_load.json" in problems
    assert len(run_table_rows(md)) == 4
    assert "No two configurations end at the same total compute" in md  # only the dense runs finished
    assert_png(out / "loss_curves.png")


def test_runs_differing_in_steps_are_two_configurations(tmp_path, store):
    """trainer.steps changes the schedule: not seeds of one configuration; seeds (trainer, data,
    upcycle), run names, checkpoint folders and the progress bar do not make configurations."""
    uri, ids = store
    c = collect(uri, "steps")
    for n, run_ids in ids["steps"].items():
        assert set(c.runs.loc[run_ids, "group"]) == {f"dense steps={n}"}
    assert c.config_keys == ["trainer.steps"]
    assert "configurations differ in: `trainer.steps`" in md_text(build.runs_section(c))
    md = md_text(build.matched_section(c, tmp_path))
    # Two budgets of one model are never rivals: each is alone at its compute.
    assert "No two configurations end at the same total compute" in md and "### " not in md
    assert "dense steps=20 (2.4e+13 FLOPs); dense steps=30 (3.6e+13 FLOPs)" in md


def test_empty_experiment(tmp_path, store):
    uri, _ = store
    out, md, page = report(tmp_path, uri, "experiment=empty")
    assert "no training runs found" in md and "no training runs found" in page
    assert not list(out.glob("*.png"))


def test_unknown_names_exit_nonzero(tmp_path, store, capsys):
    uri, _ = store
    assert main([f"tracking_uri={uri}", "experiment=nope", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "clear" in err and "scaling" in err
    assert main([f"tracking_uri={uri}", "experiment=clear", "sweep=nope", f"out={tmp_path}"]) == 2
    assert "dvm" in capsys.readouterr().err
    assert main([f"tracking_uri={uri}", "experiment=clear", "parent=abc", f"out={tmp_path}"]) == 2
    assert main([f"tracking_uri=sqlite:///{tmp_path / 'missing.db'}", "experiment=x"]) == 2
    assert "no MLflow database" in capsys.readouterr().err


def test_experiment_config_tag_selects_runs(store):
    uri, ids = store
    c = collect(uri, "upcycled_tiny")  # not an MLflow experiment: the runs' `experiment` tag
    up = ids["upcycle"]["runs"]
    assert sorted(c.runs.index) == sorted(rid for (_, _, role), rid in up.items() if role == "upcycled")
    with pytest.raises(SelectionError, match="Experiments that exist"):
        collect(uri, "o'brien")


def _line_crossing(p1, p2, q1, q2) -> float:
    """Where the segments p1-p2 and q1-q2 (points (compute, loss), linear in log compute) cross."""
    (a1, b1), (a2, b2), (c1, d1), (c2, d2) = [(np.log(x), y) for x, y in (p1, p2, q1, q2)]
    sp, sq = (b2 - b1) / (a2 - a1), (d2 - d1) / (c2 - c1)
    return float(np.exp((d1 - sq * c1 - b1 + sp * a1) / (sp - sq)))


def test_upcycling_sweep_report(tmp_path, store):
    uri, ids = store
    c = collect(uri, "upcycle")
    up = ids["upcycle"]
    runs = up["runs"]
    # Arms labelled by role (the dense stages by their run name: they have no role tag).
    assert set(c.runs.loc[list(up["dense"].values()), "group"]) == {"dense stage"}
    assert c.runs.loc[runs[(1, "0.006", "scratch_total")], "group"] == "scratch (equal total) +0.006"
    assert c.runs["group"].nunique() == 9
    md = md_text(build.matched_section(c, tmp_path) + build.upcycling_section(c, tmp_path))

    def losses(x, role):
        return finals(uri, [runs[(s, x, role)] for s in SEEDS])

    # Equal total compute at +0.006: upcycled against scratch trained for the dense stage + extra.
    # Four arms share that compute (upcycled, dense continued, scratch equal total +0.006 and
    # scratch equal extra +0.012): the best meets three rivals, each interval at 1 - 0.05 / 3.
    d, lo, hi = t_interval(losses("0.006", "upcycled"), losses("0.006", "scratch_total"), rivals=3)
    assert hi < 0 and (f"**upcycled +0.006 beats scratch (equal total) +0.006 by {-d:.4f} [{-hi:.4f}, {-lo:.4f}] "
                       "(98.3%, n=3)**") in md
    # Equal extra compute (the dense stage sunk), per budget.
    d, lo, hi = t_interval(losses("0.006", "upcycled"), losses("0.006", "scratch_extra"), rivals=2)
    assert (f"+0.006: **upcycled +0.006 beats scratch (equal extra) +0.006 by {-d:.4f} [{-hi:.4f}, {-lo:.4f}] "
            "(97.5%, n=3)**") in md
    # Crossover from final points only: the lines through each role's seed means at its budgets.
    f0, fpt, step = up["f0"], FPT["moe"], TOKENS_PER_STEP

    def point(x, role, compute):
        return compute, np.mean(list(losses(x, role).values()))

    u = [point(x, "upcycled", f0 + EXTRA[x] * step * fpt) for x in EXTRA]
    sc = [point(x, "scratch_total", (DENSE_STEPS + EXTRA[x]) * step * fpt) for x in EXTRA]
    at = float(md.split("**scratch (equal total)** catches up with **upcycled** at ", 1)[1].split(" ")[0])
    assert at == pytest.approx(_line_crossing(*u, *sc), rel=2e-3)
    assert "dense continued does not catch up with upcycled" in md
    assert f"`{up['dense'][1]}`" in md.split("## Upcycling", 1)[1]  # handoff table names the parent
    assert_png(tmp_path / "upcycling_crossover.png")


def test_scaling_sections_recover_the_laws(tmp_path, store, monkeypatch):
    uri, _ = store
    c = collect(uri, "scaling")
    axes_of = {}  # figure file -> (y scale, y limits) of each panel, read before the figure closes
    save = figures._save

    def read_axes_then_save(fig, path):
        axes_of[path.name] = [(ax.get_yscale(), ax.get_ylim()) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", read_axes_then_save)
    md = md_text(scaling_sections.scaling_section(c, tmp_path))  # one fit per family: ~3 s each
    dense = md.split("### dense", 1)[1].split("### moe 8e", 1)[0]
    law = re.search(r"L\(N, D\) = ([\d.]+) \+ ([\d.e+]+) / N\^([\d.]+) \+ ([\d.e+]+) / D\^([\d.]+)", dense)
    e, a, alpha, b, beta = map(float, law.groups())
    assert e == pytest.approx(SCALING_LAW["E"], abs=0.02)
    assert alpha == pytest.approx(SCALING_LAW["alpha"], abs=0.01)
    assert beta == pytest.approx(SCALING_LAW["beta"], abs=0.01)
    assert "dense: 12 runs" in md and "moe 8e: 12 runs" in md and "N_opt" in md
    assert re.search(r"\| alpha \| 0\.34\d* \[0\.3\d*, 0\.3\d*\] \|", dense), dense  # with its interval
    residuals = dense.split("| residual |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert len(residuals) == 12 and all(abs(float(r.split("|")[-2])) < 1e-3 for r in residuals)
    assert_png(tmp_path / "scaling_dense.png")
    assert_png(tmp_path / "scaling_moe_8e.png")

    # The MoE law over all 24 runs: delta and the multiplier 8^(delta / alpha) = 1.84 at every size.
    md = md_text(scaling_sections.moe_law_section(c, tmp_path))
    delta = float(re.search(r"\| delta \| ([\d.]+) \[", md).group(1))
    assert delta == pytest.approx(MOE_DELTA, abs=0.005) and "24 runs" in md
    table = md.split("| active params N |", 1)[1].split("\n\n", 1)[0]
    multipliers = re.findall(r"\| ([\d.]+) \[[\d.]+, [\d.]+\] \|$", table, re.M)
    assert len(multipliers) == 4 and all(float(m) == pytest.approx(8 ** (0.1 / 0.34), rel=0.02) for m in multipliers)
    assert_png(tmp_path / "moe_law.png")
    # The multiplier on a log axis kept within 1/10x..10x (an open bound would flatten it).
    scale, (low, high) = axes_of["moe_law.png"][2]
    assert scale == "log" and 0.1 <= low < 1.84 < high <= 10


def test_multiplier_cell_keeps_an_open_interval_readable():
    # An unidentified bound (the 64-expert multiplier before its ladder ran reached 7.5e+23) is
    # written in 3 significant digits, an identified one as the point value is.
    assert scaling_sections.multiplier_cell(1.1063, 0.5213, 1.7897) == "1.11 [0.521, 1.79]"
    assert scaling_sections.multiplier_cell(1.11, 0.05, 7.5375937603623e23) == "1.11 [0.05, 7.54e+23]"


# --- verdict rule (report/stats.py) and the upcycle sweep summary -----------------------------------

def test_paired_interval_is_the_student_t_interval():
    a = {1: 3.00, 2: 3.10, 3: 2.95, 4: 3.05}
    b = {1: 2.90, 2: 3.02, 3: 2.90, 4: 2.93}
    r = stats.paired_interval(a, b)
    d = np.array([0.10, 0.08, 0.05, 0.12])
    half = scipy_stats.t.ppf(0.975, 3) * np.sqrt(((d - d.mean()) ** 2).sum() / 3) / 2
    assert (r.n, r.seeds) == (4, (1, 2, 3, 4))
    assert r.diff == pytest.approx(0.0875) and r.lo == pytest.approx(0.0875 - half) and r.hi == pytest.approx(0.0875 + half)
    assert r.decided and not r.a_wins  # the interval of a - b lies above 0: B has the lower loss
    assert stats.verdict_text(r, "A", "B") == f"B beats A by 0.0875 [{0.0875 - half:.4f}, {0.0875 + half:.4f}] (n=4)"


def test_interval_containing_zero_is_no_verdict():
    r = stats.paired_interval({1: 3.1, 2: 2.92, 3: 3.02}, {1: 3.0, 2: 3.0, 3: 3.0})
    d, lo, hi = t_interval({1: 3.1, 2: 2.92, 3: 3.02}, {1: 3.0, 2: 3.0, 3: 3.0})
    assert lo < 0 < hi and not r.decided
    assert stats.verdict_text(r, "A", "B") == f"no verdict: A - B = {d:+.4f} [{lo:+.4f}, {hi:+.4f}] (n=3)"


def test_unpaired_seeds_are_dropped_and_said():
    a = {1: 2.0, 2: 2.1, 3: 2.05, 5: 1.0}  # seed 5 has no partner: it would otherwise decide
    b = {1: 2.1, 2: 2.2, 3: 2.1, 6: 9.0}
    r = stats.paired_interval(a, b)
    assert (r.n, r.seeds, r.only_a, r.only_b) == (3, (1, 2, 3), (5,), (6,))
    assert r.diff == pytest.approx(t_interval(a, b)[0])
    assert stats.verdict_text(r, "A", "B").endswith("; unpaired, dropped: seed(s) 5 only in A; seed(s) 6 only in B")


def test_fewer_than_three_seeds_is_no_verdict():
    r = stats.paired_interval({1: 2.0, 2: 2.01}, {1: 3.0, 2: 3.02})
    assert r.n == 2 and r.hi < 0 and not r.decided  # excludes 0, but two seeds are not enough
    assert stats.verdict_text(r, "A", "B").startswith("no verdict (n<3): A - B = -1.0050 [")
    one = stats.paired_interval({1: 2.0}, {1: 3.0, 2: 3.1})
    assert stats.verdict_text(one, "A", "B") == ("no verdict (n<3): A - B = -1.0000 (n=1, no interval); unpaired, "
                                                 "dropped: seed(s) 2 only in B")
    assert stats.paired_interval({}, {1: 1.0}).n == 0
    assert stats.paired_interval({1: float("nan"), 2: 1.0}, {1: 1.0, 2: 1.0}).only_b == (1,)


def test_rank_and_compare_pairs_the_best_with_each_rival():
    ranking, comparisons = stats.rank_and_compare({"a": {1: 3.0, 2: 3.1}, "b": {1: 2.0, 2: 2.2}, "c": {},
                                                   "d": {1: 2.5, 2: 2.4}})
    assert ranking == ["b", "d", "a"]
    assert [(x, y, r.n) for x, y, r in comparisons] == [("b", "d", 2), ("b", "a", 2)]
    assert comparisons[0][2].diff == pytest.approx(-0.35)


def test_upcycle_sweep_summary_uses_the_paired_rule():
    from moe_morpheus.upcycle.sweep import format_summary, load_config, summarize

    cfg = load_config(["seeds=[1,2,3,4]", "extra_fractions=[0.006]"])
    loss = {"dense_continued": 6.0, "upcycled": 5.9, "scratch_extra": 7.0, "scratch_total": 5.95}
    metrics = {f"s{s}/x0.006/{role}": {"final/valid_loss": v + 0.1 * s + 0.001 * (s * s % 3), "final/flops": 1e12,
                                       "final/flops_with_sunk": 2e12 if role in ("dense_continued", "upcycled") else 1e12}
               for s in (1, 2, 3, 4) for role, v in loss.items() if (s, role) != (4, "scratch_total")}
    summary = summarize(cfg, metrics)
    row = summary["extra"]["0.006"]
    assert row["upcycled"]["flops_with_sunk"] == 2e12 and row["scratch_total"]["losses"].keys() == {"1", "2", "3"}
    assert row["equal_extra"]["ranking"] == ["upcycled", "dense continued", "scratch (equal extra)"]
    up = {s: metrics[f"s{s}/x0.006/upcycled"]["final/valid_loss"] for s in (1, 2, 3, 4)}
    total = {s: metrics[f"s{s}/x0.006/scratch_total"]["final/valid_loss"] for s in (1, 2, 3)}
    d, lo, hi = t_interval(up, total, rivals=2)  # upcycled is the best of three arms
    verdict = [v for v in row["equal_total"]["verdicts"] if "scratch (equal total)" in v][0]
    assert verdict == (f"upcycled beats scratch (equal total) by {-d:.4f} [{-hi:.4f}, {-lo:.4f}] (97.5%, n=3); "
                       "unpaired, "
                       "dropped: seed(s) 4 only in upcycled")
    comparison = row["equal_total"]["comparisons"][-1]
    assert comparison["n"] == 3 and comparison["decided"] and comparison["hi"] == pytest.approx(hi)
    assert verdict in format_summary(summary)


def test_stage_tags_name_the_roles():
    from moe_morpheus.report.roles import stage_tags

    assert stage_tags("s1/x0.006/upcycled") == {"sweep_role": "upcycled", "sweep_extra": "0.006"}
    assert stage_tags("s12/dense") == {"sweep_role": "dense"}
    assert stage_tags("s1/x0.006/dense") == {} and stage_tags("s1/upcycled") == {} and stage_tags("other") == {}
    assert sweep_role({"sweep": "u", "mlflow.runName": "u/s2/x0.012/scratch_total"}) == ("scratch_total", "0.012")
    assert sweep_role({"sweep_role": "upcycled", "sweep_extra": "1", "mlflow.runName": "x"}) == ("upcycled", "1")
    assert sweep_role({"sweep": "u", "mlflow.runName": "dense-s1"}) == (None, None)


# --- analysis ----------------------------------------------------------------------------------------

def test_loss_at_is_log_linear_and_never_extrapolates():
    x = np.array([1e9, 1e10, 1e11])
    y = np.array([3.0, 2.0, 1.0])  # linear in log10 x
    np.testing.assert_allclose(analysis.loss_at(x[::-1], y[::-1], [10 ** 9.5, 1e10, 10 ** 10.25]), [2.5, 2.0, 1.75])
    assert np.isnan(analysis.loss_at(x, y, [1e8, 2e11])).all()
    assert np.isnan(analysis.loss_at(np.array([]), np.array([]), 1e9)).all()


def test_compute_levels_group_within_tolerance():
    levels = analysis.compute_levels({"a": 1e12, "b": 1.015e12, "c": 1.03e12, "d": 2e12, "e": float("nan")})
    assert levels == [["a", "b"], ["c"], ["d"]]  # c is 3% above a, the level's first
    assert analysis.compute_levels({}) == []


def points_frame(rows):
    return pd.DataFrame(rows, columns=["group", "arm", "seed", "loss", "se", "compute", "own"])


def test_matched_final_compares_configurations_never_budgets():
    rows = [("dense", "dense", s, 3.0 + 0.01 * s, 0.01, 1e12, 1e12) for s in (1, 2, 3)]
    rows += [("moe", "moe", s, 2.9 + 0.012 * s, np.nan, 1.01e12, 1.01e12) for s in (1, 2, 3)]
    rows += [("dense long", "dense", s, 2.5, 0.01, 2e12, 2e12) for s in (1, 2, 3)]
    rows += [("moe", "moe", 3, 2.95, np.nan, 1.01e12, 1.01e12)]  # a rerun of seed 3: averaged
    levels = analysis.matched_final(points_frame(rows))
    assert [lv.ranking for lv in levels] == [["moe", "dense"], ["dense long"]]
    first = levels[0]
    assert first.compute == pytest.approx(1.005e12) and first.table.loc["moe", "n"] == 4
    assert first.table.loc["moe", "losses"][3] == pytest.approx((2.936 + 2.95) / 2)
    (best, other, r), = first.comparisons
    assert (best, other, r.n) == ("moe", "dense", 3)
    assert r.diff == pytest.approx(t_interval(first.table.loc["moe", "losses"], first.table.loc["dense", "losses"])[0])
    assert levels[1].comparisons == []


def test_final_points_take_finished_runs_with_totals():
    runs = pd.DataFrame({"group": ["a", "b", "c"], "arm": ["a", "b", "c"], "seed": [1.0, 1.0, 1.0],
                         "status": ["FINISHED", "FAILED", "FINISHED"], "final_valid_loss": [3.0, 2.0, np.nan],
                         "valid_loss_se": [0.01, np.nan, np.nan], "total_flops": [2e12, 1e12, 1e12],
                         "flops_reached": [1e12, 1e12, 1e12]}, index=["r1", "r2", "r3"])
    p = analysis.final_points(runs)
    assert list(p.index) == ["r1"] and p.loc["r1", "compute"] == 2e12 and p.loc["r1", "own"] == 1e12
    assert analysis.final_points(pd.DataFrame()).empty


def test_arm_lines_join_budgets_in_compute_order():
    rows = [("up +2", "up", 1, 2.0, np.nan, 4e12, 2e12), ("up +1", "up", 1, 2.5, np.nan, 3e12, 1e12),
            ("up +1", "up", 2, 2.7, np.nan, 3e12, 1e12)]
    lines = analysis.arm_lines(points_frame(rows))
    np.testing.assert_allclose(lines["up"][0], [3e12, 4e12])
    np.testing.assert_allclose(lines["up"][1], [2.6, 2.0])


def test_crossover_is_the_last_catch_up():
    grid = np.geomspace(1, 1e4, 5)  # 1, 10, 100, 1000, 1e4
    early = np.zeros(5)
    assert analysis.crossover(grid, np.array([-1.0, 1.0, 1.0, -1.0, -2.0]), early) == pytest.approx(10 ** 2.5)
    assert analysis.crossover(grid, np.array([1.0, 1.0, 1.0, 1.0, 0.5]), early) is None  # never catches up
    assert analysis.crossover(grid, -np.ones(5), early) is None  # ahead all along
    assert analysis.crossover(grid, np.array([1.0, np.nan, 0.0, -1.0, -1.0]), early) == pytest.approx(100)


def test_epochs_table_marks_repeats():
    runs = pd.DataFrame({"name": ["a", "b", "c"], "group": ["dense"] * 3,
                         "epochs": [{"en": 0.5, "zh": 1.0}, {"en": 2.5}, float("nan")]}, index=["r1", "r2", "r3"])
    t = analysis.epochs_table(runs)
    assert t["repeated"].tolist() == [False, True, False]
    assert t.loc[0, "epochs/zh"] == 1.0


def test_load_imbalance():
    t = analysis.load_imbalance({"layer10": [1.0, 0.0], "layer2": [0.25] * 4})
    assert t["layer"].tolist() == ["layer2", "layer10"]
    np.testing.assert_allclose(t["max_over_uniform"], [1.0, 2.0])
    np.testing.assert_allclose(t["entropy_ratio"], [1.0, 0.0])


def test_scaling_fits_need_sizes_and_finished_runs():
    runs = pd.DataFrame({"variant": "dense", "status": ["FINISHED"] * 5 + ["FAILED"],
                         "active_params": [1e6, 1e6, 2e6, 2e6, 2e6, 4e6], "final_tokens": 1e8,
                         "final_valid_loss": 3.0})
    assert len(analysis.scaling_candidates(runs)) == 5
    fits, notes = analysis.scaling_fits(runs)
    assert fits == [] and "5 finished run(s) at 2 model size(s)" in notes[0]
    assert analysis.scaling_fits(pd.DataFrame()) == ([], [])


def test_handoff_table():
    runs = pd.DataFrame({"variant": ["dense", "upcycled"], "name": ["d", "u"], "upcycled_from": [None, "d1"],
                         "final_valid_loss": [3.0, 2.5], "sunk_tokens": [0.0, 1e6], "sunk_flops": [0.0, 1e12]},
                        index=["d1", "u1"])
    curves = {"u1": pd.DataFrame({"valid/loss": [np.nan, 3.01, 2.9]})}
    t = analysis.handoff_table(runs, curves)
    assert t.loc[0, "parent_final_loss"] == 3.0 and t.loc[0, "first_valid_loss"] == 3.01


def test_loss_series_adds_sunk_and_filters():
    runs = pd.DataFrame({"status": ["FINISHED", "FAILED"], "sunk_flops": [10.0, 0.0]}, index=["a", "b"])
    curve = pd.DataFrame({"flops": [1.0, 2.0, 3.0], "valid/loss": [5.0, np.nan, 4.0]})
    s = analysis.loss_series(runs, {"a": curve, "b": curve}, "flops", add_sunk=True, finished_only=True)
    assert list(s) == ["a"]
    np.testing.assert_allclose(s["a"][0], [11.0, 13.0])
    assert set(analysis.loss_series(runs, {"a": curve, "b": curve})) == {"a", "b"}
    assert analysis.loss_series(runs, {"a": curve}, "tokens_seen") == {}


# --- collect and configurations ----------------------------------------------------------------------

def test_curve_frame_dedupes_and_fills_axes():
    frame = curve_frame({"tokens_seen": [(1, 0, 100.0), (3, 0, 300.0)],
                         "valid/loss": [(2, 0, 5.0), (2, 9, 4.0), (4, 0, 3.5)], "flops": []})
    assert frame.loc[2, "valid/loss"] == 4.0  # the later timestamp (a resumed run's replay) wins
    assert frame.loc[2, "tokens_seen"] == 200.0 and np.isnan(frame.loc[4, "tokens_seen"])
    assert "flops" not in frame


def test_config_signature_leaves_out_seeds_infra_and_derived_params():
    params = {"model.hidden_size": "64", "trainer.steps": "100", "trainer.lr": "0.003", "data.valid_seed": "0",
              "trainer.seed": "1", "data.seed": "1234", "upcycle.seed": "0", "tracking.run_name": "a",
              "checkpoint.dir": "/x", "parallel.tp": "2", "trainer.progress": "True", "trainer.eval_interval": "50",
              "count.total_params": "1e6", "budget.planned_tokens": "5", "flops_per_token": "1e7",
              "sunk.tokens": "10", "sunk.flops": "1e9", "init.from_dense": "/runs/s1/dense/checkpoints",
              # differs per seed (the dense stage's data follows its seed): must not split the seeds
              "sunk.target_tokens": "4001", "trainer.eval_subset": "0.125"}
    assert dict(config_signature(params)) == {
        "model.hidden_size": "64", "trainer.steps": "100", "trainer.lr": "0.003", "data.valid_seed": "0",
        "sunk.tokens": "10", "init.from_dense": "checkpoint"}


def test_group_labels_name_differing_params():
    sig_a = config_signature({"model.hidden_size": "64", "trainer.seed": "0", "moe.top_k": "2"})
    sig_b = config_signature({"model.hidden_size": "128", "trainer.seed": "1", "moe.top_k": "2"})
    assert sig_a == (("model.hidden_size", "64"), ("moe.top_k", "2"))
    assert group_labels(["moe", "moe", "dense"], [sig_a, sig_b, sig_a]) == \
        ["moe hidden_size=64", "moe hidden_size=128", "dense"]
    # Two differing keys with one last component: named in full.
    en = config_signature({"data.sources.en.weight": "0.5", "data.sources.zh.weight": "0.5"})
    zh = config_signature({"data.sources.en.weight": "0.7", "data.sources.zh.weight": "0.3"})
    assert group_labels(["dense", "dense"], [en, zh])[0] == "dense data.sources.en.weight=0.5 data.sources.zh.weight=0.5"


# --- build helpers -----------------------------------------------------------------------------------

def test_runs_from_a_dense_checkpoint_are_their_own_configuration():
    """The upcycle sweep's dense stage and its dense-continued runs share model and budget; the
    continued ones (init.from_dense: a path per seed) form one configuration of their own."""
    stage = {"model.hidden_size": "64", "budget.chinchilla_fraction": "0.012", "init.from_dense": "None"}
    continued = [dict(stage, **{"init.from_dense": f"outputs/s{seed}/dense/checkpoints"}) for seed in (1, 2)]
    sigs = [config_signature(p) for p in (stage, *continued)]
    assert sigs[1] == sigs[2] != sigs[0]
    assert group_labels(["dense"] * 3, sigs) == ["dense from_dense=None"] + ["dense from_dense=checkpoint"] * 2


def test_catch_up_sentences():
    grid = np.array([1.0, 10.0, 100.0])
    assert "catches up with **up** at 50" in build._catch_up_sentence("moe", "up", grid, np.ones(3), np.ones(3), 50.0)
    assert "at or below up over all" in build._catch_up_sentence("moe", "up", grid, np.zeros(3), np.ones(3), None)
    assert "does not catch up with up up to 100" in \
        build._catch_up_sentence("moe", "up", grid, np.full(3, 2.0), np.ones(3), None)


def test_experts_cell_and_safe_names():
    run = pd.Series({"variant": "moe", "num_experts": 64.0, "top_k": np.nan})
    assert build._experts(run) == "64 / top-?"
    assert build._experts(pd.Series({"variant": "dense", "num_experts": 0.0, "top_k": 2.0})) == "-"
    assert render.file_name("moe s0/a b") == "moe_s0_a_b"


def test_sections_without_data_say_so(tmp_path):
    runs = pd.DataFrame({"name": ["a"], "group": ["dense"], "variant": ["dense"], "epochs": [{}],
                         "active_params": [1e6], "flops_per_token": [1.2e7]}, index=["r"])
    c = Collection("e", "all runs", runs)
    assert "No run logged `epochs/<source>`" in md_text(build.epochs_section(c))
    assert "| dense | 1M | 1.2e+07 | 6e+06 | 2.00 |" in md_text(build.flops_section(c))
    assert build.moe_section(c, tmp_path) == [] and build.upcycling_section(c, tmp_path) == []
    assert "No finished run" in md_text(build.matched_section(Collection("e", "all", pd.DataFrame()), tmp_path))


# --- render and figures ------------------------------------------------------------------------------

def test_render_formats_and_embeds(tmp_path):
    assert (render.count(1.234e6), render.count(950), render.count(float("nan"))) == ("1.23M", "950", "-")
    assert (render.sci(3.4e15), render.num(2.0), render.num(float("inf"))) == ("3.4e+15", "2.0000", "-")
    # Short runs: 0.0012 tokens per parameter and 0.012% of a budget, not 0.0 and 0.0%.
    assert (render.sci(0.0012), render.sci(20.0), render.pct(0.00012), render.pct(0.15)) == \
        ("0.0012", "20", "0.012%", "15%")
    png = tmp_path / "f.png"
    png.write_bytes(PNG_MAGIC + b"x")
    blocks = [render.Heading("H"), render.Para("**b** `c` <x>"), render.Bullets(["i"]),
              render.Table(["a|b"], [["1"]]), render.Figure(png, "cap")]
    md, page = render.write("T", blocks, tmp_path)
    assert "| a\\|b |" in md.read_text() and "![cap](f.png)" in md.read_text()
    html = page.read_text()
    assert "<b>b</b> <code>c</code> &lt;x&gt;" in html and "data:image/png;base64," in html
    # Rewritten with fewer figures: a PNG only the old report showed goes; the one it still shows,
    # one a hand-written note cites, and one no report showed stay.
    for name in ("gone.png", "cited.png", "mine.png"):
        (tmp_path / name).write_bytes(PNG_MAGIC)
    render.write("T", [*blocks, render.Figure(tmp_path / "gone.png", "g"), render.Figure(tmp_path / "cited.png", "c")],
                 tmp_path)
    (tmp_path / "CONCLUSION.md").write_text("![see](cited.png)")
    render.write("T", blocks, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cited.png", "f.png", "mine.png"]


def test_group_colors_share_variant_hue():
    runs = pd.DataFrame({"variant": ["dense", "moe", "moe"], "group": ["dense", "moe a", "moe b"]})
    colors = figures.group_colors(runs)
    assert len(set(colors.values())) == 3
    assert colors["moe a"][0] > colors["moe a"][2]  # an orange: more red than blue


@pytest.fixture
def captured(monkeypatch):
    """Figures handed to figures._save, kept open for inspection."""
    figs = []

    def keep(fig, path):
        figs.append(fig)
        return path

    monkeypatch.setattr(figures, "_save", keep)
    yield figs
    for fig in figs:
        plt.close(fig)


def test_single_point_curves_have_markers(captured, tmp_path):
    runs = pd.DataFrame({"variant": ["dense"], "group": ["dense"], "status": ["FINISHED"], "sunk_flops": [0.0],
                         "unigram_entropy": [np.nan]}, index=["r"])
    curves = {"r": pd.DataFrame({"tokens_seen": [1e5], "flops": [1e12], "flops_6nd": [6e11], "valid/loss": [5.0]})}
    figures.loss_curves(runs, curves, tmp_path / "a.png")
    lines = [ln for ax in captured[0].axes for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    assert len(lines) == 3 and all(ln.get_marker() == "o" for ln in lines)


def test_subset_evaluations_are_drawn_apart_from_full_ones(captured, tmp_path):
    """Intermediate subset points (valid_subset/loss) are their own dotted curve; the run's
    drawn curve holds only the full-set points (here the final one, with its marker)."""
    runs = pd.DataFrame({"variant": ["dense"], "group": ["dense"], "status": ["FINISHED"], "sunk_flops": [0.0],
                         "unigram_entropy": [np.nan]}, index=["r"])
    curves = {"r": pd.DataFrame({"tokens_seen": [1e5, 2e5, 3e5], "flops": [1e12, 2e12, 3e12],
                                 "flops_6nd": [6e11, 1.2e12, 1.8e12], "valid_subset/loss": [6.0, 5.5, np.nan],
                                 "valid/loss": [np.nan, np.nan, 5.2]})}
    figures.loss_curves(runs, curves, tmp_path / "a.png")
    for ax in captured[0].axes:
        (subset,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":" and len(ln.get_ydata()) == 2]
        assert list(subset.get_ydata()) == [6.0, 5.5]
        (full,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_ydata()) == 1]
        assert list(full.get_ydata()) == [5.2] and full.get_marker() == "o"
    assert "valid_subset/" in CURVE_PREFIXES


def test_moe_panels_plot_what_training_logs(captured, tmp_path):
    """The three MoE panels read the per-layer metrics that collect_moe_stats (what the trainer
    logs) returns after a forward pass: balance loss, drop rate and z-loss."""
    import torch
    from torch import nn

    from moe_morpheus.moe import MoEFeedForward, collect_moe_stats
    from tests.helpers.moe import FFN_MODEL, D, moe_cfg

    torch.manual_seed(0)
    model = nn.Sequential(MoEFeedForward(FFN_MODEL, moe_cfg()), MoEFeedForward(FFN_MODEL, moe_cfg()))
    model(torch.randn(4, 3, D))
    logged = {k: v for k, v in collect_moe_stats(model).items() if isinstance(v, float)}
    runs = pd.DataFrame({"variant": ["moe"], "group": ["moe"], "status": ["FINISHED"]}, index=["r"])
    curves = {"r": pd.DataFrame([{"tokens_seen": 1e5, **logged}, {"tokens_seen": 2e5, **logged}])}
    assert figures.moe_training(runs, curves, tmp_path / "m.png") is not None
    panels = captured[0].axes[:3]
    assert all(len(ax.get_lines()) == 1 for ax in panels)
    z = panels[2].get_lines()[0].get_ydata()
    layers = [v for k, v in logged.items() if k.startswith("moe/layer") and k.endswith("/z_loss")]
    assert len(layers) == 2 and z[0] == pytest.approx(np.mean(layers))


def test_matched_chart_has_one_label_per_level(captured, tmp_path):
    """Two levels of two configurations each: one x position and one tick label per level."""
    rows = [(f"{g} {c:.2g}", g, s, 3.0 + 0.01 * s, np.nan, c * f, c * f) for c in (2.25e11, 4.5e11)
            for g, f in (("dense", 1.0), ("moe", 1.01)) for s in (1, 2, 3)]
    levels = analysis.matched_final(points_frame(rows))
    runs = pd.DataFrame({"variant": ["dense", "moe"] * 2, "group": [r[0] for r in rows[::3]]})
    figures.matched(levels, runs, tmp_path / "m.png")
    ax = captured[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2.26e+11", "4.52e+11"]
    for collection in ax.collections:  # every configuration's markers within its level's slot
        x = collection.get_offsets()[:, 0]
        assert np.ptp(x) == 0 and abs(x[0] - round(x[0])) < 0.25


def test_figures_skip_empty_input(tmp_path):
    runs = pd.DataFrame({"variant": ["dense"], "group": ["dense"], "status": ["FINISHED"], "sunk_flops": [0.0],
                         "unigram_entropy": [np.nan]}, index=["r"])
    assert figures.loss_curves(runs, {}, tmp_path / "a.png") is None
    assert figures.valid_sets(runs, {}, [], tmp_path / "b.png") is None
    assert figures.moe_training(runs, {}, tmp_path / "c.png") is None
    assert figures.moe_load({}, "t", tmp_path / "d.png") is None
    assert figures.matched([], runs, tmp_path / "e.png") is None
    assert not list(tmp_path.iterdir())


def test_rank_and_compare_widens_intervals_for_several_rivals():
    """Picking the best of three arms and testing it against two: each interval at 97.5%
    (Bonferroni), so a difference that a single 95% interval would call is left undecided."""
    from scipy.stats import t

    best = {1: 2.0, 2: 2.1, 3: 2.05}
    rival = {1: 2.1, 2: 2.17, 3: 2.19}  # paired differences -0.10, -0.07, -0.14
    d = np.array([-0.10, -0.07, -0.14])
    half = {c: t.ppf(0.5 + c / 2, 2) * d.std(ddof=1) / np.sqrt(3) for c in (0.95, 0.975)}
    assert d.mean() + half[0.95] < 0 < d.mean() + half[0.975]  # the case that separates them
    _, (pair,) = stats.rank_and_compare({"best": best, "rival": rival})
    assert pair[2].decided and pair[2].hi == pytest.approx(d.mean() + half[0.95])
    _, comparisons = stats.rank_and_compare({"best": best, "rival": rival, "far": {1: 9.0, 2: 9.1, 3: 9.2}})
    close = dict((other, r) for _, other, r in comparisons)["rival"]
    assert close.hi == pytest.approx(d.mean() + half[0.975]) and not close.decided
    assert "97.5%, n=3" in stats.verdict_text(close, "best", "rival")
