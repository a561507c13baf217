"""Staged sweep ``upcycle_vs_scratch``: does upcycling a trained dense model beat continuing it,
or training the MoE from scratch? (docs/design.md#upcycle-sweep; Komatsuzaki et al. 2022 find
upcycling ahead until about 100-120% extra compute.)

``python -m moe_morpheus.upcycle.sweep [key=value ...]`` (keys and defaults:
:class:`~moe_morpheus.config.SweepConfig`; ``overrides=[...]`` go to every ``train.py`` job).
Hydra's basic sweeper runs independent jobs; these depend on each other, so this driver runs the
graph, one ``train.py`` process per stage, in order. Per seed:

1. ``dense``: the dense experiment to ``dense_fraction`` of its Chinchilla budget;
2. for each extra budget x (a fraction of the same budget; the MoE targets have the dense
   model's active parameters, so x is the same extra compute for all):
   ``dense_continued`` (init.from_dense, a dense target: same weights, fresh schedule),
   ``upcycled`` (init.from_dense into the MoE target), ``scratch_extra`` (the MoE from random
   init with x: equal *additional* compute, the dense cost sunk) and ``scratch_total`` (x +
   dense_fraction: equal *total* compute, the dense cost counted; continued and upcycled runs
   log ``flops_with_sunk``).

The driver tags every stage's run with its role (``sweep_role``: dense, dense_continued,
upcycled, scratch_extra, scratch_total) and extra budget (``sweep_extra``), which the report
labels them by (moe_morpheus/report/roles.py).

Resumable: a stage whose MLflow run (found by its run name under the sweep's tag) is FINISHED
is not run again; an unfinished one restarts in its own folder and resumes from its own
checkpoints. One MLflow parent run per sweep folder (found again by its tags), every stage a
nested child (``MOE_MORPHEUS_PARENT_RUN_ID``, as tracking.MLflowSweepCallback does). At the end
``summary.json`` and a printed table give the seed-mean final validation loss per role and
extra budget, and the paired-seed verdicts at equal extra and at equal total compute
(moe_morpheus/report/stats.py: a verdict needs >= 3 seeds and a 95% interval excluding 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from moe_morpheus.config import ConfigError, SweepConfig
from moe_morpheus.config.cli import fail, parse_options
from moe_morpheus.report.roles import EQUAL_EXTRA, EQUAL_TOTAL, ROLES, compare_per_extra, stage_tags
from moe_morpheus.report.stats import interval_text, verdict_text
from moe_morpheus.tracking.names import git_commit, resolve_uri
from moe_morpheus.tracking.tracker import ensure_experiment

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("dense_continued", "upcycled", "scratch_extra", "scratch_total")


class MissingDenseCheckpoint(RuntimeError):
    """A stage that starts from the dense checkpoint, whose dense stage finished elsewhere."""


@dataclass
class Stage:
    key: str  # s1/x0.006/upcycled
    args: list[str]
    dense_checkpoint: Path | None  # the checkpoint folder it starts from, None for a stage that starts fresh


def load_config(argv: list[str]) -> SweepConfig:
    """The sweep's settings from ``key=value`` arguments (``--help`` lists them)."""
    return parse_options(SweepConfig, argv, prog="moe_morpheus.upcycle.sweep", summary=__doc__.split("\n\n")[0])[0]


def plan(cfg: SweepConfig) -> list[Stage]:
    """Every stage in run order (the dense stage of a seed before the stages that start from it)."""
    out = Path(cfg.output_dir).resolve()

    def length(fraction: float) -> list[str]:
        if cfg.stage_steps is not None:
            return [f"trainer.steps={cfg.stage_steps}"]
        return [f"budget.chinchilla_fraction={fraction:g}"]

    stages = []
    for seed in cfg.seeds:
        dense_ckpt = out / f"s{seed}" / "dense" / "checkpoints"
        stages.append(Stage(f"s{seed}/dense", [f"+experiment={cfg.dense_experiment}",
                                               *length(cfg.dense_fraction)], None))
        for x in cfg.extra_fractions:
            prefix = f"s{seed}/x{x:g}"
            init = f"init.from_dense={dense_ckpt}"
            stages += [
                Stage(f"{prefix}/dense_continued", [f"+experiment={cfg.dense_experiment}", init, *length(x)],
                      dense_ckpt),
                Stage(f"{prefix}/upcycled", [f"+experiment={cfg.moe_experiment}", init, *length(x)], dense_ckpt),
                Stage(f"{prefix}/scratch_extra", [f"+experiment={cfg.scratch_experiment}", *length(x)], None),
                Stage(f"{prefix}/scratch_total", [f"+experiment={cfg.scratch_experiment}",
                                                  *length(x + cfg.dense_fraction)], None),
            ]
    for stage in stages:
        seed = stage.key.split("/")[0][1:]
        stage.args += [f"trainer.seed={seed}", f"hydra.run.dir={out / stage.key}",
                       f"tracking.run_name={cfg.name}/{stage.key}", f"sweep={cfg.name}",
                       f"tracking.experiment={cfg.tracking_experiment}", *cfg.overrides]
    return stages


class Driver:
    """Runs the stages of one sweep folder against one MLflow store."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.uri = resolve_uri(cfg.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = ensure_experiment(self.client, cfg.tracking_experiment)
        self.out = Path(cfg.output_dir).resolve()

    def parent(self) -> str:
        """The sweep folder's parent run: found by its tags, else created."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.sweep = '{self.cfg.name}' and tags.sweep_dir = '{self.out}' "
                                                f"and tags.sweep_driver = 'upcycle_sweep'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"sweep": self.cfg.name, "sweep_dir": str(self.out), "sweep_driver": "upcycle_sweep"}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        return self.client.create_run(self.experiment_id, run_name=self.cfg.name, tags=tags).info.run_id

    def finished(self, stage: Stage):
        """The FINISHED MLflow run of ``stage``, or None."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.sweep = '{self.cfg.name}' and "
                                                f"attributes.run_name = '{self.cfg.name}/{stage.key}' and "
                                                f"attributes.status = 'FINISHED'")
        return runs[0] if runs else None

    def run_stage(self, stage: Stage, parent: str) -> None:
        # The store says which stages finished, the dense checkpoint lives only in this folder: on
        # another clone (a committed store, a new machine) the dense stage is skipped as FINISHED
        # and its checkpoint is not there to start from.
        if stage.dense_checkpoint is not None and not stage.dense_checkpoint.is_dir():
            raise MissingDenseCheckpoint(
                f"stage {stage.key} starts from the dense checkpoint {stage.dense_checkpoint}, which is not there "
                f"(its dense stage finished in MLflow from another folder or machine): restore that folder, or "
                f"rerun every stage under a new name=...")
        env = dict(os.environ)
        env["MOE_MORPHEUS_PARENT_RUN_ID"] = parent
        command = [sys.executable, str(REPO_ROOT / "train.py"), f"tracking.uri={self.uri}", *stage.args]
        print(f"[{self.cfg.name}] running {stage.key}", flush=True)
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"stage {stage.key} failed (exit {result.returncode}): {' '.join(command)}")

    def tag(self, stage: Stage) -> None:
        """Tag the stage's finished run with its role (runs from before these tags get them now)."""
        run = self.finished(stage)
        for key, value in stage_tags(stage.key).items():
            if run is not None and run.data.tags.get(key) != value:
                self.client.set_tag(run.info.run_id, key, value)

    def run(self) -> dict:
        parent = self.parent()
        status = "FAILED"
        try:
            ran = []
            for stage in plan(self.cfg):
                if self.finished(stage) is not None:
                    print(f"[{self.cfg.name}] {stage.key}: finished in MLflow, skipped", flush=True)
                else:
                    self.run_stage(stage, parent)
                    ran.append(stage.key)
                self.tag(stage)
            summary = self.summary()
            summary["ran"] = ran
            status = "FINISHED"
        finally:
            self.client.set_terminated(parent, status=status)
        (self.out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary), flush=True)
        return summary

    def summary(self) -> dict:
        """:func:`summarize` over the finished stages' MLflow metrics."""
        metrics = {}
        for stage in plan(self.cfg):
            run = self.finished(stage)
            if run is not None:
                metrics[stage.key] = run.data.metrics
        return summarize(self.cfg, metrics)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(cfg: SweepConfig, metrics: dict[str, dict[str, float]]) -> dict:
    """Per extra budget: each role's final validation loss per seed and its mean, own FLOPs and
    FLOPs with the sunk dense stage; then, at equal extra and at equal total compute, the roles
    ranked by mean loss and the best one against each other with the paired-seed rule
    (``verdicts``; ``comparisons`` holds the numbers: a - b = diff [lo, hi] over n seeds).

    metrics: stage key (``s1/x0.006/upcycled``) -> that run's MLflow metrics; a missing stage
    or metric leaves its seed out (and the verdict says which seed went unpaired)."""
    table: dict[str, dict] = {}
    arms = []  # (extra, role, arm name, seed -> loss), as report.roles.compare_per_extra takes them
    for x in cfg.extra_fractions:
        row = table.setdefault(f"{x:g}", {})
        for role in VARIANTS:
            runs = {seed: m for seed in cfg.seeds if (m := metrics.get(f"s{seed}/x{x:g}/{role}")) is not None}
            losses = {seed: m["final/valid_loss"] for seed, m in runs.items() if "final/valid_loss" in m}
            flops = [m["final/flops"] for m in runs.values() if "final/flops" in m]
            total = [m.get("final/flops_with_sunk", m["final/flops"]) for m in runs.values() if "final/flops" in m]
            row[role] = {"valid_loss": _mean(list(losses.values())),
                         "losses": {str(seed): loss for seed, loss in losses.items()},
                         "flops": _mean(flops), "flops_with_sunk": _mean(total)}
            arms.append((f"{x:g}", role, ROLES[role], losses))
    for name, roles in (("equal_extra", EQUAL_EXTRA), ("equal_total", EQUAL_TOTAL)):
        for extra, (ranking, comparisons) in compare_per_extra(arms, roles).items():
            table[extra][name] = {"ranking": ranking,
                                  "verdicts": [verdict_text(res, a, b) for a, b, res in comparisons],
                                  "comparisons": [{"a": a, "b": b, "diff": res.diff, "lo": res.lo, "hi": res.hi,
                                                   "n": res.n, "decided": res.decided,
                                                   "interval": interval_text(res)}
                                                  for a, b, res in comparisons]}
    return {"sweep": cfg.name, "seeds": list(cfg.seeds), "dense_fraction": cfg.dense_fraction, "extra": table}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['sweep']}: seed-mean final validation loss (seeds {summary['seeds']}, dense stage "
             f"{summary['dense_fraction']:g} of its Chinchilla budget)",
             f"{'extra':>8} " + " ".join(f"{ROLES[v]:>22}" for v in VARIANTS)]
    for x, row in summary["extra"].items():
        cells = ["-" if row[v]["valid_loss"] is None else f"{row[v]['valid_loss']:.4f}" for v in VARIANTS]
        lines.append(f"{x:>8} " + " ".join(f"{c:>22}" for c in cells))
    for x, row in summary["extra"].items():
        for name in ("equal_extra", "equal_total"):
            lines += [f"extra {x}, {name.replace('_', ' ')} compute: {v}" for v in row[name]["verdicts"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        return fail(error)
    try:
        Driver(cfg).run()
    except MissingDenseCheckpoint as error:
        return fail(error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
