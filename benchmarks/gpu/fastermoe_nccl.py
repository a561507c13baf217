"""FasterMoE on a multi-GPU machine (NCCL): MoE layer fwd + bwd with shadowing and with the smart
schedule forced, and with the policy's choice, over the plain expert-parallel layer, skewed and
uniform loads, next to the performance model's prediction (the same measurement as
``benchmarks/fastermoe.py``, one GPU per rank).

    torchrun --nproc_per_node=8 benchmarks/gpu/fastermoe_nccl.py [--tokens 16384 --reps 10 --hidden 1024
        --expert-hidden 4096]

Needs at least 2 CUDA devices. The policy calibrates the NCCL bandwidth and the expert
throughput at start-up, as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for fastermoe.py
from fastermoe import LOADS, measure, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-hidden", type=int, default=4096)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2 or "LOCAL_RANK" not in os.environ:
        raise SystemExit("needs >= 2 CUDA devices, launched by torchrun --nproc_per_node=N")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)  # before any NCCL call (batch_isend_irecv hangs otherwise)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    try:
        for load in LOADS:
            out = measure(torch.device("cuda", local_rank), load, tokens=args.tokens, reps=args.reps,
                          hidden=args.hidden, expert_hidden=args.expert_hidden)
            if out is not None:
                report(out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
