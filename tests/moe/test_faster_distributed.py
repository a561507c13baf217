"""FasterMoE on gloo processes: smart schedule, dynamic shadowing and both equal the plain
expert-parallel path (outputs, input, expert and gate gradients; relative 1e-5) under skewed
routing, at EP=2 and EP=4; the shadowing decision and calibration agree across ranks.

Skew: gate bias +10 on expert 0, so every token's top-2 holds expert 0 (half of all
assignments go to it). Shape legend: T tokens, D model dim, G experts in total, E per rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_morpheus.moe import FMoE, GeGLUExperts
from moe_morpheus.moe.comm import exchange_counts
from moe_morpheus.moe.faster import FasterMoE
from tests.helpers.distributed import run_distributed
from tests.helpers.moe import EXPERT_PARAMS, F_HIDDEN, D, problem
from tests.helpers.numerics import relative_error

G = 8
TOKENS = {2: [13, 6], 4: [9, 5, 0, 7]}  # uneven; one EP=4 rank routes nothing
# Costs under which the model finds that shadowing the hot expert pays (compute-bound: cheap
# network, slow experts); measured costs are used by the "both_measured" variant.
PAYS = dict(net_bandwidth=1e12, flops=1e8)


def _variants(W: int) -> dict[str, dict]:
    forced = [0, 1, 5, G - 1] if W == 4 else [0, 5]  # several owners, two experts of one owner
    always = dict(schedule_policy=lambda load_WG: True)
    out = {f"schedule_g{gs}": dict(schedule=True, group_size=gs, **always) for gs in (1, 2, 4) if W % gs == 0}
    out.update({
        "shadow_model": dict(shadow=True, **PAYS),
        "shadow_forced": dict(shadow=True, policy=lambda load_WG: forced),
        "both": dict(schedule=True, group_size=W // 2, shadow=True, policy=lambda load_WG: forced, **always),
        "both_model": dict(schedule=True, shadow=True, **PAYS),
        # Measured costs, on a layer built with moe_group=None (FMoE's "the world group").
        "both_measured": dict(schedule=True, shadow=True, moe_group=None),
    })
    return out


def _run(prob, x, proj, W, faster: dict | None):
    rank = dist.get_rank()
    E = G // W
    faster = dict(faster) if faster is not None else None
    group = faster.pop("moe_group", dist.group.WORLD) if faster is not None else dist.group.WORLD
    layer = FMoE(E, D, world_size=W, moe_group=group, top_k=2, expert=GeGLUExperts(E, D, F_HIDDEN))
    with torch.no_grad():
        layer.gate.gate.weight.copy_(prob["gate_w"])
        layer.gate.gate.bias.copy_(prob["gate_b"])
        for n in EXPERT_PARAMS:
            getattr(layer.experts, n).copy_(prob[n][rank * E:(rank + 1) * E])
    if faster is not None:
        layer.faster = FasterMoE(layer, **faster)
    x = x.clone().requires_grad_()
    y = layer(x)
    ((y * proj).sum() + 0.1 * layer.gate.get_loss()).backward()
    out = {"y": y.detach(), "x_grad": x.grad, "gate_w": layer.gate.gate.weight.grad,
           "gate_b": layer.gate.gate.bias.grad, "stats": layer.pop_stats(),
           "costs": layer.faster.costs if faster is not None else None}
    out.update({n: getattr(layer.experts, n).grad for n in EXPERT_PARAMS})
    if faster is not None:  # the receive counts read from plan()'s all-gather == the count all-to-all
        sent_WE = layer.faster.load_WG[rank].view(W, E)
        out["received_ok"] = torch.equal(layer.faster.received([]), exchange_counts(sent_WE, group))
    return out


def _worker(W):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counts = TOKENS[W]
    prob = problem(11, G, sum(counts))
    prob["gate_b"][0] = 10.0
    rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    x, proj = prob["x"][rows], prob["proj"][rows]
    ref = _run(prob, x, proj, W, None)
    errors, stats, costs = {}, {}, {}
    for name, faster in _variants(W).items():
        got = _run(prob, x, proj, W, faster)
        keys = ("y", "x_grad", "gate_w", "gate_b") + EXPERT_PARAMS
        errors[name] = {k: relative_error(got[k], ref[k]) if ref[k].numel() else 0.0 for k in keys}
        stats[name], costs[name] = got["stats"], got["costs"]
        assert got["received_ok"], name
    with pytest.raises(ValueError, match="group_size=3 does not divide the expert-parallel size"):
        _run(prob, x, proj, W, dict(schedule=True, group_size=3))
    return {"errors": errors, "stats": stats, "costs": costs, "load": ref["stats"]["load"]}


@pytest.mark.slow
@pytest.mark.parametrize("W", [2, 4])
def test_faster_paths_equal_plain_expert_parallel(W):
    ranks = run_distributed(_worker, W, W)
    load = ranks[0]["load"]
    assert load[0] == TOKENS[W][0] and 2 * load[0] == sum(load)  # rank 0: half its assignments -> expert 0
    for rank, result in enumerate(ranks):
        for name, errs in result["errors"].items():
            for key, err in errs.items():
                assert err <= 1e-5, (W, rank, name, key, err)
    for name in _variants(W):
        per_rank = [r["stats"][name] for r in ranks]
        # One decision on every rank (from the all-gathered counts), and the same costs.
        shadowed = [{k: v for k, v in s.items() if k.startswith("faster/shadowed/")} for s in per_rank]
        assert all(d == shadowed[0] for d in shadowed), name
        assert all(r["costs"][name] == ranks[0]["costs"][name] for r in ranks), name
        s = per_rank[0]
        if name.startswith("schedule") or name.startswith("both"):
            # The same choice of exchange on every rank; forced where the name has no "_model"
            # or "_measured" (the model's own choice: either way, the results above are equal).
            assert all(r["stats"][name]["faster/scheduled"] == s["faster/scheduled"] for r in ranks), name
            assert s["faster/predicted_s_schedule"] > 0 and s["faster/predicted_s_all_to_all"] > 0
        if name.startswith("schedule") or name == "both":
            assert s["faster/scheduled"] == 1.0
            assert sum(r["stats"][name]["faster/exchange_bytes"] for r in ranks) > 0
            assert s["faster/compute_s"] > 0 and s["faster/exchange_s"] >= 0
        if "shadow" in name or name.startswith("both"):
            assert s["faster/shadowed_experts"] >= 1 or name == "both_measured", name
            assert s["faster/shadow_bytes"] > 0 or name == "both_measured"
            if name in ("shadow_model", "both_model", "both_measured"):  # the model's own choice
                assert s["faster/predicted_s"] <= s["faster/predicted_s_no_shadow"]
    assert ranks[0]["stats"]["shadow_model"]["faster/shadowed/e0"] == 1.0  # the hot expert
    measured = ranks[0]["costs"]["both_measured"]  # calibrated on this machine
    assert measured.net_bandwidth > 0 and measured.param_bandwidth > 0 and measured.flops > 0
    assert min(measured.exchange_latency_s, measured.param_latency_s, measured.call_latency_s) >= 0
    assert 0 <= measured.overlap <= 1
    forced = [0, 1, 5, G - 1] if W == 4 else [0, 5]
    stats = ranks[0]["stats"]["shadow_forced"]
    assert {k for k in stats if k.startswith("faster/shadowed/")} == {f"faster/shadowed/e{g}" for g in forced}


def test_shadowing_rejects_experts_of_different_shapes():
    class Expert(nn.Module):
        def __init__(self, d_model, hidden):
            super().__init__()
            self.fc = nn.Linear(d_model, hidden)
            self.out = nn.Linear(hidden, d_model)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    classes = [lambda d: Expert(d, 8), lambda d: Expert(d, 12)]
    layer = FMoE(2, D, top_k=1, expert=classes)
    with pytest.raises(ValueError, match="moe.faster.shadow needs experts of one shape: expert 0 is Expert"):
        FasterMoE(layer, shadow=True)
    FasterMoE(layer, schedule=True)  # the schedule has no such constraint
    with pytest.raises(ValueError, match="group_size=2 does not divide the expert-parallel size 1"):
        FasterMoE(layer, schedule=True, group_size=2)
