"""FMoE against an independent brute-force reference (per-token loop over the chosen experts, fp64).

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_morpheus.moe import FMoE, GeGLUExperts
from moe_morpheus.moe.gates import GShardGate, NaiveGate
from tests.helpers.moe import EXPERT_PARAMS, F_HIDDEN, D
from tests.helpers.numerics import relative_error


def geglu_token(x_D, p, e):
    """One expert on one token, written from the dense FFN's formula."""
    value = p["w_value_EFD"][e] @ x_D + p["b_value_EF"][e]
    gate = p["w_gate_proj_EFD"][e] @ x_D + p["b_gate_proj_EF"][e]
    act = value * 0.5 * gate * (1 + torch.erf(gate / 2**0.5))
    return p["w_out_EDF"][e] @ act + p["b_out_ED"][e]


def brute_force(x_TD, gate_w, gate_b, p, top_k, idx_override=None):
    """Top-k of the logits, softmax over the k, then a Python loop over tokens and slots."""
    logits = x_TD @ gate_w.T + gate_b
    top, idx = logits.topk(top_k, dim=-1)
    score = top.softmax(-1)
    if idx_override is not None:
        idx = idx_override
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[1], dtype=x_TD.dtype)
        for j in range(top_k):
            e = int(idx[t, j])
            if e >= 0:
                acc = acc + score[t, j] * geglu_token(x_TD[t], p, e)
        rows.append(acc)
    return torch.stack(rows), idx


def make_layer(num_expert, top_k, seed=0, gate=NaiveGate):
    torch.manual_seed(seed)
    layer = FMoE(num_expert, D, top_k=top_k, gate=gate, expert=GeGLUExperts(num_expert, D, F_HIDDEN))
    with torch.no_grad():  # non-zero biases, so bias gradients and bias use are both checked
        for name in EXPERT_PARAMS:
            if name.startswith("b_"):
                getattr(layer.experts, name).normal_()
    return layer


def run_and_compare(layer, x_TD, top_k, idx_override=None):
    x = x_TD.clone().requires_grad_()
    y = layer(x)
    proj = torch.randn_like(y)
    (y * proj).sum().backward()

    x64 = x_TD.double().requires_grad_()
    gw = layer.gate.gate.weight.detach().double().requires_grad_()
    gb = layer.gate.gate.bias.detach().double().requires_grad_()
    p64 = {n: getattr(layer.experts, n).detach().double().requires_grad_() for n in EXPERT_PARAMS}
    y_ref, idx_ref = brute_force(x64, gw, gb, p64, top_k, idx_override)
    (y_ref * proj.double()).sum().backward()

    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(x.grad, x64.grad) <= 1e-5
    assert relative_error(layer.gate.gate.weight.grad, gw.grad) <= 1e-5
    assert relative_error(layer.gate.gate.bias.grad, gb.grad) <= 1e-5
    for n in EXPERT_PARAMS:
        assert relative_error(getattr(layer.experts, n).grad, p64[n].grad) <= 1e-5, n
    return idx_ref


@pytest.mark.parametrize("num_expert", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 5, 37])
def test_fmoe_matches_brute_force(num_expert, top_k, num_tokens):
    layer = make_layer(num_expert, top_k, seed=num_expert * 100 + top_k * 10 + num_tokens)
    x = torch.randn(num_tokens, D)
    idx = run_and_compare(layer, x, top_k)
    used = set(idx.flatten().tolist())
    if num_tokens * top_k < num_expert:  # some experts got nothing: their gradients are exact zeros
        idle = [e for e in range(num_expert) if e not in used]
        assert idle
        for n in EXPERT_PARAMS:
            assert torch.count_nonzero(getattr(layer.experts, n).grad[idle]) == 0


def test_fmoe_dropped_assignments_contribute_zero():
    """GShard with a tight capacity: the reference skips exactly the assignments the gate dropped."""
    torch.manual_seed(3)
    layer = make_layer(4, 2, seed=3, gate=lambda d, e, w, k: GShardGate(d, e, w, k, capacity=0.5))
    layer.eval()  # no random routing: drops come from capacity only
    x = torch.randn(30, D)
    idx_seen = []
    layer.gate_hook = lambda idx, score, _: idx_seen.append(idx.clone())
    layer(x)
    assert (idx_seen[0] == -1).any()
    for p in layer.parameters():
        p.grad = None
    run_and_compare(layer, x, 2, idx_override=idx_seen[0])


def test_fmoe_bf16_close_to_fp64():
    layer = make_layer(8, 2, seed=11)
    x = torch.randn(40, D)
    p64 = {n: getattr(layer.experts, n).detach().double() for n in EXPERT_PARAMS}
    y_ref, _ = brute_force(x.double(), layer.gate.gate.weight.double(), layer.gate.gate.bias.double(), p64, 2)
    y = layer.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert relative_error(y, y_ref) <= 3e-2


def test_expert_view_applies_one_expert():
    torch.manual_seed(0)
    experts = GeGLUExperts(3, D, F_HIDDEN)
    x = torch.randn(6, D)
    p = {n: getattr(experts, n).detach() for n in EXPERT_PARAMS}
    for e in range(3):
        ref = torch.stack([geglu_token(x[t], p, e) for t in range(6)])
        assert relative_error(experts[e](x), ref) <= 1e-6
    assert len(list(experts)) == 3
    with pytest.raises(IndexError, match="out of range"):
        experts[3]


def test_dense_ffn_copied_into_experts_is_function_preserving():
    """value/gate_proj/fc2 linears of a dense GeGLU FFN copy into every expert: the MoE output is the
    dense output for any routing (naive gate scores sum to 1 over the k)."""
    torch.manual_seed(5)
    value, gate_proj, fc2 = nn.Linear(D, F_HIDDEN), nn.Linear(D, F_HIDDEN), nn.Linear(F_HIDDEN, D)
    layer = make_layer(4, 2, seed=5)
    with torch.no_grad():
        for name, src in (("value", value), ("gate_proj", gate_proj)):
            getattr(layer.experts, f"w_{name}_EFD").copy_(src.weight.expand(4, -1, -1))
            getattr(layer.experts, f"b_{name}_EF").copy_(src.bias.expand(4, -1))
        layer.experts.w_out_EDF.copy_(fc2.weight.expand(4, -1, -1))
        layer.experts.b_out_ED.copy_(fc2.bias.expand(4, -1))
    x = torch.randn(20, D)
    dense = fc2(value(x) * F.gelu(gate_proj(x)))
    assert relative_error(layer(x), dense) <= 1e-5


class _LinearExpert(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.fc = nn.Linear(d_model, d_model)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_fmoe_with_expert_class_matches_per_token_loop():
    """FastMoE's non-fused mode: expert(d_model) per slot, each applied to its rows."""
    torch.manual_seed(8)
    layer = FMoE(4, D, top_k=2, expert=_LinearExpert)
    x = torch.randn(12, D, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    with torch.no_grad():
        logits = layer.gate.gate(x)
        top, idx = logits.topk(2, -1)
        score = top.softmax(-1)
        ref = torch.stack([sum(score[t, j] * layer.experts[int(idx[t, j])](x[t]) for j in range(2))
                           for t in range(12)])
    assert relative_error(y, ref) <= 1e-6
    assert all(p.allreduce is False for p in layer.experts.parameters())
    assert all(p.sequence_parallel is True for p in layer.gate.parameters())
    assert all(e.fc.weight.grad is not None for e in layer.experts)


def test_fmoe_mask_and_mask_dict():
    """Masked tokens are not routed; a token whose mask equals a key gets sum_k score_k * value_k."""
    layer = make_layer(4, 2, seed=9)
    x = torch.randn(6, D)
    mask = torch.tensor([0, 1, 0, 2, 3, 0])
    value_KD = torch.randn(2, D)
    with torch.no_grad():
        plain = layer(x)
        top, _ = layer.gate.gate(x).topk(2, -1)
        score = top.softmax(-1)
        layer.mask, layer.mask_dict = mask, {1: value_KD, 2: torch.ones(D)}
        masked = layer(x)
    keep = mask == 0
    assert relative_error(masked[keep], plain[keep]) <= 1e-6
    assert relative_error(masked[1], score[1] @ value_KD) <= 1e-6
    assert relative_error(masked[3], score[3].sum() * torch.ones(D)) <= 1e-6
    assert torch.count_nonzero(masked[4]) == 0  # mask 3 has no entry in mask_dict
    stats = layer.pop_stats()
    assert sum(stats["load"]) == (6 * 2 + 3 * 2) / 2  # mean of the plain and the masked forward
    assert layer.pop_stats() is None


def test_load_statistics():
    layer = make_layer(4, 2, seed=2, gate=lambda d, e, w, k: GShardGate(d, e, w, k, capacity=0.5))
    layer.eval()
    counts = []
    layer.gate_hook = lambda idx, score, _: counts.append(idx.clone())
    x1, x2 = torch.randn(20, D), torch.randn(20, D)
    with torch.no_grad():
        layer(x1)
        layer(x2)
    idx = torch.cat(counts)
    stats = layer.pop_stats()
    expected = torch.bincount(idx[idx >= 0], minlength=4).double() / 2
    assert stats["load"] == expected.tolist()
    assert stats["drop_rate"] == pytest.approx((idx < 0).sum().item() / idx.numel())
    assert stats["load_max_over_mean"] == pytest.approx(max(expected.tolist()) / expected.mean().item())
    assert stats["balance_loss"] > 0 and stats["z_loss"] > 0


def test_bad_input_errors():
    with pytest.raises(ValueError, match="top_k=5 is larger than the number of experts 4"):
        FMoE(4, D, top_k=5, expert=GeGLUExperts(4, D, F_HIDDEN))
    layer = make_layer(4, 2)
    with pytest.raises(ValueError, match="last dimension is 8, but the layer's d_model is 16"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="holds 3 experts, num_expert=4"):
        FMoE(4, D, expert=GeGLUExperts(3, D, F_HIDDEN))
    with pytest.raises(ValueError, match="mask and mask_dict go together"):
        FMoE(4, D, expert=GeGLUExperts(4, D, F_HIDDEN), mask=torch.zeros(3))

    class OutOfRange(NaiveGate):
        def forward(self, x):
            idx, score = super().forward(x)
            return idx + self.tot_expert, score

    bad = FMoE(4, D, top_k=2, gate=OutOfRange, expert=GeGLUExperts(4, D, F_HIDDEN))
    with pytest.raises(ValueError, match=r"expert indices in \[\d+, \d+\], outside \[-1, 3\]"):
        bad(torch.randn(5, D))

    class WrongShape(NaiveGate):
        def forward(self, x):
            idx, score = super().forward(x)
            return idx.reshape(-1), score

    with pytest.raises(ValueError, match=r"expected \[tokens, top_k\]"):
        FMoE(4, D, top_k=2, gate=WrongShape, expert=GeGLUExperts(4, D, F_HIDDEN))(torch.randn(5, D))
    with pytest.raises(RuntimeError, match="a subclass must set self.experts"):
        FMoE(4, D)(torch.randn(2, D))
    with pytest.raises(ValueError, match="do not describe a buffer"):
        GeGLUExperts(2, D, F_HIDDEN)(torch.randn(3, D), [1, 1])
