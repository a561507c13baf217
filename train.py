"""Train a GLM (dense or MoE) with Hydra configs; see README.md.

    python train.py +experiment=moe_64e [overrides]
    torchrun --nproc_per_node=2 train.py +experiment=moe_64e parallel.ep=2
    python train.py -m +sweeps=dense_vs_moe
"""

import os
import sys
import tempfile

import hydra
from omegaconf import DictConfig

from moe_morpheus.config.experiment import register_configs
from moe_morpheus.train.app import check_argv, run

# Before Hydra: its error for an unknown `trainer.x=1` suggests `+trainer.x=1`, which it accepts.
check_argv(sys.argv[1:])
if int(os.environ.get("RANK", "0")) > 0:
    # torchrun composes the config once per rank; only rank 0 owns the run directory (its path is
    # broadcast to the others), so the other ranks' Hydra writes nothing where results go.
    sys.argv += [
        f"hydra.run.dir={tempfile.gettempdir()}/moe_morpheus_rank{os.environ['RANK']}_{os.getpid()}",
        "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
    ]
elif int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and not any(
    a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in sys.argv[1:]
):
    # `torchrun --max-restarts=K`: a restarted rank 0 would get a new timestamped folder and start
    # over. A folder named after torchrun's run id (the same for every restart of one launch) is
    # found again, and checkpoint.resume=auto continues from its checkpoints.
    run_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.environ.get("TORCHELASTIC_RUN_ID", "none"))
    sys.argv.append(f"hydra.run.dir=outputs/${{name}}/torchrun-{run_id}")

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
