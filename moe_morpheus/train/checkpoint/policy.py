"""When a run saves, what it resumes from, and rollback: the trainer's interface to checkpoints."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_morpheus.config import CheckpointConfig
from moe_morpheus.train.checkpoint.state import (
    TrainState,
    layout,
    load_checkpoint,
    model_shape,
    recount_targets,
    save_checkpoint,
)
from moe_morpheus.train.checkpoint.store import (
    MANIFEST,
    STEP_NAME,
    CheckpointError,
    complete_checkpoints,
    newest_valid,
    remove_partial,
    verify_checkpoint,
)


class Checkpointer:
    """When to save, where, and resuming for one run (the trainer's interface).

    ``trainer`` provides ``exp``, ``output_dir``, ``model``, ``optimizer``, ``dp``,
    ``resolved_config`` and ``count_targets`` (for checkpoints without a target count);
    ``guards`` is the run's :class:`~moe_morpheus.train.guards.Guards` (its fault injection, and
    whether a rollback target exists).
    """

    def __init__(self, cfg: CheckpointConfig, trainer, guards):
        self.cfg = cfg
        self.trainer = trainer
        self.guards = guards
        self.dir = Path(cfg.dir) if cfg.dir else Path(trainer.output_dir) / "checkpoints"
        exp = trainer.exp
        self.shape = model_shape(exp.model, exp.moe)
        self.layout = layout(exp.parallel)
        self.last_save = time.monotonic()
        self.guards.checkpoint_available = bool(complete_checkpoints(self.dir))

    def _load(self, path: Path) -> TrainState:
        state = load_checkpoint(path, self.trainer.model, self.trainer.optimizer, shape=self.shape,
                                current_layout=self.layout)
        if state.target_tokens is None:
            state.target_tokens = recount_targets(state, self.trainer.count_targets)
        self.guards.checkpoint_available = True
        return state

    def resume(self) -> TrainState | None:
        """The state to continue from (``checkpoint.resume``), or None for a fresh start."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            remove_partial(self.dir)
            path = newest_valid(self.dir, checksums=self.cfg.checksums)
            if path is None:
                return None
        else:
            path = self._explicit(Path(self.cfg.resume))
        state = self._load(path)
        self.guards.load_state_dict(state.guards)
        if dist.get_rank() == 0:
            print(f"resumed from {path} (step {state.step}, {state.consumed_samples} samples consumed)", flush=True)
        return state

    def _explicit(self, path: Path) -> Path:
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={path}: no such directory")
        if (path / MANIFEST).exists() or STEP_NAME.match(path.name):
            problems = verify_checkpoint(path, checksums=self.cfg.checksums)
            if problems:
                raise CheckpointError(f"checkpoint.resume={path} cannot be used: " + "; ".join(problems))
            return path
        found = newest_valid(path, checksums=self.cfg.checksums)
        if found is None:
            raise CheckpointError(f"checkpoint.resume={path}: no valid checkpoint (step_*/{MANIFEST}) in it")
        return found

    def due(self, step: int, last: bool) -> bool:
        """Save after completed step ``step``? Same answer on every rank (rank 0's clock decides)."""
        if last or (self.cfg.interval_steps and step % self.cfg.interval_steps == 0):
            return True
        if not self.cfg.interval_minutes:
            return False
        flag = torch.tensor([time.monotonic() - self.last_save >= 60 * self.cfg.interval_minutes], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def save(self, state: TrainState) -> Path:
        trainer = self.trainer
        manifest = {"config": trainer.resolved_config, "layout": self.layout, "model_shape": self.shape}
        path = save_checkpoint(self.dir, state, trainer.model, trainer.optimizer, manifest=manifest,
                               keep=self.cfg.keep, checksums=self.cfg.checksums,
                               during_save=self.guards.faults.during_save)
        self.last_save = time.monotonic()
        self.guards.checkpoint_available = True
        return path

    def roll_back(self, current: TrainState) -> TrainState:
        """Reload the newest valid checkpoint and continue with the data after ``current``'s
        position (the offending range is skipped)."""
        path = newest_valid(self.dir, checksums=self.cfg.checksums)
        if path is None:
            raise CheckpointError(f"guards.spike_action=rollback: no valid checkpoint left in {self.dir}")
        keep = self.guards.state_dict()
        restored = self._load(path)
        self.guards.load_state_dict(keep)
        self.guards.rolled_back(restored.guards["window"], (restored.consumed_samples, current.consumed_samples))
        return dataclasses.replace(restored, consumed_samples=current.consumed_samples, run_id=current.run_id,
                                   guards=self.guards.state_dict())
