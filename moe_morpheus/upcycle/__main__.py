"""``python -m moe_morpheus.upcycle +experiment=TARGET init.from_dense=SOURCE convert.out=DIR
[overrides]``: convert a dense checkpoint into a MoE checkpoint that ``train.py ...
checkpoint.resume=DIR/step_00000000`` trains from.

``init.from_dense`` is the key a training run upcycles from (a ``step_*`` folder or a checkpoints
folder); here the conversion is written out instead of trained on."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.config.upcycle import UpcycleError
from moe_morpheus.upcycle.load import upcycle_into


@dataclasses.dataclass
class ConvertOptions:
    out: str = option(help="folder of the converted checkpoint (step_00000000 is written in it)")


def convert(output_dir: str | Path, overrides: list[str]) -> Path:
    """Write the converted checkpoint ``output_dir/step_00000000`` (zero AdamW moments, step 0) of
    the target that ``overrides`` compose. Collective over the processes torchrun started (or one)."""
    from omegaconf import OmegaConf

    from moe_morpheus import parallel as mm_parallel
    from moe_morpheus.config.experiment import compose_experiment
    from moe_morpheus.model import build_model
    from moe_morpheus.train.build import build_training
    from moe_morpheus.train.step import wrap_ddp

    exp = compose_experiment(overrides)
    exp.validate_world(mm_parallel.world_size())
    if exp.init.from_dense is None:
        raise UpcycleError("no source: pass init.from_dense=PATH (a dense step_* or checkpoints folder)")
    if not exp.moe.enabled:
        raise UpcycleError("the target has no MoE layer (moe.layer_freq=0): pick a MoE target, e.g. "
                           "+experiment=upcycle_64e")
    mm_parallel.initialize(exp.parallel, exp.model, seed=exp.trainer.seed)
    chunks = wrap_ddp(build_model(exp.model, exp.moe, exp.parallel, seed=exp.trainer.seed))
    # keep=1: the converted checkpoint is the only one the output folder needs.
    parts = build_training(exp, chunks, directory=Path(output_dir), config=OmegaConf.to_container(
        OmegaConf.structured(exp)), checkpoint=dataclasses.replace(exp.checkpoint, keep=1))
    state = upcycle_into(chunks, exp, exp.init.from_dense)
    # A fresh run's guard state (empty spike window), which resuming from this checkpoint restores.
    state.guards = parts.guards.state_dict()
    return parts.checkpointer.save(state)


def main(argv: list[str] | None = None) -> int:
    from moe_morpheus import parallel as mm_parallel
    from moe_morpheus.train.checkpoint import CheckpointError

    try:
        options, overrides = parse_options(ConvertOptions, sys.argv[1:] if argv is None else argv,
                                           prog="moe_morpheus.upcycle", summary=__doc__, prefix="convert")
        path = convert(options.out, overrides)
    except (ConfigError, CheckpointError) as error:
        return fail(error)
    finally:
        mm_parallel.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"upcycled -> {path}; train from it with checkpoint.resume={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
