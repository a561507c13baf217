"""Memory planner: bytes per GPU of a parallel layout, and the layouts that fit a GPU.

``python -m moe_morpheus.planning.plan +experiment=NAME model=PRESET parallel.tp=.. parallel.pp=..
parallel.ep=.. [trainer.recompute=..] [trainer.zero1=..] [plan.gpus=N] [plan.gpu_memory_gb=80]``
prints the breakdown of the given layout on the given number of GPUs (default: tp * pp, dp = 1)
and then the layouts of ``plan.gpus`` GPUs that fit ``plan.gpu_memory_gb``.

What is counted, per GPU, on the most loaded pipeline stage (the first: it holds ``pp``
micro-batches in flight under 1F1B, Korthikanti et al. 2022 sec. 4.2.3; the last stage holds one,
plus the logits; both are computed and the larger is reported):

- parameters: the exact inventory of :mod:`moe_morpheus.planning.budget` split by TP (column/row
  parallel matrices and their biases / tp; LayerNorms, row-parallel biases and the router
  replicated) and EP (experts / ep, never TP-split: expert_tensor_parallel_size = 1); the first
  stage holds the embedding V h / tp, the last (PP > 1) its tied copy. 4 bytes: parameters stay
  fp32, bf16 runs through autocast, whose cast cache keeps a bf16 copy of every weight for the
  step: 2 more bytes per parameter when ``precision`` is bf16 (auto on a GPU);
- gradients: Megatron-Core DDP's fp32 ``main_grad`` buffers, 4 bytes per parameter;
- optimizer: AdamW m and v in fp32, 8 bytes per parameter; ZeRO-1 divides the dense share by dp
  and the expert share by the expert-data-parallel size dp * tp / ep (no fp32 master copy: the
  parameters are fp32 already). ZeRO-1's all-gather after the step needs a transient send +
  receive buffer of 4 (1 + 1/n) bytes per sharded parameter (train/zero.py), while activations
  are freed: the peak is the larger of the two phases;
- activations of one micro-batch, derived tensor by tensor from what autograd saves in this
  implementation (Korthikanti et al. 2022, eq. 1-2, adapted; T = s b tokens, t = tp, a heads,
  d = h / a head dim, F the GeGLU width, c bytes of the compute dtype (2 bf16, 4 fp32), r = 4 bytes
  of the residual stream and LayerNorm outputs (fp32 under autocast), Z = b (a / t) s^2):

  ``per layer = 4 T' h r + 16 T' + 6 T h c / t + 4 T d c + core + FFN``

  4 T' h r: each sub-layer's LayerNorm input and output (the output saved by QKV or the FFN; the
  same four in pre-LN and GLM-130B's post-LN); 16 T': LayerNorm mean and rstd; T' = T / t under
  sequence parallelism, else T (Korthikanti's 10 s b h of the non-TP region); 6 T h c / t: QKV
  output (3), scaled q and rotated k (2), context (1); 4 T d c: RoPE's cos and sin for q and k,
  per token; core = 4 Z (fp32 softmax output, GLM's fp32 softmax) + 2 Z for its bf16 copy, or
  with attention dropout m Z (mask) + c Z (dropped probabilities), m = 1 byte on CUDA (bool
  mask), c on the CPU (its kernel keeps the scaled noise); dense FFN = 4 T F c / t (value,
  gate, GeLU output, product); MoE FFN, rows = T k cf / t routed (cf = capacity factor, 1 when
  dropless: balanced routing assumed) = rows (2 Fe c + 2 h c + 16) (the experts keep their
  value and pre-activation and recompute the GeLU, moe/experts.py; the expert input and the
  weighted output; two int64 index vectors) + 12 T E / t (router logits,
  probabilities, their top-k in fp32); hidden dropout adds 2 T' h m bytes of masks. Per
  micro-batch once: the attention mask b s^2 (bool); on the last stage the final LayerNorm's
  input and output 2 T' h r and the fp32 logits kept by the vocab-parallel cross entropy
  4 T V / t (plus c T V / t transient while they are cast);
- recomputation: selective drops ``core`` (one layer's ``core`` comes back transiently in
  backward); full keeps T' h r per layer (its input) and one layer's full activations transiently.

The check (tests/test_plan.py): on this CPU (fp32, c = r = 4) the predicted activations of
tiny configurations are within 15% of :class:`SavedActivations` (what autograd keeps, measured)
and the parameter, gradient and optimizer bytes equal the tensors the trainer allocates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.config.cli import fail, option, parse_options

GB = 1e9
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int = 1
    recompute: str = "none"
    zero1: bool = False
    sequence_parallel: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        return (f"tp{self.tp}{sp} pp{self.pp} ep{self.ep} dp{self.dp} recompute={self.recompute} "
                f"zero1={'on' if self.zero1 else 'off'}")


@dataclass(frozen=True)
class Workload:
    """What the memory depends on besides the model and the layout."""

    micro_batch: int
    global_batch: int
    bf16: bool  # bf16 autocast (GPU): c = 2 and the autocast weight cache
    # Dropout masks: CUDA's fused dropout keeps a bool mask (1 byte), the CPU kernel a
    # scaled-noise tensor of the input's dtype (c bytes; measured).
    gpu: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU on the most loaded pipeline stage."""

    layout: Layout
    stage: str  # "first" or "last"
    params: int  # parameter count on that GPU
    param_bytes: float
    autocast_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float  # one micro-batch
    in_flight: int  # micro-batches whose activations are held at once
    transient_bytes: float  # recompute / logits cast, on top of the held activations
    zero_gather_bytes: float

    @property
    def static_bytes(self) -> float:
        return self.param_bytes + self.autocast_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> float:
        training = self.activation_bytes * self.in_flight + self.transient_bytes
        return self.static_bytes + max(training, self.zero_gather_bytes)


class SavedActivations:
    """Measures activation memory: the bytes of the distinct tensor storages autograd keeps for
    backward while this context is open (``torch.autograd.graph.saved_tensors_hooks``: every
    tensor an op or a custom Function saves passes the pack hook), parameters left out.

    This is what activation memory *is* (Korthikanti et al. 2022 count the same thing), and it is
    exact on any device: RSS or tracemalloc would see the allocator's caching and torch's
    C++ allocations not at all or only in pages. Views of one tensor count once (by storage).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def _moe_layer(moe: MoEConfig | None, index: int) -> bool:
    return moe is not None and moe.enabled and moe.is_moe_layer(index)


def stage_layers(model: ModelConfig, pp: int, stage: int) -> range:
    per = model.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def stage_params(model: ModelConfig, moe: MoEConfig | None, layout: Layout, stage: int) -> tuple[int, int]:
    """(dense, expert) parameters on one GPU of pipeline stage ``stage`` (inventory of
    :mod:`moe_morpheus.planning.budget`, split as the layers split them)."""
    h, f, v, t = model.hidden_size, model.ffn_hidden, model.padded_vocab_size, layout.tp
    # QKV (3h^2 + 3h) and the output matrix h^2 column/row-split; output bias and 2 LayerNorms replicated.
    attention = (4 * h * h + 3 * h) // t + h + 4 * h
    dense_ffn = (3 * h * f + 2 * f) // t + h  # value, gate (+ biases) split; fc2 bias replicated
    dense = expert = 0
    for i in stage_layers(model, layout.pp, stage):
        dense += attention
        if _moe_layer(moe, i):
            fe = moe.expert_hidden(model)
            dense += moe.num_experts * h + moe.num_experts  # router, replicated
            expert += moe.num_experts // layout.ep * (3 * h * fe + 2 * fe + h)
        else:
            dense += dense_ffn
    if stage == 0:
        dense += v * h // t
    if stage == layout.pp - 1:
        dense += 2 * h + (v * h // t if layout.pp > 1 else 0)
    return dense, expert


def layer_activation_bytes(model: ModelConfig, moe: MoEConfig | None, layout: Layout, micro_batch: int,
                           c: int, index: int, part: str = "all", mask: int = 1) -> float:
    """Bytes one layer keeps for backward per micro-batch without recomputation (module
    docstring); ``part="core"``: only the core attention share."""
    s, b, h, a, t = model.seq_length, micro_batch, model.hidden_size, model.num_attention_heads, layout.tp
    r, tokens = 4, s * b
    seq_tokens = tokens // t if layout.sequence_parallel else tokens
    z = b * (a / t) * s * s
    core = 4 * z + ((mask + c) * z if model.attention_dropout > 0 else (2 * z if c == 2 else 0))
    if part == "core":
        return core
    total = 4 * seq_tokens * h * r + 16 * seq_tokens + 6 * tokens * h * c / t + 4 * tokens * (h // a) * c + core
    if model.hidden_dropout > 0:
        total += 2 * seq_tokens * h * mask
    if _moe_layer(moe, index):
        fe = moe.expert_hidden(model)
        rows = tokens * moe.top_k * (moe.capacity_factor or 1.0) / t
        total += rows * (2 * fe * c + 2 * h * c + 16) + 12 * tokens * moe.num_experts / t
    else:
        total += 4 * tokens * model.ffn_hidden * c / t
    return total


def stage_activation_bytes(model: ModelConfig, moe: MoEConfig | None, layout: Layout, micro_batch: int,
                           c: int, stage: int, mask: int = 1) -> tuple[float, float]:
    """(held per micro-batch, transient in backward) bytes of one pipeline stage's GPU."""
    s, b, h, t = model.seq_length, micro_batch, model.hidden_size, layout.tp
    tokens = s * b
    seq_tokens = tokens // t if layout.sequence_parallel else tokens
    layers = stage_layers(model, layout.pp, stage)
    full = [layer_activation_bytes(model, moe, layout, micro_batch, c, i, mask=mask) for i in layers]
    core = [layer_activation_bytes(model, moe, layout, micro_batch, c, i, "core", mask) for i in layers]
    if layout.recompute == "full":
        held, transient = len(layers) * seq_tokens * h * 4, max(full)
    elif layout.recompute == "selective":
        held, transient = sum(full) - sum(core), max(core)
    else:
        held, transient = sum(full), 0.0
    held += b * s * s  # the attention mask (bool), shared by the layers
    if stage == layout.pp - 1:
        logits = tokens * model.padded_vocab_size / t
        held += 2 * seq_tokens * h * 4 + 4 * logits
        transient += c * logits
    return held, transient


def plan_memory(model: ModelConfig, moe: MoEConfig | None, layout: Layout, work: Workload) -> MemoryPlan:
    """The most loaded stage's :class:`MemoryPlan` (the larger peak of the first and last)."""
    c = 2 if work.bf16 else 4
    microbatches = work.global_batch // (work.micro_batch * layout.dp)
    edp = layout.dp * layout.tp // layout.ep
    plans = []
    for stage in sorted({0, layout.pp - 1}):
        dense, expert = stage_params(model, moe, layout, stage)
        params = dense + expert
        sharded = dense / layout.dp + expert / edp if layout.zero1 else params
        groups = [(dense, layout.dp), (expert, edp)]
        gather = sum(4 * n * (1 + 1 / size) for n, size in groups if size > 1) if layout.zero1 else 0.0
        held, transient = stage_activation_bytes(model, moe, layout, work.micro_batch, c, stage,
                                                 mask=1 if work.gpu else c)
        plans.append(MemoryPlan(
            layout=layout, stage="first" if stage == 0 else "last", params=params, param_bytes=4 * params,
            autocast_bytes=2 * params if work.bf16 else 0, grad_bytes=4 * params, optimizer_bytes=8 * sharded,
            activation_bytes=held, in_flight=min(layout.pp - stage, microbatches), transient_bytes=transient,
            zero_gather_bytes=gather))
    return max(plans, key=lambda p: p.peak_bytes)


def layout_problems(model: ModelConfig, moe: MoEConfig | None, layout: Layout, work: Workload) -> list[str]:
    """Why a layout cannot run this model (empty: it can), in the config's own words."""
    problems = []
    parallel = ParallelConfig(tp=layout.tp, pp=layout.pp, ep=layout.ep)
    try:
        parallel.validate_model(model)
    except ConfigError as error:
        problems.append(str(error))
    if layout.sequence_parallel and model.seq_length % layout.tp:
        problems.append(f"model.seq_length={model.seq_length} is not divisible by tp={layout.tp} (sequence parallelism)")
    if (layout.dp * layout.tp) % layout.ep:
        problems.append(f"parallel.ep={layout.ep} must divide dp x tp = {layout.dp} x {layout.tp}")
    if moe is not None and moe.enabled and moe.num_experts % layout.ep:
        problems.append(f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={layout.ep}")
    if (moe is None or not moe.enabled) and layout.ep > 1:
        problems.append(f"parallel.ep={layout.ep} needs MoE layers")
    if work.global_batch % (work.micro_batch * layout.dp):
        problems.append(f"trainer.global_batch_size={work.global_batch} is not a multiple of micro_batch_size x dp "
                        f"= {work.micro_batch} x {layout.dp}")
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fitting_layouts(model: ModelConfig, moe: MoEConfig | None, gpus: int, memory_gb: float, work: Workload,
                    max_tp: int = 8) -> list[MemoryPlan]:
    """Every layout of ``gpus`` GPUs (tp <= ``max_tp``: one node's NVLink; sequence parallel on
    whenever tp > 1, it only saves memory) that runs the model within ``memory_gb``, cheapest
    first: no recomputation before selective before full, then least model parallelism
    (tp * pp), then ZeRO-1 off, then the lowest peak."""
    fits = []
    experts = moe.num_experts if moe is not None and moe.enabled else 1
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            if tp > max_tp:
                continue
            dp = gpus // (tp * pp)
            for ep in [e for e in _divisors(dp * tp) if experts % e == 0]:
                for recompute in RECOMPUTE_MODES:
                    for zero1 in (False, True):
                        layout = Layout(tp, pp, dp, ep, recompute, zero1, sequence_parallel=tp > 1)
                        if layout_problems(model, moe, layout, work):
                            continue
                        plan = plan_memory(model, moe, layout, work)
                        if plan.peak_bytes <= memory_gb * GB:
                            fits.append(plan)
    rank = {mode: i for i, mode in enumerate(RECOMPUTE_MODES)}
    return sorted(fits, key=lambda p: (rank[p.layout.recompute], p.layout.tp * p.layout.pp, p.layout.zero1,
                                       p.peak_bytes))


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def format_plan(plan: MemoryPlan) -> str:
    held = plan.activation_bytes * plan.in_flight
    rows = [
        ("parameters (fp32)", plan.param_bytes),
        ("autocast bf16 weight cache", plan.autocast_bytes),
        ("gradients (fp32 main_grad)", plan.grad_bytes),
        ("optimizer (AdamW m, v fp32)" + (", ZeRO-1" if plan.layout.zero1 else ""), plan.optimizer_bytes),
        (f"activations: {plan.in_flight} micro-batch(es) x {_gb(plan.activation_bytes)} GB", held),
        ("transient (recompute, logits cast)", plan.transient_bytes),
        ("ZeRO-1 all-gather buffers (after backward)", plan.zero_gather_bytes),
    ]
    lines = [f"{plan.layout.describe()}: {plan.params / 1e9:.2f}B parameters on this GPU ({plan.stage} "
             f"pipeline stage)"]
    lines += [f"  {name:<48} {_gb(value):>8} GB" for name, value in rows]
    lines.append(f"  {'peak':<48} {_gb(plan.peak_bytes):>8} GB")
    return "\n".join(lines)


def activation_table(model: ModelConfig, moe: MoEConfig | None, layout: Layout, work: Workload) -> str:
    """Activations per micro-batch on the first stage, for each recomputation mode."""
    cells = []
    c = 2 if work.bf16 else 4
    for mode in RECOMPUTE_MODES:
        held, transient = stage_activation_bytes(model, moe, replace(layout, recompute=mode), work.micro_batch, c, 0,
                                                 mask=1 if work.gpu else c)
        cells.append(f"{mode} {_gb(held)} GB (+{_gb(transient)} transient)")
    return "activations per micro-batch, first stage: " + "; ".join(cells)


@dataclass
class PlanOptions:
    gpus: int | None = option(None, help="GPUs of the layout; null: tp x pp (dp = 1)")
    gpu_memory_gb: float | None = option(None, help="GB per GPU: check the layout against it, list the layouts that fit")
    top: int = option(8, help="fitting layouts listed")


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.planning.plan`` (module docstring)."""
    from moe_morpheus.config.experiment import compose_experiment
    from moe_morpheus.planning.budget import demo_batch_warning

    try:
        options, overrides = parse_options(PlanOptions, sys.argv[1:] if argv is None else argv,
                                           prog="moe_morpheus.planning.plan", summary=__doc__.split("\n\n")[1],
                                           prefix="plan")
        exp = compose_experiment(overrides)
    except ConfigError as error:
        # Any configuration error: an unknown key, a bad value, or a layout that does not divide the model.
        return fail(error)
    model, moe, p, trainer = exp.model, exp.moe_or_none, exp.parallel, exp.trainer
    gpus = options.gpus or p.tp * p.pp
    work = Workload(micro_batch=trainer.micro_batch_size, global_batch=trainer.global_batch_size,
                    bf16=trainer.precision in ("auto", "bf16"))
    if gpus % (p.tp * p.pp):
        print(f"plan.gpus={gpus} is not a multiple of tp x pp = {p.tp * p.pp}", file=sys.stderr)
        return 1
    layout = Layout(p.tp, p.pp, gpus // (p.tp * p.pp), p.ep, trainer.recompute, trainer.zero1, p.sequence_parallel)
    print(f"{exp.name}: {model.num_layers} layers, hidden {model.hidden_size}, {gpus} GPUs, micro-batch "
          f"{work.micro_batch} x {model.seq_length} tokens, global batch {work.global_batch}, "
          f"{'bf16 autocast' if work.bf16 else 'fp32'}")
    warning = demo_batch_warning(model, moe, work.global_batch)
    if warning:
        print(warning, file=sys.stderr)
    problems = layout_problems(model, moe, layout, work)
    if problems:
        print("this layout cannot run: " + "; ".join(problems), file=sys.stderr)
        return 1
    plan = plan_memory(model, moe, layout, work)
    print(format_plan(plan))
    print(activation_table(model, moe, layout, work))
    status = 0
    if options.gpu_memory_gb is not None:
        limit = options.gpu_memory_gb
        if plan.peak_bytes > limit * GB:
            print(f"does NOT fit {limit:g} GB: needs {_gb(plan.peak_bytes)} GB")
            status = 1
        fits = fitting_layouts(model, moe, gpus, limit, work)
        print(f"\nlayouts of {gpus} GPUs that fit {limit:g} GB: {len(fits)}" + (", the cheapest:" if fits else ""))
        for fit in fits[: options.top]:
            print(f"  {fit.layout.describe():<62} peak {_gb(fit.peak_bytes):>6} GB")
        if not fits:
            print("  none: the model states alone (16-18 bytes per parameter over the GPUs) or the "
                  "activations exceed the memory; add GPUs")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
