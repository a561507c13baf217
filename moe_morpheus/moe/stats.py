"""Routing statistics of a model's MoE layers: per-step metrics and the expert-load totals.

Every :class:`~moe_morpheus.moe.layer.FMoE` accumulates, without host syncs, the (token, slot)
assignments its gate made for this rank's own tokens (kept per global expert, dropped, routed)
and its balance and z-losses (``FMoE.take_stats``). :func:`collect_moe_stats` turns them into
metrics; given a process group it first sums them over the group's ranks in ONE all-reduce of a
``[num_layers, G + 6]`` table (row = global layer number - 1), so every rank returns the same
numbers and fractions are taken after the sum.

Why the whole world is the group in training: counts are numbers of assignments, and the sum
over ranks that routed disjoint tokens is the count over all of them. Data-parallel replicas
(the expert-parallel ranks among them) hold different micro-batches; tensor-parallel ranks each
route their own part of the micro-batch (their slice of the tokens, or their part of the
sequence under sequence parallelism), and their rows are not summed over the slice group before
(``take_stats`` hands out this rank's rows only); pipeline stages hold different layers, which
land in different rows. So every routing decision of the step is counted exactly once, and rank
0 (the MLflow logger, the checkpoint's common state) holds every stage's layers. The balance and
z-losses are means over the ranks' forwards: the mean over data-parallel replicas (tensor-parallel
ranks hold the same value, computed over the whole micro-batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_morpheus.moe.ffn import MoEFeedForward
from moe_morpheus.moe.layer import FMoE, routing_stats

# Columns of a layer's row after its G per-expert counts (all sums over forwards and ranks).
COLUMNS = ("dropped", "routed", "balance", "z", "forwards", "loss_forwards")


def _rows(chunks, group, num_layers: int, num_experts: int) -> tuple[dict, dict]:
    """{layer name: raw row tensor}, {layer name: this rank's FasterMoE stats}; resets the layers."""
    rows, faster, index = {}, {}, 0
    for chunk in chunks:
        for module in chunk.modules():
            if not isinstance(module, MoEFeedForward) or not isinstance(module.moe, FMoE):
                continue
            layer = module.moe
            name = module.layer_number if module.layer_number is not None else index
            index += 1
            if group is not None and not (module.layer_number is not None and 1 <= name <= num_layers
                                          and layer.tot_expert == num_experts):
                raise ValueError(f"collect_moe_stats over a group: MoE layer {module.layer_number} with "
                                 f"{layer.tot_expert} experts does not fit num_layers={num_layers}, "
                                 f"num_experts={num_experts} (every layer needs its global layer_number)")
            if layer.faster is not None:
                faster[name] = layer.faster.pop_stats()
            taken = layer.take_stats()
            if taken is None:
                continue
            n, counts, losses = taken
            with_losses = losses is not None
            rows[name] = torch.cat([counts, losses.double() if with_losses else counts.new_zeros(2),
                                    counts.new_tensor([n, n if with_losses else 0])])
    return rows, faster


def _device(chunks) -> torch.device:
    for chunk in chunks:
        for param in chunk.parameters():
            return param.device
    return torch.device("cpu")


def collect_moe_stats(model, group=None, *, num_layers: int = 0, num_experts: int = 0) -> dict:
    """Per-layer routing statistics since the last call, then reset.

    ``model``: a module or a list of modules (virtual pipeline chunks). ``group``: None for this
    rank's statistics (no collective); a process group to sum them over its ranks first (module
    docstring; collective: every rank of the group calls it, with the same ``num_layers``, the
    model's layer count, and ``num_experts``, the global expert count G). Keys, per MoE layer n
    (its ``layer_number``, else its index among this rank's MoE layers):
    ``moe/layer{n}/load`` (list: (token, slot) assignments kept per global expert, summed over
    the forwards and ranks; ``FMoE.pop_stats`` gives one layer's mean per forward), ``/drop_rate`` (dropped / routed assignments),
    ``/load_max_over_mean`` (1 = balanced), ``/balance_loss`` and ``/z_loss`` (means per
    forward), FasterMoE's ``/faster/...`` (this rank's); over layers ``moe/balance_loss`` and
    ``moe/z_loss`` (sums, what the aux loss adds) and ``moe/drop_rate`` (mean). Native backend
    only (FastMoE's layer keeps no statistics).
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if group is not None and (num_layers < 1 or num_experts < 1):
        raise ValueError(f"collect_moe_stats over a group needs num_layers >= 1 and num_experts >= 1 (the "
                         f"table every rank reduces); got {num_layers}, {num_experts}")
    rows, faster = _rows(chunks, group, num_layers, num_experts)
    if group is not None:
        table = torch.zeros(num_layers, num_experts + len(COLUMNS), dtype=torch.float64, device=_device(chunks))
        for name, row in rows.items():
            table[name - 1] = row
        dist.all_reduce(table, group=group)
        layers = {i + 1: row for i, row in enumerate(table.tolist()) if row[-2] > 0}
    else:
        flat = torch.cat(list(rows.values())).tolist() if rows else []  # one host sync
        layers, start = {}, 0
        for name, row in rows.items():
            layers[name], start = flat[start:start + row.numel()], start + row.numel()

    out: dict = {}
    totals: dict[str, list[float]] = {"balance_loss": [], "z_loss": [], "drop_rate": []}
    for name, row in layers.items():
        dropped, routed, balance, z, _, loss_forwards = row[-len(COLUMNS):]
        stats = routing_stats(row[: -len(COLUMNS)], dropped, routed,
                              (balance / loss_forwards, z / loss_forwards) if loss_forwards else None)
        stats.update(faster.get(name, {}))
        for key, value in stats.items():
            out[f"moe/layer{name}/{key}"] = value
            if key in totals:
                totals[key].append(value)
    for key, values in totals.items():
        if values:
            out[f"moe/{key}"] = sum(values) / len(values) if key == "drop_rate" else sum(values)
    return out
