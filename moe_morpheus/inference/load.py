"""A checkpoint as one process for inference: model, tokenizer and the experiment it was trained with."""

from __future__ import annotations

from pathlib import Path

from moe_morpheus.train.checkpoint.state import load_model_weights
from moe_morpheus.train.checkpoint.store import (
    CheckpointError,
    find_checkpoint,
    read_manifest,
    recorded_config,
)


def load_for_inference(checkpoint: str | Path, *, with_info: bool = False):
    """(model chunk, tokenizer, experiment) of a checkpoint, as one process (TP = PP = EP = 1,
    whatever layout wrote it); with ``with_info`` also {path, step, run_id}."""
    from omegaconf import OmegaConf

    from moe_morpheus.config import ParallelConfig
    from moe_morpheus.config.data import resolve_path
    from moe_morpheus.config.experiment import ExperimentConfig, to_experiment
    from moe_morpheus.data.tokenizer import Tokenizer
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize

    initialize(ParallelConfig())  # a world of one: verifying and loading are collectives
    path = find_checkpoint(checkpoint)
    config = recorded_config(read_manifest(path))
    config["parallel"] = {}  # one process reads any layout (the shards are resharded on load)
    exp = to_experiment(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), config))
    tokenizer_path = resolve_path(exp.data.tokenizer)
    if not tokenizer_path.is_file():
        raise CheckpointError(f"checkpoint {path} was trained with the tokenizer {exp.data.tokenizer}, which is not "
                              f"at {tokenizer_path}: put it back or point data.tokenizer at a copy")
    (chunk,) = build_model(exp.model, exp.moe_or_none, ParallelConfig())
    state = load_model_weights(path, [chunk])
    chunk.eval()
    tokenizer = Tokenizer(tokenizer_path)
    if with_info:
        return chunk, tokenizer, exp, {"path": path, "step": int(state.get("step", 0)), "run_id": state.get("run_id")}
    return chunk, tokenizer, exp
