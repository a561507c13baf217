"""Report tests: pure analysis on small arrays, and whole reports from synthetic MLflow stores.

One SQLite store (creating one costs ~8 s of MLflow migrations) holds an experiment per case,
written with MlflowClient exactly as the run contract says the trainer logs: tags, dotted params,
metrics against the step, final/ summaries, moe_load.json. Synthetic validation loss is a power
law in the detailed FLOPs, L(C) = 2 + 5 (C / 1e10)^-0.3, plus per-variant and per-seed offsets,
so the matched-compute margin and the seed spread are known in advance.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from moe_morpheus.report import analysis, build, figures, render
from moe_morpheus.report.__main__ import main
from moe_morpheus.report.collect import (
    Collection,
    SelectionError,
    collect,
    config_signature,
    curve_frame,
    group_labels,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 30
TOKENS_PER_STEP = 1e5
N_ACTIVE = 1e6
FPT = {"dense": 1.2e7, "moe": 1.3e7, "upcycled": 1.3e7}  # detailed FLOPs/token: 2x 6N, MoE a bit more


def base_loss(c):
    return 2.0 + 5.0 * (np.asarray(c, float) / 1e10) ** -0.3


def log_run(client, exp_id, *, variant, seed=0, offset=0.0, sweep=None, parent=None, status="FINISHED",
            steps=STEPS, loss=base_loss, fpt=None, n_active=N_ACTIVE, sunk_flops=0.0, upcycled_from=None,
            finals=True, load=None, params=None, name=None, epochs_corpus=2e6):
    """One training run following the contract; returns its id. ``loss`` maps total FLOPs (own +
    sunk) to the validation loss before ``offset``."""
    fpt = fpt or FPT[variant]
    tags = {"variant": variant, "experiment": f"{variant}_tiny", "parallel_layout": "tp1-pp1-ep1-dp1"}
    if sweep:
        tags["sweep"] = sweep
    if parent:
        tags["mlflow.parentRunId"] = parent
    if upcycled_from:
        tags["upcycled_from_run"] = upcycled_from
    run = client.create_run(exp_id, tags=tags, run_name=name or f"{variant}-s{seed}")
    rid = run.info.run_id
    p = {"model.num_layers": "2", "model.hidden_size": "64", "model.num_attention_heads": "4",
         "model.vocab_size": "8000", "model.seq_length": "128", "moe.layer_freq": "0" if variant == "dense" else "2",
         "moe.num_experts": "0" if variant == "dense" else "8", "moe.top_k": "2", "moe.gate": "naive",
         "trainer.seed": str(seed), "trainer.global_batch_size": "8", "budget.chinchilla_fraction": "1.0",
         "budget.tokens_per_param": "20", "count.total_params": str(n_active * (1 if variant == "dense" else 3)),
         "count.active_params": str(n_active), "count.embedding_params": str(0.5 * n_active),
         "count.non_embedding_params": str(0.5 * n_active * (1 if variant == "dense" else 5)),
         "budget.chinchilla_tokens": str(20 * n_active), "budget.planned_tokens": str(steps * TOKENS_PER_STEP),
         "flops_per_token": str(fpt)}
    if sunk_flops:
        p.update({"sunk.tokens": str(sunk_flops / FPT["dense"]), "sunk.flops": str(sunk_flops)})
    p.update(params or {})
    metrics = []
    for step in range(1, steps + 1):
        tokens = step * TOKENS_PER_STEP
        flops = tokens * fpt
        m = {"tokens_seen": tokens, "flops": flops, "flops_6nd": 6 * n_active * tokens,
             "budget_fraction": tokens / (20 * n_active), "train/loss": float(loss(flops + sunk_flops)) + offset,
             "epochs/en_books": tokens / epochs_corpus, "epochs/zh_books": tokens / (4 * epochs_corpus)}
        if step % 2 == 0 or step == 1:
            v = float(loss(flops + sunk_flops)) + offset
            m.update({"valid/loss": v, "valid/en_mask/loss": v + 0.1, "valid/zh_gmask/loss": v - 0.1})
        if variant != "dense":
            m.update({"moe/layer1/balance_loss": 1 + 0.2 * math.exp(-step / 10), "moe/layer1/drop_rate": 0.0,
                      "moe/aux_loss": 0.01 * (1 + 0.2 * math.exp(-step / 10))})
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


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """uri, {case: run ids} for the cases: clear (MoE wins by 0.05, seed spread 0.008), tied
    (MoE ahead by 0.004, spread 0.02), crash, empty, upcycle, scaling."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    def experiment(name):
        return client.create_experiment(name, artifact_location=str(root / "artifacts" / name))

    ids = {}
    exp = experiment("clear")
    parent = sweep_parent(client, exp, "dvm")
    ids["clear"] = [log_run(client, exp, variant=v, seed=s, offset=(-0.05 if v == "moe" else 0) + o, sweep="dvm",
                            parent=parent, load=LOAD if v == "moe" else None)
                    for v in ("dense", "moe") for s, o in ((0, -0.004), (1, 0.004))]
    ids["clear_parent"] = parent
    # A run from another sweep in the same experiment: left out by --sweep, a "mixed sweeps" problem otherwise.
    ids["clear_stray"] = log_run(client, exp, variant="dense", seed=7, sweep="older", name="stray")

    exp = experiment("tied")
    ids["tied_parents"] = [sweep_parent(client, exp, "t") for _ in range(2)]  # the sweep launched twice
    ids["tied"] = [log_run(client, exp, variant=v, seed=s, offset=(-0.004 if v == "moe" else 0) + o, sweep="t",
                           load=LOAD if v == "moe" else None)
                   for v in ("dense", "moe") for s, o in ((0, -0.01), (1, 0.01))]

    exp = experiment("crash")
    ids["crash"] = [log_run(client, exp, variant="dense", sweep="c"),
                    log_run(client, exp, variant="dense", sweep="c", name="dense-rerun"),  # same seed 0
                    log_run(client, exp, variant="moe", sweep="c", status="FAILED", steps=12, finals=False),
                    client.create_run(exp, tags={"variant": "moe", "sweep": "c"}, run_name="killed").info.run_id]
    client.create_run(exp, run_name="notebook")  # no variant tag: not a training run

    experiment("empty")

    # Upcycling: dense parent trained to F0; dense continued and upcycled charged F0 as sunk compute;
    # MoE from scratch behind upcycled early, ahead late: its advantage over dense grows as
    # 0.3 t^2 with t = (C - F0) / (c_max - F0), the upcycled one saturates at 0.15 within ~F0, so
    # scratch catches up at t = sqrt(1/2).
    exp = experiment("upcycle")
    f0 = 10 * TOKENS_PER_STEP * FPT["dense"]
    c_max = STEPS * TOKENS_PER_STEP * FPT["moe"] + f0
    dense_parent = log_run(client, exp, variant="dense", sweep="up", steps=10, name="dense-parent",
                           params={"budget.chinchilla_fraction": "0.25"})

    def upcycled_loss(c):
        return base_loss(c) - 0.15 * (1 - np.exp(-(np.asarray(c) - f0) / (0.3 * f0)))

    def scratch_loss(c):
        return base_loss(c) - 0.3 * (np.clip(np.asarray(c) - f0, 0, None) / (c_max - f0)) ** 2

    ids["upcycle"] = {
        "parent": dense_parent,
        "dense": [log_run(client, exp, variant="dense", sweep="up", sunk_flops=f0, seed=s, name=f"dense-cont-s{s}")
                  for s in (0, 1)],
        "upcycled": [log_run(client, exp, variant="upcycled", sweep="up", sunk_flops=f0, upcycled_from=dense_parent,
                             loss=upcycled_loss, seed=s, load=LOAD) for s in (0, 1)],
        "moe": [log_run(client, exp, variant="moe", sweep="up", loss=scratch_loss, seed=s, steps=40, load=LOAD)
                for s in (0, 1)],
        "f0": f0, "c_max": c_max,
    }

    # Scaling: final losses exactly from a known law at 4 sizes x 3 token counts.
    exp = experiment("scaling")
    law = SCALING_LAW
    runs = []
    for n in (1e6, 3e6, 1e7, 3e7):
        for d in (2e7, 6e7, 2e8):
            loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
            rid = client.create_run(exp, tags={"variant": "dense", "sweep": "ladder"}).info.run_id
            client.log_batch(rid, params=[Param("count.active_params", str(n)), Param("trainer.seed", "0"),
                                          Param("model.hidden_size", str(int(n ** 0.5)))],
                             metrics=[Metric("final/valid_loss", loss, 0, 1), Metric("final/tokens", d, 0, 1),
                                      Metric("valid/loss", loss, 0, 1), Metric("tokens_seen", d, 0, 1),
                                      Metric("flops", 6 * n * d, 0, 1)],
                             tags=[RunTag("mlflow.runName", f"N{n:.0e}-D{d:.0e}")])
            client.set_terminated(rid, "FINISHED")
            runs.append(rid)
    ids["scaling"] = runs
    return uri, ids


def report(tmp_path, uri, *args):
    out = tmp_path / "report"
    assert main(["--tracking-uri", uri, "--out", str(out), *args]) == 0
    return out, (out / "report.md").read_text(), (out / "report.html").read_text()


def run_table_rows(md: str) -> list[str]:
    lines = md.split("## Runs", 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("| ") and "`" in line]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


# --- whole reports -----------------------------------------------------------------------------------

def test_clear_winner_report(tmp_path, store):
    uri, ids = store
    out, md, page = report(tmp_path, uri, "--experiment", "clear", "--sweep", "dvm")
    rows = run_table_rows(md)
    assert len(rows) == 4 and all(any(rid in r for r in rows) for rid in ids["clear"])
    assert ids["clear_stray"] not in md and ids["clear_parent"] not in rows[0]
    assert "**moe** has the lower validation loss" in md and "larger than the seed-to-seed spread" in md
    for name in ("loss_curves.png", "valid_sets.png", "matched_compute.png", "moe_training.png"):
        assert_png(out / name)
    heatmaps = sorted(out.glob("moe_load_*.png"))
    assert len(heatmaps) == 2
    assert_png(heatmaps[0])
    # Self-contained: every figure is embedded, none linked.
    assert page.count('src="data:image/png;base64,') == 6 and ".png\"" not in page
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
    assert len(c.runs) == 5 and any("mixed sweeps" in p for p in c.problems)


def test_parent_selection(store):
    uri, ids = store
    c = collect(uri, "clear", parent=ids["clear_parent"])
    assert sorted(c.runs.index) == sorted(ids["clear"]) and not c.problems
    assert c.runs["group"].tolist() == ["dense", "dense", "moe", "moe"]


def test_no_verdict_within_seed_spread(tmp_path, store):
    uri, ids = store
    c = collect(uri, "tied", sweep="t")
    assert len(c.runs) == 4 and c.problems == [
        f"sweep 't' was launched 2 times (parent runs {', '.join(sorted(ids['tied_parents']))}); the runs of all launches "
        "are included together."]
    md = md_text(build.matched_section(c, tmp_path))
    assert "**No verdict**" in md and "moe is ahead of dense by 0.004" in md


def test_crashed_and_stray_runs_are_problems(tmp_path, store):
    uri, ids = store
    out, md, _ = report(tmp_path, uri, "--experiment", "crash")
    problems = md.split("## Problems", 1)[1].split("\n## ", 1)[0]
    assert f"run `{ids['crash'][2]}`" in problems and "ended FAILED" in problems
    assert "2 runs of dense share seed 0" in problems
    assert "still RUNNING" in problems and "logged no valid/loss" in problems
    assert "no variant tag" in problems and "no moe_load.json" in problems
    assert len(run_table_rows(md)) == 4
    assert "at least two configurations" in md  # only the dense run can be compared
    assert_png(out / "loss_curves.png")


def test_empty_experiment(tmp_path, store):
    uri, _ = store
    out, md, page = report(tmp_path, uri, "--experiment", "empty")
    assert "no training runs found" in md and "no training runs found" in page
    assert not list(out.glob("*.png"))


def test_unknown_names_exit_nonzero(tmp_path, store, capsys):
    uri, _ = store
    assert main(["--tracking-uri", uri, "--experiment", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "clear" in err and "scaling" in err
    assert main(["--tracking-uri", uri, "--experiment", "clear", "--sweep", "nope", "--out", str(tmp_path)]) == 2
    assert "dvm" in capsys.readouterr().err
    assert main(["--tracking-uri", uri, "--experiment", "clear", "--parent", "abc", "--out", str(tmp_path)]) == 2
    assert main(["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}", "--experiment", "x"]) == 2
    assert "no MLflow database" in capsys.readouterr().err


def test_experiment_config_tag_selects_runs(store):
    uri, ids = store
    c = collect(uri, "upcycled_tiny")  # not an MLflow experiment: the runs' `experiment` tag
    assert sorted(c.runs.index) == sorted(ids["upcycle"]["upcycled"])
    with pytest.raises(SelectionError, match="Experiments that exist"):
        collect(uri, "o'brien")


def test_upcycling_crossover(tmp_path, store):
    uri, ids = store
    c = collect(uri, "upcycle")
    md = md_text(build.matched_section(c, tmp_path) + build.upcycling_section(c, tmp_path))
    up = ids["upcycle"]
    at = float(md.split("**moe** catches up with **upcycled** at ", 1)[1].split(" ")[0])
    assert at == pytest.approx(up["f0"] + 0.5 ** 0.5 * (up["c_max"] - up["f0"]), rel=0.03)
    assert "does not catch up with upcycled" in md  # dense continued
    assert f"`{up['parent']}`" in md.split("## Upcycling", 1)[1]  # handoff table names the parent
    assert "Dense parents of upcycled runs (1) are left out" in md
    assert_png(tmp_path / "upcycling_crossover.png")


def test_scaling_section_recovers_law(tmp_path, store):
    uri, _ = store
    md = md_text(build.scaling_section(collect(uri, "scaling"), tmp_path))  # one fit: ~3 s
    law = re.search(r"L\(N, D\) = ([\d.]+) \+ ([\d.e+]+) / N\^([\d.]+) \+ ([\d.e+]+) / D\^([\d.]+)", md)
    e, a, alpha, b, beta = map(float, law.groups())
    assert e == pytest.approx(SCALING_LAW["E"], abs=0.02)
    assert alpha == pytest.approx(SCALING_LAW["alpha"], abs=0.01)
    assert beta == pytest.approx(SCALING_LAW["beta"], abs=0.01)
    assert "12 runs" in md and "N_opt" in md
    residuals = md.split("| residual |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert len(residuals) == 12 and all(abs(float(r.split("|")[-2])) < 1e-3 for r in residuals)
    assert_png(tmp_path / "scaling_dense.png")


# --- analysis ----------------------------------------------------------------------------------------

def test_loss_at_is_log_linear_and_never_extrapolates():
    x = np.array([1e9, 1e10, 1e11])
    y = np.array([3.0, 2.0, 1.0])  # linear in log10 x
    np.testing.assert_allclose(analysis.loss_at(x[::-1], y[::-1], [10 ** 9.5, 1e10, 10 ** 10.25]), [2.5, 2.0, 1.75])
    assert np.isnan(analysis.loss_at(x, y, [1e8, 2e11])).all()
    assert np.isnan(analysis.loss_at(np.array([]), np.array([]), 1e9)).all()


def test_compute_points_span_the_shared_range():
    series = {"a": (np.array([1e9, 1e12]), np.ones(2)), "b": (np.array([1e10, 1e11]), np.ones(2))}
    np.testing.assert_allclose(analysis.compute_points(series, 3), [1e10, 10 ** 10.5, 1e11])
    assert analysis.compute_points({"a": (np.array([1.0, 2.0]), np.ones(2)),
                                    "b": (np.array([3.0, 4.0]), np.ones(2))}).size == 0
    np.testing.assert_allclose(analysis.compute_points(series, 1), [1e11])


def test_verdict_kinds():
    def stats(rows):
        return pd.DataFrame(rows, columns=["group", "mean", "spread", "n"]).set_index("group")

    v = analysis.verdict(stats([("dense", 3.0, 0.01, 2), ("moe", 2.9, 0.02, 2)]))
    assert (v.winner, v.runner_up, v.kind) == ("moe", "dense", "winner") and v.margin == pytest.approx(0.1)
    assert "**moe**" in v.sentence(1e12)
    v = analysis.verdict(stats([("dense", 3.0, 0.2, 3), ("moe", 2.9, 0.02, 2)]))
    assert v.kind == "no verdict" and v.spread == pytest.approx(0.2) and "No verdict" in v.sentence(1e12)
    v = analysis.verdict(stats([("dense", 3.0, 0.0, 1), ("moe", 2.9, 0.0, 1)]))
    assert v.kind == "unmeasured" and "not a verdict" in v.sentence(1e12)
    assert analysis.verdict(stats([("dense", 3.0, 0.0, 1), ("moe", np.nan, 0.0, 1)])) is None


def test_matched_compute_averages_seeds():
    x = np.geomspace(1e9, 1e11, 5)
    series = {"d0": (x, np.full(5, 3.0)), "d1": (x, np.full(5, 3.2)), "m0": (x * 2, np.full(5, 2.5))}
    mc = analysis.matched_compute(series, {"d0": "dense", "d1": "dense", "m0": "moe"}, 2)
    np.testing.assert_allclose(mc.points, [2e9, 1e11])
    last = mc.table[mc.table["point"] == 1].set_index("group")
    assert last.loc["dense", "mean"] == pytest.approx(3.1) and last.loc["dense", "spread"] == pytest.approx(0.2)
    assert mc.headline.winner == "moe" and mc.headline.kind == "winner"


def test_mean_curve_needs_every_run():
    grid = np.array([1.0, 10.0, 100.0])
    m = analysis.mean_curve([(np.array([1.0, 100.0]), np.array([2.0, 4.0])),
                             (np.array([1.0, 10.0]), np.array([4.0, 4.0]))], grid)
    np.testing.assert_allclose(m, [3.0, 3.5, np.nan])
    assert np.isnan(analysis.mean_curve([], grid)).all()


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


def test_handoff_table_and_parents():
    runs = pd.DataFrame({"variant": ["dense", "upcycled"], "name": ["d", "u"], "upcycled_from": [None, "d1"],
                         "final_valid_loss": [3.0, 2.5], "sunk_tokens": [0.0, 1e6], "sunk_flops": [0.0, 1e12]},
                        index=["d1", "u1"])
    curves = {"u1": pd.DataFrame({"valid/loss": [np.nan, 3.01, 2.9]})}
    t = analysis.handoff_table(runs, curves)
    assert t.loc[0, "parent_final_loss"] == 3.0 and t.loc[0, "first_valid_loss"] == 3.01
    assert analysis.upcycling_parents(runs) == ["d1"]
    assert analysis.upcycling_parents(pd.DataFrame()) == []


def test_loss_series_adds_sunk_and_filters():
    runs = pd.DataFrame({"status": ["FINISHED", "FAILED"], "sunk_flops": [10.0, 0.0]}, index=["a", "b"])
    curve = pd.DataFrame({"flops": [1.0, 2.0, 3.0], "valid/loss": [5.0, np.nan, 4.0]})
    s = analysis.loss_series(runs, {"a": curve, "b": curve}, "flops", add_sunk=True, finished_only=True)
    assert list(s) == ["a"]
    np.testing.assert_allclose(s["a"][0], [11.0, 13.0])
    assert set(analysis.loss_series(runs, {"a": curve, "b": curve})) == {"a", "b"}
    assert analysis.loss_series(runs, {"a": curve}, "tokens_seen") == {}


# --- collect -----------------------------------------------------------------------------------------

def test_curve_frame_dedupes_and_fills_axes():
    frame = curve_frame({"tokens_seen": [(1, 0, 100.0), (3, 0, 300.0)],
                         "valid/loss": [(2, 0, 5.0), (2, 9, 4.0), (4, 0, 3.5)], "flops": []})
    assert frame.loc[2, "valid/loss"] == 4.0  # the later timestamp (a resumed run's replay) wins
    assert frame.loc[2, "tokens_seen"] == 200.0 and np.isnan(frame.loc[4, "tokens_seen"])
    assert "flops" not in frame


def test_group_labels_name_differing_params():
    sig_a = config_signature({"model.hidden_size": "64", "trainer.seed": "0", "moe.top_k": "2"})
    sig_b = config_signature({"model.hidden_size": "128", "trainer.seed": "1", "moe.top_k": "2"})
    assert sig_a == (("model.hidden_size", "64"), ("moe.top_k", "2"))
    assert group_labels(["moe", "moe", "dense"], [sig_a, sig_b, sig_a]) == \
        ["moe hidden_size=64", "moe hidden_size=128", "dense"]


# --- build helpers -----------------------------------------------------------------------------------

def test_runs_from_a_dense_checkpoint_are_their_own_configuration():
    """The upcycle sweep's dense stage and its dense-continued runs share model and budget; the
    continued ones (init.from_dense: a path per seed) form one configuration of their own."""
    stage = {"model.hidden_size": "64", "budget.chinchilla_fraction": "0.012", "init.from_dense": "None"}
    continued = [dict(stage, **{"init.from_dense": f"outputs/s{seed}/dense/checkpoints"}) for seed in (1, 2)]
    sigs = [config_signature(p) for p in (stage, *continued)]
    assert sigs[1] == sigs[2] != sigs[0]
    assert group_labels(["dense"] * 3, sigs) == ["dense from_dense=-"] + ["dense from_dense=checkpoint"] * 2


def test_catch_up_sentences():
    grid = np.array([1.0, 10.0, 100.0])
    nan = np.full(3, np.nan)
    assert "no common total compute" in build._catch_up_sentence("moe", "up", grid, nan, np.ones(3), None)
    assert "catches up with **up** at 50" in build._catch_up_sentence("moe", "up", grid, np.ones(3), np.ones(3), 50.0)
    assert "at or below up over all" in build._catch_up_sentence("moe", "up", grid, np.zeros(3), np.ones(3), None)
    assert "does not catch up with up up to 100" in \
        build._catch_up_sentence("moe", "up", grid, np.full(3, 2.0), np.ones(3), None)


def test_experts_cell_and_safe_names():
    run = pd.Series({"variant": "moe", "num_experts": 64.0, "top_k": np.nan})
    assert build._experts(run) == "64 / top-?"
    assert build._experts(pd.Series({"variant": "dense", "num_experts": 0.0, "top_k": 2.0})) == "-"
    assert build._safe("moe s0/a b") == "moe_s0_a_b"


def test_sections_without_data_say_so(tmp_path):
    runs = pd.DataFrame({"name": ["a"], "group": ["dense"], "variant": ["dense"], "epochs": [{}],
                         "active_params": [1e6], "flops_per_token": [1.2e7]}, index=["r"])
    c = Collection("e", "all runs", runs)
    assert "No run logged `epochs/<source>`" in md_text(build.epochs_section(c))
    assert "| dense | 1M | 1.2e+07 | 6e+06 | 2.00 |" in md_text(build.flops_section(c))
    assert build.moe_section(c, tmp_path) == [] and build.upcycling_section(c, tmp_path) == []


# --- render and figures ------------------------------------------------------------------------------

def test_render_formats_and_embeds(tmp_path):
    assert (render.count(1.234e6), render.count(950), render.count(float("nan"))) == ("1.23M", "950", "-")
    assert (render.sci(3.4e15), render.num(2.0), render.num(float("inf"))) == ("3.4e+15", "2.0000", "-")
    png = tmp_path / "f.png"
    png.write_bytes(PNG_MAGIC + b"x")
    blocks = [render.Heading("H"), render.Para("**b** `c` <x>"), render.Bullets(["i"]),
              render.Table(["a|b"], [["1"]]), render.Figure(png, "cap")]
    md, page = render.write("T", blocks, tmp_path)
    assert "| a\\|b |" in md.read_text() and "![cap](f.png)" in md.read_text()
    html = page.read_text()
    assert "<b>b</b> <code>c</code> &lt;x&gt;" in html and "data:image/png;base64," in html


def test_group_colors_share_variant_hue():
    runs = pd.DataFrame({"variant": ["dense", "moe", "moe"], "group": ["dense", "moe a", "moe b"]})
    colors = figures.group_colors(runs)
    assert len(set(colors.values())) == 3
    assert colors["moe a"][0] > colors["moe a"][2]  # an orange: more red than blue


def test_figures_skip_empty_input(tmp_path):
    runs = pd.DataFrame({"variant": ["dense"], "group": ["dense"], "status": ["FINISHED"], "sunk_flops": [0.0],
                         "unigram_entropy": [np.nan]}, index=["r"])
    assert figures.loss_curves(runs, {}, tmp_path / "a.png") is None
    assert figures.valid_sets(runs, {}, [], tmp_path / "b.png") is None
    assert figures.moe_training(runs, {}, tmp_path / "c.png") is None
    assert figures.moe_load({}, "t", tmp_path / "d.png") is None
    assert figures.crossover(runs, {}, np.array([1.0]), {}, tmp_path / "e.png") is None
    assert not list(tmp_path.iterdir())
