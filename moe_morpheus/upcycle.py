"""Dense -> MoE conversion ("sparse upcycling", reference/scaling.md sec. 5).

Two ways in:

- ``python -m moe_morpheus.upcycle SOURCE OUTPUT_DIR [overrides]``: the overrides compose the
  target experiment as ``train.py`` would (``+experiment=upcycle_64e upcycle.mode=copy ...``);
  writes ``OUTPUT_DIR/step_00000000``, a checkpoint that ``train.py ... checkpoint.resume=PATH``
  trains from. Under ``torchrun`` it converts in the target's parallel layout.
- ``python train.py +experiment=upcycle_64e init.from_dense=SOURCE``: the trainer converts into
  its freshly built model and trains on, in one go (a restarted run resumes from its own
  checkpoints and does not convert again).

``SOURCE`` is a dense ``step_*`` checkpoint folder or a checkpoints folder (its newest valid
checkpoint is taken). The conversion works on whole tensors by layout-independent name: the
dense checkpoint is loaded into a dense model in *this* run's layout (``dist_checkpointing``
reshards whatever layout it was written in), gathered whole (:func:`gather_full`), transformed,
and sliced into the target model's TP / EP shards. Every rank holds the whole model once during
the conversion (fine for research scale; a 30B conversion would want it per layer).

Modes (``upcycle.mode``); experts ``e = j * g + s`` form E / g groups ``j`` of g shards ``s``:

- ``copy`` (Komatsuzaki et al. 2022): g = 1, every expert the dense FFN. With top-k-then-softmax
  routing the k scores sum to 1, so the layer output is the dense output for any router.
- ``virtual_group`` (He et al. 2024): granularity g = dense FFN / expert width (``moe.granularity``,
  or derived from an absolute ``moe.expert_hidden_size``);
  shard s of the FFN's hidden units (``value`` and ``gelu`` rows split separately, so each
  expert keeps matching halves: Megatron-Core's ``upcycling_utils.py`` splits a fused GLU weight
  contiguously, which pairs value units with other units' gates for non-SiLU activations) goes
  to every group; router rows are tied within a group, so with top-k a multiple of g the top-k
  takes whole groups; the scores are renormalised (top-k then softmax), each chosen expert
  weighs 1 / g of its group's share, and fc2 alone is scaled by g: the output is the dense
  FFN's exactly (fc2 bias kept whole: the weights over the chosen experts sum to 1).
- ``he_scaling``: virtual-group shards with He et al.'s weight scaling instead: value, gelu and
  fc2 weights (and the value / gelu biases, which scale with their pre-activations) times
  s^(1/3), s = E g / k when routing is softmax-then-top-k (scores unnormalised, ~1/E each),
  else g (Megatron-Core's rule). GeLU is not homogeneous (gelu(a z) != a gelu(z)), so this is
  not function-preserving; the trainer logs the validation loss at step 0 to show by how much.
- ``drop`` (Drop-Upcycling, Nakamura et al. 2025): the shards of ``copy`` / ``virtual_group``,
  then in each expert a random ``round(drop_fraction * F_e)`` of its hidden units re-initialised:
  value and gelu rows and fc2 columns drawn from a normal with that slice's mean and std, the
  units' value / gelu biases zeroed. Independent units per expert, so copies diverge at once.

Router (``upcycle.router_init``): ``tied`` draws one normal(0, router_std) row per group and
repeats it over the group's g experts (Megatron's ``upcycling_utils``); ``untied`` draws every
row; bias zero. ``virtual_group`` needs ``tied`` (untied rows would pick shards of different
groups, some shard twice); for g = 1 the two are the same.

Which layers become MoE: the target's ``moe.layer_freq``; dense layers and everything outside
the FFNs are copied. **Optimizer state is not carried over**: the new run starts AdamW from
zero with a fresh warmup and schedule (He et al.: resetting to the peak LR works best); for a
MoE layer the dense moments would not fit the experts anyway. The data position is carried
(the new run reads the samples after the dense run's), and so is the lineage: the dense run,
checkpoint, tokens and FLOPs (sunk compute, logged as ``sunk.*``). A dense target (``moe``
disabled) is "dense continued": a copy with the same reset, for the upcycle-vs-scratch sweep.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig

MODES = ("copy", "virtual_group", "he_scaling", "drop")
ROUTER_INITS = ("tied", "untied")
_FFN = ("value.weight", "value.bias", "gelu.weight", "gelu.bias", "fc2.weight", "fc2.bias")


class UpcycleError(ConfigError):
    """A source or target that cannot be upcycled; the message names the field or the path."""


@dataclass
class UpcycleConfig:
    """How a dense FFN becomes a MoE layer (module docstring)."""

    mode: str = "virtual_group"
    drop_fraction: float = 0.5  # Nakamura et al.'s best r
    router_init: str = "tied"
    # None: model.init_std.
    router_std: float | None = None
    # Seed of the router rows and Drop-Upcycling's draws. None: the run's trainer.seed (resolved
    # by ExperimentConfig.seeds); set it to pin the conversion across seeds.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UpcycleError(f"upcycle.mode={self.mode!r}: choose one of {MODES}")
        if self.router_init not in ROUTER_INITS:
            raise UpcycleError(f"upcycle.router_init={self.router_init!r}: choose one of {ROUTER_INITS}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise UpcycleError(f"upcycle.drop_fraction={self.drop_fraction} must be in [0, 1]")
        if self.router_std is not None and self.router_std <= 0:
            raise UpcycleError(f"upcycle.router_std={self.router_std} must be positive (or null)")


@dataclass
class InitConfig:
    """Where a run's weights come from: None = random init (or its own checkpoints)."""

    # A dense checkpoint (step_* folder or checkpoints folder) converted per ``upcycle``.
    from_dense: str | None = None


def divisors_near(n: int, target: float, count: int = 3) -> list[int]:
    """The ``count`` divisors of ``n`` closest to ``target``, ascending (granularities to suggest)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: abs(d - target))[:count])


def granularity(model: ModelConfig, moe: MoEConfig, cfg: UpcycleConfig) -> int:
    """g = dense FFN / expert width (the target's ``moe.expert_hidden``), checked against the FFN
    size, the experts and the routing; raises UpcycleError."""
    ffn = model.ffn_hidden_size
    expert = moe.expert_hidden(model)
    if ffn % expert:
        raise UpcycleError(f"moe.expert_hidden_size={expert} does not divide model.ffn_hidden_size={ffn}: each "
                           f"expert takes ffn / g of the dense FFN's hidden units; set moe.expert_hidden_size=null "
                           f"and moe.granularity to one of {divisors_near(ffn, ffn / expert)} instead")
    g = ffn // expert
    if moe.num_experts % g:
        raise UpcycleError(f"moe.num_experts={moe.num_experts} is not divisible by the granularity {g}: "
                           f"every group holds one copy of each of the g shards")
    if cfg.mode == "copy" and g != 1:
        raise UpcycleError(f"upcycle.mode=copy makes every expert the whole dense FFN (granularity 1) but "
                           f"the experts are {expert} wide (granularity {g}): use mode=virtual_group or "
                           f"moe.granularity=1")
    if cfg.mode in ("copy", "virtual_group"):
        if moe.softmax_before_topk:
            raise UpcycleError(f"upcycle.mode={cfg.mode} is function-preserving only with renormalised top-k "
                               f"scores; moe.softmax_before_topk=true leaves them summing to < 1: set it false "
                               f"(or use mode=he_scaling)")
        if moe.capacity_factor is not None:
            raise UpcycleError(f"upcycle.mode={cfg.mode} is function-preserving only without dropped tokens: "
                               f"set moe.capacity_factor=null (dropless)")
        if moe.top_k % g:
            raise UpcycleError(f"moe.top_k={moe.top_k} is not a multiple of the granularity {g}: the top-k must "
                               f"take whole groups (one copy of every shard) to reproduce the dense FFN")
    if g > 1 and cfg.router_init != "tied" and cfg.mode == "virtual_group":
        raise UpcycleError("upcycle.mode=virtual_group needs upcycle.router_init=tied: untied rows would route "
                           "to shards of different groups")
    if moe.gate not in ("naive", "switch") and cfg.mode in ("copy", "virtual_group"):
        # Noisy / GShard / FasterMoE gates perturb or redistribute the top-k in training.
        raise UpcycleError(f"upcycle.mode={cfg.mode} is function-preserving with moe.gate=naive; "
                           f"moe.gate={moe.gate} perturbs the routing")
    return g


def _generator(seed: int, layer: int) -> torch.Generator:
    # One stream per layer: the result does not depend on which layers are converted first.
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def upcycle_ffn(dense: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig, cfg: UpcycleConfig,
                layer: int) -> dict[str, torch.Tensor]:
    """One MoE layer's tensors (names under ``moe.``) from one dense FFN's (names ``value.weight``...)."""
    if cfg.seed is None:
        raise UpcycleError("upcycle.seed is None (it follows trainer.seed): pass ExperimentConfig.upcycle_config(), "
                           "which resolves it, or set upcycle.seed")
    g = granularity(model, moe, cfg)
    E, ffn = moe.num_experts, model.ffn_hidden_size
    fe = ffn // g
    shard = torch.arange(E) % g  # expert e = j * g + s holds shard s
    rows = (shard[:, None] * fe + torch.arange(fe)[None, :])  # [E, Fe] dense hidden units of each expert
    w_value = dense["value.weight"][rows].clone()  # [E, Fe, D]
    b_value = dense["value.bias"][rows].clone()
    w_gelu = dense["gelu.weight"][rows].clone()
    b_gelu = dense["gelu.bias"][rows].clone()
    w_out = dense["fc2.weight"][:, rows].permute(1, 0, 2).clone()  # [E, D, Fe]
    b_out = dense["fc2.bias"].expand(E, -1).clone()
    if cfg.mode == "he_scaling":
        s = E * g / moe.top_k if moe.softmax_before_topk else float(g)
        a = s ** (1.0 / 3.0)
        for t in (w_value, b_value, w_gelu, b_gelu, w_out):
            t.mul_(a)
    else:
        w_out.mul_(g)
    gen = _generator(cfg.seed, layer)
    # The router first: a drop variant gets the same router as its undropped conversion.
    std = cfg.router_std or model.init_std
    hidden = model.hidden_size
    if cfg.router_init == "tied":
        router = (torch.randn(E // g, hidden, generator=gen) * std).repeat_interleave(g, dim=0)
    else:
        router = torch.randn(E, hidden, generator=gen) * std
    if cfg.mode == "drop":
        n_drop = round(cfg.drop_fraction * fe)
        for e in range(E):
            units = torch.randperm(fe, generator=gen)[:n_drop]
            for w in (w_value[e], w_gelu[e]):
                old = w[units]
                w[units] = torch.randn(old.shape, generator=gen) * old.std() + old.mean()
            old = w_out[e][:, units]
            w_out[e][:, units] = torch.randn(old.shape, generator=gen) * old.std() + old.mean()
            b_value[e, units] = 0.0
            b_gelu[e, units] = 0.0
    dtype = dense["value.weight"].dtype
    return {"moe.gate.gate.weight": router.to(dtype), "moe.gate.gate.bias": torch.zeros(E, dtype=dtype),
            "moe.experts.w_value_EFD": w_value, "moe.experts.b_value_EF": b_value,
            "moe.experts.w_gelu_EFD": w_gelu, "moe.experts.b_gelu_EF": b_gelu,
            "moe.experts.w_out_EDF": w_out, "moe.experts.b_out_ED": b_out}


def upcycle_tensors(dense: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig | None,
                    cfg: UpcycleConfig) -> dict[str, torch.Tensor]:
    """The target model's whole tensors by global name from the dense model's (moe None or
    disabled: a copy, "dense continued")."""
    if moe is None or not moe.enabled:
        return {k: v.clone() for k, v in dense.items()}
    out = {}
    for i in range(model.num_layers):
        prefix = f"layers.{i}.ffn."
        if moe.is_moe_layer(i):
            ffn = {name: dense[prefix + name] for name in _FFN}
            out.update({prefix + k: v for k, v in upcycle_ffn(ffn, model, moe, cfg, i).items()})
    for name, value in dense.items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if not (layer is not None and moe.is_moe_layer(int(layer)) and name.startswith(f"layers.{layer}.ffn.")):
            out[name] = value.clone()
    return out


# ---------------------------------------------------------------------- distributed side
def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if hasattr(chunk, "module") else chunk


def load_whole(chunks, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors by global name into this rank's shards (inverse of gather_full): expert
    tensors sliced along dim 0 over EP, tensor-parallel ones along their partition dim; the
    last stage's output layer (tied) takes the word embedding."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from moe_morpheus.parallel.gather import global_name

    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    ep, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    embedding = next(k for k in tensors if "word_embeddings" in k)
    wanted = set()
    with torch.no_grad():
        for chunk in chunks:
            module = _unwrap(chunk)
            for name, param in module.named_parameters():
                key = embedding if name.startswith("output_layer") else global_name(module, name)
                wanted.add(key)
                if key not in tensors:
                    raise UpcycleError(f"the converted model has no tensor {key!r} for this model's parameter {name}")
                whole = tensors[key]
                if not getattr(param, "allreduce", True) and ep > 1:
                    whole = whole.chunk(ep, dim=0)[ep_rank]
                elif getattr(param, "tensor_model_parallel", False) and tp > 1:
                    whole = whole.chunk(tp, dim=param.partition_dim)[tp_rank]
                if whole.shape != param.shape:
                    raise UpcycleError(f"{key}: converted shard {tuple(whole.shape)} does not fit the parameter "
                                       f"{tuple(param.shape)}")
                param.copy_(whole)


def resolve_source(path: str | Path, *, checksums: bool = True) -> Path:
    """The dense checkpoint folder to read: ``path`` itself (a step_* folder, verified) or the
    newest valid checkpoint inside it. Collective."""
    from moe_morpheus.train.checkpoint import CheckpointError, find_checkpoint

    try:
        return find_checkpoint(path, checksums=checksums)
    except CheckpointError as error:
        raise UpcycleError(f"init.from_dense={path}: {error}") from None


def load_dense(path: Path, model: ModelConfig, parallel) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole tensors and the trainer state of the dense checkpoint at ``path``, read through a
    dense model of this run's layout. Collective; raises UpcycleError for a MoE source or
    another model shape."""
    from moe_morpheus.export import configs_from_manifest
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel.gather import gather_full
    from moe_morpheus.train.checkpoint import load_model_weights, model_shape, read_manifest

    manifest = read_manifest(path)
    source_model, source_moe, _ = configs_from_manifest(manifest)
    if source_moe is not None:
        raise UpcycleError(f"{path} is already a MoE checkpoint (moe.layer_freq={source_moe.layer_freq}, "
                           f"{source_moe.num_experts} experts): upcycling starts from a dense model")
    recorded, expected = manifest.get("model_shape", {}), model_shape(model, None)
    mismatches = [f"{k}: checkpoint {recorded.get(k)!r}, target {v!r}" for k, v in expected.items()
                  if recorded.get(k) != v]
    if mismatches:
        raise UpcycleError(f"dense checkpoint {path} does not match the target model (pass the dense run's "
                           f"model.* settings): " + "; ".join(mismatches))
    chunks = build_model(source_model, None, parallel)
    trainer = load_model_weights(path, chunks)
    return gather_full(chunks, lambda p: p), trainer


def upcycle_into(chunks, exp, source: str | Path):
    """Convert the dense checkpoint ``source`` into this rank's ``chunks`` of ``exp``'s model;
    return the :class:`TrainState` to start from (step 0, the dense data position, lineage).
    Collective."""
    from moe_morpheus.train.checkpoint import TrainState

    path = resolve_source(source, checksums=exp.checkpoint.checksums)
    moe = exp.moe if exp.moe.enabled else None
    if moe is not None:
        granularity(exp.model, moe, exp.upcycle)  # fail before loading anything
    dense, trainer = load_dense(path, exp.model, exp.parallel)
    load_whole(chunks, upcycle_tensors(dense, exp.model, moe, exp.upcycle_config()))
    lineage = {"kind": "upcycled" if moe is not None else "continued", "from_run": trainer.get("run_id"),
               "from_checkpoint": str(path.resolve()), "tokens": int(trainer.get("tokens", 0)),
               "flops": float(trainer.get("flops", 0.0)), "steps": int(trainer.get("step", 0)),
               "mode": exp.upcycle.mode if moe is not None else "continue",
               # None: the dense checkpoint predates target-token counting.
               "target_tokens": trainer.get("target_tokens")}
    return TrainState(consumed_samples=int(trainer.get("consumed_samples", 0)), lineage=lineage, target_tokens=0)


def lineage_tags(lineage: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(MLflow tags, params) of a run started from a dense checkpoint (report/collect.py reads
    ``upcycled_from_run`` and ``sunk.*``)."""
    prefix = "upcycled_from" if lineage["kind"] == "upcycled" else "continued_from"
    tags = {f"{prefix}_checkpoint": lineage["from_checkpoint"], "init_mode": lineage["mode"]}
    if lineage.get("from_run"):
        tags[f"{prefix}_run"] = lineage["from_run"]
    params = {"sunk.tokens": str(lineage["tokens"]), "sunk.flops": str(lineage["flops"]),
              "sunk.steps": str(lineage["steps"])}
    if lineage.get("target_tokens") is not None:
        params["sunk.target_tokens"] = str(lineage["target_tokens"])
    return tags, params


def convert(source: str | Path, output_dir: str | Path, overrides: list[str]) -> Path:
    """``python -m moe_morpheus.upcycle``: write the converted checkpoint ``output_dir/step_00000000``
    (zero AdamW moments, step 0). Collective over the processes torchrun started (or one)."""
    from omegaconf import OmegaConf

    from moe_morpheus import parallel as mm_parallel
    from moe_morpheus.experiment import compose_experiment
    from moe_morpheus.model import build_model
    from moe_morpheus.train.checkpoint import layout, model_shape, save_checkpoint
    from moe_morpheus.train.guards import Guards
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import wrap_ddp

    exp = compose_experiment(overrides)
    exp.validate_world(int(os.environ.get("WORLD_SIZE", "1")))
    if not exp.moe.enabled:
        raise UpcycleError("the target has no MoE layer (moe.layer_freq=0): pick a MoE target, e.g. "
                           "+experiment=upcycle_64e")
    mm_parallel.initialize(exp.parallel, exp.model, seed=exp.trainer.seed)
    t = exp.trainer
    chunks = wrap_ddp(build_model(exp.model, exp.moe, exp.parallel, seed=t.seed))
    optimizer = Optimizer(chunks, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps,
                          grad_clip=t.grad_clip)
    state = upcycle_into(chunks, exp, source)
    # A fresh run's guard state (empty spike window), which resuming from this checkpoint restores.
    state.guards = Guards(exp.guards, exp.faults, chunks, exp.model.embedding_grad_shrink).state_dict()
    manifest = {"config": OmegaConf.to_container(OmegaConf.structured(exp)), "layout": layout(exp.parallel),
                "model_shape": model_shape(exp.model, exp.moe)}
    return save_checkpoint(Path(output_dir), state, chunks, optimizer, manifest=manifest, keep=1,
                           checksums=exp.checkpoint.checksums)


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.upcycle SOURCE OUTPUT_DIR [hydra overrides]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0].startswith("-"):
        print("usage: python -m moe_morpheus.upcycle SOURCE_CHECKPOINT OUTPUT_DIR [overrides, e.g. "
              "+experiment=upcycle_64e upcycle.mode=copy moe.granularity=1]", file=sys.stderr)
        return 2
    from moe_morpheus import parallel as mm_parallel
    from moe_morpheus.train.checkpoint import CheckpointError

    try:
        path = convert(args[0], args[1], args[2:])
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        mm_parallel.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"upcycled {args[0]} -> {path}; train from it with checkpoint.resume={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
