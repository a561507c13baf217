"""Stability guards in one process: the decision on each step (NaN skips, spike detection and its
three actions), what is recorded after the trainer acted, the EGS schedule, fault switches, state
round trip, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from moe_morpheus.config import ConfigError, FaultConfig, GuardConfig
from moe_morpheus.train.guards import Decision, Faults, Guards, SpikeDetector
from moe_morpheus.train.optim import GradNorms


class Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.grad_shrink = 0.1


def make(cfg: GuardConfig | None = None, faults: FaultConfig | None = None) -> tuple[Guards, Embedding]:
    embedding = Embedding()
    guards = Guards(cfg or GuardConfig(spike_window=4), faults or FaultConfig(), [embedding], 0.1)
    return guards, embedding


def act(guards: Guards, step: int, loss: float, *, lr: float = 1e-3, norm: float = 1.0,
        can_roll_back: bool = False) -> Decision:
    """One step as the trainer takes it: the guards decide, the optimizer would update (or not)
    with gradient norm ``norm``, the guards record the outcome."""
    decision = guards.decide(step, loss, lr, can_roll_back=can_roll_back)
    guards.record(step, decision, GradNorms(total=norm, embedding=0.0, finite=math.isfinite(norm), rest=norm))
    return decision


def warm(guards: Guards, steps: int = 4, loss: float = 3.0) -> None:
    for step in range(steps):
        assert act(guards, step, loss + 0.01 * step).update


def test_spike_detector_needs_a_full_window_and_both_thresholds():
    detector = SpikeDetector(window=3, ratio=1.5, zscore=6.0)
    assert not detector.is_spike(100.0)  # empty window judges nothing
    for loss in (2.0, 2.1, 1.9):
        detector.accept(loss)
    assert detector.is_spike(3.1) and not detector.is_spike(2.9)  # ratio: 1.5 x 2.0 = 3.0
    noisy = SpikeDetector(window=3, ratio=1.5, zscore=6.0)
    for loss in (1.0, 3.0, 2.0):  # mean 2, std 0.82: the z-score bound is 6.9
        noisy.accept(loss)
    assert not noisy.is_spike(4.0)
    assert not SpikeDetector(window=0, ratio=1.5, zscore=6.0).is_spike(1e9)


def test_non_finite_loss_or_norm_skips_the_update_and_counts():
    guards, _ = make()
    decision = act(guards, 0, float("nan"))
    assert math.isnan(decision.loss) and not decision.update and guards.skipped == 1 and decision.lr == 1e-3
    assert act(guards, 1, 3.0, norm=float("inf")).update  # the optimizer refuses it: counted as skipped
    assert guards.skipped == 2 and not guards.detector.losses
    act(guards, 2, 3.0)
    assert guards.skipped == 2 and list(guards.detector.losses) == [3.0]


def test_spike_skip():
    guards, _ = make()
    warm(guards)
    decision = act(guards, 4, 30.0, can_roll_back=True)
    assert decision == Decision(30.0, 1e-3, update=False, rollback=False, spike=True)
    assert (guards.spikes, guards.skipped) == (1, 1) and 30.0 not in guards.detector.losses


def test_spike_lower_lr_applies_the_update_at_the_lower_rate_from_then_on():
    guards, _ = make(GuardConfig(spike_window=4, spike_action="lower_lr", lr_factor=0.5))
    warm(guards)
    decision = act(guards, 4, 30.0)
    assert decision.lr == 5e-4 and decision.update and guards.skipped == 0 and guards.spikes == 1
    assert 30.0 not in guards.detector.losses  # a spike never enters the window
    assert act(guards, 5, 3.0, lr=2e-3).lr == 1e-3
    assert guards.metrics()["guards/lr_scale"] == 0.5


def test_spike_rollback_is_decided_and_falls_back_to_skip_without_a_checkpoint():
    guards, _ = make(GuardConfig(spike_window=4, spike_action="rollback", max_rollbacks=1))
    warm(guards)
    decision = act(guards, 4, 30.0)
    assert not decision.rollback and not decision.update and guards.skipped == 1  # no checkpoint yet
    decision = act(guards, 5, 30.0, can_roll_back=True)
    assert decision.rollback and not decision.update and guards.skipped == 1  # a rollback is no skip
    guards.rolled_back([3.0, 3.0, 3.0, 3.0], (40, 56))
    assert guards.rollbacks == 1 and guards.skipped_ranges == [[40, 56]]
    assert list(guards.detector.losses) == [3.0] * 4
    with pytest.raises(RuntimeError, match="after 1 rollbacks"):
        act(guards, 6, 30.0, can_roll_back=True)


def test_embedding_grad_shrink_follows_the_schedule():
    guards, embedding = make(GuardConfig(egs_schedule={3: 0.5, 6: 1.0}))
    alphas = []
    for step in range(7):
        guards.begin_step(step)
        alphas.append(embedding.grad_shrink)
    assert alphas == [0.1, 0.1, 0.5, 0.5, 0.5, 1.0, 1.0]  # 1-based steps 3 and 6


def test_faults_fire_once_and_not_after_a_torchelastic_restart(monkeypatch):
    faults = Faults(FaultConfig(nan_step=2, spike_step=3, spike_factor=4.0), rank=0)
    assert faults.loss(1, 2.0) == 2.0 and math.isnan(faults.loss(2, 2.0)) and faults.loss(3, 2.0) == 8.0
    assert faults.loss(2, 2.0) == 2.0  # once per process (a rollback replays the step)
    killed = []
    monkeypatch.setattr(Faults, "_kill_self", staticmethod(killed.append))
    crash = Faults(FaultConfig(crash_step=5, crash_rank=1, crash_in_save_step=10), rank=1)
    crash.before_step(4)
    crash.before_step(5)
    crash.during_save(10)
    Faults(FaultConfig(crash_step=5, crash_rank=1), rank=0).before_step(5)  # another rank: nothing
    assert killed == ["rank 1 crashes before step 5", "rank 1 dies while saving the checkpoint of step 10"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = Faults(FaultConfig(nan_step=2), rank=0)
    assert restarted.loss(2, 2.0) == 2.0


def test_state_round_trip():
    guards, _ = make()
    guards.skipped, guards.spikes, guards.rollbacks, guards.lr_scale = 2, 3, 1, 0.25
    guards.detector.accept(3.0)
    guards.skipped_ranges = [[1, 2]]
    other, _ = make()
    other.load_state_dict(guards.state_dict())
    assert other.state_dict() == guards.state_dict() and other.detector.losses.maxlen == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(spike_action="halve"), "guards.spike_action='halve'"),
    (dict(spike_ratio=1.0), "spike_ratio must be > 1"),
    (dict(lr_factor=1.5), "guards.lr_factor=1.5"),
    (dict(egs_schedule={10: 0.0}), "step 10 -> alpha 0.0"),
])
def test_guard_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        GuardConfig(**kwargs)


def test_fault_config_steps_are_one_based():
    with pytest.raises(ConfigError, match="faults.nan_step=0 must be >= 1"):
        FaultConfig(nan_step=0)
