"""The numbers a training run logs, assembled outside the loop: per step (``train/*``, ``guards/*``,
tokens and FLOPs with and without the sunk compute of a dense start, target tokens, the budget
fraction, throughput, ``epochs/*``, ``moe/*``), at each evaluation (``valid/*`` or
``valid_subset/*`` and the task metrics) and at the end (``final/*``, ``best/valid_loss``).
report/collect.py reads these names."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_morpheus.inference.evaluate import Validation
    from moe_morpheus.planning.budget import RunPlan
    from moe_morpheus.tracking.run_log import RunLogger
    from moe_morpheus.train.checkpoint import TrainState
    from moe_morpheus.train.optim import GradNorms


@dataclass(frozen=True)
class Sunk:
    """Compute spent before this run: the dense run it started from (``TrainState.lineage``, written
    by moe_morpheus/upcycle/convert.py), nothing for a run from scratch."""

    tokens: int = 0
    flops: float = 0.0
    # None: the dense checkpoint predates target counting (target_tokens_with_sunk not logged).
    target_tokens: int | None = 0

    @classmethod
    def of(cls, lineage: dict) -> Sunk:
        if not lineage:
            return cls()
        return cls(lineage.get("tokens", 0), lineage.get("flops", 0.0), lineage.get("target_tokens"))

    def metrics(self, tokens: int, flops: float, target_tokens: int | None) -> dict[str, float]:
        """``*_with_sunk``: this run's counts plus the sunk ones."""
        out = {"flops_with_sunk": flops + self.flops, "tokens_with_sunk": tokens + self.tokens}
        if target_tokens is not None and self.target_tokens is not None:
            out["target_tokens_with_sunk"] = target_tokens + self.target_tokens
        return out


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


class MoELoad:
    """Expert load per layer: (token, slot) assignments per global expert summed over training
    steps and every rank (``collect_moe_stats`` over the world, so every rank holds the same
    totals). ``totals`` is updated in place: the trainer's state (and so every checkpoint) holds
    it; moe_load.json holds its fractions, for the report's heatmap."""

    def __init__(self, totals: dict[str, list[float]]):
        self.totals = totals

    def add(self, stats: dict) -> dict[str, float]:
        """Accumulate the per-expert loads; return the scalar statistics for logging."""
        scalars = {}
        for key, value in stats.items():
            if key.endswith("/load"):
                layer = key.split("/")[1]
                total = self.totals.setdefault(layer, [0.0] * len(value))
                for i, v in enumerate(value):
                    total[i] += float(v)
            else:
                scalars[key] = float(value)
        return scalars

    def fractions(self) -> dict[str, list[float]]:
        return {layer: [v / max(sum(t), 1e-12) for v in t] for layer, t in self.totals.items()}


class RunMetrics:
    """One run's metrics and their history, logged through ``logger`` (rank 0; None elsewhere, where
    only the history is kept). ``epochs(consumed_samples)``: passes over each data source;
    ``moe_load``: the expert-load totals so far (:class:`MoELoad`); ``unigram_entropy``: the
    corpus's unigram baseline pooled as valid/loss is (``inference.evaluate.pooled_unigram``)."""

    def __init__(self, plan: RunPlan, sunk: Sunk, epochs: Callable[[int], dict[str, float]],
                 moe_load: dict[str, list[float]], unigram_entropy: float, logger: RunLogger | None):
        self.plan = plan
        self.sunk = sunk
        self.epochs = epochs
        self.unigram_entropy = unigram_entropy
        self.logger = logger
        self.throughput = Throughput()
        self.load = MoELoad(moe_load)
        self.losses: list[float] = []  # training losses of the steps that were not rolled back
        self.valid_history: list[float] = []  # full-set validation losses
        self.valid: Validation | None = None  # the latest full-set validation

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger:
            self.logger.log(metrics, step)

    def handoff(self, valid: Validation) -> None:
        """Log the loss at the handoff from a dense checkpoint, before any update (equal to the
        dense run's for a function-preserving conversion; what he_scaling / drop cost)."""
        self.log({**valid.metrics(), **self.sunk.metrics(0, 0.0, 0)}, 0)

    def step(self, state: TrainState, *, loss: float, lr: float, norms: GradNorms, guards: dict[str, float],
             moe_stats: dict | None) -> dict[str, float]:
        """What is logged after the step that led to ``state``; ``moe_stats``: ``collect_moe_stats``
        of the step (None for a dense model)."""
        plan = self.plan
        self.losses.append(loss)
        tokens = state.step * plan.tokens_per_step
        flops = tokens * plan.flops_per_token
        metrics = {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": norms.total,
            "train/grad_norm_embedding": norms.embedding, "train/grad_norm_rest": norms.rest,
            **guards,
            "tokens_seen": tokens, "flops": flops, "flops_6nd": 6 * plan.n_params * tokens,
            **self.sunk.metrics(tokens, flops, state.target_tokens),
            # Positions with loss; "tokens" (budgets, FLOPs) are positions processed. None: resumed
            # from a checkpoint without the count that could not be recounted exactly.
            **({} if state.target_tokens is None else {"target_tokens_seen": state.target_tokens}),
            "budget_fraction": tokens / plan.budget_tokens,
            "throughput/tokens_per_s": self.throughput.last,
        }
        metrics.update({f"epochs/{k}": v for k, v in self.epochs(state.consumed_samples).items()})
        if moe_stats is not None:
            metrics.update(self.load.add(moe_stats))
        return metrics

    def validation(self, valid: Validation, tasks: dict[str, float], *, full: bool) -> dict[str, float]:
        """An evaluation's metrics: ``valid/*`` for the full sets, ``valid_subset/*`` for a subset
        (``trainer.eval_subset``). Only full-set losses are comparable with each other and count
        for best/valid_loss (a minimum over noisier subset points would be biased low)."""
        if full:
            self.valid_history.append(valid.loss)
            self.valid = valid
        return {**valid.metrics("valid" if full else "valid_subset"), **tasks}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Around the training: the MLflow run ends FINISHED, KILLED (Ctrl-C, or a signal that stopped
        the run after saving: train/interrupts.py raises a KeyboardInterrupt) or FAILED."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.finish(status)

    def finish(self, status: str) -> None:
        """Close the MLflow run with its summary and the expert load (moe_load.json). A run that did
        not finish gets no ``final/*``: they would claim the planned tokens (a resumed run logs them
        when it finishes)."""
        if not self.logger:
            return
        if status != "FINISHED":
            self.logger.finish(status, {}, self.load.fractions())
            return
        plan = self.plan
        tokens = plan.steps * plan.tokens_per_step
        summary = {"final/tokens": tokens, "final/flops": tokens * plan.flops_per_token,
                   "final/flops_with_sunk": tokens * plan.flops_per_token + self.sunk.flops,
                   "final/tokens_per_s": self.throughput.mean, "final/unigram_entropy": self.unigram_entropy}
        if self.valid_history:
            summary.update({"final/valid_loss": self.valid_history[-1], "best/valid_loss": min(self.valid_history)})
        self.logger.finish(status, summary, self.load.fractions())
