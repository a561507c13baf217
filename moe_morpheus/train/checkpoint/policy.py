"""When a run saves, what it resumes from, and the checkpoint a rollback returns to."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from moe_morpheus.config import CheckpointConfig
from moe_morpheus.train.checkpoint.state import (
    TrainState,
    load_checkpoint,
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

log = logging.getLogger(__name__)


class Checkpointer:
    """Saving, resuming and rollback for one run's ``model`` and ``optimizer`` in ``directory``.

    ``manifest``: what every checkpoint records besides the tensors (``config``, ``layout``,
    ``model_shape``; a loaded checkpoint must match the shape, the layout may differ).
    ``count_targets(start, end)``: target tokens of training rows [start, end), to recount a
    checkpoint written before they were counted (None: such a checkpoint loads without a count).
    ``during_save(step)``: called while a checkpoint is half written (fault injection).
    :attr:`available` tells whether a checkpoint exists to roll back to.
    """

    def __init__(self, cfg: CheckpointConfig, model: list[torch.nn.Module], optimizer, *, directory: Path,
                 manifest: dict, count_targets: Callable[[int, int], int] | None = None,
                 during_save: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.dir = Path(directory)
        self.manifest = manifest
        self.count_targets = count_targets
        self.during_save = during_save
        self.last_save = time.monotonic()
        self.available = bool(complete_checkpoints(self.dir))

    def _load(self, path: Path) -> TrainState:
        state = load_checkpoint(path, self.model, self.optimizer, shape=self.manifest["model_shape"],
                                current_layout=self.manifest["layout"])
        if state.target_tokens is None and self.count_targets is not None:
            state.target_tokens = recount_targets(state, self.count_targets)
        self.available = True
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
        if dist.get_rank() == 0:
            log.info("resumed from %s (step %d, %d samples consumed)", path, state.step, state.consumed_samples)
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

    def _due(self, step: int, last: bool) -> bool:
        """Save after completed step ``step``? Same answer on every rank (rank 0's clock decides)."""
        if last or (self.cfg.interval_steps and step % self.cfg.interval_steps == 0):
            return True
        if not self.cfg.interval_minutes:
            return False
        flag = torch.tensor([time.monotonic() - self.last_save >= 60 * self.cfg.interval_minutes], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def maybe_save(self, state: TrainState, last: bool) -> Path | None:
        """Save ``state`` when a save is due after its step (``last``: the run's final step)."""
        return self.save(state) if self._due(state.step, last) else None

    def save(self, state: TrainState) -> Path:
        path = save_checkpoint(self.dir, state, self.model, self.optimizer, manifest=self.manifest,
                               keep=self.cfg.keep, checksums=self.cfg.checksums, during_save=self.during_save)
        self.last_save = time.monotonic()
        self.available = True
        return path

    def newest(self) -> TrainState:
        """Reload the newest valid checkpoint into the model and optimizer (a rollback)."""
        path = newest_valid(self.dir, checksums=self.cfg.checksums)
        if path is None:
            raise CheckpointError(f"guards.spike_action=rollback: no valid checkpoint left in {self.dir}")
        return self._load(path)
