"""GeGLU experts stored as batched weight tensors and run over an expert-sorted token buffer.

Shape legend: N rows of the sorted buffer (token copies, grouped by local expert), D model dim,
F expert hidden, E local experts, M / K the output / contracted width of one grouped GEMM.

Each expert is exactly the project's dense FFN, ``out = fc2(value(x) * gelu_erf(gate_proj(x)))``
with three biased linears (``value``: D->F, ``gate_proj``: D->F, ``fc2``: F->D; ``nn.Linear`` convention
``y = x W^T + b``), so a dense FFN copies into every expert unchanged (upcycling).

The buffer is sorted by expert, so expert e owns one contiguous row block and every matmul of
the layer is a grouped GEMM over those blocks: ``torch.nn.functional.grouped_mm`` with the
blocks' end offsets, 3 calls forward and 6 backward for all experts, on views (no weight copy,
no padding). One hand-written autograd node (:class:`_GroupedGeGLU`) for the whole GeGLU: it
keeps two N x F buffers instead of autograd's four, and works whatever strides the incoming
gradient has (autograd's own grouped_mm backward raises on an expanded one, e.g. ``.sum()``'s).

On the CPU grouped_mm is ATen's C++ loop of one ``mm`` per group: it saves the Python of 9 x E
calls (~8 us each), and costs a separate pass over the buffer for each of the three biases and
for the grad-input sum (grouped_mm has no bias on the CPU, "Bias not supported yet", and no
``out=`` to accumulate into; one pass over 8192 x 256 fp32 is ~1-2 ms at this machine's ~13 GB/s).
Measured here (2 cores, fp32, the experts alone, fwd + bwd, N = 8192, D = F = 256, per-expert
Python loop of ``addmm`` -> grouped_mm, two runs): E = 8: 78 -> 77 and 81 -> 90 ms; E = 64:
99 -> 100 and 106 -> 114 ms; E = 256: 260 -> 234 and 322 -> 245 ms. The layer: benchmarks/
moe_layer.py, results in benchmarks/results/moe_layer.json. On a Hopper GPU in bf16 grouped_mm is
one CUTLASS grouped-GEMM kernel.

Not fused: value and gate projections as one [E, 2F, D] GEMM. The checkpoint stores them as
two parameters (``w_value_EFD``, ``w_gate_proj_EFD``), and concatenating them per call copies
2 x E x F x D x 4 bytes (33 MB at E = 64, D = F = 256) forward and again backward; measured
here at E = 64 it made the experts' fwd + bwd 1.2x slower (137 vs 114 ms) than two grouped GEMMs.

grouped_mm takes fp32, bf16 and fp16 with every row stride a multiple of 16 bytes (D and F
multiples of 4 in fp32, of 8 in 16-bit); other dtypes (fp64) and other widths run the
same GEMMs as a Python loop of ``mm`` on the blocks (:class:`ExpertGroups`; tests/moe/test_experts.py
holds both paths to an fp64 reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def expert_segments(counts_E: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start row, row count) for the non-empty experts of a sorted buffer."""
    out, start = [], 0
    for e, n in enumerate(counts_E):
        if n:
            out.append((e, start, n))
        start += n
    return out


def grouped_mm_supported(dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``F.grouped_mm`` runs matrices of ``dtype`` whose row lengths are ``widths``
    (ATen's check: a supported dtype and every stride a multiple of 16 bytes)."""
    if dtype not in GROUPED_MM_DTYPES:
        return False
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return all(w % align == 0 for w in widths)


class ExpertGroups:
    """The row blocks of an expert-sorted buffer (``counts_E[e]`` rows for expert e, in order)
    and the grouped GEMMs over them: ``F.grouped_mm`` when ``grouped``, else one ``mm`` per
    non-empty block (same results up to rounding; tests hold both paths to the reference)."""

    def __init__(self, counts_E: list[int], device: torch.device, grouped: bool):
        self.num_expert, self.num_rows = len(counts_E), sum(counts_E)
        # An empty buffer takes the loop (nothing to multiply): grouped_mm rejects the [0, M]
        # gradient of an expanded scalar (strides 0, which .contiguous() keeps at 0 elements).
        self.grouped = grouped and self.num_rows > 0
        counts_t = torch.tensor(counts_E, device=device)
        # Expert of every row: the biases' gather and their gradients' row sums (an index_add
        # over the buffer: 0.2 ms for 8192 x 256 here, vs 3 ms for segment_reduce).
        self.expert_N = torch.repeat_interleave(torch.arange(self.num_expert, device=device), counts_t,
                                                output_size=self.num_rows)
        self.offs_E = counts_t.cumsum(0).to(torch.int32) if self.grouped else None
        self.segs = None if self.grouped else expert_segments(counts_E)
        # Experts that received no token get zero weight gradients (not None: the optimizer must
        # see a defined gradient on every rank). Only those are zero-filled (filling whole
        # [E, F, D] gradients cost ~1 ms per forward + backward here).
        self.idle = [e for e, n in enumerate(counts_E) if n == 0]

    def rows_wt(self, a_NK: torch.Tensor, w_EMK: torch.Tensor) -> torch.Tensor:
        """[N, M]: each block of ``a`` times its expert's ``w[e].T`` (a linear layer)."""
        if self.grouped:
            return F.grouped_mm(a_NK, w_EMK.transpose(-2, -1), offs=self.offs_E)
        out_NM = a_NK.new_empty(self.num_rows, w_EMK.shape[1])
        for e, s, n in self.segs:
            torch.mm(a_NK[s:s + n], w_EMK[e].t(), out=out_NM[s:s + n])
        return out_NM

    def rows_w(self, g_NM: torch.Tensor, w_EMK: torch.Tensor) -> torch.Tensor:
        """[N, K]: each block of ``g`` times its expert's ``w[e]`` (a linear layer's input gradient)."""
        if self.grouped:
            return F.grouped_mm(g_NM, w_EMK, offs=self.offs_E)
        out_NK = g_NM.new_empty(self.num_rows, w_EMK.shape[2])
        for e, s, n in self.segs:
            torch.mm(g_NM[s:s + n], w_EMK[e], out=out_NK[s:s + n])
        return out_NK

    def outer(self, g_NM: torch.Tensor, a_NK: torch.Tensor) -> torch.Tensor:
        """[E, M, K]: per expert, its block of ``g`` transposed times its block of ``a`` (a linear
        layer's weight gradient); zero for idle experts."""
        if self.grouped:
            out_EMK = F.grouped_mm(g_NM.t(), a_NK, offs=self.offs_E)
        else:
            out_EMK = g_NM.new_empty(self.num_expert, g_NM.shape[1], a_NK.shape[1])
            for e, s, n in self.segs:
                torch.mm(g_NM[s:s + n].t(), a_NK[s:s + n], out=out_EMK[e])
        if self.idle:
            out_EMK[self.idle] = 0
        return out_EMK

    def add_bias(self, y_NM: torch.Tensor, b_EM: torch.Tensor) -> torch.Tensor:
        """``y`` (in place) plus each row's expert's bias."""
        return y_NM.add_(b_EM.index_select(0, self.expert_N))

    def row_sums(self, g_NM: torch.Tensor) -> torch.Tensor:
        """[E, M]: the rows of each block summed (a bias gradient)."""
        return g_NM.new_zeros(self.num_expert, g_NM.shape[1]).index_add_(0, self.expert_N, g_NM)


class _GroupedGeGLU(torch.autograd.Function):
    """GeGLU over an expert-sorted buffer, one forward/backward graph node for all experts."""

    @staticmethod
    def forward(ctx, x_ND, counts_E, w_value_EFD, b_value_EF, w_gate_proj_EFD, b_gate_proj_EF, w_out_EDF, b_out_ED):
        d_model, hidden = x_ND.shape[1], w_value_EFD.shape[1]
        groups = ExpertGroups(counts_E, x_ND.device, grouped_mm_supported(x_ND.dtype, d_model, hidden))
        value_NF = groups.add_bias(groups.rows_wt(x_ND, w_value_EFD), b_value_EF)
        pre_NF = groups.add_bias(groups.rows_wt(x_ND, w_gate_proj_EFD), b_gate_proj_EF)
        act_NF = value_NF * F.gelu(pre_NF)
        y_ND = groups.add_bias(groups.rows_wt(act_NF, w_out_EDF), b_out_ED)
        # value and pre-activation are kept; gelu(pre) is recomputed in backward (one erf pass
        # over N x F is cheaper than holding a third N x F buffer per layer).
        ctx.save_for_backward(x_ND, value_NF, pre_NF, w_value_EFD, w_gate_proj_EFD, w_out_EDF)
        ctx.groups = groups
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        x_ND, value_NF, pre_NF, w_value_EFD, w_gate_proj_EFD, w_out_EDF = ctx.saved_tensors
        groups = ctx.groups
        grad_y_ND = grad_y_ND.contiguous()
        gelu_NF = F.gelu(pre_NF)
        grad_act_NF = groups.rows_w(grad_y_ND, w_out_EDF)
        grad_w_out = groups.outer(grad_y_ND, value_NF * gelu_NF)
        grad_b_out = groups.row_sums(grad_y_ND)

        # d/dv [v * gelu(p)] = gelu(p); d/dp = v * gelu'(p) (exact erf GeLU derivative).
        grad_value_NF = grad_act_NF * gelu_NF
        grad_pre_NF = torch.ops.aten.gelu_backward(grad_act_NF * value_NF, pre_NF, approximate="none")
        del gelu_NF, grad_act_NF

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = groups.rows_w(grad_value_NF, w_value_EFD).add_(groups.rows_w(grad_pre_NF, w_gate_proj_EFD))
        grad_w_value = groups.outer(grad_value_NF, x_ND)
        grad_w_gate_proj = groups.outer(grad_pre_NF, x_ND)
        grad_b_value = groups.row_sums(grad_value_NF)
        grad_b_gate_proj = groups.row_sums(grad_pre_NF)
        return grad_x, None, grad_w_value, grad_b_value, grad_w_gate_proj, grad_b_gate_proj, grad_w_out, grad_b_out


class _ExpertView(nn.Module):
    """Local expert ``index`` of a :class:`GeGLUExperts`, applied to a [T, D] tensor.

    A view over the batched weights (no copy, not a registered submodule): gradients flow into
    the parent's batched parameters.
    """

    def __init__(self, parent: GeGLUExperts, index: int):
        super().__init__()
        self._parent = [parent]  # a list, so the parent is not registered as a submodule
        self.index = index

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        p, e = self._parent[0], self.index
        value_TF = F.linear(x_TD, p.w_value_EFD[e], p.b_value_EF[e])
        pre_TF = F.linear(x_TD, p.w_gate_proj_EFD[e], p.b_gate_proj_EF[e])
        return F.linear(value_TF * F.gelu(pre_TF), p.w_out_EDF[e], p.b_out_ED[e])


class GeGLUExperts(nn.Module):
    """``num_expert`` GeGLU experts (D -> F -> D) as batched weights.

    ``forward(x_ND, counts_E)`` runs the experts on a buffer whose rows are grouped by local
    expert (``counts_E[e]`` rows for expert e, in order); ``experts[e](x_TD)`` applies expert e
    to any [T, D] tensor.

    Init: each weight matrix of each expert is normal with ``std`` (the model passes the dense
    FFN's, ``ModelConfig.output_init_std``; None: Xavier normal, sqrt(2 / (D + F))), biases zero.
    Expert g (global id
    ``first_expert + e``) is drawn from its own generator seeded with ``seed + g``, so its
    initial weights do not depend on how experts are spread over ranks; ``seed=None`` draws the
    base seed from torch's global generator (identical on all ranks after the same
    ``torch.manual_seed``).
    """

    def __init__(self, num_expert: int, d_model: int, d_hidden: int, *, std: float | None = None,
                 first_expert: int = 0, seed: int | None = None):
        super().__init__()
        if num_expert < 1 or d_model < 1 or d_hidden < 1:
            raise ValueError(f"GeGLUExperts needs positive sizes, got num_expert={num_expert}, "
                             f"d_model={d_model}, d_hidden={d_hidden}")
        self.num_expert, self.d_model, self.d_hidden = num_expert, d_model, d_hidden
        E, D, F_ = num_expert, d_model, d_hidden
        self.w_value_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.b_value_EF = nn.Parameter(torch.zeros(E, F_))
        self.w_gate_proj_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.b_gate_proj_EF = nn.Parameter(torch.zeros(E, F_))
        self.w_out_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.b_out_ED = nn.Parameter(torch.zeros(E, D))
        # Weight decay is decided per logical parameter (train/optim.py ``decays``), and batched
        # storage hides the role (an [E, F] bias is 2-D): E weight matrices are decayed like the
        # dense FFN's, E biases are not.
        for w in (self.w_value_EFD, self.w_gate_proj_EFD, self.w_out_EDF):
            w.no_weight_decay = False
        for b in (self.b_value_EF, self.b_gate_proj_EF, self.b_out_ED):
            b.no_weight_decay = True
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if std is None:  # Xavier normal (Glorot & Bengio 2010): fan_in + fan_out = D + F for all three
            std = math.sqrt(2.0 / (D + F_))
        with torch.no_grad():
            for e in range(E):
                gen = torch.Generator().manual_seed(seed + first_expert + e)
                for w in (self.w_value_EFD, self.w_gate_proj_EFD, self.w_out_EDF):
                    w[e].copy_(torch.randn(w.shape[1:], generator=gen) * std)

    def __len__(self) -> int:
        return self.num_expert

    def __getitem__(self, index: int) -> _ExpertView:
        if not -self.num_expert <= index < self.num_expert:
            raise IndexError(f"expert index {index} out of range for {self.num_expert} local experts")
        return _ExpertView(self, index % self.num_expert)

    def __iter__(self):
        return (self[e] for e in range(self.num_expert))

    def forward(self, x_ND: torch.Tensor, counts_E) -> torch.Tensor:
        counts = [int(c) for c in (counts_E.tolist() if torch.is_tensor(counts_E) else counts_E)]
        if len(counts) != self.num_expert or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts {counts} do not describe a buffer of {x_ND.shape[0]} rows "
                             f"over {self.num_expert} experts")
        return _GroupedGeGLU.apply(x_ND.contiguous(), counts, self.w_value_EFD, self.b_value_EF,
                                   self.w_gate_proj_EFD, self.b_gate_proj_EF, self.w_out_EDF, self.b_out_ED)
