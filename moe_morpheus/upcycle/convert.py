"""Dense -> MoE conversion ("sparse upcycling", Komatsuzaki et al. 2022; docs/design.md#upcycling).

Two ways in:

- ``python -m moe_morpheus.upcycle init.from_dense=SOURCE convert.out=DIR [overrides]``: the
  overrides compose the target experiment as ``train.py`` would (``+experiment=upcycle_64e
  upcycle.mode=copy ...``); writes ``DIR/step_00000000``, a checkpoint that ``train.py ... checkpoint.resume=PATH``
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
  shard s of the FFN's hidden units (``value`` and ``gate_proj`` rows split separately, so each
  expert keeps matching halves: Megatron-Core's ``upcycling_utils.py`` splits a fused GLU weight
  contiguously, which pairs value units with other units' gates for non-SiLU activations) goes
  to every group; router rows are tied within a group, so with top-k a multiple of g the top-k
  takes whole groups; the scores are renormalised (top-k then softmax), each chosen expert
  weighs 1 / g of its group's share, and fc2 alone is scaled by g: the output is the dense
  FFN's exactly (fc2 bias kept whole: the weights over the chosen experts sum to 1).
- ``he_scaling``: virtual-group shards with He et al.'s weight scaling instead: value, gate_proj
  and fc2 weights (and the value / gate_proj biases, which scale with their pre-activations) times
  s^(1/3), s = E g / k when routing is softmax-then-top-k (scores unnormalised, ~1/E each),
  else g (Megatron-Core's rule). GeLU is not homogeneous (gelu(a z) != a gelu(z)), so this is
  not function-preserving; the trainer logs the validation loss at step 0 to show by how much.
- ``drop`` (Drop-Upcycling, Nakamura et al. 2025): the shards of ``copy`` / ``virtual_group``,
  then in each expert a random ``round(drop_fraction * F_e)`` of its hidden units re-initialised:
  value and gate_proj rows and fc2 columns drawn from a normal with that slice's mean and std, the
  units' value / gate_proj biases zeroed. Independent units per expert, so copies diverge at once.

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

import torch

from moe_morpheus.config import ModelConfig, MoEConfig
from moe_morpheus.config.upcycle import UpcycleConfig, UpcycleError, granularity

_FFN = ("value.weight", "value.bias", "gate_proj.weight", "gate_proj.bias", "fc2.weight", "fc2.bias")


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
    E, ffn = moe.num_experts, model.ffn_hidden
    fe = ffn // g
    shard = torch.arange(E) % g  # expert e = j * g + s holds shard s
    rows = (shard[:, None] * fe + torch.arange(fe)[None, :])  # [E, Fe] dense hidden units of each expert
    w_value = dense["value.weight"][rows].clone()  # [E, Fe, D]
    b_value = dense["value.bias"][rows].clone()
    w_gate = dense["gate_proj.weight"][rows].clone()
    b_gate = dense["gate_proj.bias"][rows].clone()
    w_out = dense["fc2.weight"][:, rows].permute(1, 0, 2).clone()  # [E, D, Fe]
    b_out = dense["fc2.bias"].expand(E, -1).clone()
    if cfg.mode == "he_scaling":
        s = E * g / moe.top_k if moe.softmax_before_topk else float(g)
        a = s ** (1.0 / 3.0)
        for t in (w_value, b_value, w_gate, b_gate, w_out):
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
            for w in (w_value[e], w_gate[e]):
                old = w[units]
                w[units] = torch.randn(old.shape, generator=gen) * old.std() + old.mean()
            old = w_out[e][:, units]
            w_out[e][:, units] = torch.randn(old.shape, generator=gen) * old.std() + old.mean()
            b_value[e, units] = 0.0
            b_gate[e, units] = 0.0
    dtype = dense["value.weight"].dtype
    return {"moe.gate.gate.weight": router.to(dtype), "moe.gate.gate.bias": torch.zeros(E, dtype=dtype),
            "moe.experts.w_value_EFD": w_value, "moe.experts.b_value_EF": b_value,
            "moe.experts.w_gate_proj_EFD": w_gate, "moe.experts.b_gate_proj_EF": b_gate,
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
