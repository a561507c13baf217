"""The speed changes keep the numbers: fused attention against an fp64 softmax, the gradient norm
against an fp64 sum of squares, fused AdamW against the per-tensor loop; and the allocator
setting does what it is for (freed memory is reused without page faults)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from moe_morpheus.config import ModelConfig, ParallelConfig
from moe_morpheus.model.attention import SelfAttention
from moe_morpheus.model.glm import megatron_config
from moe_morpheus.model.mask import glm_attention_mask
from moe_morpheus.parallel import initialize
from moe_morpheus.train.optim import Optimizer, grad_norms


@pytest.fixture(scope="module", autouse=True)
def single_process():
    initialize(ParallelConfig())


def reference_attention(query, key, value, mask):
    """softmax(q k^T / sqrt(d)) v in fp64 for [s, b, n, d] inputs, masked entries excluded."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    seq, batch = query.shape[:2]
    return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


@pytest.mark.parametrize("layer_scaling", [True, False])
def test_fused_attention_equals_fp64_softmax_with_the_glm_mask(layer_scaling):
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=48,
                      query_layer_scaling=layer_scaling)
    attention = SelfAttention(megatron_config(cfg, ParallelConfig(), torch.float32), cfg, layer_number=3)
    seq, batch, heads, dim = 48, 3, 4, 16
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(seq, batch, heads, dim, generator=gen, requires_grad=True) for _ in range(3))
    # Two packed samples per row, Part A of 5 and 9 tokens, and trailing padding.
    segment_ids = torch.tensor([1] * 20 + [2] * 24 + [0] * 4).repeat(batch, 1)
    prefix_mask = torch.zeros(batch, seq, dtype=torch.long)
    prefix_mask[:, :5] = 1
    prefix_mask[:, 20:29] = 1
    mask = glm_attention_mask(segment_ids, prefix_mask)

    out = attention.core_attention(query, key, value, mask)
    expected = reference_attention(query, key, value, mask)
    assert (out.double() - expected).abs().max() / expected.abs().max() < 1e-5
    grad = torch.randn(out.shape, generator=gen)
    fused_grads = torch.autograd.grad(out, (query, key, value), grad)
    reference_grads = torch.autograd.grad(expected, (query, key, value), grad.double())
    for fused, reference in zip(fused_grads, reference_grads):
        assert (fused.double() - reference).abs().max() / reference.abs().max() < 1e-5


def params_with_grads(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (8, 16, 32), (100, 32), (7,)]
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=gen))
        param.main_grad = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-3, 3, (), generator=gen)
        params.append(param)
    params[2].allreduce = False  # an expert weight
    return params


def test_grad_norms_equal_an_fp64_sum_of_squares():
    params = params_with_grads(1)
    embedding = {id(params[3])}
    norms = grad_norms(params, embedding)
    squares = [float(p.main_grad.double().pow(2).sum()) for p in params]
    assert norms.total == pytest.approx(math.sqrt(sum(squares)), rel=1e-6)
    assert norms.embedding == pytest.approx(math.sqrt(squares[3]), rel=1e-6)
    assert norms.rest == pytest.approx(math.sqrt(sum(squares) - squares[3]), rel=1e-6)
    assert norms.finite
    params[1].main_grad[3] = float("nan")
    assert not grad_norms(params, embedding).finite


def test_fused_adamw_updates_equal_the_per_tensor_loop():
    """Optimizer (fused AdamW, weight decay on weight matrices only, clipped) against torch's
    single-tensor AdamW on the same clipped gradients."""
    biases = (1, 4)  # the roles of params_with_grads' tensors: the 1-D ones are biases

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, param in enumerate(params_with_grads(2)):
                param.no_weight_decay = i in biases
                self.register_parameter(f"p{i}", param)

    model = Model()
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    grads = [p.main_grad.clone() for p in model.parameters()]
    optimizer = Optimizer([model], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)
    loop = torch.optim.AdamW([{"params": [r for i, r in enumerate(reference) if i not in biases], "weight_decay": 0.1},
                              {"params": [reference[i] for i in biases], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(3):
        for param, grad in zip(model.parameters(), grads):
            param.main_grad = grad.clone()
        norms = optimizer.step()
        scale = min(1.0, 1.0 / (norms.total + 1e-6))
        for ref, grad in zip(reference, grads):
            ref.grad = grad * scale
        loop.step()
    assert optimizer.adam.param_groups[0]["fused"]
    for param, ref in zip(model.parameters(), reference):
        assert (param.detach() - ref.detach()).abs().max() / ref.detach().abs().max() < 1e-6


@pytest.mark.slow
def test_cpu_allocator_reuses_freed_memory_without_page_faults():
    """Without the setting, a second 16 MB tensor page-faults all its 4096 pages again (glibc
    unmapped the first on free); with it, the freed pages are handed out again."""
    probe = """
import resource, torch
from moe_morpheus.parallel.cpu_compat import keep_freed_memory
def faults():
    x = torch.empty(4 * 2**20); x.fill_(1.0); del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(4 * 2**20); x.fill_(1.0); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
assert keep_freed_memory()
print(default, faults())
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    default, kept = (int(v) for v in done.stdout.split())
    assert default > 2000
    assert kept < 100
