"""The project's MoE layer against Megatron-Core's MoELayer on one GPU, bf16, forward + backward.

    python benchmarks/gpu/moe_layer_gpu.py [--tokens 16384] [--hidden 2048] [--reps 20]

Same shapes for both (top-2, GeGLU experts, no auxiliary loss, dropless): 8 experts of hidden
2752 and 64 experts of hidden 688 (glm_1b's FFN 5504 split for the same active size). Megatron-
Core's layer uses the alltoall dispatcher with SequentialMLP experts, and GroupedMLP too where
its grouped-GEMM kernels import. Times are CUDA-event medians after warm-up. Goal (issue #11):
ours / Megatron-Core <= 1.2. Writes benchmarks/results/moe_layer_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from moe_layer import fwd_bwd, megatron_moe_layer  # noqa: E402

from moe_morpheus.moe import FMoE, GeGLUExperts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def time_fwd_bwd(module, x, grad, unpack, reps: int) -> float:
    """Median milliseconds of one forward + backward (CUDA events, after 3 warm-up runs)."""
    step = fwd_bwd(module, x, grad, unpack)
    times = []
    for rep in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if rep >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    rows = []
    for experts, expert_hidden in ((8, 2752), (64, 688)):
        ours = FMoE(experts, args.hidden, top_k=2,
                    expert=GeGLUExperts(experts, args.hidden, expert_hidden)).cuda().to(torch.bfloat16)
        row = {"experts": experts, "expert_hidden": expert_hidden,
               "ours_ms": time_fwd_bwd(ours, x, grad, lambda out: out, args.reps)}
        x3, grad3 = x.detach().view(args.tokens, 1, args.hidden).requires_grad_(), grad.view(args.tokens, 1, -1)
        for name, grouped in (("megatron_sequential_ms", False), ("megatron_grouped_ms", True)):
            try:
                mcore = megatron_moe_layer(experts, hidden=args.hidden, expert_hidden=expert_hidden,
                                           dispatcher="alltoall", dtype=torch.bfloat16, grouped_gemm=grouped,
                                           device="cuda")
            except (ImportError, AssertionError, RuntimeError) as err:  # grouped GEMM kernels absent
                print(f"Megatron-Core MoELayer grouped_gemm={grouped}: not available ({err})")
                continue
            row[name] = time_fwd_bwd(mcore, x3, grad3, lambda out: out[0], args.reps)
        best = min(v for k, v in row.items() if k.startswith("megatron"))
        row["ours_over_megatron_best"] = row["ours_ms"] / best
        rows.append(row)
        print(json.dumps(row))
    print("\n| experts x hidden | ours ms | Megatron sequential ms | Megatron grouped ms | ours / best (goal <= 1.2) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        grouped = f"{r['megatron_grouped_ms']:.2f}" if "megatron_grouped_ms" in r else "n/a"
        print(f"| {r['experts']} x {r['expert_hidden']} | {r['ours_ms']:.2f} | {r['megatron_sequential_ms']:.2f} | "
              f"{grouped} | {r['ours_over_megatron_best']:.2f} |")
    out = REPO / "benchmarks" / "results" / "moe_layer_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
