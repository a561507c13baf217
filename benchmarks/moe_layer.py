"""MoE layer speed on this machine's CPU: fwd + bwd time over a dense GeGLU FFN and over a roofline.

Run: ``.venv/bin/python benchmarks/moe_layer.py [--json benchmarks/results/moe_layer.json --label after]``
(about two minutes on 2 cores). ``--json`` adds the run under ``runs.<label>`` of that file with
the commit of the ``moe_morpheus`` it imported (``--commit`` names it where that is no checkout:
``PYTHONPATH=<exported tree>`` benchmarks another commit with this script).

``--baseline-experts FILE`` (another commit's ``moe/experts.py``: ``git show <commit>:moe_morpheus/
moe/experts.py > FILE``) also times every FMoE with that file's expert kernel, same weights and
routing, in the same round-robin: a before/after of the experts within one run, immune to the
minutes-long swings of a shared machine that separate runs see (+-10% here).

1. 4096 tokens, hidden 256, expert hidden 256, 64 experts, top-2, against a dense GeGLU FFN of
   hidden 512 (the same active parameters: 2 x 256) on the same tokens. Goal: <= 1.3 (the ideal
   balanced expert compute alone is about 1.3 here: 64 matmuls of ~128 rows run slower than
   one of 4096). Reference points measured here before: Megatron-Core MoELayer (allgather) ~2.5,
   padded batched matmul ~3, naive loop over experts ~14. Megatron-Core's MoELayer is timed in
   the same run.
   Then the 64-expert layer split into its gate, its experts (alone, on the rows sorted for
   them) and the rest (dispatch, combine, statistics), beside the same rows through one expert
   of the same width: the cost of splitting the experts' GEMMs into 64 groups.
2. E = 8 .. 256 experts at fixed active parameters (top-2, expert hidden 256): layer time over
   max(FLOPs / measured matmul peak, bytes / measured copy bandwidth). Goal: within 1.5.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moe_morpheus
from moe_morpheus.moe import FMoE, GeGLUExperts

TOKENS, HIDDEN, EXPERT_HIDDEN, TOP_K = 4096, 256, 256, 2
BYTES = 4  # fp32


def timed(fns: dict, reps: int = 7, warmup: int = 1) -> dict:
    """Best wall time in seconds of each ``fn()``, measured round-robin.

    Round-robin and the minimum, not the median: on a shared 2-core machine other processes
    steal time in bursts; interleaving exposes every candidate to the same bursts and the
    minimum is the run least disturbed by them.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, unpack=lambda out: out):
    def step():
        for p in module.parameters():
            p.grad = None
        unpack(module(x)).backward(grad)
    return step


class DenseGeGLU(nn.Module):
    """The project's dense FFN: fc2(value(x) * gelu_erf(gate_proj(x))), biased linears."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.value, self.gate_proj = nn.Linear(d_model, d_hidden), nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x):
        return self.fc2(self.value(x) * F.gelu(self.gate_proj(x)))


class OneExpert(DenseGeGLU):
    """A single GeGLU expert as its own module: FMoE's per-expert (autograd) path."""

    def __init__(self, d_model: int):
        super().__init__(d_model, EXPERT_HIDDEN)


def roofline_probes() -> dict:
    """Timed probes for the roofline: fp32 matmuls of a few shapes (compute ceiling = the best
    FLOP/s among them) and a 256 MB copy (bandwidth, read + write bytes)."""
    probes = {}
    for m, k, n in ((2048, 2048, 2048), (4096, 256, 512), (8192, 256, 256)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        probes[("matmul", 2 * m * k * n)] = lambda a=a, b=b: a @ b
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    probes[("copy", 2 * src.numel() * BYTES)] = lambda: dst.copy_(src)
    return probes


def roofline_seconds(num_experts: int, peak: float, bandwidth: float) -> float:
    """max(FLOPs / peak, bytes / bandwidth) for one fwd + bwd of the MoE layer.

    FLOPs: each of the N = T * k rows goes through 3 matmuls of D x F (2 FLOPs per MAC),
    backward costs twice forward (grad input + grad weight): 3 * 3 * 2 * N * D * F; the router
    adds 3 * 2 * T * D * E. Bytes: expert weights (3 * E * D * F) read in forward, read in
    backward and their gradients written; per row the activations x, value, pre-GeLU, product
    and output (2D + 3F) written in forward, read in backward, and their gradients written.
    """
    rows = TOKENS * TOP_K
    flops = 18 * rows * HIDDEN * EXPERT_HIDDEN + 6 * TOKENS * HIDDEN * num_experts
    weight_bytes = 3 * (3 * num_experts * HIDDEN * EXPERT_HIDDEN) * BYTES
    act_bytes = 3 * rows * (2 * HIDDEN + 3 * EXPERT_HIDDEN) * BYTES
    return max(flops / peak, (weight_bytes + act_bytes) / bandwidth)


def breakdown(layer: FMoE, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """fwd + bwd callables of the parts of ``layer`` on ``x``: the gate with its balance loss;
    the experts alone on the rows the gate sorted for them (their counts); and the same rows
    through ONE expert of the same width: the same FLOPs in one GEMM per matrix, what the
    experts would cost without being split into groups."""
    gate = layer.gate
    with torch.no_grad():
        idx_TK, _ = gate(x)
        gate.get_loss()
    order_N = torch.argsort(idx_TK.reshape(-1), stable=True)
    counts = torch.bincount(idx_TK.reshape(-1), minlength=layer.num_expert).tolist()
    x_ND = x.detach()[order_N // TOP_K].requires_grad_()
    grad_ND = torch.randn_like(x_ND)
    one_group = GeGLUExperts(1, HIDDEN, EXPERT_HIDDEN)

    def gate_step():
        x.grad = None
        _, score_TK = gate(x)
        (score_TK.sum() + gate.get_loss()).backward()

    def experts_step(experts, group_counts):
        def step():
            x_ND.grad = None
            experts.zero_grad(set_to_none=True)
            experts(x_ND, group_counts).backward(grad_ND)
        return step

    return {"gate": gate_step, "experts": experts_step(layer.experts, counts),
            "experts_one_group": experts_step(one_group, [x_ND.shape[0]])}


def native_layer(num_experts: int, expert=None) -> FMoE:
    return FMoE(num_experts, HIDDEN, top_k=TOP_K,
                expert=expert or GeGLUExperts(num_experts, HIDDEN, EXPERT_HIDDEN))


def baseline_layer(layer: FMoE, experts_py: Path) -> FMoE:
    """A copy of ``layer`` (same gate and expert weights) whose experts run ``_GroupedGeGLU`` of
    another ``experts.py`` (its parameters in GeGLUExperts' order, as every version has them)."""
    spec = importlib.util.spec_from_file_location("baseline_experts", experts_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class BaselineExperts(GeGLUExperts):
        def forward(self, x_ND, counts_E):
            return module._GroupedGeGLU.apply(x_ND.contiguous(), [int(c) for c in counts_E], self.w_value_EFD,
                                              self.b_value_EF, self.w_gate_proj_EFD, self.b_gate_proj_EF,
                                              self.w_out_EDF, self.b_out_ED)

    base = native_layer(layer.num_expert, BaselineExperts(layer.num_expert, HIDDEN, EXPERT_HIDDEN))
    base.load_state_dict(layer.state_dict())
    return base


def megatron_moe_layer(num_experts: int, *, hidden: int = HIDDEN, expert_hidden: int = EXPERT_HIDDEN,
                       dispatcher: str = "allgather", dtype: torch.dtype = torch.float32,
                       grouped_gemm: bool = False, device: str = "cpu") -> nn.Module:
    """Megatron-Core's MoELayer (GeGLU experts, top-2, no aux loss) in a world of one: on the
    CPU the allgather dispatcher with SequentialMLP experts; on a GPU any dispatcher, and
    GroupedMLP experts with ``grouped_gemm`` (Megatron-Core's fastest path without TE)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from moe_morpheus.config import ParallelConfig
    from moe_morpheus.parallel import initialize

    initialize(ParallelConfig())  # a world of one; enables the CPU redirections (docs/design.md#cpu-compatibility)
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=4, num_moe_experts=num_experts,
        moe_router_topk=TOP_K, moe_ffn_hidden_size=expert_hidden, ffn_hidden_size=TOP_K * expert_hidden,
        moe_token_dispatcher_type=dispatcher, gated_linear_unit=True, activation_func=F.gelu,
        add_bias_linear=False, use_cpu_initialization=True, moe_grouped_gemm=grouped_gemm, moe_aux_loss_coeff=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    layer = build_module(spec.submodules.mlp, config=config)
    return layer.to(device)


def source_commit() -> str:
    """The commit of the imported moe_morpheus, "+dirty" if its moe/ differs from it."""
    src = Path(moe_morpheus.__file__).parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "moe"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout: give --commit)"
    return commit + ("+dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="add this run to that file (e.g. benchmarks/results/moe_layer.json)")
    parser.add_argument("--label", default="run", help="the run's key under runs in --json")
    parser.add_argument("--commit", help="the commit of the moe_morpheus benchmarked (default: from its checkout)")
    parser.add_argument("--baseline-experts", type=Path, help="another experts.py, timed in the same run")
    parser.add_argument("--baseline-commit", default="", help="the commit --baseline-experts comes from (recorded)")
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokens {TOKENS}, hidden {HIDDEN}, "
          f"expert hidden {EXPERT_HIDDEN}, top-{TOP_K}, fp32, forward + backward, best of 7 round-robin; "
          f"moe_morpheus from {Path(moe_morpheus.__file__).parent}")
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    grad = torch.randn(TOKENS, HIDDEN)

    ours = native_layer(64)
    per_expert = native_layer(64, expert=OneExpert)
    mcore = megatron_moe_layer(64)
    x3, grad3 = x.detach().view(TOKENS, 1, HIDDEN).requires_grad_(), grad.view(TOKENS, 1, HIDDEN)
    candidates = {
        "dense GeGLU FFN, hidden 512": (DenseGeGLU(HIDDEN, TOP_K * EXPERT_HIDDEN), x, grad, None),
        "FMoE, 64 experts (batched GeGLU experts)": (ours, x, grad, None),
        "FMoE, 64 experts (one module per expert)": (per_expert, x, grad, None),
        "Megatron-Core MoELayer, 64 experts (allgather)": (mcore, x3, grad3, lambda out: out[0]),
    }
    if args.baseline_experts:
        candidates["FMoE, 64 experts (baseline experts)"] = (baseline_layer(ours, args.baseline_experts), x, grad, None)
    seconds = timed({name: fwd_bwd(m, xi, gi, *([u] if u else [])) for name, (m, xi, gi, u) in candidates.items()})
    dense = seconds["dense GeGLU FFN, hidden 512"]
    layers = {}
    print("\n| layer | ms | / dense |\n| --- | ---: | ---: |")
    for name, (module, *_rest) in candidates.items():
        layers[name] = {"ms": seconds[name] * 1e3, "over_dense": seconds[name] / dense}
        note = ""
        if isinstance(module, FMoE):
            layers[name]["load_max_over_mean"] = module.pop_stats()["load_max_over_mean"]
            note = f" (load max/mean {layers[name]['load_max_over_mean']:.2f})"
        print(f"| {name}{note} | {seconds[name] * 1e3:.1f} | {seconds[name] / dense:.2f} |")

    # Where the 64-expert layer's time goes, timed in one round-robin with the whole layer.
    parts = breakdown(ours, x, grad)
    part_s = timed({"layer": fwd_bwd(ours, x, grad), **parts})
    ours.pop_stats()
    around = part_s["layer"] - part_s["gate"] - part_s["experts"]
    split = {"layer_ms": part_s["layer"] * 1e3, "gate_ms": part_s["gate"] * 1e3,
             "experts_ms": part_s["experts"] * 1e3, "experts_one_group_ms": part_s["experts_one_group"] * 1e3,
             "dispatch_combine_stats_ms": around * 1e3}
    print("\n| FMoE, 64 experts: part (fwd + bwd) | ms | share of the layer |\n| --- | ---: | ---: |")
    for name, value in (("gate and balance loss", part_s["gate"]), ("experts (64 groups)", part_s["experts"]),
                        ("dispatch, combine, statistics (the rest)", around)):
        print(f"| {name} | {value * 1e3:.1f} | {value / part_s['layer']:.0%} |")
    print(f"| experts as ONE group of the same rows and FLOPs | {part_s['experts_one_group'] * 1e3:.1f} | "
          f"{part_s['experts_one_group'] / part_s['layer']:.0%} |")

    # The sweep and the roofline probes are timed in one round-robin, so that both see the same
    # machine (the ratio is meaningless if the probes ran in a quieter or busier moment).
    sweep = {num_experts: native_layer(num_experts) for num_experts in (8, 16, 32, 64, 128, 256)}
    fns = {e: fwd_bwd(layer, x, grad) for e, layer in sweep.items()}
    if args.baseline_experts:
        fns.update({("baseline", e): fwd_bwd(baseline_layer(layer, args.baseline_experts), x, grad)
                    for e, layer in sweep.items()})
    probes = roofline_probes()
    best = timed({**fns, **probes}, reps=5)
    peak = max(key[1] / best[key] for key in probes if key[0] == "matmul")
    bandwidth = next(key[1] / best[key] for key in probes if key[0] == "copy")
    print(f"\nroofline: matmul peak {peak / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    extra = " baseline ms | baseline / roofline |" if args.baseline_experts else ""
    print(f"\n| experts | ms | roofline ms | / roofline | load max/mean |{extra}\n"
          f"| ---: | ---: | ---: | ---: | ---: |{' ---: | ---: |' if extra else ''}")
    roofline = {}
    for num_experts, layer in sweep.items():
        bound = roofline_seconds(num_experts, peak, bandwidth)
        balance = layer.pop_stats()["load_max_over_mean"]
        row = roofline[num_experts] = {"ms": best[num_experts] * 1e3, "roofline_ms": bound * 1e3,
                                       "over_roofline": best[num_experts] / bound, "load_max_over_mean": balance}
        line = (f"| {num_experts} | {row['ms']:.1f} | {bound * 1e3:.1f} | {row['over_roofline']:.2f} | "
                f"{balance:.2f} |")
        if args.baseline_experts:
            base = best[("baseline", num_experts)]
            row.update(baseline_ms=base * 1e3, baseline_over_roofline=base / bound)
            line += f" {base * 1e3:.1f} | {base / bound:.2f} |"
        print(line)

    if args.json:
        results = json.loads(args.json.read_text()) if args.json.exists() else {}
        run = {"commit": args.commit or source_commit(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "layers_64_experts": layers, "breakdown_64_experts": split, "matmul_peak_flops": peak, "copy_bytes_per_s": bandwidth,
               "sweep": roofline}
        if args.baseline_experts:
            run["baseline_experts"] = {"file": str(args.baseline_experts), "commit": args.baseline_commit}
        results.setdefault("runs", {})[args.label] = run
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nwritten {args.json} (runs.{args.label})")


if __name__ == "__main__":
    main()
