"""Configuration schemas: one dataclass per component, validated when built.

Hydra YAML under ``conf/`` only picks and overrides these; every check lives here so that a
config that cannot work fails before any process group or model is created, with a message
that names the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


NORMS = ("deepnorm", "deepnet", "pre_ln")
ROPE_MODES = ("1d", "2d")


@dataclass
class ModelConfig:
    """Shape and numerics of the GLM backbone (reference/glm.md)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    # None: 8/3 * hidden rounded up to a multiple of 64 (DESIGN.md, GeGLU keeps the 4h FFN's
    # parameter count: 3 matrices of h x 8h/3 = 2 matrices of h x 4h).
    ffn_hidden_size: int | None = None
    vocab_size: int = 1024
    # The embedding is padded to a multiple of this, independent of TP so that parameter counts
    # and checkpoints do not depend on the layout; TP must divide the padded size.
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 128
    # deepnorm: GLM-130B's DeepNorm, post-LN with alpha = (2N)^1/2, beta = (2N)^-1/2.
    # deepnet: GLM-130B's block order (model/layer.py) with the DeepNet paper's decoder constants,
    # alpha = (2N)^1/4, beta = (8N)^-1/4.
    # pre_ln: plain pre-LN (for comparisons; GLM-130B found it unstable at 100B).
    norm: str = "deepnorm"
    # 1d: GLM-130B's RoPE over the whole head; 2d: GLM/ChatGLM, half the head rotated by the
    # position ids, the other half by the block position ids.
    rope: str = "2d"
    rope_base: float = 10000.0
    # Embedding gradient shrink (GLM-130B): emb * a + emb.detach() * (1 - a); 1.0 disables it.
    embedding_grad_shrink: float = 0.1
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # GLM-130B: q / (sqrt(d) * (l + 1)), scores * (l + 1) in fp32 before the softmax.
    query_layer_scaling: bool = True

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, f"model.num_layers={self.num_layers}: needs at least 1 layer")
        _check(self.hidden_size >= 1 and self.num_attention_heads >= 1,
               "model.hidden_size and model.num_attention_heads must be positive")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"model.hidden_size={self.hidden_size} is not divisible by "
               f"model.num_attention_heads={self.num_attention_heads}: pick a head count that divides it")
        _check(self.norm in NORMS, f"model.norm={self.norm!r}: choose one of {NORMS}")
        _check(self.rope in ROPE_MODES, f"model.rope={self.rope!r}: choose one of {ROPE_MODES}")
        quarter = 4 if self.rope == "2d" else 2
        _check(self.head_dim % quarter == 0,
               f"head dim {self.head_dim} (hidden {self.hidden_size} / heads {self.num_attention_heads}) "
               f"must be divisible by {quarter} for {self.rope} RoPE (each rotated half needs pairs)")
        _check(self.vocab_size >= 8, f"model.vocab_size={self.vocab_size} is too small")
        _check(self.seq_length >= 2, f"model.seq_length={self.seq_length} must be at least 2")
        _check(0.0 < self.embedding_grad_shrink <= 1.0,
               f"model.embedding_grad_shrink={self.embedding_grad_shrink} must be in (0, 1]")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        _check(self.ffn_hidden_size >= 1, "model.ffn_hidden_size must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return multiple * math.ceil(self.vocab_size / multiple)

    @property
    def residual_alpha(self) -> float:
        """Scale of the normalised residual in post-LN (GLM-130B): h = alpha * LN(h) + F(LN(h))."""
        n = self.num_layers
        return {"deepnorm": (2 * n) ** 0.5, "deepnet": (2 * n) ** 0.25, "pre_ln": 1.0}[self.norm]

    @property
    def init_beta(self) -> float:
        """Xavier gain on the FFN, value and output projections (DeepNorm)."""
        n = self.num_layers
        return {"deepnorm": (2 * n) ** -0.5, "deepnet": (8 * n) ** -0.25, "pre_ln": 1.0}[self.norm]


GATES = ("naive", "noisy", "gshard", "switch", "faster")


@dataclass
class FasterMoEConfig:
    """FasterMoE (PPoPP'22): smart schedule, dynamic shadowing, topology-aware gate
    (``moe_morpheus.moe.faster``; reference/fastmoe.md sec. 3)."""

    # Split the token exchange into W / group_size steps and overlap each with expert compute.
    schedule: bool = False
    group_size: int = 1  # must divide the expert-parallel size (checked when the layer is built)
    shadow: bool = False
    # Shadowing policy's performance model: bytes/s of the expert-parallel network and expert
    # FLOP/s; null = measured at start-up on the actual backend (one broadcast, one expert run).
    net_bandwidth: float | None = None
    flops: float | None = None
    # gate: faster (congestion-avoiding selection): ranks sharing a node, and the fraction of a
    # rank's tokens whose top-1 expert may stay off-node (FastMoE's defaults 8 and 0.14).
    ranks_per_node: int = 8
    outgoing_fraction: float = 0.14

    def __post_init__(self) -> None:
        _check(self.group_size >= 1, f"moe.faster.group_size={self.group_size} must be >= 1")
        for name in ("net_bandwidth", "flops"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"moe.faster.{name}={value} must be positive (or null: measure)")
        _check(self.ranks_per_node >= 1, f"moe.faster.ranks_per_node={self.ranks_per_node} must be >= 1")
        _check(0.0 <= self.outgoing_fraction <= 1.0,
               f"moe.faster.outgoing_fraction={self.outgoing_fraction} must be in [0, 1]")


@dataclass
class MoEConfig:
    """Which FFN layers are Mixture-of-Experts, and how they route."""

    # Layer i (0-based) is MoE iff layer_freq > 0 and (i + 1) % layer_freq == 0; 0 = dense model.
    layer_freq: int = 0
    num_experts: int = 8  # total over the expert-parallel group
    top_k: int = 2
    gate: str = "naive"
    # Expert width relative to the dense FFN, as Megatron-Core and He et al. (2024) define
    # granularity: expert hidden = model.ffn_hidden_size / g, so top_k = g experts hold exactly the
    # dense FFN's active parameters and FLOPs on every model preset. None: g = 1 (every expert as
    # wide as the dense FFN, so a dense FFN can be copied into each).
    granularity: int | None = None
    # An absolute expert hidden size, only when asked for explicitly; setting it and granularity
    # together is an error. Read the width through expert_hidden(model), never these fields.
    expert_hidden_size: int | None = None
    # None: dropless. Otherwise ceil(capacity_factor * T_local * k / E) per sender and expert.
    capacity_factor: float | None = None
    # Route by softmax over all experts, then top-k (He et al. 2024), instead of top-k then softmax.
    softmax_before_topk: bool = False
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    # native: this project's PyTorch FMoE; fastmoe: the real `fmoe` package where installed.
    backend: str = "native"
    faster: FasterMoEConfig = field(default_factory=FasterMoEConfig)

    def __post_init__(self) -> None:
        _check(self.layer_freq >= 0, f"moe.layer_freq={self.layer_freq} must be >= 0 (0 = dense)")
        _check(self.gate in GATES, f"moe.gate={self.gate!r}: choose one of {GATES}")
        _check(self.backend in ("native", "fastmoe"), f"moe.backend={self.backend!r}: native or fastmoe")
        _check(self.granularity is None or self.expert_hidden_size is None,
               f"moe.granularity={self.granularity} and moe.expert_hidden_size={self.expert_hidden_size} are "
               f"both set: the expert width is ffn_hidden_size / granularity or an absolute size, not both; "
               f"set moe.granularity=null to use the absolute width")
        _check(self.granularity is None or self.granularity >= 1,
               f"moe.granularity={self.granularity} must be >= 1 (expert hidden = ffn_hidden_size / granularity)")
        _check(self.expert_hidden_size is None or self.expert_hidden_size >= 1,
               f"moe.expert_hidden_size={self.expert_hidden_size} must be >= 1 (or null)")
        if self.layer_freq == 0:
            return
        _check(self.num_experts >= 1, f"moe.num_experts={self.num_experts} must be >= 1")
        _check(1 <= self.top_k <= self.num_experts,
               f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               f"moe.capacity_factor={self.capacity_factor} must be positive (or null for dropless)")
        _check(self.aux_loss_coeff >= 0 and self.z_loss_coeff >= 0, "MoE loss coefficients must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.layer_freq > 0

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.layer_freq > 0 and (layer_index + 1) % self.layer_freq == 0

    def expert_hidden(self, model: ModelConfig) -> int:
        """Each expert's GeGLU hidden size on ``model``: ``expert_hidden_size`` when set, else
        ``model.ffn_hidden_size / granularity`` (which must divide it)."""
        if self.expert_hidden_size is not None:
            return self.expert_hidden_size
        g, ffn = self.granularity or 1, model.ffn_hidden_size
        if ffn % g:
            divisors = ", ".join(str(d) for d in range(1, 17) if ffn % d == 0)
            raise ConfigError(f"moe.granularity={g} does not divide model.ffn_hidden_size={ffn}: pick a divisor "
                              f"of it ({divisors}, ...) or set model.ffn_hidden_size to a multiple of {g}")
        return ffn // g


@dataclass
class ParallelConfig:
    """Process layout. Data parallelism is what is left: dp = world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    virtual_pp: int | None = None
    # Expert parallelism spans data-parallel ranks (FastMoE); ep must divide dp * tp (Megatron).
    ep: int = 1
    sequence_parallel: bool = False
    # NCCL on GPU, gloo on CPU; "auto" picks.
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"parallel.{name}={value} must be an integer >= 1")
        _check(self.virtual_pp is None or self.virtual_pp >= 1,
               f"parallel.virtual_pp={self.virtual_pp} must be >= 1 or null")
        _check(self.virtual_pp is None or self.virtual_pp == 1 or self.pp > 1,
               "parallel.virtual_pp > 1 needs pipeline parallelism (parallel.pp > 1)")
        _check(self.backend in ("auto", "nccl", "gloo"), f"parallel.backend={self.backend!r}: auto, nccl or gloo")
        # Megatron-Core's rule: the sequence is split over the tensor-parallel ranks.
        _check(not self.sequence_parallel or self.tp > 1,
               "parallel.sequence_parallel=true needs tensor parallelism (parallel.tp > 1): it splits the "
               "sequence over the tensor-parallel ranks")

    def validate_world(self, world_size: int) -> int:
        """Check the layout against the world size; returns the data-parallel size."""
        _check(world_size % (self.tp * self.pp) == 0,
               f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = "
               f"{self.tp} * {self.pp} = {self.tp * self.pp}: change the process count or the layout")
        dp = world_size // (self.tp * self.pp)
        _check((dp * self.tp) % self.ep == 0,
               f"parallel.ep={self.ep} must divide data-parallel size x tp = {dp} x {self.tp}: "
               f"expert parallelism spans data-parallel (and tensor-parallel) ranks")
        return dp

    def validate_model(self, model: ModelConfig) -> None:
        """Check that the layout divides the model."""
        _check(self.tp <= model.num_attention_heads,
               f"parallel.tp={self.tp} is larger than model.num_attention_heads="
               f"{model.num_attention_heads}: each tensor-parallel rank needs at least one head")
        _check(model.num_attention_heads % self.tp == 0,
               f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
               f"parallel.tp={self.tp}")
        _check(model.hidden_size % self.tp == 0,
               f"model.hidden_size={model.hidden_size} is not divisible by parallel.tp={self.tp}")
        _check(model.ffn_hidden_size % self.tp == 0,
               f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp={self.tp}")
        _check(model.padded_vocab_size % self.tp == 0,
               f"padded vocabulary {model.padded_vocab_size} is not divisible by parallel.tp={self.tp}: "
               f"set model.make_vocab_size_divisible_by to a multiple of {self.tp}")
        _check(not self.sequence_parallel or model.seq_length % self.tp == 0,
               f"model.seq_length={model.seq_length} is not divisible by parallel.tp={self.tp}: sequence "
               f"parallelism gives each tensor-parallel rank seq_length / tp positions")
        stages = self.pp * (self.virtual_pp or 1)
        _check(model.num_layers % stages == 0,
               f"model.num_layers={model.num_layers} is not divisible by parallel.pp * virtual_pp = "
               f"{self.pp} * {self.virtual_pp or 1} = {stages}: each pipeline stage needs the same "
               f"number of layers")


RECOMPUTE = ("none", "selective", "full")


@dataclass
class TrainerConfig:
    """The optimisation loop. Run length: ``steps`` or ``tokens`` when set, else the budget
    (``budget.chinchilla_fraction``); steps win over tokens, tokens over the budget."""

    seed: int = 1234
    global_batch_size: int = 16
    micro_batch_size: int = 4
    steps: int | None = None
    tokens: int | None = None
    # AdamW (0.9, 0.95), eps 1e-8, wd 0.1 as GLM-130B; cosine to min_lr_ratio * lr.
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # Validation every this many steps (and at the end); 0 = only at the end.
    eval_interval: int = 50
    # Fraction of each validation set (its first rows: a random sample of its windows, the same
    # rows every time) evaluated at intermediate evaluations, whose valid/loss_se is then the
    # subset's; the full sets are evaluated at the last step and at step 0 of a run started from
    # a dense checkpoint, and only full-set losses count for best/valid_loss. 1.0: always full.
    eval_subset: float = 1.0
    # Items per zero-shot task (held-out translation, en / zh cloze) at each evaluation; 0: none.
    eval_task_items: int = 16
    log_interval: int = 1
    # auto: bf16 autocast on a GPU, fp32 on a CPU.
    precision: str = "auto"
    # Intra-op threads per process; None leaves PyTorch's choice.
    threads: int | None = None
    progress: bool = True
    # Activation recomputation (Korthikanti et al. 2022): none; selective = the core attention
    # (scores, softmax, dropout, attention over values) is recomputed in backward; full = each
    # layer keeps only its input and is recomputed whole (MoE layers too, token exchange included).
    recompute: str = "none"
    # ZeRO-1 (train/zero.py): AdamW moments sharded over the data-parallel group (experts: their
    # expert-data-parallel group); updates equal the unsharded optimizer's.
    zero1: bool = False

    def __post_init__(self) -> None:
        _check(self.global_batch_size >= 1 and self.micro_batch_size >= 1,
               "trainer.global_batch_size and trainer.micro_batch_size must be >= 1")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
               f"trainer.micro_batch_size={self.micro_batch_size}")
        _check(self.steps is None or self.steps >= 1, f"trainer.steps={self.steps} must be >= 1 (or null)")
        _check(self.tokens is None or self.tokens >= 1, f"trainer.tokens={self.tokens} must be >= 1 (or null)")
        _check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "trainer.lr must be > 0, min_lr_ratio in [0, 1]")
        _check(0 <= self.warmup_fraction < 1, f"trainer.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        _check(self.precision in ("auto", "fp32", "bf16"), f"trainer.precision={self.precision!r}: auto, fp32 or bf16")
        _check(self.eval_interval >= 0 and self.log_interval >= 1, "trainer.eval_interval >= 0, log_interval >= 1")
        _check(0.0 < self.eval_subset <= 1.0, f"trainer.eval_subset={self.eval_subset} must be in (0, 1]")
        _check(self.recompute in RECOMPUTE, f"trainer.recompute={self.recompute!r}: choose one of {RECOMPUTE}")


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` None: ``sqlite:///mlflow.db`` in the launch directory (MLflow's default)."""

    uri: str | None = None
    experiment: str = "moe_morpheus"
    run_name: str | None = None
    # Fail at start when the tracking server cannot be reached (default: warn, spool locally).
    strict: bool = False


@dataclass
class LaunchConfig:
    """How a job starts its processes when not already under torchrun or Slurm."""

    # > 1: the job runs itself as `torchrun --nproc_per_node=N train.py ...` (sweep jobs too).
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        _check(self.nproc_per_node >= 1, f"launch.nproc_per_node={self.nproc_per_node} must be >= 1")


SPIKE_ACTIONS = ("skip", "rollback", "lower_lr")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (moe_morpheus/train/checkpoint.py): when, where, how many.

    ``dir`` None: ``<run output dir>/checkpoints``. ``resume``: ``auto`` continues from the newest
    complete checkpoint in ``dir`` (a fresh start when there is none), ``never`` ignores it, any
    other value is the path of one checkpoint to start from (e.g. another run's, another layout).
    A save happens every ``interval_steps`` steps and every ``interval_minutes`` minutes
    (whichever comes first; 0 turns either off) and after the last step; the newest ``keep`` are kept.
    """

    dir: str | None = None
    resume: str = "auto"
    interval_steps: int = 500
    interval_minutes: float = 30.0
    keep: int = 3
    # SHA-256 of every file (each rank hashes a share) recorded at save and checked on resume:
    # catches bit rot and torn copies, not only truncation (sizes are always checked).
    checksums: bool = True

    def __post_init__(self) -> None:
        _check(self.interval_steps >= 0 and self.interval_minutes >= 0,
               "checkpoint.interval_steps and checkpoint.interval_minutes must be >= 0 (0 = off)")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1 (the newest is needed to resume)")
        _check(self.resume != "", "checkpoint.resume must be auto, never or a checkpoint path")


@dataclass
class GuardConfig:
    """Training-stability guards (moe_morpheus/train/guards.py, reference/glm.md section 3).

    A non-finite loss or gradient norm always skips the update. A loss spike is a loss above
    ``spike_ratio`` x the mean of the last ``spike_window`` accepted losses *and* above that mean
    plus ``spike_zscore`` standard deviations (both: a ratio alone fires on noisy tiny runs, a
    z-score alone on a flat window); detection starts once the window is full; 0 turns it off.
    ``spike_action``: ``skip`` the update, ``rollback`` to the last checkpoint and skip the data
    since it (GLM-130B), or ``lower_lr`` (multiply the learning rate by ``lr_factor`` from then on).
    """

    spike_window: int = 50
    spike_ratio: float = 1.5
    spike_zscore: float = 6.0
    spike_action: str = "skip"
    lr_factor: float = 0.5
    # A run that keeps spiking after this many rollbacks stops with an error instead of looping.
    max_rollbacks: int = 5
    # Embedding gradient shrink alpha from a step on, e.g. {1000: 0.5, 2000: 0.1} (GLM-130B lowered
    # it 1 -> 0.5 -> 0.1 after explosions); before the first entry model.embedding_grad_shrink holds.
    egs_schedule: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.spike_action in SPIKE_ACTIONS, f"guards.spike_action={self.spike_action!r}: choose one of "
                                                   f"{SPIKE_ACTIONS}")
        _check(self.spike_window >= 0, f"guards.spike_window={self.spike_window} must be >= 0 (0 = off)")
        _check(self.spike_ratio > 1.0 and self.spike_zscore > 0,
               "guards.spike_ratio must be > 1 and guards.spike_zscore > 0")
        _check(0.0 < self.lr_factor < 1.0, f"guards.lr_factor={self.lr_factor} must be in (0, 1)")
        _check(self.max_rollbacks >= 0, f"guards.max_rollbacks={self.max_rollbacks} must be >= 0")
        for step, alpha in self.egs_schedule.items():
            _check(step >= 0 and 0.0 < alpha <= 1.0,
                   f"guards.egs_schedule: step {step} -> alpha {alpha}; steps must be >= 0, alphas in (0, 1]")


@dataclass
class FaultConfig:
    """Fault injection for tests (moe_morpheus/train/guards.py). Steps are 1-based (the step
    number logged to MLflow). Each fault fires at most once per process and never in a worker
    that torchrun restarted (``TORCHELASTIC_RESTART_COUNT`` > 0), so a resumed run goes on."""

    # SIGKILL rank `crash_rank` just before step `crash_step` runs.
    crash_step: int | None = None
    crash_rank: int = 0
    # SIGKILL every rank in the middle of the checkpoint save at this step (shards written, not
    # yet renamed into place).
    crash_in_save_step: int | None = None
    # Make the loss NaN (and every rank's gradients non-finite) at this step.
    nan_step: int | None = None
    # Multiply the loss seen by the guards by `spike_factor` at this step.
    spike_step: int | None = None
    spike_factor: float = 10.0

    def __post_init__(self) -> None:
        for name in ("crash_step", "crash_in_save_step", "nan_step", "spike_step"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"faults.{name}={value} must be >= 1 (1-based step) or null")
        _check(self.crash_rank >= 0, f"faults.crash_rank={self.crash_rank} must be >= 0")
