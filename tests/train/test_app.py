"""End to end through the CLI: `python train.py +experiment=...` runs, multiruns with a parent
MLflow run, and clear errors (torchrun jobs: test_app_two_processes.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.resume import printed_argv, resume_line
from tests.helpers.train_app import SMALL, runs, train, train_command, train_env, wait_for

pytestmark = pytest.mark.slow


def test_moe_64e_three_steps_logs_an_mlflow_run(tmp_path):
    result = train(tmp_path, "+experiment=moe_64e", "trainer.steps=3", "trainer.eval_interval=2", "trainer.seed=5",
                   "upcycle.seed=7", *SMALL)
    frame = runs(tmp_path)
    assert len(frame) == 1
    run = MlflowClient().get_run(frame.run_id[0])
    assert run.info.status == "FINISHED"
    # The run names its folder and MLflow run at the start and the end, and train.log holds its story.
    (folder,) = (tmp_path / "outputs" / "moe_64e").iterdir()
    where = f"{folder}; MLflow run {run.info.run_id} at sqlite:///{tmp_path}/mlflow.db"
    assert f"run started: {where}" in result.stdout and f"finished: step 3 of 3; run folder {where}" in result.stdout
    log = (folder / "train.log").read_text()
    for text in ("run started", "config: moe_64e: 2 layers, hidden 64", "budget:", "step 1/3 loss", "step 3/3 loss",
                 "step 2 evaluation (subset): valid_subset/loss", "step 3 evaluation (full sets): valid/loss",
                 "validation loss", "finished: step 3 of 3"):
        assert text in log, text
    assert run.data.tags["variant"] == "moe" and run.data.tags["experiment"] == "moe_64e"
    assert run.data.tags["parallel_layout"] == "tp1-pp1-ep1-dp1"
    assert run.data.params["moe.num_experts"] == "64" and run.data.params["model.hidden_size"] == "64"
    assert int(run.data.params["count.total_params"]) > int(run.data.params["count.active_params"])
    # The effective seeds: data follows trainer.seed (data.seed null), upcycle.seed is pinned.
    assert [run.data.params[f"{k}.seed"] for k in ("trainer", "data", "upcycle")] == ["5", "5", "7"]
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    for key in ("tokens_seen", "target_tokens_seen", "flops", "flops_6nd", "budget_fraction", "valid/loss",
                "valid/loss_se", "valid/target_tokens", "valid/en_gmask/loss", "valid/en_gmask/loss_se",
                "moe/layer2/balance_loss", "epochs/en", "final/valid_loss", "final/unigram_entropy",
                "eval/mip_heldout/chrf", "eval/cloze_en/accuracy", "eval/cloze_zh/accuracy"):
        assert key in run.data.metrics, key
    assert run.data.metrics["tokens_seen"] == 3 * 4 * 64
    # cpu_demo's trainer.eval_subset at step 2 (the first of each set's 4 rows) under its own names,
    # the full sets at the end: valid/* holds full-set points only.
    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, key)}

    subset, full = history("valid_subset/target_tokens"), history("valid/target_tokens")
    assert sorted(subset) == [2] and sorted(full) == [3] and 0 < subset[2] < full[3]
    assert sorted(history("valid_subset/en_gmask/loss")) == [2] and sorted(history("valid/en_gmask/loss")) == [3]
    outputs = list((tmp_path / "outputs" / "moe_64e").iterdir())
    assert len(outputs) == 1 and (outputs[0] / "moe_load.json").exists()

    # The run's checkpoint generates in both languages and evaluates (issue 10's commands).
    checkpoints = outputs[0] / "checkpoints"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("It is a truth universally acknowledged that\n天下大势，[MASK]久必合。\n", encoding="utf-8")
    # Every form of checkpoint path: the run folder, its checkpoints folder (above), one step folder.
    generated = module(tmp_path, "moe_morpheus.inference.generate", f"checkpoint={outputs[0]}", "max_new_tokens=8",
                       f"file={prompts}")
    assert ">>> It is a truth universally acknowledged that" in generated and ">>> 天下大势" in generated
    # The fills between [[ and ]] (a space the model put before a fill stays outside the marks).
    assert "It is a truth universally acknowledged that [[" in generated
    assert re.search(r"\n天下大势， ?\[\[[^\]]*\]\]久必合。", generated), generated
    evaluated = module(tmp_path, "moe_morpheus.inference.evaluate", f"checkpoint={checkpoints / 'step_00000003'}",
                       "items=2", "mlflow=true")
    assert "valid/zh_gmask/perplexity" in evaluated and "eval/mip_heldout/chrf" in evaluated
    assert "evaluate: cloze zh" in evaluated  # the progress bar names its stage
    assert f"metrics to MLflow run {run.info.run_id} at sqlite:///{tmp_path}/mlflow.db (step 3)" in evaluated
    missing = module(tmp_path, "moe_morpheus.inference.generate", f"checkpoint={tmp_path / 'nowhere'}", "prompt=x",
                     check=False)
    assert "does not exist: pass a run's checkpoints folder" in missing


def module(tmp_path: Path, name: str, *args: str, check: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    result = subprocess.run([sys.executable, "-m", name, *args], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def test_multirun_makes_a_parent_with_nested_children_and_a_rerun_resumes_it(tmp_path):
    sweep = ["-m", "+sweeps=dense_vs_moe", "+experiment=dense,moe_8e", "trainer.seed=1",
             "budget.chinchilla_fraction=0.0005", "checkpoint.interval_steps=5", *SMALL]
    # SIGTERM (a session or allocation ending) once the second job has saved step 5.
    with (tmp_path / "stopped.log").open("w") as log:
        proc = subprocess.Popen(train_command(tmp_path, *sweep), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env=train_env())
        wait_for(lambda: list(tmp_path.glob("multirun/dense_vs_moe/1_*/checkpoints/step_00000005/checkpoint.json")),
                 proc, tmp_path / "stopped.log")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 143, (tmp_path / "stopped.log").read_text()[-3000:]
    before = runs(tmp_path)
    first_job = before[before["tags.experiment"] == "dense"]
    assert list(first_job.status) == ["FINISHED"] and list(before[before["tags.experiment"] == "moe_8e"].status) == ["KILLED"]
    first_losses = _losses(tmp_path, first_job.run_id.iloc[0])

    # The command it printed (the sweep's own, its folder pinned) skips the finished job and
    # continues the stopped one.
    line = resume_line((tmp_path / "stopped.log").read_text())
    assert printed_argv(line)[1:] == [*train_command(tmp_path, *sweep)[1:], f"hydra.sweep.dir={tmp_path / 'multirun/dense_vs_moe'}"]
    result = subprocess.run(printed_argv(line), cwd=tmp_path, capture_output=True, text=True, env=train_env(),
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "this run already finished" in result.stdout + result.stderr
    assert "resumed: finished jobs are skipped" in result.stderr
    frame = runs(tmp_path)
    assert sorted(frame.run_id) == sorted(before.run_id), "a rerun must continue the sweep's runs, not open others"
    assert _losses(tmp_path, first_job.run_id.iloc[0]) == first_losses
    resumed = _losses(tmp_path, frame[frame["tags.experiment"] == "moe_8e"].run_id.iloc[0])
    assert sorted(set(resumed)) == list(range(1, max(resumed) + 1)) and max(resumed) > 5
    parents = frame[frame["tags.mlflow.parentRunId"].isna()]
    # The multirun names its folder and parent run, and at the end the command that reports it.
    parent = parents.run_id.iloc[0]
    assert re.search(rf"multirun \S+: MLflow parent run {parent} at sqlite:///", result.stderr), result.stderr[-2000:]
    printed = re.search(rf"ended FINISHED \(MLflow parent run {parent}\); report: python -m moe_morpheus.report "
                        rf"(.+)", result.stderr)
    assert printed, result.stderr[-2000:]
    children = frame[frame["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and parents["tags.sweep"].iloc[0] == "dense_vs_moe"
    assert sorted(children["tags.experiment"]) == ["dense", "moe_8e"]
    assert set(children["tags.mlflow.parentRunId"]) == {parents.run_id.iloc[0]}
    assert set(children["tags.sweep"]) == {"dense_vs_moe"}

    # A fresh clone that carries the MLflow store but not multirun/ (no parent file, no
    # checkpoints): the same command reopens the parent and skips both jobs by their FINISHED runs.
    shutil.rmtree(tmp_path / "multirun")
    again = subprocess.run(train_command(tmp_path, *sweep), cwd=tmp_path, capture_output=True, text=True,
                           env=train_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("ended FINISHED; its checkpoints are not in") == 2
    assert f"MLflow parent run {parent} at" in again.stderr and "resumed: finished jobs are skipped" in again.stderr
    assert sorted(runs(tmp_path).run_id) == sorted(frame.run_id), "nothing may be trained or logged again"

    # The report reads these real runs: one table row per run, figures, a matched-compute
    # comparison naming whichever variant has the lower loss there.
    from moe_morpheus.report.__main__ import main as report

    out = tmp_path / "report"
    assert printed.group(1).split() == ["experiment=moe_morpheus", "sweep=dense_vs_moe",
                                        f"tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    assert report([*printed.group(1).split(), f"out={out}"]) == 0
    text = (out / "report.md").read_text()
    for run_id in children.run_id:
        assert run_id in text
    assert list(out.glob("*.png")) and (out / "report.html").stat().st_size > 10_000
    assert "## Evaluation" in text and "en_gmask perplexity" in text and "cloze_zh/accuracy" in text


def _losses(tmp_path: Path, run_id: str) -> dict[int, list[float]]:
    """Every train/loss a run logged, by step."""
    values: dict[int, list[float]] = {}
    for m in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "train/loss"):
        values.setdefault(m.step, []).append(m.value)
    return values


@pytest.mark.parametrize("args,message", [
    (["+experiment=nonexistent"], "Could not find 'experiment/nonexistent'"),
    (["+experiment=dense", "model.hiden_size=3"], "unknown config key model.hiden_size: did you mean model.hidden_size?"),
    (["+experiment=dense", "+trainer.lerning_rate=1"], "unknown config key trainer.lerning_rate: did you mean trainer.lr?"),
    (["+experiment=moe_8e", "parallel.ep=3"], "moe.num_experts=8 is not divisible by parallel.ep=3"),
    (["+experiment=moe_8e", "moe.top_k=9"], "moe.top_k=9 must be between 1 and moe.num_experts=8"),
    (["+experiment=moe_8e", "moe.expert_hidden_size=96"], "moe.granularity=2 and moe.expert_hidden_size=96 are both set"),
    (["+experiment=moe_8e", "moe.granularity=5"], "moe.granularity=5 does not divide model.ffn_hidden_size=192"),
    (["+experiment=dense", "budget.chinchilla_fraction=1e-9"], "rounds to 0 steps"),
    (["+sweeps=dense_vs_moe"], "run it with -m"),
    (["+experiment=dense", "tracking.uri=http://127.0.0.1:9", "tracking.strict=true"], "127.0.0.1:9"),
], ids=["unknown-experiment", "typo", "typo-added", "ep", "top-k", "expert-width-twice", "granularity", "zero-steps",
        "sweep-without-m", "unreachable-tracking"])
def test_bad_input_gives_a_clear_error_and_leaves_no_run_folder(tmp_path, args, message):
    result = train(tmp_path, *args, *SMALL, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    outputs = tmp_path / "outputs"
    leftovers = [p for p in outputs.rglob("*") if p.is_dir() and (p / ".hydra").is_dir()] if outputs.exists() else []
    assert leftovers == []
