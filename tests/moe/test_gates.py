"""Gates: capacity bounds and deterministic drops, Switch / GShard semantics, balance and z-loss.

Shape legend: T tokens, D model dim, G experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_morpheus.moe.ffn import gate_class
from moe_morpheus.moe.gates import GShardGate, NaiveGate, NoisyGate, SwitchGate


def balance_formula(probs_TG, idx_TK):
    """docs/design.md#losses: G * sum_i f_i * P_i, f_i over the T * K assignments, P_i mean probability."""
    T, G = probs_TG.shape
    K = idx_TK.shape[1]
    total = 0.0
    for i in range(G):
        f_i = sum(int(idx_TK[t, j]) == i for t in range(T) for j in range(K)) / (T * K)
        P_i = sum(float(probs_TG[t, i]) for t in range(T)) / T
        total += f_i * P_i
    return G * total


def logit_gate(G, top_k, **options):
    """A NaiveGate whose logits are its input (identity weight, zero bias): routings by hand."""
    gate = NaiveGate(G, G, 1, top_k, **options)
    with torch.no_grad():
        gate.gate.weight.copy_(torch.eye(G))
        gate.gate.bias.zero_()
    return gate


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_loss_is_one_at_uniform_routing(top_k):
    """Cyclic logits: token t prefers experts t..t+k-1 (mod G); every expert is chosen k times
    and, by symmetry, has the same mean probability: f_i = P_i = 1 / G."""
    G = 6
    logits = torch.stack([torch.roll(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]), t) for t in range(G)])
    gate = logit_gate(G, top_k)
    idx, _ = gate(logits)
    assert torch.bincount(idx.flatten(), minlength=G).tolist() == [top_k] * G
    assert gate.get_loss().item() == pytest.approx(1.0, abs=1e-6)
    assert gate.loss_value.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("softmax_before_topk", [False, True])
def test_balance_and_z_loss_equal_formulas_on_hand_built_routing(top_k, softmax_before_topk):
    G = 4
    logits = torch.tensor([[4.0, 1.0, 0.0, -1.0], [3.0, 2.5, 0.0, 0.0], [0.0, 0.5, 2.0, 1.0],
                           [5.0, -2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 3.0]])
    gate = logit_gate(G, top_k, softmax_before_topk=softmax_before_topk)
    idx, score = gate(logits)
    probs = logits.softmax(-1)
    assert idx.tolist() == logits.topk(top_k, -1).indices.tolist()
    expected_score = probs.gather(1, idx) if softmax_before_topk else logits.topk(top_k, -1).values.softmax(-1)
    assert torch.allclose(score, expected_score, rtol=1e-6)
    assert gate.get_loss().item() == pytest.approx(balance_formula(probs, idx), rel=1e-6)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / len(logits)
    assert gate.get_z_loss().item() == pytest.approx(z, rel=1e-6)
    assert gate.get_loss() is None  # cleared by the first get_loss


def test_balance_loss_counts_assignments_before_capacity_drops():
    G = 4
    logits = torch.tensor([[4.0, 1.0, 0.0, -1.0]] * 6)  # everyone wants expert 0
    gate = logit_gate(G, 1, capacity=1.0)  # cap = ceil(1.0 * 6 * 1 / 4) = 2
    idx, _ = gate(logits)
    assert (idx[:, 0] == 0).sum() == 2 and (idx == -1).sum() == 4
    assert gate.get_loss().item() == pytest.approx(balance_formula(logits.softmax(-1), torch.zeros(6, 1)), rel=1e-6)


@pytest.mark.parametrize("gate_cls,top_k", [(NaiveGate, 3), (GShardGate, 2), (SwitchGate, 1)])
@pytest.mark.parametrize("factor", [0.3, 1.0])
def test_capacity_bound_and_lowest_scores_dropped(gate_cls, top_k, factor):
    torch.manual_seed(1)
    D, E, T = 8, 8, 64
    gate = gate_cls(D, E, 1, top_k, capacity=factor)
    gate.eval()  # no jitter / random routing: two calls see the same routing
    x = torch.randn(T, D) + 2.0 * torch.randn(1, D)  # a shared offset makes the loads skewed
    idx, score = gate(x)
    cap = math.ceil(factor * T * top_k / E)
    counts = torch.bincount(idx[idx >= 0], minlength=E)
    assert counts.max() <= cap
    assert (idx == -1).any()
    # Which assignments were dropped: the same top-k without capacity, minus the kept ones.
    gate.capacity = None
    full_idx, full_score = gate(x)
    assert torch.equal(full_score, score)
    for e in range(E):
        chose = full_idx == e
        kept, dropped = chose & (idx == e), chose & (idx == -1)
        assert kept.sum() == min(chose.sum(), cap)
        if dropped.any():
            assert score[kept].min() >= score[dropped].max()
    gate.capacity = (factor, factor)
    assert torch.equal(gate(x)[0], idx)  # deterministic


def test_capacity_ties_drop_the_later_assignment():
    gate = logit_gate(2, 1, capacity=1.0)  # cap = ceil(4 / 2) = 2
    idx, _ = gate(torch.tensor([[1.0, 0.0]] * 4))
    assert idx[:, 0].tolist() == [0, 0, -1, -1]


def test_capacity_train_and_eval_factors():
    gate = GShardGate(4, 4, 1, 2)
    assert gate.capacity == (1.2, 2.4)
    assert gate.capacity_per_expert(10) == math.ceil(1.2 * 10 * 2 / 4)
    gate.eval()
    assert gate.capacity_per_expert(10) == math.ceil(2.4 * 10 * 2 / 4)
    assert GShardGate(4, 4, 1, 2, capacity=None).capacity_per_expert(10) is None


def test_switch_score_is_router_probability():
    torch.manual_seed(2)
    gate = SwitchGate(8, 4, 2, 1, capacity=None)
    x = torch.randn(50, 8)
    gate.eval()
    idx, score = gate(x)
    probs = gate.gate(x).softmax(-1)
    assert torch.equal(idx[:, 0], probs.argmax(-1))
    assert torch.allclose(score, probs.gather(1, idx), rtol=1e-6)

    gate.train()  # jitter: regenerate the multiplicative noise from the same RNG state
    torch.manual_seed(7)
    idx, score = gate(x)
    torch.manual_seed(7)
    noise = torch.empty_like(x).uniform_(1 - gate.switch_eps, 1 + gate.switch_eps)
    probs = gate.gate(x * noise).softmax(-1)
    assert torch.equal(idx[:, 0], probs.argmax(-1))
    assert torch.allclose(score, probs.gather(1, idx), rtol=1e-6)


def test_gshard_random_routing_drops_only_the_second_slot():
    torch.manual_seed(4)
    gate = GShardGate(8, 4, 1, 2, capacity=None)
    x = torch.randn(400, 8)
    torch.manual_seed(9)
    idx, score = gate(x)
    assert (idx[:, 0] >= 0).all()
    dropped = idx[:, 1] == -1
    torch.manual_seed(9)
    u = torch.rand(400)
    # kept with probability min(1, 2 * score_2) (GShard, Algorithm 1)
    assert torch.equal(dropped, 2 * score[:, 1] < u)
    assert 0 < dropped.sum() < 400
    gate.eval()
    assert (gate(x)[0] >= 0).all()  # no random routing in evaluation


def test_noisy_gate_top_k_shapes_and_noise():
    torch.manual_seed(5)
    gate = NoisyGate(8, 4, 1, 3)
    x = torch.randn(20, 8)
    idx, score = gate(x)
    assert idx.shape == (20, 3) and score.shape == (20, 3)
    assert torch.allclose(score.sum(-1), torch.ones(20))
    gate.eval()  # no noise: top-k of the clean logits
    idx, score = gate(x)
    top, clean_idx = gate.w_gate(x).topk(3, -1)
    assert torch.equal(idx, clean_idx) and torch.allclose(score, top.softmax(-1))
    gate.train()
    gate(x)[1].sum().backward()
    assert gate.w_noise.weight.grad is not None and gate.w_noise.weight.grad.abs().sum() > 0


def test_gate_init_is_identical_given_the_seed():
    torch.manual_seed(123)
    a = NaiveGate(8, 4, 2, 2)
    torch.manual_seed(123)
    b = NaiveGate(8, 4, 2, 2)
    assert torch.equal(a.gate.weight, b.gate.weight) and torch.equal(a.gate.bias, b.gate.bias)


def test_gate_errors():
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and the number of experts 8"):
        NaiveGate(8, 4, 2, 9)
    with pytest.raises(ValueError, match="GShardGate routes to exactly 2 experts"):
        GShardGate(8, 4, 1, 3)
    with pytest.raises(ValueError, match="SwitchGate routes to exactly 1 expert"):
        SwitchGate(8, 4, 1, 2)
    with pytest.raises(ValueError, match="capacity factors must be positive"):
        NaiveGate(8, 4, 1, 2, capacity=0.0)
    with pytest.raises(ValueError, match="moe.gate='bogus' has no native gate"):
        gate_class("bogus")
    assert gate_class("switch") is SwitchGate
