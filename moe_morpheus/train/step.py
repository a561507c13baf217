"""One training (or evaluation) step through Megatron-Core's pipeline schedule.

Loss normalisation: the objective is the mean cross entropy per target token of the *global*
batch (all micro-batches, all data-parallel ranks). Each micro-batch returns
``sum(CE * loss_mask) / N_global`` where N_global is counted before the step, so the schedule
must neither divide by the number of micro-batches nor let DDP average: ``megatron_config`` sets
``calculate_per_token_loss=True`` (no division in the schedule, DDP gradient scaling 1, i.e. a
sum over data-parallel ranks) and :func:`finalize_grads` is called without a token count.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

MODEL_INPUTS = ("tokens", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")


def wrap_ddp(chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Megatron-Core DDP: gradients accumulate in ``param.main_grad`` (fp32 buffers); expert
    parameters (``allreduce = False``) are reduced over the expert-data-parallel group only."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        average_in_collective=False,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's buckets may be overlapped with the backward (Megatron rule).
            disable_bucketing=index > 0,
        ))
    for chunk in wrapped:
        chunk.config.finalize_model_grads_func = finalize_grads
    return wrapped


def finalize_grads(model: list[torch.nn.Module], num_tokens=None, **kwargs) -> None:
    """Megatron's gradient finalisation plus the MoE gate rule (docs/design.md#gradient-reduction).

    Gate parameters are marked ``sequence_parallel = True``: each tensor-parallel rank routes a
    different 1/tp slice of the tokens, so their gradients are *summed* over the TP group.
    Megatron-Core does that itself only when sequence parallelism is on.
    """
    finalize_model_grads(model, num_tokens=None)
    config = model[0].config
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if config.sequence_parallel or dist.get_world_size(tp_group) == 1:
        return
    grads = [
        param.main_grad
        for chunk in model
        for param in chunk.parameters()
        if param.requires_grad and getattr(param, "sequence_parallel", False)
    ]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=tp_group)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def count_target_tokens(micro_batches: Iterable[dict]) -> torch.Tensor:
    """Target tokens of the global batch: this rank's micro-batches summed over data parallelism."""
    local = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total


def _loss_func(loss_mask: torch.Tensor, denominator: float, keep_per_token: bool, per_token_loss: torch.Tensor):
    mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss * mask).sum()
    reported = {"loss": loss_sum.detach() / denominator}
    if keep_per_token:
        reported["per_token"] = (per_token_loss * mask).detach()
    return loss_sum / denominator, mask.sum().to(torch.int), reported


def _forward_step(denominator: float, keep_per_token: bool, data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    inputs = {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS}
    gmask = batch.get("gmask")
    output = model(
        **inputs, targets=batch["targets"].to(device), gmask=None if gmask is None else gmask.to(device)
    )
    return output, partial(_loss_func, batch["loss_mask"].to(device), denominator, keep_per_token)


def _schedule(model: list[torch.nn.Module], micro_batches: list[dict], *, forward_only: bool, denominator: float,
              keep_per_token: bool = False) -> list[dict]:
    """Megatron's schedule over the micro-batches; what each reported (last pipeline stage only)."""
    first = micro_batches[0]["tokens"]
    vpp = len(model)
    iterators = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, denominator, keep_per_token),
        data_iterator=iterators,
        model=model if vpp > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    )


def forward_per_token(model: list[torch.nn.Module], micro_batches: list[dict]) -> list[torch.Tensor]:
    """Cross entropy of every position of every micro-batch ([b, s] each, 0 where ``loss_mask``
    is 0), forward only, nothing reduced: on the last pipeline stage; an empty list on the others."""
    return [item["per_token"] for item in _schedule(model, micro_batches, forward_only=True, denominator=1.0,
                                                    keep_per_token=True)]


def forward_backward(
    model: list[torch.nn.Module],
    micro_batches: list[dict],
    *,
    forward_only: bool = False,
    denominator: float | None = None,
) -> float:
    """Run all micro-batches of one step through the pipeline schedule.

    Returns the mean cross entropy per target token over the global batch (every rank gets it).
    Gradients (when not ``forward_only``) are left in ``main_grad``, finalised. ``denominator``:
    the global target count when the caller has it (:func:`count_target_tokens`), else counted here.
    """
    if denominator is None:
        denominator = float(count_target_tokens(micro_batches))
    denominator = max(denominator, 1.0)
    losses = _schedule(model, micro_batches, forward_only=forward_only, denominator=denominator)
    # Only the last pipeline stage has the losses; sum them there, then over DP and PP.
    local = sum(float(item["loss"]) for item in losses) if losses else 0.0
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return float(total)
