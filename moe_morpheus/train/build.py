"""What a training run is built from around its model, in one place: the optimizer (AdamW, or
ZeRO-1's sharded AdamW), the stability guards and the checkpointer (used by the trainer, the upcycle
CLI and benchmarks/train_step.py), and the run's metrics with their MLflow logger (rank 0)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_morpheus.config import CheckpointConfig
from moe_morpheus.config.experiment import ExperimentConfig
from moe_morpheus.planning.budget import ParamCounts, RunPlan
from moe_morpheus.tracking.metrics import RunMetrics, Sunk
from moe_morpheus.tracking.run_log import RunLogger
from moe_morpheus.train.checkpoint import Checkpointer, TrainState, layout, model_shape
from moe_morpheus.train.guards import Guards
from moe_morpheus.train.optim import Optimizer
from moe_morpheus.train.zero import ZeroOptimizer


@dataclass
class TrainingParts:
    optimizer: Optimizer
    guards: Guards
    checkpointer: Checkpointer


def checkpoint_dir(cfg: CheckpointConfig, output_dir: Path) -> Path:
    """``checkpoint.dir``, or the run folder's ``checkpoints``."""
    return Path(cfg.dir) if cfg.dir else Path(output_dir) / "checkpoints"


def build_training(exp: ExperimentConfig, model: list[torch.nn.Module], *, directory: Path, config: dict,
                   checkpoint: CheckpointConfig | None = None,
                   count_targets: Callable[[int, int], int] | None = None) -> TrainingParts:
    """Optimizer, guards and checkpointer for ``model`` (the DDP-wrapped chunks). ``config``: the
    resolved configuration every checkpoint records; ``checkpoint`` replaces ``exp.checkpoint``;
    ``count_targets``: see :class:`~moe_morpheus.train.checkpoint.Checkpointer`."""
    t = exp.trainer
    # ZeRO-1 (train/zero.py) shards AdamW's moments over the data-parallel group; the same API.
    optimizer_class = ZeroOptimizer if t.zero1 else Optimizer
    optimizer = optimizer_class(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps,
                                grad_clip=t.grad_clip)
    guards = Guards(exp.guards, exp.faults, model, exp.model.embedding_grad_shrink)
    manifest = {"config": config, "layout": layout(exp.parallel), "model_shape": model_shape(exp.model, exp.moe)}
    checkpointer = Checkpointer(checkpoint or exp.checkpoint, model, optimizer, directory=directory,
                                manifest=manifest, count_targets=count_targets, during_save=guards.faults.during_save)
    return TrainingParts(optimizer, guards, checkpointer)


def build_run_metrics(exp: ExperimentConfig, config: dict, state: TrainState, *, plan: RunPlan,
                      counts: ParamCounts, dp: int, epochs: Callable[[int], dict[str, float]],
                      unigram_entropy: float, output_dir: Path, parent_run_id: str | None,
                      rank0: bool) -> RunMetrics:
    """The metrics of a run starting from ``state``, logged to MLflow by rank 0 (a resumed run
    into its own run); ``epochs`` and ``unigram_entropy``: see
    :class:`~moe_morpheus.tracking.metrics.RunMetrics`."""
    logger = None
    if rank0:
        logger = RunLogger(exp, config, plan=plan, counts=counts, dp=dp,
                           planned_epochs=epochs(plan.steps * exp.trainer.global_batch_size), output_dir=output_dir,
                           parent_run_id=parent_run_id, resume_run_id=state.run_id, lineage=state.lineage)
    return RunMetrics(plan, Sunk.of(state.lineage), epochs, state.moe_load, unigram_entropy, logger)
