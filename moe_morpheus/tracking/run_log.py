"""A training run's MLflow side (:class:`RunLogger`, rank 0 only): params, tags, metrics, the
summary and the expert-load artifact; what it logs is assembled in
:mod:`moe_morpheus.tracking.metrics`."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from omegaconf import OmegaConf

if TYPE_CHECKING:
    from moe_morpheus.config.experiment import ExperimentConfig
    from moe_morpheus.planning.budget import ParamCounts, RunPlan

log = logging.getLogger(__name__)


def lineage_tags(lineage: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(MLflow tags, params) of a run started from a dense checkpoint (report/collect.py reads
    ``upcycled_from_run`` and ``sunk.*``)."""
    prefix = "upcycled_from" if lineage["kind"] == "upcycled" else "continued_from"
    tags = {f"{prefix}_checkpoint": lineage["from_checkpoint"], "init_mode": lineage["mode"]}
    if lineage.get("from_run"):
        tags[f"{prefix}_run"] = lineage["from_run"]
    params = {"sunk.tokens": str(lineage["tokens"]), "sunk.flops": str(lineage["flops"]),
              "sunk.steps": str(lineage["steps"])}
    if lineage.get("target_tokens") is not None:
        params["sunk.target_tokens"] = str(lineage["target_tokens"])
    return tags, params


def _hydra_job() -> tuple[str | None, int | None]:
    """(model preset chosen on the command line, job number within a multirun) when running
    under Hydra (train.py), else (None, None)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    return hc.runtime.choices.get("model"), hc.job.num if hc.mode == RunMode.MULTIRUN else None


def run_identity(exp: ExperimentConfig, variant: str, plan: RunPlan, counts: ParamCounts,
                 output_dir: Path) -> tuple[str, dict[str, str]]:
    """(run name, tags) that find the run: a readable unique name unless ``tracking.run_name`` is
    set, the filter tags, and MLflow's Source and Description (the command and the run folder)."""
    from moe_morpheus.tracking.names import filter_tags, readable_run_name, short_count

    preset, job = _hydra_job()
    size = f"{preset}-{short_count(counts.active)}" if preset else short_count(counts.active)
    seed = exp.seeds.trainer
    name = exp.tracking.run_name or readable_run_name(exp.name, variant, size, seed, time.time(), job)
    moe = exp.moe_or_none
    tags = filter_tags(model=preset, experts=moe.num_experts if moe else 0, top_k=moe.top_k if moe else 0,
                       active_params=counts.active, total_params=counts.total,
                       budget_fraction=plan.budget_fraction, seed=seed)
    command = " ".join(["train.py", *sys.argv[1:]])
    tags.update({"mlflow.source.name": "train.py", "mlflow.source.type": "LOCAL",
                 "mlflow.note.content": f"`{command}`\n\nrun folder: `{output_dir.resolve()}`",
                 "run_dir": str(output_dir.resolve())})
    return name, tags


class RunLogger:
    """The run's MLflow side (rank 0) for ``exp`` and its resolved ``config``: ``plan`` and
    ``counts`` (planning.budget), ``dp`` data-parallel ranks, ``planned_epochs`` per data source
    over the whole plan; ``resume_run_id`` continues a run, ``lineage`` is a dense start's."""

    def __init__(self, exp: ExperimentConfig, config: dict, *, plan: RunPlan, counts: ParamCounts, dp: int,
                 planned_epochs: dict[str, float], output_dir: Path, parent_run_id: str | None = None,
                 resume_run_id: str | None = None, lineage: dict | None = None):
        from moe_morpheus.tracking.names import flatten_config, resolve_uri, run_tags
        from moe_morpheus.tracking.tracker import Tracker

        uri = resolve_uri(exp.tracking.uri)
        # A converted checkpoint trained via checkpoint.resume is an upcycled run too.
        variant = "upcycled" if lineage and lineage["kind"] == "upcycled" else exp.run_variant
        lineage_tag, lineage_params = lineage_tags(lineage) if lineage else ({}, {})
        tags = run_tags(variant, exp.name, exp.sweep, f"{exp.layout}-dp{dp}", extra=lineage_tag)
        run_name, identity = run_identity(exp, variant, plan, counts, output_dir)
        tags.update(identity)
        if any(v > 1 for v in planned_epochs.values()):
            tags["data_repeated"] = "true"
            log.warning("this run repeats data: planned epochs per source %s", planned_epochs)
        self.tracker = Tracker(uri, exp.tracking.experiment, run_name, rank=0, tags=tags,
                               parent_run_id=parent_run_id, resume_run_id=resume_run_id, local_dir=output_dir,
                               finish_timeout_s=exp.tracking.finish_timeout_s)
        params = flatten_config(config)
        params.update({
            "count.total_params": counts.total, "count.active_params": counts.active,
            "count.embedding_params": counts.embedding, "count.non_embedding_params": counts.non_embedding,
            "budget.chinchilla_tokens": plan.budget_tokens, "budget.planned_tokens": plan.tokens,
            "budget.planned_steps": plan.steps, "flops_per_token": plan.flops_per_token,
            "world_size": dist.get_world_size(), "dp": dp, **lineage_params,
            # The effective seeds, not the config's None for "follows trainer.seed".
            **exp.seeds.params(),
        })
        self.tracker.start({k: str(v) for k, v in params.items()}, OmegaConf.to_yaml(config))
        self.output_dir = output_dir

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.tracker.log_metrics(clean, step)

    def finish(self, status: str, summary: dict[str, float], load: dict[str, list[float]]) -> None:
        if load:
            path = self.output_dir / "moe_load.json"
            path.write_text(json.dumps(load, indent=1))
            self.tracker.log_artifact(path)
        self.tracker.finish(status, summary)
