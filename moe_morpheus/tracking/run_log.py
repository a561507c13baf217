"""What a run records besides the loop itself: the MLflow side (:class:`RunLogger`, rank 0 only) and
the expert load accumulated over training (:class:`MoELoad`, written as moe_load.json at the end)."""

from __future__ import annotations

import json
import logging
import math

import torch.distributed as dist
from omegaconf import OmegaConf

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


class MoELoad:
    """Expert load per layer: (token, slot) assignments per global expert summed over training
    steps and every rank (``collect_moe_stats`` over the world, so every rank holds the same
    totals); saved in checkpoints, and as fractions in moe_load.json for the report's heatmap."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, stats: dict) -> dict[str, float]:
        """Accumulate the per-expert loads; return the scalar statistics for logging."""
        scalars = {}
        for key, value in stats.items():
            if key.endswith("/load"):
                layer = key.split("/")[1]
                total = self.totals.setdefault(layer, [0.0] * len(value))
                for i, v in enumerate(value):
                    total[i] += float(v)
            else:
                scalars[key] = float(value)
        return scalars

    def fractions(self) -> dict[str, list[float]]:
        return {layer: [v / max(sum(t), 1e-12) for v in t] for layer, t in self.totals.items()}


class RunLogger:
    """The run's MLflow side (rank 0): params, tags, metrics, summary and artifacts, for
    ``trainer``, a set-up :class:`~moe_morpheus.train.trainer.Trainer` (not imported here: the
    trainer imports this module)."""

    def __init__(self, trainer, resume_run_id: str | None = None, lineage: dict | None = None):
        from moe_morpheus.tracking.names import flatten_config, resolve_uri, run_tags
        from moe_morpheus.tracking.tracker import Tracker

        exp = trainer.exp
        uri = resolve_uri(exp.tracking.uri)
        # A converted checkpoint trained via checkpoint.resume is an upcycled run too.
        variant = "upcycled" if lineage and lineage["kind"] == "upcycled" else exp.variant
        lineage_tag, lineage_params = lineage_tags(lineage) if lineage else ({}, {})
        tags = run_tags(variant, exp.name, exp.sweep, f"{exp.layout}-dp{trainer.dp}", extra=lineage_tag)
        if any(v > 1 for v in trainer.data.epochs(trainer.plan.steps * exp.trainer.global_batch_size).values()):
            tags["data_repeated"] = "true"
            log.warning("this run repeats data: planned epochs per source %s",
                        trainer.data.epochs(trainer.plan.steps * exp.trainer.global_batch_size))
        self.tracker = Tracker(uri, exp.tracking.experiment, exp.tracking.run_name or exp.name, rank=0, tags=tags,
                               parent_run_id=trainer.parent_run_id, resume_run_id=resume_run_id,
                               local_dir=trainer.output_dir)
        counts, plan = trainer.counts, trainer.plan
        params = flatten_config(trainer.resolved_config)
        params.update({
            "count.total_params": counts.total, "count.active_params": counts.active,
            "count.embedding_params": counts.embedding, "count.non_embedding_params": counts.non_embedding,
            "budget.chinchilla_tokens": plan.budget_tokens, "budget.planned_tokens": plan.tokens,
            "budget.planned_steps": plan.steps, "flops_per_token": plan.flops_per_token,
            "world_size": dist.get_world_size(), "dp": trainer.dp, **lineage_params,
            # The effective seeds, not the config's None for "follows trainer.seed".
            **exp.seeds.params(),
        })
        self.tracker.start({k: str(v) for k, v in params.items()}, OmegaConf.to_yaml(trainer.resolved_config))
        self.output_dir = trainer.output_dir

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
