"""One clipped AdamW training run of the 4-layer tiny GLM in this process's layout: the unit of the
optimizer-update equality tests (parallel layouts, FasterMoE against the plain path)."""

from __future__ import annotations

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from tests.helpers.numerics import full_gradients
from tests.helpers.presets import TINY_GLM_4_LAYERS
from tests.helpers.synthetic import micro_batches


def clipped_update(tp: int, pp: int, ep: int, moe: dict | None, steps: int = 2, sequence_parallel: bool = False):
    """Two optimizer steps (clip active) on a global batch of 4 micro-batches of 2 rows; with
    MoE also each step's routing statistics summed over the world (as the trainer logs them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from moe_morpheus.model import build_model
    from moe_morpheus.moe import collect_moe_stats, set_aux_loss_scale
    from moe_morpheus.parallel import initialize
    from moe_morpheus.parallel.gather import gather_full
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import forward_backward, wrap_ddp

    model_cfg = ModelConfig(**TINY_GLM_4_LAYERS)
    moe_cfg = MoEConfig(**moe) if moe else None
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=sequence_parallel)
    dp = initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, moe_cfg, parallel, seed=5))
    # A clip far below the gradient norm, so the clipped update depends on the global norm.
    # eps 1e-3 instead of 1e-8: Adam's first steps are ~lr * sign(g) where |g| << eps does not
    # hold, so gradients of 1e-9 that differ in their last bits (any reduction order does that)
    # would move parameters by lr in different directions; with eps above the smallest
    # gradients the update is a smooth function of the clipped gradient, which is what is tested.
    optimizer = Optimizer(chunks, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3, grad_clip=0.05)
    batches = micro_batches(4, 2, model_cfg.seq_length, model_cfg.vocab_size, seed=9)
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp
    mine = batches[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    losses, norms, stats = [], [], []
    for _ in range(steps):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        set_aux_loss_scale(1.0 / (len(mine) * dp))
        losses.append(forward_backward(chunks, mine))
        if moe_cfg:
            stats.append(collect_moe_stats(chunks, dist.group.WORLD, num_layers=model_cfg.num_layers,
                                           num_experts=moe_cfg.num_experts))
        norms.append(optimizer.step().total)
    grads = full_gradients(chunks) if ep == 1 else None
    params = gather_full(chunks, lambda param: param)
    return losses, norms, params, grads, stats
