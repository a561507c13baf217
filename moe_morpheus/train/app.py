"""What ``train.py`` runs for one Hydra job: validate the config, launch, report errors cleanly.

- A config that cannot work stops before any process group is made, with the message of the
  dataclass check, and the job's output folder is removed (nothing is left that looks like a
  result). A key the schema has not stops the command before Hydra composes (:func:`check_argv`).
- ``launch.nproc_per_node > 1`` outside torchrun (a sweep job, or a plain ``python train.py``)
  starts ``torchrun`` for this job with the same overrides and output folder.
- A multirun's jobs attach to the sweep's MLflow parent run (moe_morpheus.tracking).
- A signal stops the run after a saved step (train/interrupts.py): one line says how to resume,
  the exit code is 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), no traceback.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_morpheus.config import ConfigError
from moe_morpheus.config.experiment import check_command_line
from moe_morpheus.config.keys import override

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("moe_morpheus.run")


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


def _resume_command(output_dir: Path) -> str:
    from moe_morpheus.train.interrupts import resume_command

    hydra_cfg = HydraConfig.get()
    multirun = Path(hydra_cfg.sweep.dir).resolve() if hydra_cfg.mode == RunMode.MULTIRUN else None
    return resume_command(output_dir, multirun_dir=multirun)


def _torchrun(nproc: int, output_dir: Path, parent_run_id: str | None) -> float:
    """Run this job as ``torchrun --nproc_per_node=N train.py <same overrides>``.

    torchrun runs in a session of its own, so a terminal's Ctrl-C reaches this process only; a
    signal here is passed to the ranks themselves (not to torchrun, which would answer it with a
    traceback of its own). The ranks save, exit 0 and leave the exit code to this process."""
    from moe_morpheus.train.interrupts import LAUNCHER_COMMAND_ENV, SIGNALS, exit_code

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("launch.nproc_per_node")]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO_ROOT / "train.py"), *overrides, "launch.nproc_per_node=1", override("hydra.run.dir", output_dir),
    ]
    env = dict(os.environ, **{LAUNCHER_COMMAND_ENV: _resume_command(output_dir)})
    if parent_run_id:
        from moe_morpheus.tracking.names import PARENT_RUN_ENV

        env[PARENT_RUN_ENV] = parent_run_id
    log.info("launching: %s", shlex.join(command))
    started = time.time()
    process = subprocess.Popen(command, env=env, start_new_session=True)
    received = []

    def forward(signum, frame):
        import psutil

        received.append(signum)
        for rank in psutil.Process(process.pid).children(recursive=True):
            rank.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    result = output_dir / "result.txt"
    finished = result.exists() and result.stat().st_mtime >= started
    if received and not finished:
        raise SystemExit(exit_code(received[0]))
    if code != 0:
        print(f"error: the job's torchrun exited with code {code} (its output is above)", file=sys.stderr, flush=True)
        raise SystemExit(code if 0 < code < 128 else 1)
    return float(result.read_text()) if result.exists() else float("nan")


def _interrupted(stop, output_dir: Path) -> None:
    """Exit after :class:`~moe_morpheus.train.interrupts.Interrupted`: one line (rank 0) with the
    command that resumes the run; under train.py's own torchrun the launcher sets the exit code."""
    from moe_morpheus.train.interrupts import LAUNCHER_COMMAND_ENV, exit_code

    if int(os.environ.get("RANK", "0")) == 0:
        saved = f"saved {stop.checkpoint}" if stop.checkpoint else "nothing trained yet, nothing saved"
        run = f"MLflow run {stop.run_id} KILLED" if stop.run_id else "MLflow run KILLED"
        log.info("interrupted (%s) after step %d: %s; %s; resume with: %s", signal.Signals(stop.signum).name,
                 stop.step, saved, run, _resume_command(output_dir))
    logging.shutdown()
    raise SystemExit(0 if os.environ.get(LAUNCHER_COMMAND_ENV) else exit_code(stop.signum))


def run(cfg: DictConfig) -> float:
    # Megatron-Core logs every parameter's bucket at INFO; keep the console for the run itself.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Python warnings (tracking outages, deprecations) into train.log as well as the console.
    logging.captureWarnings(True)
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
    from moe_morpheus.train.interrupts import LAUNCHER_COMMAND_ENV, Interrupted
    from moe_morpheus.train.trainer import Trainer

    resolved = OmegaConf.to_container(cfg, resolve=True)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = Trainer(exp, output_dir, resolved_config=resolved, parent_run_id=parent).train()
    except ConfigError as error:
        parallel.destroy()
        _fail(str(error), output_dir)
    except Interrupted as stop:
        parallel.destroy()
        _interrupted(stop, output_dir)
    except KeyboardInterrupt:  # a second signal: stopped at once, nothing saved
        if rank0:
            print(f"stopped without saving; resume from the last checkpoint with: {_resume_command(output_dir)}",
                  file=sys.stderr, flush=True)
        # The other ranks' collectives may be half done: no clean teardown to wait for. Under
        # train.py's own torchrun the launcher gives the exit code (a rank's would add torchrun's traceback).
        os._exit(0 if os.environ.get(LAUNCHER_COMMAND_ENV) else 130)
    parallel.destroy()
    path = output_dir / "result.txt"
    if result is None:  # already finished: the result of the run that finished it
        value = float(path.read_text()) if path.exists() else float("nan")
    else:
        value = result.valid_losses["mean"]
    if rank0:
        path.write_text(f"{value}\n")
    return value
