"""GeGLUExperts' grouped GEMMs: torch's grouped_mm and the per-block loop it falls back to, both
against a per-expert fp64 reference.

Shape legend: N rows of the expert-sorted buffer, D model dim, F expert hidden, E experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_morpheus.moe import GeGLUExperts
from moe_morpheus.moe.experts import ExpertGroups, grouped_mm_supported
from tests.helpers.moe import EXPERT_PARAMS, F_HIDDEN, D
from tests.helpers.numerics import relative_error

COUNTS_E = [3, 0, 6, 1, 0]  # idle experts in the middle and at the end


def reference(x_ND, counts_E, p):
    """Each expert's block through its own three fp64 linears (autograd, no grouping)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E):
        x = x_ND[start:start + n]
        value = F.linear(x, p["w_value_EFD"][e], p["b_value_EF"][e])
        pre = F.linear(x, p["w_gate_proj_EFD"][e], p["b_gate_proj_EF"][e])
        outs.append(F.linear(value * F.gelu(pre), p["w_out_EDF"][e], p["b_out_ED"][e]))
        start += n
    return torch.cat(outs)


def check_against_reference(experts, dtype, tol):
    torch.manual_seed(1)
    with torch.no_grad():
        for name in EXPERT_PARAMS:
            if name.startswith("b_"):
                getattr(experts, name).normal_()
    experts.to(dtype)
    x = torch.randn(sum(COUNTS_E), experts.d_model, dtype=dtype, requires_grad=True)
    proj = torch.randn(sum(COUNTS_E), experts.d_model, dtype=dtype)
    (experts(x, COUNTS_E) * proj).sum().backward()

    x64 = x.detach().double().requires_grad_()
    p64 = {n: getattr(experts, n).detach().double().requires_grad_() for n in EXPERT_PARAMS}
    y64 = reference(x64, COUNTS_E, p64)
    (y64 * proj.double()).sum().backward()
    assert relative_error(experts(x, COUNTS_E), y64) <= tol
    assert relative_error(x.grad, x64.grad) <= tol
    for n in EXPERT_PARAMS:
        assert relative_error(getattr(experts, n).grad, p64[n].grad) <= tol, n
        idle = getattr(experts, n).grad[[1, 4]]
        assert torch.count_nonzero(idle) == 0, n  # exact zeros, not uninitialised memory


def test_which_shapes_and_dtypes_take_grouped_mm():
    assert grouped_mm_supported(torch.float32, D, F_HIDDEN)
    assert grouped_mm_supported(torch.bfloat16, 16, 24)
    assert not grouped_mm_supported(torch.bfloat16, 16, 12)  # 24 bytes: not a multiple of 16
    assert not grouped_mm_supported(torch.float32, 16, 10)
    assert not grouped_mm_supported(torch.float64, 16, 24)  # grouped_mm rejects fp64


def test_grouped_mm_experts_match_the_reference():
    check_against_reference(GeGLUExperts(len(COUNTS_E), D, F_HIDDEN), torch.float32, 1e-6)


@pytest.mark.parametrize("dtype,hidden", [(torch.float64, F_HIDDEN), (torch.float32, 10)])
def test_fallback_loop_matches_the_reference(dtype, hidden):
    """fp64 and widths grouped_mm cannot stride over run one mm per expert block."""
    assert not grouped_mm_supported(dtype, D, hidden)
    check_against_reference(GeGLUExperts(len(COUNTS_E), D, hidden), dtype, 1e-12 if dtype == torch.float64 else 1e-6)


def test_grouped_and_loop_gemms_agree():
    """The three GEMM shapes of the layer, both ways, on the same fp32 blocks."""
    torch.manual_seed(2)
    E, N = len(COUNTS_E), sum(COUNTS_E)
    a_ND, g_NF = torch.randn(N, D), torch.randn(N, F_HIDDEN)
    w_EFD = torch.randn(E, F_HIDDEN, D)
    grouped, loop = ExpertGroups(COUNTS_E, a_ND.device, True), ExpertGroups(COUNTS_E, a_ND.device, False)
    for op, args in (("rows_wt", (a_ND, w_EFD)), ("rows_w", (g_NF, w_EFD)), ("outer", (g_NF, a_ND))):
        ours, theirs = getattr(grouped, op)(*args), getattr(loop, op)(*args)
        assert ours.shape == theirs.shape and ours.is_contiguous()
        assert relative_error(ours, theirs) <= 1e-6, op


def test_empty_buffer():
    experts = GeGLUExperts(3, D, F_HIDDEN)
    x = torch.randn(0, D, requires_grad=True)
    y = experts(x, [0, 0, 0])
    y.sum().backward()
    assert y.shape == (0, D) and x.grad.shape == (0, D)
    assert all(torch.count_nonzero(p.grad) == 0 for p in experts.parameters())
