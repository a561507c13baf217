"""The costs of FasterMoE's performance model, measured on the machine and backend it runs on
(docs/design.md#fastermoe).

Each cost is a line, time = fixed + size x per-unit, fitted through two measurements (the
fastest of ``reps``, the two sizes timed in turn, after a warm-up of each):

- the token exchange: an all-to-all of 8 and of up to 512 rows per peer (rows of ``d_model``,
  at most 16 MiB per buffer); its fixed cost is divided among the W - 1 peers, so that a
  smart-schedule step with fewer peers pays its share;
- the parameter transfer of a shadowed expert: broadcasts of a quarter of one expert's
  parameters and of all of them;
- the experts: one call on 16 and on 256 rows spread over all local experts, as the layer
  calls them (on a CPU each expert's GEMMs are separate calls, so the fixed cost grows with E);
- the overlap of a pipelined step: the larger all-to-all posted asynchronously while the
  256-row call runs, against the two apart.

On 2 gloo CPU processes the fixed costs are what the paper's bandwidth-only model misses: with
it the policy predicted 1.02-1.41x from shadowing and the smart schedule where 0.61-0.86x was
measured (issue #19). The fastest of 15 rather than the median of 5: on a shared 2-core machine
the median still caught stalls that ran over most repetitions, and 2 of 4 calibrations in one
session read the exchange at 0.08-0.10 GB/s against 1.1-3.8 GB/s in the others; the policy then
predicted 1.5-3.6x from shadowing and the schedule, shadowed 5 of 8 experts, and measured
0.98x. Other work only adds time, so the fastest repetition is the machine's own cost, and
timing the two sizes of a line in turn exposes both to the same conditions. Every rank keeps the
slowest rank's times (one MAX all-reduce), so the
costs, and every decision taken from them, are identical on all ranks. A value given in the
config (``moe.faster.net_bandwidth`` / ``flops``) replaces its measurement, with no fixed cost,
and then the overlap is not measured either: it is taken as full, the paper's assumption.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from moe_morpheus.moe.faster.policy import Costs

EXCHANGE_ROWS = (8, 512)  # per peer
EXCHANGE_BYTES_CAP = 16 << 20  # per buffer: 512 rows per peer of 8192 fp32 values at EP=64 would be 1 GiB
CALL_ROWS = (16, 256)


def calibrate(group, run_expert, d_model: int, param_numel: int, *, net_bandwidth: float | None,
              flops: float | None, device: torch.device, dtype: torch.dtype = torch.float32,
              reps: int = 15) -> Costs:
    """Costs of one layer whose experts have ``param_numel`` parameters each and run as
    ``run_expert(x_ND)`` (the rows spread over the local experts); collective over ``group``."""
    world = dist.get_world_size(group)
    item = torch.empty((), dtype=dtype).element_size()
    largest = EXCHANGE_BYTES_CAP // (world * d_model * item)
    exchange_rows = (EXCHANGE_ROWS[0], max(EXCHANGE_ROWS[0] + 1, min(EXCHANGE_ROWS[1], largest)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = torch.zeros(7, dtype=torch.float64, device=device)
    measure_net, measure_compute = net_bandwidth is None, flops is None
    # The exchange buffers (up to 16 MiB each) only where the exchange is measured.
    rows = [torch.randn(world * n, d_model, device=device, dtype=dtype) for n in exchange_rows] if measure_net else []
    received = [torch.empty_like(t) for t in rows]
    calls = [torch.randn(n, d_model, device=device, dtype=dtype) for n in CALL_ROWS]

    def exchange(i, async_op=False):
        return dist.all_to_all_single(received[i], rows[i], group=group, async_op=async_op)

    with torch.no_grad():
        if measure_net:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            blocks = [torch.zeros(max(param_numel // 4, 1), device=device, dtype=dtype),
                      torch.zeros(param_numel, device=device, dtype=dtype)]
            for i in range(2):  # warm-up: the first use of a pair of ranks sets up its connection
                exchange(i)
                dist.broadcast(blocks[i], src, group=group)
            times[0:2] = torch.tensor(_fastest([lambda: exchange(0), lambda: exchange(1)], reps, sync))
            times[2:4] = torch.tensor(_fastest([lambda i=i: dist.broadcast(blocks[i], src, group=group)
                                                for i in range(2)], reps, sync))
        if measure_compute:
            for i in range(2):
                run_expert(calls[i])
            times[4:6] = torch.tensor(_fastest([lambda i=i: run_expert(calls[i]) for i in range(2)], reps, sync))
        if measure_net and measure_compute:
            def side_by_side():
                work = exchange(1, async_op=True)
                run_expert(calls[1])
                work.wait()

            times[6] = _fastest([side_by_side], reps, sync)[0]
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    t = times.tolist()
    token_bytes, param_bytes = d_model * item, param_numel * item
    token_flops = 2.0 * param_numel
    costs = dict(token_flops=token_flops, token_bytes=token_bytes, param_bytes=param_bytes,
                 net_bandwidth=net_bandwidth or 0.0, flops=flops or 0.0)
    if measure_net:
        # An all-to-all of n rows per peer moves n * (W - 1) rows over each rank's link.
        per_row, fixed = _line([n * max(world - 1, 1) for n in exchange_rows], t[0:2])
        costs["exchange_latency_s"] = fixed / max(world - 1, 1)
        per_byte, costs["param_latency_s"] = _line([blocks[0].numel() * item, param_bytes], t[2:4])
        costs["net_bandwidth"], costs["param_bandwidth"] = token_bytes / per_row, 1.0 / per_byte
    if measure_compute:
        per_token, costs["call_latency_s"] = _line(list(CALL_ROWS), t[4:6])
        costs["flops"] = token_flops / per_token
    if measure_net and measure_compute:
        hidden = t[1] + t[5] - t[6]
        costs["overlap"] = min(max(hidden / min(t[1], t[5]), 0.0), 1.0)
    return Costs(**costs)


def _line(sizes: list[float], seconds: list[float]) -> tuple[float, float]:
    """(seconds per unit, fixed seconds) of the line through two (size, seconds) points. Where
    noise makes that line meaningless (the larger size not slower, or a negative fixed cost),
    the larger point is read as all per-unit cost: it is the nearer one to a layer's sizes."""
    slope = (seconds[1] - seconds[0]) / (sizes[1] - sizes[0])
    fixed = seconds[0] - slope * sizes[0]
    if slope <= 0 or fixed < 0:
        return seconds[1] / sizes[1], 0.0
    return slope, fixed


def _fastest(fns, reps: int, sync) -> list[float]:
    """The fastest of ``reps`` timed calls of each of ``fns``, called in turn (fns[0], fns[1],
    fns[0], ...), so that a burst of other work slows every size of a line alike."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return [max(b, 1e-9) for b in best]
