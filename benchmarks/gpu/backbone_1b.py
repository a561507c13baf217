"""bf16 forward + backward of a 1B-class GLM on one GPU: tokens/s and MFU.

    python benchmarks/gpu/backbone_1b.py [--layers 24 --hidden 2048 --heads 16 --seq 2048 --micro 2]

MFU = model FLOP/s (moe_morpheus.budget.flops_per_token x tokens/s) over the dense bf16 peak
(989 TFLOP/s for H100/H200, reference/scaling.md section 3). Needs CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_morpheus.budget import flops_per_token
from moe_morpheus.config import ModelConfig, ParallelConfig
from moe_morpheus.model import build_model
from moe_morpheus.parallel import initialize
from moe_morpheus.train.step import forward_backward, wrap_ddp


def packed_batch(micro: int, seq: int, vocab: int, device) -> dict:
    """One [gMASK]-style sample per row: first quarter Part A, the rest Part B."""
    sep = seq // 4
    positions = torch.arange(seq, device=device).clamp(max=sep - 1)
    block = (torch.arange(seq, device=device) - sep + 1).clamp(min=0)
    prefix = (torch.arange(seq, device=device) < sep).long()
    rows = {
        "tokens": torch.randint(0, vocab, (micro, seq), device=device),
        "targets": torch.randint(0, vocab, (micro, seq), device=device),
        "position_ids": positions.expand(micro, seq), "block_position_ids": block.expand(micro, seq),
        "segment_ids": torch.ones(micro, seq, dtype=torch.long, device=device),
        "prefix_mask": prefix.expand(micro, seq), "loss_mask": (1 - prefix).float().expand(micro, seq),
    }
    return {k: v.contiguous() for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                            vocab_size=100000, seq_length=args.seq)
    parallel = ParallelConfig()
    initialize(parallel, model_cfg)
    model = wrap_ddp(build_model(model_cfg, None, parallel))
    params = sum(p.numel() for p in model[0].parameters())
    batch = packed_batch(args.micro, args.seq, model_cfg.vocab_size, torch.device("cuda"))
    times = []
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward_backward(model, [batch])
        torch.cuda.synchronize()
        if step >= 2:  # warm-up: allocator, kernels
            times.append(time.perf_counter() - start)
    tokens_per_s = args.micro * args.seq / (sum(times) / len(times))
    model_flops = flops_per_token(model_cfg, args.seq) * tokens_per_s
    print(f"params {params / 1e9:.2f}B  loss {loss:.3f}  tokens/s {tokens_per_s:,.0f}  "
          f"model TFLOP/s {model_flops / 1e12:.1f}  MFU {model_flops / (args.peak_tflops * 1e12):.1%}  "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
