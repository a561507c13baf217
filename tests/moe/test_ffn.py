"""MoEFeedForward: auxiliary-loss injection, statistics for the trainer, the fastmoe backend.

(Its TP=2 / EP=2 / sequence-parallel equality with TP=1 is in tests/moe/test_distributed.py.)
Shape legend: s sequence, b batch, D hidden.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

from moe_morpheus.moe import FMoE, GeGLUExperts, MoEFeedForward, collect_moe_stats, gates, set_aux_loss_scale
from moe_morpheus.moe.ffn import AuxLossInjector
from tests.helpers.moe import F_HIDDEN, FFN_MODEL, D, moe_cfg
from tests.helpers.numerics import relative_error


@pytest.fixture(autouse=True)
def unit_aux_scale():
    set_aux_loss_scale(1.0)
    yield
    set_aux_loss_scale(1.0)


@pytest.mark.parametrize("gate", ["naive", "gshard"])
def test_aux_loss_injection_equals_adding_it_to_the_loss(gate):
    """Backward through the injected output == backward of main + scale * (c_b * balance + c_z * z)."""
    coeffs = dict(aux_loss_coeff=0.5, z_loss_coeff=0.2)
    torch.manual_seed(0)
    layer = MoEFeedForward(FFN_MODEL, moe_cfg(gate=gate, **coeffs))
    layer.eval()  # deterministic routing (no GShard random routing) for both paths
    explicit = copy.deepcopy(layer)
    x = torch.randn(6, 2, D)
    proj = torch.randn(6, 2, D)
    scale = 0.25

    set_aux_loss_scale(scale)
    xa = x.clone().requires_grad_()
    out = layer(xa)
    assert out.shape == x.shape
    (out * proj).sum().backward()

    xb = x.clone().requires_grad_()
    y = explicit.moe(xb.reshape(-1, D)).reshape(x.shape)
    aux = coeffs["aux_loss_coeff"] * explicit.moe.gate.get_loss() + coeffs["z_loss_coeff"] * explicit.moe.gate.get_z_loss()
    ((y * proj).sum() + scale * aux).backward()

    assert relative_error(out, y) <= 1e-6
    assert relative_error(xa.grad, xb.grad) <= 1e-6
    for (name, p), q in zip(layer.named_parameters(), explicit.parameters()):
        assert relative_error(p.grad, q.grad) <= 1e-6, name

    # The aux term is really there: without it the gate gradient differs.
    plain = copy.deepcopy(explicit)
    for p in plain.parameters():
        p.grad = None
    (plain.moe(x.reshape(-1, D)).reshape(x.shape) * proj).sum().backward()
    assert relative_error(plain.moe.gate.gate.weight.grad, layer.moe.gate.gate.weight.grad) > 1e-3


def test_no_injection_without_grad_and_gate_losses_cleared():
    torch.manual_seed(1)
    layer = MoEFeedForward(FFN_MODEL, moe_cfg(aux_loss_coeff=0.0, z_loss_coeff=0.0))
    x = torch.randn(3, 2, D)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    assert layer.moe.gate.get_loss() is None  # taken and dropped each forward: no graph kept
    out = layer(x.requires_grad_())
    assert type(out.grad_fn).__name__ != "AuxLossInjectorBackward"  # both coefficients are 0
    assert layer.moe.gate.get_loss() is None
    layer.aux_loss_coeff = 0.1
    assert type(layer(x).grad_fn).__name__ == "AuxLossInjectorBackward"


def test_set_aux_loss_scale():
    set_aux_loss_scale(0.125)
    assert AuxLossInjector.loss_scale.item() == 0.125
    AuxLossInjector.set_loss_scale(torch.tensor(2.0))
    assert AuxLossInjector.loss_scale.item() == 2.0


def test_expert_hidden_size_and_init():
    torch.manual_seed(2)
    layer = MoEFeedForward(FFN_MODEL, moe_cfg(expert_hidden_size=40, num_experts=8))
    experts = layer.moe.experts
    assert experts.w_value_EFD.shape == (8, 40, D) and experts.w_out_EDF.shape == (8, D, 40)
    # Xavier normal with the DeepNorm gain: std = beta * sqrt(2 / (h + F)).
    expected = FFN_MODEL.init_beta * (2 / (D + 40)) ** 0.5
    assert experts.w_gate_proj_EFD.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.count_nonzero(experts.b_out_ED) == 0
    assert layer.moe.experts.w_value_EFD.allreduce is False
    assert layer.moe.gate.gate.weight.sequence_parallel is True
    assert MoEFeedForward(FFN_MODEL, moe_cfg()).moe.experts.d_hidden == F_HIDDEN
    # Granularity g: experts F / g wide (24 / 3 = 8), and the same layer, weight for weight, as the
    # absolute width it resolves to (what keeps the glm_tiny demo runs reproducible).
    assert MoEFeedForward(FFN_MODEL, moe_cfg(granularity=3)).moe.experts.w_value_EFD.shape == (4, F_HIDDEN // 3, D)
    torch.manual_seed(5)
    relative = MoEFeedForward(FFN_MODEL, moe_cfg(granularity=2)).state_dict()
    torch.manual_seed(5)
    absolute = MoEFeedForward(FFN_MODEL, moe_cfg(expert_hidden_size=F_HIDDEN // 2)).state_dict()
    assert relative.keys() == absolute.keys() and all(torch.equal(relative[k], absolute[k]) for k in relative)


def test_collect_moe_stats():
    torch.manual_seed(3)
    model = nn.Sequential(MoEFeedForward(FFN_MODEL, moe_cfg()), nn.Linear(D, D), MoEFeedForward(FFN_MODEL, moe_cfg()))
    model[0].layer_number = 5
    seen = {0: [], 2: []}
    for i in (0, 2):
        model[i].moe.gate_hook = lambda idx, score, _, i=i: seen[i].append(idx.clone())
    balances = {0: [], 2: []}
    for _ in range(2):  # two micro-batches
        x = torch.randn(4, 3, D)
        h = model[0](x)
        balances[0].append(model[0].moe.gate.loss_value.item())
        model[2](model[1](h))
        balances[2].append(model[2].moe.gate.loss_value.item())
    stats = collect_moe_stats([model])
    for i, name in ((0, "layer5"), (2, "layer1")):  # unnamed layer: its index among MoE layers
        idx = torch.cat(seen[i])
        assert stats[f"moe/{name}/load"] == torch.bincount(idx.flatten(), minlength=4).double().tolist()  # summed
        assert stats[f"moe/{name}/balance_loss"] == pytest.approx(sum(balances[i]) / 2, rel=1e-6)
        assert stats[f"moe/{name}/drop_rate"] == 0.0
        assert stats[f"moe/{name}/z_loss"] > 0
    assert stats["moe/balance_loss"] == pytest.approx(sum(balances[0] + balances[2]) / 2, rel=1e-6)
    assert stats["moe/z_loss"] == pytest.approx(stats["moe/layer5/z_loss"] + stats["moe/layer1/z_loss"])
    assert collect_moe_stats(model) == {}  # reset by the first call


def test_fastmoe_backend_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "fmoe", None)  # import fmoe -> ImportError
    with pytest.raises(ImportError, match="moe.backend=fastmoe needs FastMoE's `fmoe` package"):
        MoEFeedForward(FFN_MODEL, moe_cfg(backend="fastmoe"))


class _FakeFastMoE(nn.Module):
    """The parts of fmoe.FMoE the builder relies on: gate(d_model, E, W, k), expert(d_model) per
    slot, and the non-fused call experts[i](rows, count tensor)."""

    def __init__(self, num_expert, d_model, world_size, moe_group, slice_group, top_k, gate, expert):
        super().__init__()
        self.kwargs = dict(num_expert=num_expert, world_size=world_size, top_k=top_k)
        self.gate = gate(d_model, num_expert, world_size, top_k)
        self.experts = nn.ModuleList([expert(d_model) for _ in range(num_expert)])

    def forward(self, x_TD):
        idx, score = self.gate(x_TD)
        rows = [sum(score[t, j] * self.experts[int(idx[t, j])](x_TD[t:t + 1], torch.tensor([1]))[0]
                    for j in range(idx.shape[1])) for t in range(x_TD.shape[0])]
        return torch.stack(rows)


def test_fastmoe_backend_builds_fmoe_with_geglu_experts(monkeypatch):
    fake = types.ModuleType("fmoe")
    fake.FMoE = _FakeFastMoE
    fake.gates = types.SimpleNamespace(NaiveGate=gates.NaiveGate, NoisyGate=gates.NoisyGate,
                                       GShardGate=gates.GShardGate, SwitchGate=gates.SwitchGate)
    monkeypatch.setitem(sys.modules, "fmoe", fake)
    torch.manual_seed(4)
    layer = MoEFeedForward(FFN_MODEL, moe_cfg(backend="fastmoe"))
    torch.manual_seed(4)
    native = MoEFeedForward(FFN_MODEL, moe_cfg())
    fm = layer.moe
    assert fm.kwargs == dict(num_expert=4, world_size=1, top_k=2)
    assert all(isinstance(e, GeGLUExperts) and len(e) == 1 for e in fm.experts)
    for e in range(4):  # same layout-independent init as the native experts
        assert torch.equal(fm.experts[e].w_value_EFD[0], native.moe.experts.w_value_EFD[e])
    assert all(p.allreduce is False for p in fm.experts.parameters())
    assert all(p.sequence_parallel is True for p in fm.gate.parameters())
    x = torch.randn(3, 2, D)
    assert relative_error(layer(x), native(x)) <= 1e-6
    assert collect_moe_stats(layer) == {}  # FastMoE keeps no statistics

    capped = MoEFeedForward(FFN_MODEL, moe_cfg(backend="fastmoe", gate="gshard", capacity_factor=1.5))
    assert capped.moe.gate.capacity == (1.5, 1.5)


def test_fmoe_is_what_moe_feedforward_runs():
    torch.manual_seed(6)
    layer = MoEFeedForward(FFN_MODEL, moe_cfg(gate="switch", top_k=1, capacity_factor=1.0, softmax_before_topk=True))
    assert isinstance(layer.moe, FMoE) and isinstance(layer.moe.gate, gates.SwitchGate)
    assert layer.moe.gate.capacity == (1.0, 1.0)
    noisy = MoEFeedForward(FFN_MODEL, moe_cfg(gate="noisy", softmax_before_topk=True))
    assert noisy.moe.gate.softmax_before_topk
