"""Stopping a run on a signal without losing it (docs/design.md#interrupts).

SIGINT (Ctrl-C), SIGTERM (``timeout``, ``scancel``, preemption) and SIGUSR1 (Slurm's warning
before the time limit, ``--signal=USR1@T``) only raise a flag here. The loop asks
:meth:`Interrupts.agreed` once per step; one all-reduce (MAX) of the flag over the world makes
every rank stop after the same step, so all of them save the same checkpoint. The trainer then
saves and raises :class:`Interrupted`; ``train/app.py`` prints the command that resumes the run
and exits with 128 + the signal's number, without a traceback.

A second signal more than ``repeat_grace_s`` after the first stops the process at once
(KeyboardInterrupt, no save). Nearer ones are the same interrupt delivered twice: a terminal's
Ctrl-C reaches every process of the foreground group, and torchrun forwards it to its workers
again a few milliseconds later.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_morpheus.config.keys import override

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Set by train/app.py when it starts torchrun for a job itself: the command that resumes the job
# (rank 0 prints it), and the sign that the launcher, not the ranks, exits with the signal's code
# (a worker that exits non-zero makes torchrun print a traceback of its own).
LAUNCHER_COMMAND_ENV = "MOE_MORPHEUS_LAUNCHER_COMMAND"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """The run stopped on ``signum`` after ``step`` with its checkpoint at ``checkpoint`` (None:
    nothing trained yet) and its MLflow run ``run_id``. A KeyboardInterrupt, so that whatever ends
    the MLflow run on Ctrl-C (tracking/metrics.py) ends it KILLED."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_id: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint, self.run_id = signum, step, checkpoint, run_id


class Interrupts:
    """A context manager that catches :data:`SIGNALS` while it is open (main thread only; the
    previous handlers come back on exit). ``announce``: print one line when the first signal
    arrives (rank 0)."""

    def __init__(self, *, announce: bool = True, repeat_grace_s: float = 1.0):
        self.announce = announce
        self.repeat_grace_s = repeat_grace_s
        self.received = 0  # the first signal's number; 0: none
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first_at = signum, now
            if self.announce:
                # os.write: a handler may run in the middle of another print.
                os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                            f"(interrupt again to stop at once without saving)\n".encode())
            return
        if now - self._first_at < self.repeat_grace_s:
            return
        raise KeyboardInterrupt

    def agreed(self, device: torch.device | None = None) -> int:
        """The signal every rank stops for (the largest number any rank received), or 0 to go on.
        A collective: every rank calls it at the same point of every step."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _without(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    return [a for a in argv if not a.startswith(tuple(k + "=" for k in keys))]


def resume_argv(argv: list[str], run_dir: Path, *, multirun_dir: Path | None = None) -> list[str]:
    """``argv`` (the command as typed, program included) made to resume its run: the run folder
    (or a multirun's folder) pinned, and ``checkpoint.resume`` back to ``auto`` (an explicit path,
    such as an upcycled start, would start over from that path instead of this run's checkpoints)."""
    argv = _without(argv, ("hydra.run.dir", "hydra.sweep.dir", "checkpoint.resume", "+checkpoint.resume"))
    if multirun_dir is not None:
        return [*argv, override("hydra.sweep.dir", multirun_dir)]
    return [*argv, override("hydra.run.dir", run_dir)]


def typed_command() -> list[str]:
    """The command line that started this process as it was typed: under torchrun, torchrun's
    own (the agent is the parent process), else this interpreter's."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        import psutil

        agent = psutil.Process(os.getppid()).cmdline()
        if len(agent) > 1 and Path(agent[1]).name == "torchrun":
            return ["torchrun", *agent[2:]]
        return agent
    return list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def multirun_command(multirun_dir: Path) -> list[str] | None:
    """The command that launched the multirun in ``multirun_dir``, from the ``multirun.yaml``
    Hydra writes there (the sweep's overrides as typed, lists included), or None without one.
    A job under a launcher that starts it in a process of its own (submitit on Slurm) has no
    typed command of its own: its argv is the launcher's."""
    import yaml

    path = multirun_dir / "multirun.yaml"
    try:
        overrides = yaml.safe_load(path.read_text())["hydra"]["overrides"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    hydra = [o for o in overrides.get("hydra", []) if not o.startswith("hydra.mode=")]
    script = Path(__file__).resolve().parents[2] / "train.py"
    return [sys.executable, str(script), "-m", *overrides.get("task", []), *hydra]


def resume_command(run_dir: Path, *, multirun_dir: Path | None = None) -> str:
    """The shell command that continues the run in ``run_dir``, same folder and MLflow run: for a
    multirun job, the sweep's own command (every job of it resumes, finished ones are skipped)."""
    given = os.environ.get(LAUNCHER_COMMAND_ENV)
    if given:
        return given
    typed = (multirun_command(multirun_dir) if multirun_dir is not None else None) or typed_command()
    return shlex.join(resume_argv(typed, run_dir, multirun_dir=multirun_dir))
