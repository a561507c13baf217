"""Training-stability guards and fault injection (GLM-130B, Zeng et al. 2022, section 3: loss
spikes, NaNs and embedding-gradient explosions; docs/design.md#guards).

The guards decide, the trainer acts. Per step the trainer calls :meth:`Guards.begin_step` (faults
that crash, the embedding-gradient shrink schedule); once the loss of the step is known and before
any parameter moves, :meth:`Guards.decide` returns a :class:`Decision`:

- a NaN / Inf loss skips the update; so does a non-finite gradient norm, which
  :class:`~moe_morpheus.train.optim.Optimizer` refuses by itself; counted in ``guards/skipped``;
- a loss spike (:class:`SpikeDetector`) is counted in ``guards/spikes`` and handled by
  ``guards.spike_action``: ``skip`` the update; ``lower_lr`` (the update runs at the lowered LR
  and every later one too); ``rollback``: no update, and the trainer reloads the last checkpoint
  and goes on with the data *after* the spiking batch, then calls :meth:`Guards.rolled_back`
  (``guards/rollbacks``; the skipped sample range is kept in :attr:`Guards.skipped_ranges`).

The trainer then steps the optimizer or not and reports the gradient norms to
:meth:`Guards.record`, which counts skipped updates and keeps the window of accepted losses.

Every rank sees the same loss (``forward_backward`` reduces it over all ranks) and the same
global gradient norm, so every rank takes the same decision without extra communication.

Counters and the LR scale describe the run's history: a rollback keeps them and restores only the
loss window (which must describe the restored model); a resume from a checkpoint restores all.
A crash after a rollback but before the next checkpoint replays the offending range; the run is
deterministic, so the same spike is detected and rolled back again.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_morpheus.config import FaultConfig, GuardConfig
from moe_morpheus.train.optim import GradNorms

log = logging.getLogger(__name__)


class SpikeDetector:
    """A loss is a spike when it exceeds both ``ratio`` x the window mean and the mean plus
    ``zscore`` standard deviations of the last ``window`` accepted losses; only a full window
    judges (the first steps' fast decline must not fill it with a misleading spread)."""

    def __init__(self, window: int, ratio: float, zscore: float):
        self.window = window
        self.ratio = ratio
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=max(window, 1))

    def is_spike(self, loss: float) -> bool:
        if self.window == 0 or len(self.losses) < self.window:
            return False
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        return loss > self.ratio * mean and loss > mean + self.zscore * std

    def accept(self, loss: float) -> None:
        self.losses.append(loss)


class Faults:
    """Config-driven faults for tests (``FaultConfig``). Each fires at most once per process and
    never in a worker that torchrun restarted, so the run that resumes after it goes on."""

    def __init__(self, cfg: FaultConfig, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.armed = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.fired: set[str] = set()

    def _due(self, name: str, step: int) -> bool:
        if not self.armed or name in self.fired or getattr(self.cfg, name) != step:
            return False
        self.fired.add(name)
        return True

    @staticmethod
    def _kill_self(what: str) -> None:
        print(f"fault injection: {what}; SIGKILL to process {os.getpid()}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def before_step(self, step: int) -> None:
        """``step`` 1-based: SIGKILL ``crash_rank`` at ``crash_step``."""
        if self._due("crash_step", step) and self.rank == self.cfg.crash_rank:
            self._kill_self(f"rank {self.rank} crashes before step {step}")

    def during_save(self, step: int) -> None:
        """SIGKILL every rank while the checkpoint of ``crash_in_save_step`` is half written."""
        if self._due("crash_in_save_step", step):
            self._kill_self(f"rank {self.rank} dies while saving the checkpoint of step {step}")

    def loss(self, step: int, loss: float) -> float:
        """The loss the guards see at ``step`` (1-based): NaN or a spike when configured."""
        if self._due("nan_step", step):
            log.warning("fault injection: NaN loss at step %d", step)
            return float("nan")
        if self._due("spike_step", step):
            log.warning("fault injection: loss x %g at step %d", self.cfg.spike_factor, step)
            return loss * self.cfg.spike_factor
        return loss


@dataclass(frozen=True)
class Decision:
    """The guards' verdict on one step, taken before any parameter moves; the trainer acts on it."""

    loss: float  # as the guards saw it: fault injection may have replaced the measured one
    lr: float  # the scheduled LR times the guards' LR scale
    update: bool  # step the optimizer (which still refuses a non-finite gradient norm)
    rollback: bool = False  # no update: reload the last checkpoint, go on after this batch
    spike: bool = False  # the loss spiked (never enters the spike window, even when updated)


class Guards:
    """NaN/Inf skips, loss-spike actions, the EGS schedule and fault injection for one run.

    ``model`` are the (DDP-wrapped) chunks; ``base_egs`` is ``model.embedding_grad_shrink``, the
    alpha before the first ``egs_schedule`` entry. Steps passed in are 0-based loop indices; the
    config's step numbers are 1-based, as logged to MLflow.
    """

    def __init__(self, cfg: GuardConfig, faults: FaultConfig, model: list[torch.nn.Module], base_egs: float):
        self.cfg = cfg
        self.faults = Faults(faults, dist.get_rank() if dist.is_initialized() else 0)
        self.embeddings = [m for chunk in model for m in chunk.modules() if hasattr(m, "grad_shrink")]
        self.base_egs = base_egs
        self.detector = SpikeDetector(cfg.spike_window, cfg.spike_ratio, cfg.spike_zscore)
        self.skipped = 0
        self.spikes = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.skipped_ranges: list[list[int]] = []

    # ------------------------------------------------------------------ per step
    def egs_alpha(self, step: int) -> float:
        """Embedding gradient shrink alpha at 1-based ``step``: the latest schedule entry <= step."""
        due = [s for s in self.cfg.egs_schedule if s <= step]
        return self.cfg.egs_schedule[max(due)] if due else self.base_egs

    def begin_step(self, step: int) -> None:
        self.faults.before_step(step + 1)
        alpha = self.egs_alpha(step + 1)
        for embedding in self.embeddings:
            embedding.grad_shrink = alpha

    def decide(self, step: int, loss: float, lr: float, *, can_roll_back: bool) -> Decision:
        """This step's update, from its loss and scheduled ``lr``; ``can_roll_back``: a checkpoint
        exists to return to (without one a rollback becomes a skip)."""
        loss = self.faults.loss(step + 1, loss)
        if not math.isfinite(loss):
            return Decision(loss, lr * self.lr_scale, update=False)
        if not self.detector.is_spike(loss):
            return Decision(loss, lr * self.lr_scale, update=True)
        self.spikes += 1
        action = self.cfg.spike_action
        if action == "rollback" and not can_roll_back:
            log.warning("no checkpoint to roll back to yet: the update is skipped instead")
            action = "skip"
        if action == "rollback" and self.rollbacks >= self.cfg.max_rollbacks:
            raise RuntimeError(f"loss spike at step {step + 1} after {self.rollbacks} rollbacks "
                               f"(guards.max_rollbacks={self.cfg.max_rollbacks}): the run keeps diverging; "
                               f"lower the learning rate or the embedding gradient shrink and resume")
        log.warning("loss spike at step %d: %.4f against a window mean of %.4f; action %s", step + 1, loss,
                    sum(self.detector.losses) / len(self.detector.losses), action)
        if action == "lower_lr":
            self.lr_scale *= self.cfg.lr_factor
        return Decision(loss, lr * self.lr_scale, update=action == "lower_lr", rollback=action == "rollback",
                        spike=True)

    def record(self, step: int, decision: Decision, norms: GradNorms) -> None:
        """After the trainer acted on ``decision``: count a skipped update, keep an accepted loss."""
        applied = decision.update and norms.finite
        if not applied and not decision.rollback:
            self.skipped += 1
            finite = math.isfinite(decision.loss)
            if not (finite and norms.finite):
                log.warning("non-finite %s at step %d: update skipped", "loss" if not finite else "gradient norm",
                            step + 1)
        if applied and not decision.spike:
            self.detector.accept(decision.loss)

    def rolled_back(self, window: list[float], samples: tuple[int, int]) -> None:
        """After the trainer restored a checkpoint: its loss window; ``samples`` = the skipped
        [first, end) sample range. Counters and the LR scale stay (module docstring)."""
        self.rollbacks += 1
        self.detector.losses = deque(window, maxlen=self.detector.losses.maxlen)
        self.skipped_ranges.append(list(samples))
        log.warning("rolled back; samples [%d, %d) are skipped (GLM-130B-style data skip)", *samples)

    def metrics(self) -> dict[str, float]:
        return {"guards/skipped": self.skipped, "guards/spikes": self.spikes, "guards/rollbacks": self.rollbacks,
                "guards/lr_scale": self.lr_scale}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "spikes": self.spikes, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale, "window": list(self.detector.losses),
                "skipped_ranges": [list(r) for r in self.skipped_ranges]}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.spikes, self.rollbacks = state["skipped"], state["spikes"], state["rollbacks"]
        self.lr_scale = state["lr_scale"]
        self.detector.losses = deque(state["window"], maxlen=self.detector.losses.maxlen)
        self.skipped_ranges = [list(r) for r in state["skipped_ranges"]]
