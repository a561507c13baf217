"""Parameter counts, model FLOPs per token and Chinchilla token budgets, from the config alone.

Nothing here builds a model: a ``morpheus_30b`` plan is printed on a laptop in microseconds. The
counts follow the GLM model's exact parameter inventory (docs/design.md#budgets), so
a test can compare them with ``sum(p.numel())`` of the built module.

Inventory, with h = hidden size, V = padded vocabulary (padded as the model pads it, independent
of TP), F = dense GeGLU hidden size, Fe = expert GeGLU hidden size (``moe.expert_hidden``: F /
granularity, or the absolute ``moe.expert_hidden_size``), E = experts, k = top-k:

- word embedding V h (the output logits are tied to it; RoPE, so no position embedding);
- per layer: two LayerNorms 2 x 2h; fused QKV 3h^2 + 3h; output projection h^2 + h;
- dense GeGLU FFN: value and gate h -> F (h F + F each) and fc2 F -> h (F h + h): 3hF + 2F + h;
- MoE FFN: router E h + E, and E experts each 3h Fe + 2Fe + h; only k experts are active;
- final LayerNorm 2h.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_morpheus.config import BudgetConfig, ConfigError, ModelConfig, MoEConfig

# Which parameter count sizes the Chinchilla budget. Hoffmann et al. (2022) counted embeddings,
# so the default is active parameters including the embedding (docs/design.md#budgets).
# A model of a billion parameters or more trained on fewer tokens per step than this is on the CPU
# demo trainer by mistake: GPT-3 trained even its 125M model on 0.5M-token batches (Brown et al.
# 2020, Table 2.1), and conf/trainer/cluster.yaml takes 2.1M.
CLUSTER_PARAMS = 1e9
CLUSTER_MIN_TOKENS_PER_STEP = 2**19


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one GLM configuration; ``active`` counts top-k experts per MoE layer."""

    total: int
    active: int
    embedding: int
    non_embedding: int

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def _geglu_params(h: int, f: int) -> int:
    # value h->f and gate h->f with biases, fc2 f->h with bias.
    return 3 * h * f + 2 * f + h


def _moe_enabled(moe_cfg: MoEConfig | None) -> bool:
    return moe_cfg is not None and moe_cfg.enabled


def param_counts(model_cfg: ModelConfig, moe_cfg: MoEConfig | None = None) -> ParamCounts:
    """Total, active, embedding and non-embedding parameters (inventory in the module docstring)."""
    h, v, f = model_cfg.hidden_size, model_cfg.padded_vocab_size, model_cfg.ffn_hidden
    embedding = v * h
    # Two LayerNorms (2h each) + QKV (3h^2 + 3h) + output projection (h^2 + h).
    layer_common = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h)
    total = active = embedding + 2 * h  # the final LayerNorm
    for i in range(model_cfg.num_layers):
        total += layer_common
        active += layer_common
        if _moe_enabled(moe_cfg) and moe_cfg.is_moe_layer(i):
            e, k = moe_cfg.num_experts, moe_cfg.top_k
            router = e * h + e  # counted as active: every token goes through it
            expert = _geglu_params(h, moe_cfg.expert_hidden(model_cfg))
            total += router + e * expert
            active += router + k * expert
        else:
            total += _geglu_params(h, f)
            active += _geglu_params(h, f)
    return ParamCounts(total=total, active=active, embedding=embedding, non_embedding=total - embedding)


def flops_per_token(model_cfg: ModelConfig, seq_len: int, moe_cfg: MoEConfig | None = None) -> int:
    """Training model FLOPs per token (docs/design.md#budgets; Megatron-Core's model-FLOP convention).

    3 x forward (forward, weight gradient, input gradient), 2 FLOPs per multiply-add::

        flops = 3 * [ sum over layers ( 2*3h^2 + 2h^2 + 2sh + 2sh + ffn_i ) + 2 h V ]
        ffn_i = 2*3*h*F                dense GeGLU layer (value, gate, fc2)
        ffn_i = top_k * 2*3*h*Fe       MoE layer (only the routed experts)

    QKV 2*3h^2, output projection 2h^2, attention scores q.k 2sh and probabilities @ V 2sh over
    the full s x s matrix (no causal halving, as Chinchilla and Megatron count it), output logits
    2hV over the padded vocabulary. Not counted: the embedding lookup, the router GEMM (as
    Megatron-Core), biases, LayerNorms, softmax, activations.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be a positive number of tokens")
    h, v, f, s = model_cfg.hidden_size, model_cfg.padded_vocab_size, model_cfg.ffn_hidden, seq_len
    forward = 2 * h * v
    for i in range(model_cfg.num_layers):
        forward += 2 * 3 * h * h + 2 * h * h + 2 * s * h + 2 * s * h
        if _moe_enabled(moe_cfg) and moe_cfg.is_moe_layer(i):
            forward += moe_cfg.top_k * 2 * 3 * h * moe_cfg.expert_hidden(model_cfg)
        else:
            forward += 2 * 3 * h * f
    return 3 * forward


def chinchilla_tokens(n_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal tokens by Chinchilla's rule of thumb: about 20 per parameter (Table 3)."""
    if n_params <= 0 or tokens_per_param <= 0:
        raise ValueError(f"n_params={n_params} and tokens_per_param={tokens_per_param} must be positive")
    return float(n_params) * float(tokens_per_param)


@dataclass(frozen=True)
class RunPlan:
    """A run's length and its place against the budget; ``flops`` is what runs log."""

    steps: int
    tokens: int  # steps * tokens_per_step, what the run actually trains on
    tokens_per_step: int
    counts: ParamCounts
    budget_params: str  # which count is N (BudgetConfig.params)
    n_params: int  # N, the count named by budget_params
    budget_tokens: float  # tokens_per_param * N
    budget_fraction: float  # tokens / budget_tokens
    flops_per_token: int
    flops: int  # detailed: flops_per_token * tokens
    flops_6nd: float  # 6 N D with the budget's N: the C of a Chinchilla fit on this run


def plan_run(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, budget_cfg: BudgetConfig,
             tokens_per_step: int, *, steps: int | None = None, tokens: int | None = None) -> RunPlan:
    """Size a run by exactly one of ``steps``, ``tokens`` or ``budget_cfg.chinchilla_fraction``.

    Token counts are rounded to the nearest whole step (a run trains on whole global batches).
    """
    if tokens_per_step < 1:
        raise ConfigError(f"tokens_per_step={tokens_per_step} must be positive (global batch x seq length)")
    given = {name: value for name, value in (("steps", steps), ("tokens", tokens),
                                             ("budget.chinchilla_fraction", budget_cfg.chinchilla_fraction))
             if value is not None}
    if not given:
        raise ConfigError("run length unspecified: set one of steps, tokens or budget.chinchilla_fraction")
    if len(given) > 1:
        raise ConfigError(f"run length is ambiguous: {', '.join(f'{k}={v}' for k, v in given.items())} "
                          f"are all set; set exactly one")

    counts = param_counts(model_cfg, moe_cfg)
    n_params = getattr(counts, budget_cfg.params)
    budget_tokens = chinchilla_tokens(n_params, budget_cfg.tokens_per_param)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"steps={steps} must be at least 1")
        n_steps = int(steps)
    else:
        target, what = ((tokens, "tokens") if tokens is not None
                        else (budget_cfg.chinchilla_fraction * budget_tokens, "budget"))
        if target <= 0:
            raise ConfigError(f"tokens={tokens} must be positive")
        n_steps = round(target / tokens_per_step)
        if n_steps == 0:
            fix = ("raise budget.chinchilla_fraction or lower the batch" if what == "budget"
                   else "raise tokens or lower the batch")
            raise ConfigError(f"{what} of {target:,.0f} tokens at {tokens_per_step:,} tokens/step rounds to "
                              f"0 steps: {fix}")
    n_tokens = n_steps * tokens_per_step
    fpt = flops_per_token(model_cfg, model_cfg.seq_length, moe_cfg)
    return RunPlan(steps=n_steps, tokens=n_tokens, tokens_per_step=tokens_per_step, counts=counts,
                   budget_params=budget_cfg.params, n_params=n_params, budget_tokens=budget_tokens,
                   budget_fraction=n_tokens / budget_tokens, flops_per_token=fpt, flops=fpt * n_tokens,
                   flops_6nd=6.0 * n_params * n_tokens)


def _si(x: float) -> str:
    """12345678 -> '12.35M': parameters and tokens in K/M/B/T."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_budget(plan: RunPlan) -> str:
    """Multi-line summary of a plan, printed at run start."""
    c = plan.counts
    return "\n".join([
        f"params: total {_si(c.total)}, active {_si(c.active)}, embedding {_si(c.embedding)}, "
        f"non-embedding {_si(c.non_embedding)}, active non-embedding {_si(c.active_non_embedding)}",
        f"budget: {_si(plan.budget_tokens)} tokens ({plan.budget_tokens / plan.n_params:g} tokens/param x "
        f"{plan.budget_params} {_si(plan.n_params)})",
        f"run: {plan.steps:,} steps x {plan.tokens_per_step:,} tokens/step = {_si(plan.tokens)} tokens "
        f"({100 * plan.budget_fraction:.3g}% of the budget)",
        f"FLOPs: {plan.flops:.3e} detailed ({plan.flops_per_token:.3e}/token), {plan.flops_6nd:.3e} as 6ND "
        f"(detailed / 6ND = {plan.flops / plan.flops_6nd:.2f})",
    ])


def demo_batch_warning(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, global_batch_size: int) -> str | None:
    """A one-line warning when a model of over ``CLUSTER_PARAMS`` active parameters runs with a
    CPU-demo-sized batch (under ``CLUSTER_MIN_TOKENS_PER_STEP`` tokens per step), else None."""
    active = param_counts(model_cfg, moe_cfg).active
    tokens = global_batch_size * model_cfg.seq_length
    if active < CLUSTER_PARAMS or tokens >= CLUSTER_MIN_TOKENS_PER_STEP:
        return None
    return (f"warning: {_si(active)} active parameters with a global batch of {global_batch_size} x "
            f"{model_cfg.seq_length} = {_si(tokens)} tokens per step, the CPU demo's size: a cluster run "
            f"takes trainer=cluster (conf/trainer/cluster.yaml)")


def model_line(name: str, model: ModelConfig, moe: MoEConfig | None) -> str:
    """``NAME: L layers, hidden H, ...``: the shape of a model in one line (budget, train.log)."""
    return (f"{name}: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads, "
            f"FFN {model.ffn_hidden}, seq {model.seq_length}, vocab {model.vocab_size}"
            + (f", {moe.num_experts} experts top-{moe.top_k} every {moe.layer_freq} layer(s), experts "
               f"{moe.expert_hidden(model)} wide" if moe else ""))


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.planning.budget +experiment=NAME [model=PRESET] [overrides]``: the run plan
    (parameters, Chinchilla budget, FLOPs) of a configuration, without building the model."""
    import sys

    from moe_morpheus.config.cli import fail
    from moe_morpheus.config.experiment import compose_experiment

    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        print("usage: python -m moe_morpheus.planning.budget [Hydra overrides]\n\nThe run plan (parameters, "
              "Chinchilla budget, FLOPs) of a configuration, without building the model. Overrides as for "
              "train.py, e.g. +experiment=moe_64e model=morpheus_30b")
        return 0
    try:
        exp = compose_experiment(args)
    except ConfigError as error:
        return fail(error)
    moe = exp.moe_or_none
    tokens_per_step = exp.trainer.global_batch_size * exp.model.seq_length
    budget = exp.budget
    if budget.chinchilla_fraction is None and exp.trainer.steps is None and exp.trainer.tokens is None:
        budget = BudgetConfig(chinchilla_fraction=1.0, tokens_per_param=budget.tokens_per_param, params=budget.params)
    plan = plan_run(exp.model, moe, budget, tokens_per_step, steps=exp.trainer.steps,
                    tokens=exp.trainer.tokens if exp.trainer.steps is None else None)
    print(model_line(exp.name, exp.model, moe))
    print(format_budget(plan))
    warning = demo_batch_warning(exp.model, moe, exp.trainer.global_batch_size)
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
