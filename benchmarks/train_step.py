"""Training throughput and MFU on this machine: the project's own loop, one run, ratios.

    .venv/bin/python benchmarks/train_step.py [--rounds 2] [--steps 5] [--cases small/dense ...]
                                              [--json benchmarks/results/train_step.json]
    python benchmarks/train_step.py --gpu       # one GPU, bf16 (benchmarks/gpu/run.sh sets it up)

Every case is a fresh process (``torchrun --nproc_per_node=2`` for the 2-process ones) that
builds the run exactly as ``train.py`` does (``Trainer.setup``: demo data, model, Megatron DDP,
AdamW, guards) and times ``Trainer.train_step``, the loop body itself, after two warm-up steps.
Cases run round-robin ``--rounds`` times and the best round of each is kept: on a shared 2-core
machine other work steals time in bursts, and interleaving exposes every case to the same bursts.

Measured per case: tokens/s; model FLOP/s from ``budget.flops_per_token`` (the count runs log);
MFU = model FLOP/s over the machine's fp32 matmul peak, a 2048^3 matmul measured by this
script between the rounds with the 2 threads of one process; the step split into data (the
micro-batches from the sampler), forward, backward, optimizer (clip + AdamW), gradient sync
(Megatron's ``finalize_model_grads``) and other communication (tensor-parallel all-reduces, the
MoE all-to-all, pipeline send/receive, the grad-norm all-reduce: wall time inside those calls,
waiting for the peer included); peak resident memory of the process (rank 0) and its growth
over the resident size before the set-up.

Cases (fp32, micro-batch 8, global batch 16 = 2 micro-batches, demo corpus):
- ``tiny/*``, ``small/*``: the presets ``glm_tiny`` (h128, s128) and ``glm_small`` (h256, s256),
  dense and MoE (8 and 64 experts, top-2, every second layer, the dense FFN's active size);
- ``ref/glm_h256``, ``ref/glm_h512``, ``ref/gpt_h256``, ``ref/gpt_h512``: the GLM backbone and
  Megatron-Core's ``GPTModel`` (local layer spec: GeGLU, biases, RoPE, tied embeddings, causal
  mask) of the same size (4 layers, s256, vocab 8192), trained by the same loop;
- ``2proc/*``: glm_small with 2 processes x 1 thread: data parallel, expert parallel (64
  experts), TP=2, PP=2; compared with the 1 process x 2 threads cases.

``--gpu``: ``gpu/dense_1b`` and ``gpu/moe_1b_8e`` (glm_1b, bf16 autocast, micro-batch 2 x 2048,
global batch 8), MFU against an 8192^3 bf16 matmul measured in the run and against the H100 /
H200 spec peak (989 TFLOP/s), peak GPU memory.

Goals (issue #11): GLM >= 0.9 x GPTModel tokens/s; dense MFU >= 70% at h512; MoE 64 experts
>= 0.75 x dense; data parallel 2 x 1 thread >= 0.85 x 1 process x 2 threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_MOE = ["model=glm_small"]  # granularity 2: experts of 352, 2 x 352 = glm_small's FFN 704
REF = ["+experiment=dense", "model=glm_small", "model.seq_length=256"]
CASES: dict[str, dict] = {
    "tiny/dense": {"overrides": ["+experiment=dense"]},
    "tiny/moe_8e": {"overrides": ["+experiment=moe_8e"]},
    "tiny/moe_64e": {"overrides": ["+experiment=moe_64e"]},
    "small/dense": {"overrides": ["+experiment=dense", "model=glm_small"]},
    "small/moe_8e": {"overrides": ["+experiment=moe_8e", *SMALL_MOE]},
    "small/moe_64e": {"overrides": ["+experiment=moe_64e", *SMALL_MOE]},
    "ref/glm_h256": {"overrides": REF},
    "ref/gpt_h256": {"overrides": REF, "reference": "gpt"},
    "ref/glm_h512": {"overrides": [*REF, "model.hidden_size=512", "model.num_attention_heads=8"]},
    "ref/gpt_h512": {"overrides": [*REF, "model.hidden_size=512", "model.num_attention_heads=8"],
                     "reference": "gpt"},
    "2proc/dp2": {"overrides": ["+experiment=dense", "model=glm_small"], "nproc": 2},
    "2proc/ep2_moe_64e": {"overrides": ["+experiment=moe_64e", *SMALL_MOE, "parallel.ep=2"], "nproc": 2},
    "2proc/tp2": {"overrides": ["+experiment=dense", "model=glm_small", "parallel.tp=2"], "nproc": 2},
    "2proc/pp2": {"overrides": ["+experiment=dense", "model=glm_small", "parallel.pp=2"], "nproc": 2},
    # One GPU, bf16 autocast (--gpu): glm_1b (24 x 2048, s2048) dense and with 8 experts top-2 in
    # every second layer (granularity 2: expert hidden 2752 = half the dense FFN's 5504, the same
    # active size).
    "gpu/dense_1b": {"overrides": ["+experiment=dense", "model=glm_1b"], "gpu": True},
    "gpu/moe_1b_8e": {"overrides": ["+experiment=moe_8e", "model=glm_1b"], "gpu": True},
}
COMMON = ["trainer.micro_batch_size=8", "trainer.global_batch_size=16", "trainer.progress=false",
          "trainer.eval_task_items=0"]
PHASES = ("data", "forward", "backward", "optimizer", "grad_sync", "comm")
# Comparisons printed at the end: (name, numerator case, denominator case, goal or None).
RATIOS = [
    ("GLM / GPTModel tokens/s, h256", "ref/glm_h256", "ref/gpt_h256", 0.9),
    ("GLM / GPTModel tokens/s, h512", "ref/glm_h512", "ref/gpt_h512", 0.9),
    ("MoE 64e / dense tokens/s, glm_small", "small/moe_64e", "small/dense", 0.75),
    ("MoE 8e / dense tokens/s, glm_small", "small/moe_8e", "small/dense", None),
    ("MoE 64e / dense tokens/s, glm_tiny", "tiny/moe_64e", "tiny/dense", 0.75),
    ("DP 2x1 thread / 1 process x 2 threads", "2proc/dp2", "small/dense", 0.85),
    ("EP 2x1 thread / 1 process x 2 threads", "2proc/ep2_moe_64e", "small/moe_64e", None),
    ("TP=2 2x1 thread / 1 process x 2 threads", "2proc/tp2", "small/dense", None),
    ("PP=2 2x1 thread / 1 process x 2 threads", "2proc/pp2", "small/dense", None),
    ("GPU MoE 8e / dense tokens/s, glm_1b bf16", "gpu/moe_1b_8e", "gpu/dense_1b", None),
]
# Dense bf16 tensor-core peak of an H100 / H200 SXM (NVIDIA's spec sheet, without sparsity).
GPU_SPEC_PEAK = 989e12


# ---------------------------------------------------------------------------------- timing
class PhaseTimer:
    """Exclusive wall time per phase: a region's time minus the regions nested in it."""

    def __init__(self, synchronize=lambda: None):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.stack: list[list] = []  # [name, start, nested seconds]
        # On a GPU each boundary waits for the device, so time lands in the phase that queued
        # it (this serialises what would overlap: the split is an upper bound per phase).
        self.synchronize = synchronize

    @contextlib.contextmanager
    def region(self, name: str):
        self.synchronize()
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self.synchronize()
            _, start, nested = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed - nested
            if self.stack:
                self.stack[-1][2] += elapsed

    def inside(self, name: str) -> bool:
        return any(entry[0] == name for entry in self.stack)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)


class _TimedWork:
    """An async collective's handle whose ``wait`` counts as communication."""

    def __init__(self, work, timer: PhaseTimer):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        with self._timer.region("comm"):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


def instrument(trainer, timer: PhaseTimer) -> None:
    """Wrap the loop's parts in timed regions (nothing else changes)."""
    import torch.distributed as dist

    from moe_morpheus.train import step as step_module

    forward_step = step_module._forward_step

    def timed_forward(*args, **kwargs):
        with timer.region("forward"):
            return forward_step(*args, **kwargs)

    step_module._forward_step = timed_forward
    config = trainer.model[0].config
    finalize = config.finalize_model_grads_func

    def timed_finalize(*args, **kwargs):
        with timer.region("grad_sync"):
            return finalize(*args, **kwargs)

    config.finalize_model_grads_func = timed_finalize
    optimizer_step = trainer.optimizer.step

    def timed_optimizer():
        with timer.region("optimizer"):
            return optimizer_step()

    trainer.optimizer.step = timed_optimizer

    def wrap(fn):
        def timed(*args, **kwargs):
            if timer.inside("grad_sync"):  # counted whole as gradient sync
                return fn(*args, **kwargs)
            with timer.region("comm"):
                work = fn(*args, **kwargs)
            return _TimedWork(work, timer) if work is not None and hasattr(work, "wait") else work
        return timed

    for name in ("all_reduce", "all_to_all_single", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "broadcast", "send", "recv", "isend", "irecv", "barrier"):
        setattr(dist, name, wrap(getattr(dist, name)))


def matmul_peak(gpu: bool = False, reps: int = 8) -> float:
    """Best FLOP/s of a square matmul: 2048^3 fp32 on the CPU (this process's threads), 8192^3
    bf16 on the GPU."""
    import torch

    size, kind = (8192, dict(device="cuda", dtype=torch.bfloat16)) if gpu else (2048, {})
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    a, b = torch.randn(size, size, **kind), torch.randn(size, size, **kind)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------- GPTModel
def gpt_reference(model_cfg, parallel, seed: int):
    """Megatron-Core's GPTModel of ``model_cfg``'s size, called like the GLM (same batches, same
    loss convention), for the same loop. Local layer spec (no Transformer Engine): GeGLU with
    biases, pre-LN, RoPE, tied embeddings, causal mask."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from moe_morpheus.model.glm import megatron_config

    base = megatron_config(model_cfg, parallel, torch.float32)
    config = TransformerConfig(
        num_layers=base.num_layers, hidden_size=base.hidden_size, num_attention_heads=base.num_attention_heads,
        ffn_hidden_size=base.ffn_hidden_size, gated_linear_unit=True, activation_func=F.gelu,
        add_bias_linear=True, use_cpu_initialization=True, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, calculate_per_token_loss=True,
        gradient_accumulation_fusion=False, apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True, bias_dropout_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False)
    torch.manual_seed(seed)

    class GPT(GPTModel):
        def forward(self, tokens, position_ids, block_position_ids, segment_ids, prefix_mask, targets=None,
                    gmask=None):
            # GPTModel's causal mask is built by its softmax when none is given.
            return super().forward(tokens, position_ids, None, labels=targets)

    return GPT(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
               vocab_size=model_cfg.padded_vocab_size, max_sequence_length=model_cfg.seq_length,
               position_embedding_type="rope", share_embeddings_and_output_weights=True)


def use_reference(trainer) -> None:
    """Swap the trainer's GLM for Megatron-Core's GPTModel (same DDP, optimizer, guards)."""
    from moe_morpheus.train.step import wrap_ddp

    exp = trainer.exp
    trainer.model = wrap_ddp([gpt_reference(exp.model, exp.parallel, exp.trainer.seed)])
    trainer.setup_optimizer()


# ---------------------------------------------------------------------------------- one case
def run_case(name: str, steps: int, out: Path) -> None:
    """Runs inside the case's process (each rank of a 2-process case)."""
    import psutil
    import torch
    import torch.distributed as dist

    from moe_morpheus.config.experiment import compose_experiment
    from moe_morpheus.data import batch_iterator
    from moe_morpheus.planning.budget import flops_per_token
    from moe_morpheus.train.trainer import Trainer

    case = CASES[name]
    nproc, gpu = case.get("nproc", 1), case.get("gpu", False)
    threads = 1 if nproc > 1 else 2
    device = ["trainer.precision=bf16", "trainer.micro_batch_size=2", "trainer.global_batch_size=8"] if gpu else \
        [f"trainer.threads={threads}"]
    exp = compose_experiment([*case["overrides"], *COMMON, *device])
    rss_before = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(exp, Path(tmp))
        trainer.setup()
        if case.get("reference") == "gpt":
            use_reference(trainer)
        timer = PhaseTimer(torch.cuda.synchronize if gpu else lambda: None)
        instrument(trainer, timer)
        t = exp.trainer
        batches = batch_iterator(trainer.data.train, global_batch_size=t.global_batch_size,
                                 micro_batch_size=t.micro_batch_size, dp_rank=trainer.dp_rank, dp_size=trainer.dp)
        warmup = 2
        losses = []
        for step in range(warmup + steps):
            if step == warmup:
                dist.barrier()  # before the reset: waiting for the peer here is not a step's communication
                timer.reset()
                start = time.perf_counter()
            with timer.region("data"):
                micro = [next(batches) for _ in range(trainer.num_microbatches)]
            with timer.region("backward"):  # what forward_backward spends outside forward and grad sync
                loss = trainer.train_step(step, micro).loss
            losses.append(loss)
        seconds = time.perf_counter() - start
    tokens = steps * trainer.tokens_per_step
    moe = exp.moe_or_none
    result = {
        "case": name, "nproc": nproc, "threads": threads, "layout": f"{exp.layout}-dp{trainer.dp}",
        "tokens_per_step": trainer.tokens_per_step, "steps": steps, "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "model_flops_per_s": tokens / seconds * flops_per_token(exp.model, exp.model.seq_length, moe),
        "phase_fraction": {k: v / seconds for k, v in timer.seconds.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
        "rss_before_mb": rss_before / 2**20, "loss_first": losses[0], "loss_last": losses[-1],
    }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))


def launch(name: str, steps: int) -> dict:
    nproc = CASES[name].get("nproc", 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--case", name, "--steps", str(steps), "--out", str(out)]
        if nproc > 1:
            from moe_morpheus.parallel import free_port

            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                       f"--master_port={free_port()}", *script]
        else:
            command = [sys.executable, *script]
        # The checkout this script is in, whatever the installed package points at (a second
        # worktree benchmarks another commit).
        env = {**os.environ, "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if not CASES[name].get("gpu"):
            env["OMP_NUM_THREADS"] = "1" if nproc > 1 else "2"
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"case {name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(results: dict[str, dict], peak: float, gpu: bool = False) -> str:
    what = "bf16 matmul peak (8192^3)" if gpu else "fp32 matmul peak (2048^3, 2 threads)"
    lines = [f"{what}, best of the run: {peak / 1e9:.1f} GFLOP/s", "",
             "| case | procs x threads | layout | tokens/s | model GFLOP/s | MFU | "
             + " | ".join(PHASES) + " | peak RSS MB (+ over start) |",
             "| --- | --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in PHASES) + " | ---: |"]
    for name, r in results.items():
        phases = " | ".join(f"{100 * r['phase_fraction'][k]:.0f}%" for k in PHASES)
        lines.append(
            f"| {name} | {r['nproc']} x {r['threads']} | {r['layout']} | {r['tokens_per_s']:,.0f} | "
            f"{r['model_flops_per_s'] / 1e9:.1f} | {r['model_flops_per_s'] / peak:.0%} | {phases} | "
            f"{r['peak_rss_mb']:,.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:,.0f}) |")
        if r.get("peak_gpu_mb") is not None:
            lines[-1] += (f" MFU against the {GPU_SPEC_PEAK / 1e12:.0f} TFLOP/s spec: "
                          f"{r['model_flops_per_s'] / GPU_SPEC_PEAK:.1%}; peak GPU memory {r['peak_gpu_mb']:,.0f} MB")
    lines += ["", "| comparison | ratio | goal |", "| --- | ---: | ---: |"]
    for label, num, den, goal in RATIOS:
        if num in results and den in results:
            ratio = results[num]["tokens_per_s"] / results[den]["tokens_per_s"]
            verdict = "" if goal is None else f">= {goal} ({'met' if ratio >= goal else 'NOT met'})"
            lines.append(f"| {label} | {ratio:.2f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", choices=list(CASES), metavar="CASE",
                        help="default: every CPU case, or every GPU case with --gpu")
    parser.add_argument("--gpu", action="store_true", help="the one-GPU bf16 cases (needs CUDA)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and round (after 2 warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/train_step[_gpu].json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.steps, args.out)
        return

    import torch
    from tqdm import tqdm

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    args.cases = args.cases or [name for name, case in CASES.items() if case.get("gpu", False) == args.gpu]
    torch.set_num_threads(2)
    best: dict[str, dict] = {}
    peaks = [matmul_peak(args.gpu)]
    with tqdm(total=args.rounds * len(args.cases), desc="cases", unit="case") as progress:
        for _ in range(args.rounds):
            for name in args.cases:
                progress.set_postfix_str(name)
                result = launch(name, args.steps)
                if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = result
                progress.update(1)
            peaks.append(matmul_peak(args.gpu))
    peak = max(peaks)
    report = table({name: best[name] for name in args.cases}, peak, args.gpu)
    print(report)
    args.json = args.json or REPO / "benchmarks" / "results" / f"train_step{'_gpu' if args.gpu else ''}.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"matmul_peak_flops": peak, "peaks": peaks, "torch": torch.__version__,
                                     "cases": best}, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
