"""FasterMoE on this machine: MoE layer fwd + bwd time with shadowing and with the smart schedule,
each over the plain expert-parallel layer, next to what the performance model predicted.

Run: ``.venv/bin/python benchmarks/fastermoe.py`` (2 gloo processes, one thread each; about a
minute on 2 cores). ``benchmarks/gpu/fastermoe_nccl.py`` runs :func:`measure` on GPUs (NCCL).

Skewed routing: gate bias +10 on expert 0, so every token's top-2 holds it and expert 0
receives half of all assignments; its rank computes ~70% of the layer's rows at EP=2. The
policy uses costs calibrated at start-up on this backend (one 4 MiB broadcast, one expert run).
Predictions cover the exchange and the experts (the model's scope), not the gate, sort and
combine that every variant shares, so measured ratios are diluted towards 1 by those.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from moe_morpheus.moe import FMoE, GeGLUExperts
from moe_morpheus.moe.faster import FasterMoE, decide_shadow, predict_latency, predict_schedule

TOKENS, HIDDEN, EXPERT_HIDDEN, EXPERTS_PER_RANK, TOP_K = 2048, 128, 256, 4, 2


def build(world: int, device, faster: dict | None, hidden: int, expert_hidden: int) -> FMoE:
    """The same layer (seeded) on every call; expert 0 is the hot one."""
    torch.manual_seed(0)
    rank = dist.get_rank()
    layer = FMoE(EXPERTS_PER_RANK, hidden, world_size=world, moe_group=dist.group.WORLD, top_k=TOP_K,
                 expert=GeGLUExperts(EXPERTS_PER_RANK, hidden, expert_hidden, first_expert=rank * EXPERTS_PER_RANK,
                                     seed=1)).to(device)
    with torch.no_grad():
        layer.gate.gate.bias[0] = 10.0
    if faster is not None:
        layer.faster = FasterMoE(layer, **faster)
    return layer


def measure(device, tokens: int = TOKENS, reps: int = 5, hidden: int = HIDDEN,
            expert_hidden: int = EXPERT_HIDDEN) -> dict | None:
    """Best-of-``reps`` (round-robin; slowest rank per repetition) fwd + bwd seconds of each
    variant, the policy's choice and predictions. Returns the report on rank 0."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=gen).to(device)
    variants = {"plain": None, "shadow": dict(shadow=True), "schedule": dict(schedule=True, group_size=1),
                "both": dict(schedule=True, group_size=1, shadow=True)}
    layers = {name: build(world, device, cfg, hidden, expert_hidden) for name, cfg in variants.items()}

    def step(layer):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    for layer in layers.values():  # warm-up; the shadow layers calibrate here
        step(layer)
        layer.pop_stats()  # the statistics below cover the timed repetitions only
    best = dict.fromkeys(layers, float("inf"))
    for _ in range(reps):
        for name, layer in layers.items():
            dist.barrier()
            sync()
            start = time.perf_counter()
            step(layer)
            sync()
            elapsed = torch.tensor([time.perf_counter() - start], device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            best[name] = min(best[name], elapsed.item())
    stats = {name: layer.pop_stats() for name, layer in layers.items()}
    # The model's view of this routing: counts of one forward, all-gathered.
    load_G = torch.tensor(stats["plain"]["load"], device=device).round().long()  # mean per forward
    parts = [torch.empty_like(load_G) for _ in range(world)]
    dist.all_gather(parts, load_G)
    load_WG = torch.stack(parts).cpu()
    costs = layers["shadow"].faster.costs
    shadow = decide_shadow(load_WG, EXPERTS_PER_RANK, costs)
    plain_model, sched_model = predict_schedule(load_WG, EXPERTS_PER_RANK, 1, costs)
    if rank:
        return None
    return {"world": world, "tokens": tokens, "hidden": hidden, "expert_hidden": expert_hidden, "best": best, "stats": stats, "costs": costs, "shadow": shadow,
            "predicted_shadow": predict_latency(load_WG, EXPERTS_PER_RANK, [], costs)
            / predict_latency(load_WG, EXPERTS_PER_RANK, shadow, costs),
            "predicted_schedule": plain_model / sched_model, "received": load_WG.sum(0).tolist()}


def report(r: dict) -> None:
    best, c = r["best"], r["costs"]
    print(f"EP={r['world']}, {r['tokens']} tokens/rank, hidden {r['hidden']}, expert hidden {r['expert_hidden']}, "
          f"{EXPERTS_PER_RANK} experts/rank, top-{TOP_K}, fp32, fwd + bwd, best of round-robin repetitions")
    print(f"received rows per expert: {r['received']}")
    print(f"calibrated: network {c.net_bandwidth / 1e9:.2f} GB/s, expert {c.flops / 1e9:.1f} GFLOP/s; "
          f"policy shadows {r['shadow']}")
    for name, seconds in best.items():
        s = r["stats"][name]
        extra = "" if name == "plain" else (f"   exchange wait {s['faster/exchange_s'] * 1e3:.1f} ms, compute "
                                           f"{s['faster/compute_s'] * 1e3:.1f} ms, shadow comm "
                                           f"{s['faster/shadow_comm_s'] * 1e3:.1f} ms (means per call)")
        print(f"  {name:9s} {seconds * 1e3:8.1f} ms{extra}")
    print(f"shadowing over plain:  measured {best['plain'] / best['shadow']:.2f}x faster, "
          f"model predicted {r['predicted_shadow']:.2f}x (exchange + experts only)")
    print(f"schedule over plain:   measured {best['plain'] / best['schedule']:.2f}x faster, "
          f"model predicted {r['predicted_schedule']:.2f}x (exchange + experts only)")
    print(f"both over plain:       measured {best['plain'] / best['both']:.2f}x faster")


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        out = measure(torch.device("cpu"))
        if out is not None:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    report(queue.get())


if __name__ == "__main__":
    main()
