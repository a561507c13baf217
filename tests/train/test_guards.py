"""Stability guards in one process, with a stand-in optimizer: NaN skips, spike detection and
its three actions, the EGS schedule, fault switches, state round trip, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from moe_morpheus.config import ConfigError, FaultConfig, GuardConfig
from moe_morpheus.train import guards as guards_module
from moe_morpheus.train.guards import Faults, Guards, SpikeDetector
from moe_morpheus.train.optim import GradNorms


class StubOptimizer:
    """Records LRs and applied updates; the gradient norm is whatever the test sets."""

    def __init__(self):
        self.params, self.embedding_params = [], set()
        self.lrs, self.updates, self.norm = [], 0, 1.0

    def set_lr(self, lr):
        self.lrs.append(lr)

    def norms(self):
        return GradNorms(total=self.norm, embedding=0.0, finite=math.isfinite(self.norm), rest=self.norm)

    def step(self):
        norms = self.norms()
        self.updates += norms.finite
        return norms


class Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.grad_shrink = 0.1


@pytest.fixture
def stub(monkeypatch):
    optimizer = StubOptimizer()
    monkeypatch.setattr(guards_module, "grad_norms", lambda params, embedding: optimizer.norms())
    return optimizer


def make(cfg: GuardConfig | None = None, faults: FaultConfig | None = None) -> tuple[Guards, Embedding]:
    embedding = Embedding()
    guards = Guards(cfg or GuardConfig(spike_window=4), faults or FaultConfig(), [embedding], 0.1)
    return guards, embedding


def warm(guards: Guards, optimizer, steps: int = 4, loss: float = 3.0) -> None:
    for step in range(steps):
        guards.update(step, loss + 0.01 * step, 1e-3, optimizer)


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


def test_non_finite_loss_or_norm_skips_the_update_and_counts(stub):
    guards, _ = make()
    loss, norms, lr = guards.update(0, float("nan"), 1e-3, stub)
    assert math.isnan(loss) and stub.updates == 0 and guards.skipped == 1 and lr == 1e-3
    stub.norm = float("inf")
    guards.update(1, 3.0, 1e-3, stub)
    assert stub.updates == 0 and guards.skipped == 2
    stub.norm = 1.0
    guards.update(2, 3.0, 1e-3, stub)
    assert stub.updates == 1 and guards.skipped == 2 and list(guards.detector.losses) == [3.0]


def test_spike_skip(stub):
    guards, _ = make()
    warm(guards, stub)
    guards.update(4, 30.0, 1e-3, stub)
    assert (guards.spikes, guards.skipped, stub.updates) == (1, 1, 4)
    assert 30.0 not in guards.detector.losses and not guards.rollback_requested


def test_spike_lower_lr_applies_the_update_at_the_lower_rate_from_then_on(stub):
    guards, _ = make(GuardConfig(spike_window=4, spike_action="lower_lr", lr_factor=0.5))
    warm(guards, stub)
    _, _, lr = guards.update(4, 30.0, 1e-3, stub)
    assert lr == 5e-4 and stub.updates == 5 and guards.skipped == 0 and guards.spikes == 1
    assert guards.update(5, 3.0, 2e-3, stub)[2] == 1e-3
    assert guards.metrics()["guards/lr_scale"] == 0.5


def test_spike_rollback_requests_a_rollback_and_falls_back_to_skip_without_a_checkpoint(stub):
    guards, _ = make(GuardConfig(spike_window=4, spike_action="rollback", max_rollbacks=1))
    warm(guards, stub)
    guards.update(4, 30.0, 1e-3, stub)
    assert not guards.rollback_requested and guards.skipped == 1  # no checkpoint yet
    guards.checkpoint_available = True
    guards.update(5, 30.0, 1e-3, stub)
    assert guards.rollback_requested and stub.updates == 4 and guards.skipped == 1
    guards.rolled_back([3.0, 3.0, 3.0, 3.0], (40, 56))
    assert guards.rollbacks == 1 and not guards.rollback_requested and guards.skipped_ranges == [[40, 56]]
    with pytest.raises(RuntimeError, match="after 1 rollbacks"):
        guards.update(6, 30.0, 1e-3, stub)


def test_embedding_grad_shrink_follows_the_schedule():
    guards, embedding = make(GuardConfig(egs_schedule={3: 0.5, 6: 1.0}))
    alphas = []
    for step in range(7):
        guards.begin_step(step)
        alphas.append(embedding.grad_shrink)
    assert alphas == [0.1, 0.1, 0.5, 0.5, 0.5, 1.0, 1.0]  # 1-based steps 3 and 6


def test_faults_fire_once_and_not_after_a_torchelastic_restart(monkeypatch, stub):
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
