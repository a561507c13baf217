"""Expert parallelism and slicing on gloo processes == one process holding all experts.

Each scenario builds the same problem (gate weights, expert weights, tokens, loss projection) from
a seeded generator in every process; the single-process reference runs here in the test
process. Shape legend: T tokens, D model dim, F expert hidden, G experts in total, E per rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_morpheus.config import ConfigError, MoEConfig, ParallelConfig
from moe_morpheus.moe import FMoE, GeGLUExperts, MoEFeedForward, set_aux_loss_scale
from tests.helpers.distributed import run_distributed
from tests.helpers.moe import EXPERT_PARAMS, F_HIDDEN, FFN_MODEL, D, problem
from tests.helpers.numerics import relative_error

pytestmark = pytest.mark.slow
BALANCE_COEFF = 0.1


def _run(prob, x, proj, *, num_expert, first, top_k, world_size=1, moe_group=None, slice_group=None):
    """Build FMoE holding global experts [first, first + num_expert), run loss = <y, proj> +
    BALANCE_COEFF * balance, return output and gradients."""
    layer = FMoE(num_expert, D, world_size=world_size, moe_group=moe_group, slice_group=slice_group,
                 top_k=top_k, expert=GeGLUExperts(num_expert, D, F_HIDDEN))
    with torch.no_grad():
        layer.gate.gate.weight.copy_(prob["gate_w"])
        layer.gate.gate.bias.copy_(prob["gate_b"])
        for n in EXPERT_PARAMS:
            getattr(layer.experts, n).copy_(prob[n][first:first + num_expert])
    x = x.clone().requires_grad_()
    y = layer(x)
    ((y * proj).sum() + BALANCE_COEFF * layer.gate.get_loss()).backward()
    out = {"y": y.detach(), "x_grad": x.grad, "gate_w": layer.gate.gate.weight.grad,
           "gate_b": layer.gate.gate.bias.grad, "stats": layer.pop_stats()}
    out.update({n: getattr(layer.experts, n).grad for n in EXPERT_PARAMS})
    return out


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-process run for the EP=2, slicing and MoEFeedForward checks (process start-up and
    the Megatron-Core import dominate their cost)."""
    return run_distributed(_slice_worker, 2)


EP_CASES = [  # (seed, G, top_k, tokens per rank: uneven, some ranks with 0 or 1 token)
    (1, 8, 2, {2: [7, 4], 4: [5, 1, 0, 6]}),
    (2, 4, 3, {2: [3, 9], 4: [2, 3, 4, 1]}),
    (3, 8, 1, {2: [1, 2], 4: [3, 0, 1, 2]}),  # 3 to 6 tokens for 8 experts: idle experts
]


def _ep_worker(world_size):
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    for seed, G, top_k, splits in EP_CASES:
        counts = splits[world_size]
        prob = problem(seed, G, sum(counts))
        start = sum(counts[:rank])
        rows = slice(start, start + counts[rank])
        E = G // world_size
        results.append(_run(prob, prob["x"][rows], prob["proj"][rows], num_expert=E, first=rank * E,
                            top_k=top_k, world_size=world_size))
    return results


def test_expert_parallel_4_ranks_matches_single_process():
    check_expert_parallel(run_distributed(_ep_worker, 4, 4), 4)


def test_expert_parallel_2_ranks_matches_single_process(two_ranks):
    check_expert_parallel([r["ep"] for r in two_ranks], 2)


def check_expert_parallel(per_rank, world_size):
    for case, (seed, G, top_k, splits) in enumerate(EP_CASES):
        counts = splits[world_size]
        prob = problem(seed, G, sum(counts))
        E = G // world_size
        # Reference: one process, all experts, each rank's tokens separately (the balance loss is
        # per sending rank by definition), gradients summed over ranks for shared parameters.
        refs = []
        for rank in range(world_size):
            rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
            refs.append(_run(prob, prob["x"][rows], prob["proj"][rows], num_expert=G, first=0, top_k=top_k))
        for rank, got in enumerate(per_rank):
            ref = refs[rank]
            assert got[case]["y"].shape == ref["y"].shape
            if ref["y"].numel():
                assert relative_error(got[case]["y"], ref["y"]) <= 1e-5
                assert relative_error(got[case]["x_grad"], ref["x_grad"]) <= 1e-5
            assert got[case]["stats"]["load"] == ref["stats"]["load"]
            for n in EXPERT_PARAMS:  # this rank's experts, gradients from every rank's tokens
                ref_grad = sum(r[n] for r in refs)[rank * E:(rank + 1) * E]
                assert relative_error(got[case][n], ref_grad) <= 1e-5, (case, rank, n)
        for n in ("gate_w", "gate_b"):  # each rank's gate sees its own tokens
            for rank in range(world_size):
                assert relative_error(per_rank[rank][case][n], refs[rank][n]) <= 1e-5


SLICE_TOKENS = 7  # odd: slices of 4 and 3 rows (FastMoE would drop the 7th token)


def _slice_worker():
    """2 ranks holding identical tokens: slice_group alone, and slice_group + EP over the same
    2 ranks (TP=2, EP=2, as Megatron lays it out on 2 processes); then MoEFeedForward."""
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        FMoE(4, D, world_size=2)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="world_size=4 does not match moe_group's size 2"):
        FMoE(2, D, world_size=4, moe_group=group)
    prob = problem(7, 8, SLICE_TOKENS)
    sliced = _run(prob, prob["x"], prob["proj"], num_expert=8, first=0, top_k=2, slice_group=group)
    both = _run(prob, prob["x"], prob["proj"], num_expert=4, first=rank * 4, top_k=2, world_size=2,
                moe_group=group, slice_group=group)
    tiny = problem(8, 4, 1)  # one token for two slice ranks: rank 1 routes nothing
    tiny_out = _run(tiny, tiny["x"], tiny["proj"], num_expert=4, first=0, top_k=2, slice_group=group)
    return {"sliced": sliced, "both": both, "tiny": tiny_out, "ep": _ep_worker(2), "ffn": _ffn_worker_part()}


def test_slice_group_matches_no_slicing(two_ranks):
    ranks = two_ranks
    cases = (("sliced", problem(7, 8, SLICE_TOKENS), 8, 8), ("both", problem(7, 8, SLICE_TOKENS), 8, 4),
             ("tiny", problem(8, 4, 1), 4, 4))
    for name, prob, G, E in cases:
        ref = _run(prob, prob["x"], prob["proj"], num_expert=G, first=0, top_k=2)
        for rank, got in enumerate(r[name] for r in ranks):
            assert relative_error(got["y"], ref["y"]) <= 1e-5, name  # all-gathered: every rank has all rows
            assert relative_error(got["x_grad"], ref["x_grad"]) <= 1e-5, name
            assert got["stats"]["load"] == ref["stats"]["load"]  # summed over the slice group
            assert got["stats"]["balance_loss"] == pytest.approx(ref["stats"]["balance_loss"], rel=1e-6)
            if E < G:  # EP over the slice ranks: each rank's experts saw every slice's tokens
                for n in EXPERT_PARAMS:
                    assert relative_error(got[n], ref[n][rank * E:(rank + 1) * E]) <= 1e-5, (name, n)
        # Gate (balance loss included) and replicated experts: the sum over slice ranks.
        for n in ("gate_w", "gate_b") + (EXPERT_PARAMS if E == G else ()):
            assert relative_error(sum(r[name][n] for r in ranks), ref[n]) <= 1e-5, (name, n)


# ---- MoEFeedForward under Megatron-Core's parallel_state ---------------------------------------
MOE = dict(layer_freq=1, num_experts=4, top_k=2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
SBH = (5, 3, D)  # 15 tokens: TP slices of 8 and 7
AUX_SCALE = 0.5


def _ffn_run(x_sbh, proj_sbh, **kwargs):
    """MoEFeedForward with the seeded init (no copying: the init is layout-independent)."""
    torch.manual_seed(4321)
    layer = MoEFeedForward(FFN_MODEL, MoEConfig(**MOE), **kwargs)
    set_aux_loss_scale(AUX_SCALE)
    x = x_sbh.clone().requires_grad_()
    y = layer(x)
    (y * proj_sbh).sum().backward()
    set_aux_loss_scale(1.0)
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return {"y": y.detach(), "x_grad": x.grad, "grads": grads,
            "params": {n: p.detach() for n, p in layer.named_parameters()}}


def _ffn_inputs():
    gen = torch.Generator().manual_seed(99)
    return torch.randn(SBH, generator=gen), torch.randn(SBH, generator=gen)


def _ffn_worker_part():
    from moe_morpheus.parallel import initialize

    x, proj = _ffn_inputs()
    out = {}
    for ep in (1, 2):
        initialize(ParallelConfig(tp=2, ep=ep))
        out[f"tp2_ep{ep}"] = _ffn_run(x, proj)
    # Sequence parallel: each TP rank gets its own half of the sequence, no slicing.
    rank = dist.get_rank()
    initialize(ParallelConfig(tp=2, ep=1))
    rows = slice(0, 3) if rank == 0 else slice(3, 5)
    out["sp"] = _ffn_run(x[rows], proj[rows], sequence_parallel=True)
    initialize(ParallelConfig(tp=1, ep=2))
    with pytest.raises(ConfigError, match="moe.num_experts=3 is not divisible by the expert-parallel size"):
        MoEFeedForward(FFN_MODEL, MoEConfig(**dict(MOE, num_experts=3)))
    return out


def test_moe_feedforward_tp2_matches_tp1(two_ranks):
    x, proj = _ffn_inputs()
    ref = _ffn_run(x, proj)  # no parallel_state here: a world of one
    ranks = two_ranks
    for layout in ("tp2_ep1", "tp2_ep2", "sp"):
        got = [r["ffn"][layout] for r in ranks]
        if layout == "sp":
            assert relative_error(torch.cat([g["y"] for g in got]), ref["y"]) <= 1e-5
            assert relative_error(torch.cat([g["x_grad"] for g in got]), ref["x_grad"]) <= 1e-5
        else:
            for g in got:
                assert relative_error(g["y"], ref["y"]) <= 1e-5, layout
                assert relative_error(g["x_grad"], ref["x_grad"]) <= 1e-5, layout
        for name, ref_grad in ref["grads"].items():
            if name.startswith("moe.gate") or layout != "tp2_ep2":
                # gate: summed over TP (finalize_model_grads, `sequence_parallel` mark);
                # replicated experts (ep=1): each TP rank holds the gradient of its own tokens.
                assert relative_error(sum(g["grads"][name] for g in got), ref_grad) <= 1e-5, (layout, name)
            else:  # ep=2: rank r holds experts [2r, 2r + 2) with their full gradients
                for rank, g in enumerate(got):
                    assert torch.equal(g["params"][name], ref["params"][name][2 * rank:2 * rank + 2])
                    assert relative_error(g["grads"][name], ref_grad[2 * rank:2 * rank + 2]) <= 1e-5, (layout, name)

