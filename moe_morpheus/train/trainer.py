"""The training loop: data, model, optimiser and schedule put together for one run.

:meth:`Trainer.train` is the loop and :meth:`Trainer.train_step` one update; what surrounds them is
built in train/build.py (optimizer, guards, checkpointer, the run's metrics) and decides for itself:
the guards judge each step (train/guards.py), the checkpointer when to save
(train/checkpoint/policy.py), and the numbers logged are assembled in tracking/metrics.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
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
from moe_morpheus.planning.budget import RunPlan, format_budget, model_line, param_counts, plan_run
from moe_morpheus.tracking.metrics import RunMetrics
from moe_morpheus.train import console
from moe_morpheus.train.build import build_run_metrics, build_training, checkpoint_dir
from moe_morpheus.train.checkpoint import TrainState
from moe_morpheus.train.checkpoint.store import checkpoint_name
from moe_morpheus.train.interrupts import Interrupted, Interrupts
from moe_morpheus.train.optim import GradNorms, grad_norms, lr_at
from moe_morpheus.train.step import count_target_tokens, forward_backward, wrap_ddp

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


@dataclass
class StepResult:
    """One :meth:`Trainer.train_step`: the loss as the guards saw it, the LR and gradient norms,
    the global batch's target tokens, and whether the guards asked for a rollback."""

    loss: float
    lr: float
    norms: GradNorms
    targets: int
    rollback: bool


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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
        self.dp = exp.validate_world(mm_parallel.world_size())
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
        self.counts = param_counts(exp.model, exp.moe_or_none)
        self.model = wrap_ddp(build_model(exp.model, exp.moe_or_none, exp.parallel,
                                          seed=trainer.seed, recompute=trainer.recompute))
        self.num_microbatches = trainer.global_batch_size // (trainer.micro_batch_size * self.dp)
        self.warmup_steps = int(trainer.warmup_fraction * self.plan.steps)
        self.setup_optimizer()

    def setup_optimizer(self) -> None:
        """AdamW, stability guards and checkpoints for ``self.model`` (train/build.py;
        benchmarks/train_step.py calls it again after swapping in a reference model)."""
        parts = build_training(self.exp, self.model, directory=checkpoint_dir(self.exp.checkpoint, self.output_dir),
                               config=self.resolved_config, count_targets=self.count_targets)
        self.optimizer, self.guards, self.checkpointer = parts.optimizer, parts.guards, parts.checkpointer

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
            return plan_run(exp.model, exp.moe_or_none, budget, self.tokens_per_step,
                            steps=steps, tokens=tokens)
        return plan_run(exp.model, exp.moe_or_none, budget, self.tokens_per_step)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int, micro_batches: list[dict]) -> StepResult:
        """One update at 0-based ``step`` from the global batch's ``micro_batches``: forward and
        backward, then the guards decide and the update is applied or skipped (a rollback is the
        caller's: :meth:`train`)."""
        from moe_morpheus.moe import set_aux_loss_scale

        t = self.exp.trainer
        self.guards.begin_step(step)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        # Each micro-batch's aux loss enters once; DDP sums over data-parallel ranks: the mean.
        set_aux_loss_scale(1.0 / (self.num_microbatches * self.dp))
        # Supervised target tokens of the global batch: the loss's own denominator, counted here
        # once (one all-reduce) and logged as target_tokens_seen.
        targets = float(count_target_tokens(micro_batches))
        with self.autocast:
            loss = forward_backward(self.model, micro_batches, denominator=targets)
        lr = lr_at(step, lr=t.lr, min_lr=t.lr * t.min_lr_ratio, warmup_steps=self.warmup_steps,
                   total_steps=self.plan.steps)
        decision = self.guards.decide(step, loss, lr, can_roll_back=self.checkpointer.available)
        self.optimizer.set_lr(decision.lr)
        if decision.update:
            norms = self.optimizer.step()  # clips; refuses a non-finite norm
        else:  # measured all the same: logged, and judged by the guards
            norms = grad_norms(self.optimizer.params, self.optimizer.embedding_params)
        self.guards.record(step, decision, norms)
        return StepResult(decision.loss, decision.lr, norms, int(targets), decision.rollback)

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

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult | None:
        """Set up, start (fresh, resumed, or from a dense checkpoint) and train to ``plan.steps``:
        each step logged, evaluated and saved when due; a rollback returns to the last checkpoint.
        None: resumed from the final checkpoint, nothing to do. A signal (train/interrupts.py)
        stops every rank after the same step, saves it and raises :class:`Interrupted`."""
        self.setup()
        t = self.exp.trainer
        state = self._start_state()
        if (finished := self._finished(state)) is not None:
            if is_rank0():
                console.log.info("this run already finished (%s): nothing to do", finished)
            return None
        run = self._open_run(state)
        train_iter = self._batches(state.consumed_samples)
        saved_step = state.step  # a resumed state is on disk; a fresh one at step 0 holds nothing to save
        with Interrupts(announce=is_rank0()) as interrupts, run.recording(), \
                _progress(self.plan.steps, state.step, enabled=is_rank0() and t.progress) as progress:
            while state.step < self.plan.steps:
                if signum := interrupts.agreed(self.device):
                    raise self._stop(signum, state, saved_step, run)
                step = state.step
                micro_batches = [next(train_iter) for _ in range(self.num_microbatches)]
                start = time.perf_counter()
                result = self.train_step(step, micro_batches)
                run.throughput.add(self.tokens_per_step, time.perf_counter() - start)
                if result.rollback:
                    state = self._roll_back(state, run)
                    train_iter, progress.n = self._batches(state.consumed_samples), state.step
                    continue
                state = self._advance(state, result, run)
                metrics = run.step(state, loss=result.loss, lr=result.lr, norms=result.norms,
                                   guards=self.guards.metrics(), moe_stats=self._moe_stats())
                last = state.step == self.plan.steps
                evaluation = self._scheduled_evaluation(step, last, run)
                metrics.update(evaluation or {})
                if last or step % t.log_interval == 0 or evaluation is not None:
                    run.log(metrics, state.step)
                    if is_rank0():
                        console.step_line(state.step, self.plan.steps, metrics)
                if self.checkpointer.maybe_save(state, last) is not None:
                    saved_step = state.step
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{run.throughput.last:,.0f}",
                                     budget=f"{metrics['budget_fraction']:.1%}", refresh=False)
        return self._result(run)

    def _finished(self, state: TrainState) -> str | None:
        """Why there is nothing to train, or None: ``state`` is the final step, or (a sweep job
        starting afresh, ``checkpoint.resume=auto``) the sweep's MLflow store holds a FINISHED run
        of this job, whose folder and checkpoints were not carried here (a store restored on a
        fresh clone or machine: the sweep goes on with the jobs that did not finish)."""
        if state.step >= self.plan.steps:
            return f"step {state.step} of {self.plan.steps}, {self.output_dir}; raise trainer.steps to train it further"
        if state.step > 0 or self.parent_run_id is None or self.exp.checkpoint.resume != "auto":
            return None
        found = [None]
        if is_rank0():
            from mlflow import MlflowClient

            from moe_morpheus.tracking.store import finished_job

            try:
                found[0] = finished_job(MlflowClient(self.tracking_uri), self.parent_run_id, self.output_dir)
            except Exception as exc:  # an unreachable store: train, as a job without a store would
                console.log.warning("could not look up this job's runs at %s (%s): training it", self.tracking_uri, exc)
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return None
        return (f"MLflow run {found[0]} of this sweep job ended FINISHED; its checkpoints are not in "
                f"{self.output_dir}, so nothing is resumed")

    def _stop(self, signum: int, state: TrainState, saved_step: int, run: RunMetrics) -> Interrupted:
        """Save ``state`` (unless it is saved already) for a run stopped by ``signum``."""
        path = None
        if state.step > saved_step:
            path = self.checkpointer.save(state)
        elif state.step > 0:
            path = self.checkpointer.dir / checkpoint_name(state.step)
        return Interrupted(signum, state.step, path, run.run_id)

    def _start_state(self) -> TrainState:
        """Resume (``checkpoint.resume``), else start from a dense checkpoint (``init.from_dense``,
        moe_morpheus/upcycle), else from scratch; before the MLflow run opens, so that a resumed run
        logs into its own run."""
        state = self.checkpointer.resume()
        if state is not None:
            self.guards.load_state_dict(state.guards)
            return state
        if self.exp.init.from_dense is not None:
            from moe_morpheus.upcycle.load import upcycle_into

            return upcycle_into(self.model, self.exp, self.exp.init.from_dense)
        return TrainState(target_tokens=0)

    def _open_run(self, state: TrainState) -> RunMetrics:
        """The run's metrics and (rank 0) its MLflow run; a dense start logs its handoff loss."""
        from moe_morpheus.inference.evaluate import pooled_unigram

        # Pooled over every target of the full sets, as valid/loss is (comparable on one axis).
        entropy = pooled_unigram(self.data.unigram_entropy, self.data.valid)
        run = build_run_metrics(self.exp, self.resolved_config, state, plan=self.plan, counts=self.counts,
                                dp=self.dp, epochs=self.data.epochs, unigram_entropy=entropy,
                                output_dir=self.output_dir, parent_run_id=self.parent_run_id, rank0=is_rank0())
        if is_rank0():
            exp = self.exp
            console.run_started(self.output_dir, self.tracking_uri, run.run_id,
                                f"{model_line(exp.name, exp.model, exp.moe_or_none)}; variant {exp.run_variant}, "
                                f"layout {exp.layout}-dp{self.dp}, seed {exp.trainer.seed}", state.step)
            console.log.info(format_budget(self.plan))
        if state.lineage and state.step == 0:
            run.handoff(self.evaluate()[0])
        return run

    @property
    def tracking_uri(self) -> str:
        from moe_morpheus.tracking.names import resolve_uri

        return resolve_uri(self.exp.tracking.uri)

    def _batches(self, start_sample: int):
        t = self.exp.trainer
        return batch_iterator(self.data.train, global_batch_size=t.global_batch_size,
                              micro_batch_size=t.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp,
                              start_sample=start_sample)

    def _advance(self, state: TrainState, result: StepResult, run: RunMetrics) -> TrainState:
        """The state after ``state.step`` completed with ``result`` (what a checkpoint saves)."""
        step, tokens = state.step + 1, (state.step + 1) * self.tokens_per_step
        # None: resumed from a checkpoint without the count that could not be recounted exactly
        # (checkpoint.recount_targets); then no target_tokens_* are logged.
        target_tokens = None if state.target_tokens is None else state.target_tokens + result.targets
        return TrainState(step=step, consumed_samples=state.consumed_samples + self.exp.trainer.global_batch_size,
                          tokens=tokens, flops=tokens * self.plan.flops_per_token, run_id=run.run_id,
                          guards=self.guards.state_dict(), moe_load=run.load.totals, lineage=state.lineage,
                          target_tokens=target_tokens)

    def _roll_back(self, state: TrainState, run: RunMetrics) -> TrainState:
        """Back to the last checkpoint, on with the data after the batch of ``state.step`` that
        spiked (GLM-130B's data skip)."""
        end = state.consumed_samples + self.exp.trainer.global_batch_size
        restored = self.checkpointer.newest()
        self.guards.rolled_back(restored.guards["window"], (restored.consumed_samples, end))
        run.log(self.guards.metrics(), state.step + 1)
        return dataclasses.replace(restored, consumed_samples=end, run_id=state.run_id,
                                   guards=self.guards.state_dict())

    def _moe_stats(self) -> dict | None:
        """This step's routing statistics summed over every rank (one all-reduce): rank 0 logs,
        saves and plots the global load, and every rank saves the same checkpoint state."""
        from moe_morpheus.moe import collect_moe_stats

        moe = self.exp.moe
        if not moe.enabled:
            return None
        return collect_moe_stats(self.model, dist.group.WORLD, num_layers=self.exp.model.num_layers,
                                 num_experts=moe.num_experts)

    def _scheduled_evaluation(self, step: int, last: bool, run: RunMetrics) -> dict[str, float] | None:
        """The evaluation due after 0-based ``step`` (every ``trainer.eval_interval`` steps and
        after the last), or None. Intermediate ones may use a subset (``trainer.eval_subset``)."""
        t = self.exp.trainer
        if not (last or (t.eval_interval and (step + 1) % t.eval_interval == 0)):
            return None
        full = last or t.eval_subset == 1.0
        metrics = run.validation(*self.evaluate(full=full), full=full)
        if is_rank0():
            console.evaluation_line(step + 1, metrics, full=full)
        return metrics

    def _result(self, run: RunMetrics) -> TrainResult:
        tokens, entropy = self.plan.steps * self.tokens_per_step, run.unigram_entropy
        result = TrainResult(
            steps=self.plan.steps, tokens=tokens, final_train_loss=run.losses[-1] if run.losses else float("nan"),
            valid_losses=run.valid.losses(), best_valid_loss=min(run.valid_history), unigram_entropy=entropy,
            run_id=run.run_id, losses=run.losses, skipped_steps=self.guards.skipped,
        )
        if is_rank0():
            verdict = "below" if result.valid_losses["mean"] < entropy else "NOT below"
            console.log.info(f"validation loss {result.valid_losses['mean']:.3f} nats/token is {verdict} the "
                             f"corpus's unigram entropy {entropy:.3f}; {run.throughput.mean:,.0f} tokens/s")
            console.run_ended(self.output_dir, self.tracking_uri, run.run_id,
                              f"finished: step {self.plan.steps} of {self.plan.steps}")
        return result


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    progress = tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
    progress.update(done)
    return progress
