"""FasterMoE's performance model, shadowing decision, schedule steps and prediction, topology-
aware gate and statistics, in one process on constructed inputs.

Shape legend: W ranks, E local experts, G = W * E experts, T tokens, K top-k.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from moe_morpheus.config import ConfigError, FasterMoEConfig
from moe_morpheus.moe.faster import (
    Costs,
    TopologyGate,
    decide_schedule,
    decide_shadow,
    predict_latency,
    predict_schedule,
)
from moe_morpheus.moe.faster.calibrate import _fastest, _line
from moe_morpheus.moe.faster.policy import MARGIN, step_groups
from moe_morpheus.moe.faster.stats import FasterStats
from moe_morpheus.moe.ffn import gate_class

# D = F = 1024 GeGLU expert: 3 * D * F parameters, fp32.
P = 3 * 1024 * 1024
GPU = Costs(token_flops=2.0 * P, token_bytes=4 * 1024, param_bytes=4 * P, net_bandwidth=50e9 / 8, flops=11.5e12)


def hot_load(W: int, E: int, tokens: int, hot: int = 0) -> torch.Tensor:
    """Every rank sends ``tokens`` assignments: half to expert ``hot``, the rest spread evenly."""
    G = W * E
    load = torch.full((W, G), tokens // 2 // G)
    load[:, hot] += tokens - load[0].sum()
    return load


def test_hot_expert_is_shadowed_when_the_model_says_it_pays():
    W, E = 8, 1
    load = hot_load(W, E, 16384, hot=3)
    assert load.sum(0)[3] * 2 >= load.sum()  # expert 3 receives half of everything
    shadow = decide_shadow(load, E, GPU)
    assert shadow[:1] == [3] or 3 in shadow
    assert predict_latency(load, E, shadow, GPU) < predict_latency(load, E, [], GPU)
    # Same load, expert parameters 1000x more expensive to move: keeping the tokens pays.
    slow_net = Costs(GPU.token_flops, GPU.token_bytes, 1000 * GPU.param_bytes, GPU.net_bandwidth, GPU.flops)
    assert decide_shadow(load, E, slow_net) == []
    # Few tokens: the parameters (12 MiB) cost more than the hot expert's rows save.
    assert decide_shadow(hot_load(W, E, 64, hot=3), E, GPU) == []


def test_uniform_load_shadows_nothing_and_sent_totals_do_not_matter():
    for W, E in ((2, 1), (4, 2), (8, 4)):
        load = torch.full((W, W * E), 512)
        assert decide_shadow(load, E, GPU) == []
    # FastMoE's policy sorts per-SENDER totals (equal here) and never shadows; the received
    # load of expert 0 is what the model must see.
    load = hot_load(4, 2, 8192)
    assert len(set(load.sum(1).tolist())) == 1 and decide_shadow(load, 2, GPU) == [0]


def test_decision_is_a_function_of_the_gathered_counts_only():
    """Every rank calls decide_shadow on the same all-gathered matrix: the answer is sorted,
    deterministic, and does not depend on which rank asks (nothing rank-local enters)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        load = torch.randint(0, 300, (4, 8), generator=gen)
        load[:, int(torch.randint(0, 8, (), generator=gen))] += 4000
        first = decide_shadow(load, 2, GPU)
        assert first == sorted(first)
        assert all(decide_shadow(load.clone(), 2, GPU) == first for _ in range(3))


def test_latency_model_terms():
    """predict_latency by hand for W=2, E=1: rank 0 sends 30 rows to expert 1, rank 1 sends
    10 to expert 0; each keeps 70 / 90 rows for its own expert."""
    load = torch.tensor([[70, 30], [10, 90]])
    costs = Costs(token_flops=2.0, token_bytes=4.0, param_bytes=100.0, net_bandwidth=1.0, flops=1.0)
    # rank 0 computes 80, link max(30, 10) = 30; rank 1 computes 120, link 30.
    assert predict_latency(load, 1, [], costs) == max(3 * 80 * 2 + 4 * 30 * 4, 3 * 120 * 2 + 4 * 30 * 4)
    # Shadow expert 1: rank 0 computes 80 + its own 30 rows of expert 1, rank 1 computes 90;
    # the links carry rank 1's 10 rows for expert 0; plus broadcast and reduce of 100 bytes.
    assert predict_latency(load, 1, [1], costs) == max(3 * 110 * 2, 3 * 90 * 2) + 4 * 10 * 4 + 2 * 100


def test_fixed_costs_enter_the_latency_model():
    """The same W=2, E=1 load as above with an all-to-all latency X, a call latency C, and a
    parameter latency P at half the token bandwidth."""
    load = torch.tensor([[70, 30], [10, 90]])
    X, C, P = 7.0, 5.0, 11.0
    costs = Costs(token_flops=2.0, token_bytes=4.0, param_bytes=100.0, net_bandwidth=1.0, flops=1.0,
                  exchange_latency_s=X, call_latency_s=C, param_latency_s=P, param_bandwidth=0.5)
    plain = max(3 * (C + 80 * 2) + 4 * (X + 30 * 4), 3 * (C + 120 * 2) + 4 * (X + 30 * 4))
    assert predict_latency(load, 1, [], costs) == plain
    # Shadowing expert 1 adds its own call (3 C), one owner's broadcast and reduce (2 P) and
    # 2 x 100 bytes at 0.5 bytes/s.
    shadowed = max(3 * (C + 110 * 2), 3 * (C + 90 * 2)) + 4 * (X + 10 * 4) + 3 * C + 2 * P + 2 * 200
    assert predict_latency(load, 1, [1], costs) == shadowed


def test_decisions_act_only_beyond_the_margin():
    # Compute-bound, one hot expert: the paper's model (no fixed costs) shadows it.
    W, E = 2, 4
    load = hot_load(W, E, 4096)
    free = Costs(token_flops=1e5, token_bytes=512.0, param_bytes=4e5, net_bandwidth=3e9, flops=4e10)
    assert decide_shadow(load, E, free) == [0]
    plain, shadowed = predict_latency(load, E, [], free), predict_latency(load, E, [0], free)
    assert shadowed <= (1 - MARGIN) * plain
    # A parameter transfer that eats all but 2% of the gain: greedy would still take it, the
    # margin does not.
    gain = plain - shadowed
    near = Costs(free.token_flops, free.token_bytes, free.param_bytes, free.net_bandwidth, free.flops,
                 param_latency_s=(gain - 0.02 * plain) / 2)
    assert predict_latency(load, E, [0], near) < plain
    assert decide_shadow(load, E, near) == []
    # Uniform load: neither pays. The schedule with full overlap hides the transfers; with none
    # (a CPU whose cores the transfer competes for) it only adds latencies.
    uniform = torch.full((W, W * E), 256)
    assert decide_shadow(uniform, E, free) == []
    slow_net = Costs(free.token_flops, free.token_bytes, free.param_bytes, 1e8, free.flops)
    assert decide_schedule(predict_schedule(uniform, E, 1, slow_net))
    no_overlap = Costs(free.token_flops, free.token_bytes, free.param_bytes, 1e8, free.flops,
                       exchange_latency_s=1e-4, call_latency_s=1e-4, overlap=0.0)
    plain, sched = predict_schedule(uniform, E, 1, no_overlap)
    assert sched > plain and not decide_schedule((plain, sched))
    assert not decide_schedule((0.0, 0.0))  # nothing to exchange: no gain, not taken


def test_schedule_prediction_with_fixed_costs_by_hand():
    """W=2, E=1, group size 1, every rank sends 100 rows to each expert; exchange latency X per
    peer, call latency C, overlap 0.5; a row costs 1 s to move and 2 s to compute."""
    X, C, h = 3.0, 5.0, 0.5
    costs = Costs(token_flops=2.0, token_bytes=1.0, param_bytes=1.0, net_bandwidth=1.0, flops=1.0,
                  exchange_latency_s=X, call_latency_s=C, overlap=h)
    load = torch.full((2, 2), 100)
    # Plain, per rank: 2 all-to-alls of 100 rows with 1 peer, one call on 200 rows; backward the
    # same with twice the call.
    plain = (2 * (X + 100) + (C + 400)) + (2 * (X + 100) + 2 * (C + 400))
    # Scheduled: step 0 computes the own 100 rows (no transfer), step 1 moves 100 rows each way.
    d1 = X + 100

    def ov(a, b):
        return a + b - h * min(a, b)

    sched = sum(d1 + ov(f * (C + 200), d1) + ov(f * (C + 200), 0.0) for f in (1, 2))
    assert predict_schedule(load, 1, 1, costs) == pytest.approx((plain, sched))
    # W=4 with group size 1: the plain all-to-all pays the latency of 3 peers for 300 rows each
    # way, a step that of its 1 peer for 100; each rank computes 400 rows.
    load4 = torch.full((4, 4), 100)
    d = X + 100
    # Step 0 is the own rows (no transfer); C_1 overlaps D_2 (R_0 is empty), C_2 overlaps D_3 + R_1.
    sched4 = sum(d + ov(f * (C + 200), d) + ov(f * (C + 200), d) + ov(f * (C + 200), 2 * d)
                 + ov(f * (C + 200), d) for f in (1, 2))
    assert predict_schedule(load4, 1, 1, costs) == pytest.approx(
        ((2 * (3 * X + 300) + (C + 800)) + (2 * (3 * X + 300) + 2 * (C + 800)), sched4))


def test_calibration_fits_a_line_and_reads_noise_as_per_unit_cost():
    assert _line([8, 512], [0.001 + 8 * 2e-6, 0.001 + 512 * 2e-6]) == pytest.approx((2e-6, 0.001))
    # The larger size measured faster: no slope to trust, all of it per unit, no fixed cost.
    assert _line([16, 256], [0.004, 0.003]) == (0.003 / 256, 0.0)
    # A negative fixed cost: the larger point, all per unit (it is not over-predicted).
    assert _line([10, 20], [0.001, 0.003]) == (0.003 / 20, 0.0)


def test_calibration_times_the_sizes_in_turn_and_keeps_each_ones_fastest():
    # Stalls over most repetitions (what a median still caught): only the fastest is the machine's.
    calls, sleeps = [], {0: [0.1, 0.1, 0.001], 1: [0.1, 0.002, 0.1]}

    def timed(i):
        def fn():
            calls.append(i)
            time.sleep(sleeps[i][calls.count(i) - 1])
        return fn

    best = _fastest([timed(0), timed(1)], 3, lambda: None)
    assert calls == [0, 1, 0, 1, 0, 1]
    assert 0.001 <= best[0] < 0.05 and 0.002 <= best[1] < 0.05


def test_schedule_steps_and_prediction():
    # W=4, group size 1: step s sends to r + s, receives from r - s.
    assert [(list(d), list(s)) for d, s in step_groups(1, 4, 1)] == [([1], [1]), ([2], [0]), ([3], [3]), ([0], [2])]
    assert [(list(d), list(s)) for d, s in step_groups(2, 4, 2)] == [([2, 3], [2, 3]), ([0, 1], [0, 1])]
    # Every (sender, receiver) pair is served exactly once per rank.
    for W, gs in ((4, 1), (4, 2), (8, 2), (6, 3)):
        for r in range(W):
            steps = step_groups(r, W, gs)
            assert sorted(w for d, _ in steps for w in d) == list(range(W))
            assert sorted(w for _, s in steps for w in s) == list(range(W))
    load = torch.full((2, 2), 1000)
    costs = Costs(token_flops=1.0, token_bytes=1.0, param_bytes=1.0, net_bandwidth=1.0, flops=1.0)
    plain, sched = predict_schedule(load, 1, 1, costs)
    # Per rank: step 0 (self) computes 1000, step 1 moves 1000 each way and computes 1000.
    # Plain: fwd 1000 + 2000 + 1000, bwd 1000 + 4000 + 1000. Pipelined: max(c0, d1) + c1 + r1.
    assert plain == 4000 + 6000
    assert sched == (1000 + 1000 + 1000) + (2000 + 2000 + 1000)
    # One group (group_size = W): nothing to overlap, the prediction is the plain one.
    assert predict_schedule(load, 1, 2, costs)[1] == plain


def _brute_force_select(logits_TG, off_node_G, K, fraction):
    T = logits_TG.shape[0]
    top1 = logits_TG.argmax(-1)
    quota = int(T * fraction)
    off = [bool(off_node_G[int(t)]) for t in top1]
    if sum(off) < quota:
        return [sorted(torch.topk(row, K).indices.tolist()) for row in logits_TG]
    ranked = sorted((t for t in range(T) if off[t]), key=lambda t: -logits_TG[t, top1[t]].item())[:quota]
    out = []
    for t in range(T):
        on = logits_TG[t].masked_fill(off_node_G, float("-inf"))
        ids = torch.topk(on, K).indices.tolist()
        if t in ranked:
            ids[-1] = int(top1[t])
        out.append(sorted(ids))
    return out


@pytest.mark.parametrize("rank,fraction,top_k", [(0, 0.14, 2), (2, 0.3, 2), (3, 0.0, 1), (1, 0.9, 3)])
def test_topology_gate_caps_off_node_traffic(rank, fraction, top_k):
    # W=4 ranks, 2 per node, 2 experts each: experts 0-3 on node 0, 4-7 on node 1.
    torch.manual_seed(rank)
    gate = TopologyGate(12, 2, 4, top_k, ranks_per_node=2, outgoing_fraction=fraction, rank=rank)
    x = torch.randn(50, 12, requires_grad=True)
    idx, score = gate(x)
    logits = gate.gate(x).detach()
    off_node = torch.tensor([(g // 2) // 2 != rank // 2 for g in range(8)])
    assert torch.equal(gate.off_node_G, off_node)
    assert [sorted(r) for r in idx.tolist()] == _brute_force_select(logits, off_node, top_k, fraction)
    quota = int(50 * fraction)
    if int(off_node[logits.argmax(-1)].sum()) >= quota:
        assert int(off_node[idx].sum()) == quota  # exactly the quota crosses nodes
    torch.testing.assert_close(score, logits.gather(1, idx).softmax(-1), rtol=0, atol=0)
    (score[:, 0].sum() + gate.get_loss()).backward()
    assert x.grad is not None and gate.gate.weight.grad.abs().sum() > 0


def test_topology_gate_plain_top_k_under_the_quota_and_errors():
    gate = TopologyGate(12, 2, 4, 2, ranks_per_node=2, outgoing_fraction=1.0, rank=0)
    x = torch.randn(30, 12)
    logits = gate.gate(x)
    assert torch.equal(gate(x)[0], logits.topk(2).indices)  # quota 30: never reached
    assert gate_class("faster") is TopologyGate
    with pytest.raises(ValueError, match="only 2 experts are on this node .* fewer than top_k=3"):
        TopologyGate(12, 1, 4, 3, ranks_per_node=2, rank=0)
    with pytest.raises(ValueError, match="outgoing_fraction in \\[0, 1\\]"):
        TopologyGate(12, 1, 4, 1, outgoing_fraction=1.5)


def test_faster_config_errors():
    with pytest.raises(ConfigError, match="moe.faster.group_size=0 must be >= 1"):
        _faster(group_size=0)
    with pytest.raises(ConfigError, match="moe.faster.net_bandwidth=-1.0 must be positive"):
        _faster(net_bandwidth=-1.0)
    with pytest.raises(ConfigError, match="moe.faster.outgoing_fraction=2.0 must be in"):
        _faster(outgoing_fraction=2.0)
    with pytest.raises(ConfigError, match="moe.faster.ranks_per_node=0"):
        _faster(ranks_per_node=0)


def _faster(**kwargs):
    return FasterMoEConfig(**kwargs)


def test_stats_are_means_per_forward():
    stats = FasterStats(4)
    like = torch.zeros(1)
    for shadow, scheduled in (([0], True), ([0, 2], False)):
        stats.record_forward(shadow, (2.0, 1.0), scheduled, (4.0, 3.0 if scheduled else 5.0))
        stats.add_bytes("exchange", 100)
        with stats.timed("compute", like):
            math.factorial(2000)
    out = stats.pop()
    assert out["faster/shadowed/e0"] == 1.0 and out["faster/shadowed/e2"] == 0.5
    assert "faster/shadowed/e1" not in out and out["faster/shadowed_experts"] == 1.5
    assert all(isinstance(v, float) for v in out.values())
    assert out["faster/exchange_bytes"] == 100 and out["faster/compute_s"] > 0
    assert out["faster/predicted_s_no_shadow"] == 2.0 and out["faster/predicted_s"] == 1.0
    assert out["faster/scheduled"] == 0.5
    assert out["faster/predicted_s_all_to_all"] == 4.0 and out["faster/predicted_s_schedule"] == 4.0
    assert stats.pop() == {}  # reset
    stats.record_forward([], None)  # the schedule not allowed: no schedule keys
    assert not any("schedul" in k or "all_to_all" in k for k in stats.pop())
