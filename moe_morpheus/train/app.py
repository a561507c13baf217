"""What ``train.py`` runs for one Hydra job: validate the config, launch, report errors cleanly.

- A config that cannot work stops before any process group is made, with the message of the
  dataclass check, and the job's output folder is removed (nothing is left that looks like a
  result). A key the schema has not stops the command before Hydra composes (:func:`check_argv`).
- ``launch.nproc_per_node > 1`` outside torchrun (a sweep job, or a plain ``python train.py``)
  starts ``torchrun`` for this job with the same overrides and output folder.
- A multirun's jobs attach to the sweep's MLflow parent run (moe_morpheus.tracking).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_morpheus.config import ConfigError
from moe_morpheus.config.experiment import check_command_line

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fail(message: str, output_dir: Path | None) -> None:
    if output_dir is not None and int(os.environ.get("RANK", "0")) == 0 and output_dir.is_dir():
        # Only what Hydra wrote at start is there: remove it rather than leave a run folder
        # without results.
        shutil.rmtree(output_dir, ignore_errors=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_argv(argv: list[str]) -> None:
    """Exit with a one-line error when an override on ``train.py``'s command line names a key
    the schema has not, ``+`` or not. Hydra's options (``-m``, ``--cfg job``, ``-cn NAME``) and
    their values hold no ``=`` or start with ``-``; everything else is an override, except under
    ``-sc`` (shell completion), whose arguments are commands such as ``install=bash``."""
    if "-sc" in argv or "--shell-completion" in argv:
        return
    try:
        check_command_line([a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))])
    except ConfigError as error:
        _fail(str(error), None)


def _check_sweep(hydra_cfg) -> None:
    """Hydra runs one default job when a sweep is named without -m, or names no parameters."""
    chosen = hydra_cfg.runtime.choices.get("sweeps")
    if chosen is None:
        return
    if hydra_cfg.mode != RunMode.MULTIRUN:
        raise ConfigError(f"+sweeps={chosen} is a sweep: run it with -m (python train.py -m +sweeps={chosen})")
    if not hydra_cfg.sweeper.params:
        raise ConfigError(f"conf/sweeps/{chosen}.yaml sets no hydra.sweeper.params: the sweep would run one "
                          f"default job")


def _torchrun(nproc: int, output_dir: Path, parent_run_id: str | None) -> float:
    """Run this job as ``torchrun --nproc_per_node=N train.py <same overrides>``."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("launch.nproc_per_node")]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO_ROOT / "train.py"), *overrides, "launch.nproc_per_node=1", f"hydra.run.dir={output_dir}",
    ]
    env = dict(os.environ)
    if parent_run_id:
        from moe_morpheus.tracking.names import PARENT_RUN_ENV

        env[PARENT_RUN_ENV] = parent_run_id
    print("launching: " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    result = output_dir / "result.txt"
    return float(result.read_text()) if result.exists() else float("nan")


def run(cfg: DictConfig) -> float:
    # Megatron-Core logs every parameter's bucket at INFO; keep the console for the run itself.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from moe_morpheus.config.experiment import to_experiment
    from moe_morpheus.tracking.names import TrackingUnreachableError, resolve_uri
    from moe_morpheus.tracking.sweep_callback import parent_run_id
    from moe_morpheus.tracking.tracker import check_reachable

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        _check_sweep(hydra_cfg)
        exp = to_experiment(cfg)
        if exp.tracking.strict:
            # Every rank asks, so all of them stop together before any process group exists.
            check_reachable(resolve_uri(exp.tracking.uri))
    except (ConfigError, TrackingUnreachableError) as error:
        _fail(str(error), output_dir)
    parent = parent_run_id(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    parent = parent or os.environ.get("MOE_MORPHEUS_PARENT_RUN_ID")

    if exp.launch.nproc_per_node > 1 and "RANK" not in os.environ:
        return _torchrun(exp.launch.nproc_per_node, output_dir, parent)

    from moe_morpheus import parallel
    from moe_morpheus.train.trainer import Trainer

    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        result = Trainer(exp, output_dir, resolved_config=resolved, parent_run_id=parent).train()
    except ConfigError as error:
        parallel.destroy()
        _fail(str(error), output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        (output_dir / "result.txt").write_text(f"{result.valid_losses['mean']}\n")
    parallel.destroy()
    return result.valid_losses["mean"]
