"""The optimisation loop and what guards it: trainer, checkpoints, stability guards, fault injection."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_morpheus.config.errors import check

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
        check(self.global_batch_size >= 1 and self.micro_batch_size >= 1,
              "trainer.global_batch_size and trainer.micro_batch_size must be >= 1")
        check(self.global_batch_size % self.micro_batch_size == 0,
              f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
              f"trainer.micro_batch_size={self.micro_batch_size}")
        check(self.steps is None or self.steps >= 1, f"trainer.steps={self.steps} must be >= 1 (or null)")
        check(self.tokens is None or self.tokens >= 1, f"trainer.tokens={self.tokens} must be >= 1 (or null)")
        check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "trainer.lr must be > 0, min_lr_ratio in [0, 1]")
        check(0 <= self.warmup_fraction < 1, f"trainer.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        check(self.precision in ("auto", "fp32", "bf16"), f"trainer.precision={self.precision!r}: auto, fp32 or bf16")
        check(self.eval_interval >= 0 and self.log_interval >= 1, "trainer.eval_interval >= 0, log_interval >= 1")
        check(0.0 < self.eval_subset <= 1.0, f"trainer.eval_subset={self.eval_subset} must be in (0, 1]")
        check(self.recompute in RECOMPUTE, f"trainer.recompute={self.recompute!r}: choose one of {RECOMPUTE}")


SPIKE_ACTIONS = ("skip", "rollback", "lower_lr")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (moe_morpheus/train/checkpoint/): when, where, how many.

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
        check(self.interval_steps >= 0 and self.interval_minutes >= 0,
              "checkpoint.interval_steps and checkpoint.interval_minutes must be >= 0 (0 = off)")
        check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1 (the newest is needed to resume)")
        check(self.resume != "", "checkpoint.resume must be auto, never or a checkpoint path")


@dataclass
class GuardConfig:
    """Training-stability guards (GLM-130B, Zeng et al. 2023, sec. 3; docs/design.md#guards).

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
        check(self.spike_action in SPIKE_ACTIONS, f"guards.spike_action={self.spike_action!r}: choose one of "
                                                   f"{SPIKE_ACTIONS}")
        check(self.spike_window >= 0, f"guards.spike_window={self.spike_window} must be >= 0 (0 = off)")
        check(self.spike_ratio > 1.0 and self.spike_zscore > 0,
              "guards.spike_ratio must be > 1 and guards.spike_zscore > 0")
        check(0.0 < self.lr_factor < 1.0, f"guards.lr_factor={self.lr_factor} must be in (0, 1)")
        check(self.max_rollbacks >= 0, f"guards.max_rollbacks={self.max_rollbacks} must be >= 0")
        for step, alpha in self.egs_schedule.items():
            check(step >= 0 and 0.0 < alpha <= 1.0,
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
            check(value is None or value >= 1, f"faults.{name}={value} must be >= 1 (1-based step) or null")
        check(self.crash_rank >= 0, f"faults.crash_rank={self.crash_rank} must be >= 0")
