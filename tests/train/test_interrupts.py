"""train/interrupts.py in-process: a signal only raises a flag, a repeat within the grace period
is the same interrupt, a later one stops at once, and the resume command pins the run folder.
(Real signals to real runs, 1 and 2 processes: test_checkpoint_resume*.py.)"""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from moe_morpheus.train import interrupts
from moe_morpheus.train.interrupts import Interrupts, exit_code, multirun_command, resume_argv, resume_command
from tests.helpers.distributed import run_distributed


def test_a_signal_raises_a_flag_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with Interrupts(announce=False, repeat_grace_s=60) as interrupts:
        assert interrupts.agreed() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within the grace period: the same interrupt again
        assert interrupts.agreed() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert exit_code(signal.SIGINT) == 130 and exit_code(signal.SIGTERM) == 143


def test_a_second_interrupt_after_the_grace_period_stops_at_once():
    with Interrupts(announce=False, repeat_grace_s=0.05) as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        assert interrupts.received == signal.SIGINT


def test_the_resume_command_pins_the_folder_and_resumes_from_the_run_itself():
    argv = ["python", "train.py", "+experiment=moe_8e", "hydra.run.dir=old", "checkpoint.resume=upcycled/step_0"]
    assert resume_argv(argv, Path("/r/run")) == ["python", "train.py", "+experiment=moe_8e", "hydra.run.dir=/r/run"]
    multirun = resume_argv(["python", "train.py", "-m", "+sweeps=s"], Path("/m/0_x"), multirun_dir=Path("/m"))
    assert multirun == ["python", "train.py", "-m", "+sweeps=s", "hydra.sweep.dir=/m"]


def test_a_multirun_job_resumes_with_the_sweeps_own_command(tmp_path):
    # Under submitit a job's argv is submitit's; the sweep's command is in its multirun.yaml.
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra: [hydra.mode=MULTIRUN, hydra/launcher=slurm]\n"
        "    task: [+sweeps=s, 'trainer.seed=1,2']\n")
    argv = multirun_command(tmp_path)
    assert argv[1:] == [str(Path(interrupts.__file__).parents[2] / "train.py"), "-m", "+sweeps=s", "trainer.seed=1,2",
                        "hydra/launcher=slurm"]
    assert shlex.split(resume_command(tmp_path / "0_x", multirun_dir=tmp_path))[-4:] == [
        "+sweeps=s", "trainer.seed=1,2", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}"]
    assert multirun_command(tmp_path / "elsewhere") is None


def _agree(signalled_rank: int) -> int:
    import torch.distributed

    from moe_morpheus import parallel
    from moe_morpheus.config import ParallelConfig

    parallel.initialize(ParallelConfig())
    interrupts = Interrupts(announce=False)
    if torch.distributed.get_rank() == signalled_rank:
        interrupts.received = signal.SIGUSR1
    return interrupts.agreed()


@pytest.mark.slow
def test_every_rank_stops_when_one_rank_was_signalled():
    assert run_distributed(_agree, 2, 1) == [signal.SIGUSR1, signal.SIGUSR1]


def test_a_multirun_job_folder_passes_to_torchrun_ranks_intact():
    # train.py hands its job folder to the ranks it starts as an override; a multirun job folder
    # is named after its overrides, whose = and , are override syntax unless quoted.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moe_morpheus.config.keys import override

    folder = "/runs/multirun/2026-12-04/0_+experiment=moe_8e,trainer.seed=1,note=it's"
    (parsed,) = OverridesParser.create().parse_overrides([override("hydra.run.dir", folder)])
    assert parsed.key_or_group == "hydra.run.dir" and parsed.value() == folder
    # A plain path stays as written, so the resume line a user reads is the command they typed.
    assert override("hydra.run.dir", "/r/outputs/moe_8e/2026-12-04_01-53-32-123") == \
        "hydra.run.dir=/r/outputs/moe_8e/2026-12-04_01-53-32-123"
    assert resume_argv(["python", "train.py"], Path(folder))[-1] == override("hydra.run.dir", folder)
