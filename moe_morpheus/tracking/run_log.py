"""A training run's MLflow side (:class:`RunLogger`, rank 0 only): params, tags, metrics, the
summary and the expert-load artifact; what it logs is assembled in
:mod:`moe_morpheus.tracking.metrics`."""

from __future__ import annotations

import json
import logging
import math
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
        if any(v > 1 for v in planned_epochs.values()):
            tags["data_repeated"] = "true"
            log.warning("this run repeats data: planned epochs per source %s", planned_epochs)
        self.tracker = Tracker(uri, exp.tracking.experiment, exp.tracking.run_name or exp.name, rank=0, tags=tags,
                               parent_run_id=parent_run_id, resume_run_id=resume_run_id, local_dir=output_dir)
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
