"""The same model on one CUDA device (skipped without one): TP=1 forward/backward on CUDA equals
the CPU result, and a bf16 step of a small GLM runs."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_matches_cpu_and_bf16_runs():
    from moe_morpheus.config import ModelConfig, ParallelConfig
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from tests.helpers.presets import TINY_GLM
    from tests.helpers.synthetic import micro_batches

    cfg = ModelConfig(**TINY_GLM)
    initialize(ParallelConfig(), cfg)
    model = build_model(cfg, None, ParallelConfig(), seed=3)[0]
    batch = micro_batches(1, 2, cfg.seq_length, cfg.vocab_size)[0]
    inputs = {k: batch[k] for k in ("tokens", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")}
    cuda_loss = model(**{k: v.cuda() for k, v in inputs.items()}, targets=batch["targets"].cuda())
    cpu_model = build_model(cfg, None, ParallelConfig(), seed=3)[0].cpu()
    cpu_loss = cpu_model(**inputs, targets=batch["targets"])
    assert (cuda_loss.cpu() - cpu_loss).abs().max() / cpu_loss.abs().max() < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**{k: v.cuda() for k, v in inputs.items()}, targets=batch["targets"].cuda()).mean()
    loss.backward()
    assert torch.isfinite(loss)
