"""The training loop: data, model, optimiser and schedule put together for one run.

Side concerns stay outside the loop body: MLflow goes through
:class:`~moe_morpheus.tracking.run_log.RunLogger` (rank 0 only), expert load through
:class:`~moe_morpheus.tracking.run_log.MoELoad`,
throughput through :class:`Throughput`; the loop itself is ``_train_step`` + ``evaluate``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf

from moe_morpheus import parallel as mm_parallel
from moe_morpheus.config import ConfigError
from moe_morpheus.config.experiment import ExperimentConfig
from moe_morpheus.data import batch_iterator, build_data
from moe_morpheus.model import build_model
from moe_morpheus.planning.budget import RunPlan, format_budget, param_counts, plan_run
from moe_morpheus.tracking.run_log import MoELoad, RunLogger
from moe_morpheus.train.checkpoint import Checkpointer, TrainState
from moe_morpheus.train.guards import Guards
from moe_morpheus.train.optim import Optimizer, lr_at
from moe_morpheus.train.step import count_target_tokens, forward_backward, wrap_ddp
from moe_morpheus.train.zero import ZeroOptimizer

if TYPE_CHECKING:
    from moe_morpheus.inference.evaluate import Validation

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_train_loss: float
    valid_losses: dict[str, float]
    best_valid_loss: float
    unigram_entropy: float
    run_id: str | None
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Throughput:
    """Tokens per second of training steps only (evaluation and logging excluded)."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self.last = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.last = tokens / max(seconds, 1e-9)

    @property
    def mean(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Trainer:
    def __init__(self, exp: ExperimentConfig, output_dir: Path, *, resolved_config: dict | None = None,
                 parent_run_id: str | None = None):
        self.exp = exp
        self.output_dir = Path(output_dir)
        self.resolved_config = resolved_config or OmegaConf.to_container(OmegaConf.structured(exp))
        self.parent_run_id = parent_run_id

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        exp, trainer = self.exp, self.exp.trainer
        if trainer.threads:
            torch.set_num_threads(trainer.threads)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = exp.validate_world(world)
        mm_parallel.initialize(exp.parallel, exp.model, seed=trainer.seed)
        # Every rank composed its own Hydra config; rank 0's run folder is the run's.
        shared = [str(self.output_dir)]
        dist.broadcast_object_list(shared, src=0)
        self.output_dir = Path(shared[0])
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.device = mm_parallel.device()
        use_bf16 = trainer.precision == "bf16" or (trainer.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

        # Rank 0 tokenises (with a progress bar); the others then read its cache. The data's
        # seed is the run's effective one (ExperimentConfig.seeds: trainer.seed unless pinned).
        if is_rank0():
            self.data = build_data(exp.data_config(), exp.model.seq_length, progress=trainer.progress)
        dist.barrier()
        if not is_rank0():
            self.data = build_data(exp.data_config(), exp.model.seq_length, progress=False)
        vocab = self.data.tokenizer.vocab_size
        if vocab > exp.model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but model.vocab_size={exp.model.vocab_size}: "
                              f"set model.vocab_size to at least {vocab}")

        self.tokens_per_step = trainer.global_batch_size * exp.model.seq_length
        self.plan = self._plan()
        self.counts = param_counts(exp.model, exp.moe if exp.moe.enabled else None)
        self.model = wrap_ddp(build_model(exp.model, exp.moe if exp.moe.enabled else None, exp.parallel,
                                          seed=trainer.seed, recompute=trainer.recompute))
        self.num_microbatches = trainer.global_batch_size // (trainer.micro_batch_size * self.dp)
        self.warmup_steps = int(trainer.warmup_fraction * self.plan.steps)
        self.setup_optimizer()

    def setup_optimizer(self) -> None:
        """AdamW, stability guards and checkpoints for ``self.model`` (benchmarks/train_step.py
        calls it again after swapping in a reference model)."""
        exp, trainer = self.exp, self.exp.trainer
        # ZeRO-1 (train/zero.py) shards AdamW's moments over the data-parallel group; the same API.
        optimizer_class = ZeroOptimizer if trainer.zero1 else Optimizer
        self.optimizer = optimizer_class(self.model, lr=trainer.lr, weight_decay=trainer.weight_decay,
                                         betas=(trainer.beta1, trainer.beta2), eps=trainer.eps,
                                         grad_clip=trainer.grad_clip)
        # Stability guards and checkpoints (train/guards.py, train/checkpoint.py).
        self.guards = Guards(exp.guards, exp.faults, self.model, exp.model.embedding_grad_shrink)
        self.checkpointer = Checkpointer(exp.checkpoint, self, self.guards)

    def _plan(self) -> RunPlan:
        exp, trainer = self.exp, self.exp.trainer
        budget = exp.budget
        if trainer.steps is not None or trainer.tokens is not None:
            # An explicit length wins over the budget fraction; the budget still gives the
            # fraction used, for reports.
            budget = type(budget)(chinchilla_fraction=None, tokens_per_param=budget.tokens_per_param,
                                  params=budget.params)
            steps = trainer.steps
            tokens = trainer.tokens if steps is None else None
            return plan_run(exp.model, exp.moe if exp.moe.enabled else None, budget, self.tokens_per_step,
                            steps=steps, tokens=tokens)
        return plan_run(exp.model, exp.moe if exp.moe.enabled else None, budget, self.tokens_per_step)

    # ------------------------------------------------------------------ loop
    def _train_step(self, step: int, micro_batches: list[dict], targets: float | None = None) -> tuple[float, object]:
        """One update; ``targets``: the global batch's target tokens (count_target_tokens) when
        the caller counted them already (one all-reduce per step either way)."""
        from moe_morpheus.moe import set_aux_loss_scale

        for chunk in self.model:
            chunk.zero_grad_buffer()
        # Each micro-batch's aux loss enters once; DDP sums over data-parallel ranks: the mean.
        set_aux_loss_scale(1.0 / (self.num_microbatches * self.dp))
        lr = lr_at(step, lr=self.exp.trainer.lr, min_lr=self.exp.trainer.lr * self.exp.trainer.min_lr_ratio,
                   warmup_steps=self.warmup_steps, total_steps=self.plan.steps)
        with self.autocast:
            loss = forward_backward(self.model, micro_batches, denominator=targets)
        # The guards set the (possibly lowered) LR, then update or skip (train/guards.py).
        return self.guards.update(step, loss, lr, self.optimizer)

    def count_targets(self, start: int, end: int) -> int:
        """Target tokens (loss-mask positions) of training rows [start, end)."""
        return int(sum(self.data.train[i]["loss_mask"].sum() for i in range(start, end)))

    @torch.no_grad()
    def evaluate(self, full: bool = True) -> tuple[Validation, dict[str, float]]:
        """Validation loss, pooled and per set, with standard errors (the full sets, or
        ``trainer.eval_subset`` of each); with one pipeline stage also the zero-shot
        translation and cloze metrics (moe_morpheus.inference.evaluate; generation needs one chunk)."""
        from moe_morpheus.inference.evaluate import task_metrics, validation_losses
        from moe_morpheus.moe import collect_moe_stats

        with self.autocast:
            losses = validation_losses(self.model, self.data.valid, micro_batch_size=self.exp.trainer.micro_batch_size,
                                       dp_rank=self.dp_rank, dp_size=self.dp,
                                       fraction=1.0 if full else self.exp.trainer.eval_subset)
            tasks = {}
            if self.exp.parallel.pp == 1 and self.exp.trainer.eval_task_items > 0:
                tasks = task_metrics(self.model[0].module, self.data, self.exp.model.seq_length,
                                     self.exp.trainer.eval_task_items)
        collect_moe_stats(self.model)  # evaluation routing is not training load
        return losses, tasks

    def fit(self) -> TrainResult:
        from moe_morpheus.inference.evaluate import pooled_unigram
        from moe_morpheus.moe import collect_moe_stats

        self.setup()
        exp, trainer, plan = self.exp, self.exp.trainer, self.plan
        # Resume (train/checkpoint.py) before the MLflow run opens: a resumed run logs into its run.
        state = self.checkpointer.resume()
        if state is None and exp.init.from_dense is not None:
            from moe_morpheus.upcycle.load import upcycle_into

            state = upcycle_into(self.model, exp, exp.init.from_dense)
        state = state or TrainState(target_tokens=0)
        # Sunk compute of a run started from a dense checkpoint (moe_morpheus/upcycle/convert.py).
        sunk_tokens, sunk_flops = state.lineage.get("tokens", 0), state.lineage.get("flops", 0.0)
        # None: the dense checkpoint predates target counting (target_tokens_with_sunk not logged).
        sunk_targets = state.lineage.get("target_tokens") if state.lineage else 0
        logger = RunLogger(self, resume_run_id=state.run_id, lineage=state.lineage) if is_rank0() else None
        if logger:
            print(format_budget(plan), flush=True)
        if state.lineage and state.step == 0:
            # The loss at the handoff, before any update: equal to the dense run's for a
            # function-preserving conversion; what he_scaling / drop cost.
            valid, _ = self.evaluate()
            if logger:
                logger.log({**valid.metrics(), "flops_with_sunk": sunk_flops, "tokens_with_sunk": sunk_tokens,
                            **({} if sunk_targets is None else {"target_tokens_with_sunk": sunk_targets})}, 0)

        def batches(start_sample: int):
            return batch_iterator(self.data.train, global_batch_size=trainer.global_batch_size,
                                  micro_batch_size=trainer.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp,
                                  start_sample=start_sample)

        train_iter = batches(state.consumed_samples)
        throughput, load = Throughput(), MoELoad()
        load.totals = state.moe_load
        losses, valid_history = [], []
        valid = None
        progress = _progress(plan.steps, enabled=bool(logger) and trainer.progress)
        progress.update(state.step)
        status = "FAILED"
        try:
            step = state.step
            while step < plan.steps:
                self.guards.begin_step(step)
                micro_batches = [next(train_iter) for _ in range(self.num_microbatches)]
                start = time.perf_counter()
                # Supervised target tokens of the global batch: the loss's own denominator, so
                # counting them costs no extra collective.
                targets = float(count_target_tokens(micro_batches))
                loss, norms, lr = self._train_step(step, micro_batches, targets)
                throughput.add(self.tokens_per_step, time.perf_counter() - start)
                state.consumed_samples += trainer.global_batch_size
                if self.guards.rollback_requested:
                    # Back to the last checkpoint, on with the data after this batch (GLM-130B).
                    state = self.checkpointer.roll_back(state)
                    if logger:
                        logger.log(self.guards.metrics(), step + 1)
                    train_iter = batches(state.consumed_samples)
                    step = state.step
                    progress.n = step
                    continue
                losses.append(loss)
                consumed = state.consumed_samples
                tokens = (step + 1) * self.tokens_per_step
                # None: resumed from a checkpoint without the count that could not be recounted
                # exactly (Checkpointer._load); then no target_tokens_* are logged.
                target_tokens = None if state.target_tokens is None else state.target_tokens + int(targets)
                metrics = {
                    "train/loss": loss, "train/lr": lr, "train/grad_norm": norms.total,
                    "train/grad_norm_embedding": norms.embedding, "train/grad_norm_rest": norms.rest,
                    **self.guards.metrics(),
                    "tokens_seen": tokens, "flops": tokens * plan.flops_per_token,
                    "flops_6nd": 6 * plan.n_params * tokens,
                    "flops_with_sunk": tokens * plan.flops_per_token + sunk_flops,
                    "tokens_with_sunk": tokens + sunk_tokens,
                    # Positions with loss; "tokens" (budgets, FLOPs) are positions processed.
                    **({} if target_tokens is None else {"target_tokens_seen": target_tokens}),
                    **({} if target_tokens is None or sunk_targets is None
                       else {"target_tokens_with_sunk": target_tokens + sunk_targets}),
                    "budget_fraction": tokens / plan.budget_tokens,
                    "throughput/tokens_per_s": throughput.last,
                }
                metrics.update({f"epochs/{k}": v for k, v in self.data.epochs(consumed).items()})
                if exp.moe.enabled:
                    # Summed over every rank (one all-reduce): rank 0 logs, saves and plots the
                    # global load, and every rank saves the same checkpoint state (moe/stats.py).
                    metrics.update(load.add(collect_moe_stats(self.model, dist.group.WORLD,
                                                              num_layers=exp.model.num_layers,
                                                              num_experts=exp.moe.num_experts)))
                last = step == plan.steps - 1
                evaluated = last or bool(trainer.eval_interval and (step + 1) % trainer.eval_interval == 0)
                if evaluated:
                    # Intermediate evaluations may use a subset (trainer.eval_subset), logged as
                    # valid_subset/*: only full-set losses (valid/*) are comparable with each
                    # other and count for best/valid_loss (a minimum over noisier subset points
                    # would be biased low).
                    full = last or trainer.eval_subset == 1.0
                    valid, tasks = self.evaluate(full=full)
                    if full:
                        valid_history.append(valid.loss)
                    metrics.update(valid.metrics("valid" if full else "valid_subset"))
                    metrics.update(tasks)
                if logger and (last or step % trainer.log_interval == 0 or evaluated):
                    logger.log(metrics, step + 1)
                state = TrainState(step=step + 1, consumed_samples=consumed, tokens=tokens,
                                   flops=tokens * plan.flops_per_token, run_id=logger.run_id if logger else None,
                                   guards=self.guards.state_dict(), moe_load=load.totals, lineage=state.lineage,
                                   target_tokens=target_tokens)
                if self.checkpointer.due(step + 1, last):
                    self.checkpointer.save(state)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{throughput.last:,.0f}",
                                     budget=f"{metrics['budget_fraction']:.1%}", refresh=False)
                step += 1
            if not valid_history:  # resumed from the final checkpoint: nothing left to train
                valid, _ = self.evaluate()
                valid_history.append(valid.loss)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            progress.close()
            # Pooled over every target of the full sets, as valid/loss is (comparable on one axis).
            entropy = pooled_unigram(self.data.unigram_entropy, self.data.valid)
            if logger:
                summary = {"final/tokens": plan.steps * self.tokens_per_step,
                           "final/flops": plan.steps * self.tokens_per_step * plan.flops_per_token,
                           "final/flops_with_sunk": plan.steps * self.tokens_per_step * plan.flops_per_token
                           + sunk_flops,
                           "final/tokens_per_s": throughput.mean, "final/unigram_entropy": entropy}
                if valid_history:
                    summary.update({"final/valid_loss": valid_history[-1], "best/valid_loss": min(valid_history)})
                logger.finish(status, summary, load.fractions())
        result = TrainResult(
            steps=plan.steps, tokens=plan.steps * self.tokens_per_step,
            final_train_loss=losses[-1] if losses else float("nan"),
            valid_losses=valid.losses(), best_valid_loss=min(valid_history), unigram_entropy=entropy,
            run_id=logger.run_id if logger else None, losses=losses, skipped_steps=self.guards.skipped,
        )
        if logger:
            verdict = "below" if result.valid_losses["mean"] < entropy else "NOT below"
            print(f"validation loss {result.valid_losses['mean']:.3f} nats/token is {verdict} the corpus's "
                  f"unigram entropy {entropy:.3f}; {throughput.mean:,.0f} tokens/s", flush=True)
        return result


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
