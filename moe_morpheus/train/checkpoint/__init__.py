"""Distributed checkpoints: the folder on disk (store), the tensors and trainer state in it
(state), and when a run saves, resumes and rolls back (policy)."""

from moe_morpheus.train.checkpoint.policy import Checkpointer
from moe_morpheus.train.checkpoint.state import (
    TrainState,
    layout,
    load_checkpoint,
    load_model_weights,
    loadable_manifest,
    model_shape,
    recount_targets,
    save_checkpoint,
)
from moe_morpheus.train.checkpoint.store import (
    CheckpointError,
    find_checkpoint,
    newest_valid,
    read_manifest,
    recorded_config,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError", "Checkpointer", "TrainState", "find_checkpoint", "layout", "load_checkpoint",
    "load_model_weights", "loadable_manifest", "model_shape", "newest_valid", "read_manifest", "recorded_config",
    "recount_targets", "save_checkpoint", "verify_checkpoint",
]
