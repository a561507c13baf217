"""What a training run tells its user, on the console and in ``<run folder>/train.log``.

Everything goes through :mod:`logging`: Hydra's job logging (``conf/hydra/job_logging/run.yaml``)
sends the root logger to the console and to ``train.log``, and the per-interval lines of
:data:`STEPS` to ``train.log`` only (the console has the progress bar). A ``print`` would reach
the console and never the file, which is why ``train.log`` was empty before.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("moe_morpheus.run")
# One line every trainer.log_interval steps; train.log only (conf/hydra/job_logging/run.yaml).
STEPS = logging.getLogger("moe_morpheus.steps")


class ConsoleFormatter(logging.Formatter):
    """The message alone for INFO (the console reads like a program's output, not a log),
    ``warning: ...`` / ``error: ...`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def mlflow_location(uri: str, run_id: str | None) -> str:
    """``MLflow run <id> at <uri>``, with the run's page for an HTTP server."""
    if run_id is None:
        return f"MLflow run not created yet ({uri} did not answer; records are spooled in the run folder)"
    where = f"MLflow run {run_id} at {uri}"
    if uri.startswith(("http://", "https://")):
        try:
            from mlflow import MlflowClient

            experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
            where += f" ({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
        except Exception:  # the page is a convenience; the id is enough to find the run
            pass
    return where


def run_started(output_dir: Path, uri: str, run_id: str | None, summary: str, resumed_step: int) -> None:
    how = f"resumed at step {resumed_step}" if resumed_step else "started"
    log.info("run %s: %s; %s", how, output_dir, mlflow_location(uri, run_id))
    log.info("config: %s", summary)


def step_line(step: int, total: int, metrics: dict[str, float]) -> None:
    STEPS.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f budget %.3g%%", step, total,
               metrics["train/loss"], metrics["train/lr"], metrics["train/grad_norm"],
               metrics["throughput/tokens_per_s"], 100 * metrics["budget_fraction"])


def evaluation_line(step: int, metrics: dict[str, float], *, full: bool) -> None:
    prefix = "valid" if full else "valid_subset"
    tasks = " ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.startswith("eval/"))
    log.info("step %d evaluation (%s): %s/loss %.4f ± %.4f%s", step, "full sets" if full else "subset",
             prefix, metrics[f"{prefix}/loss"], metrics[f"{prefix}/loss_se"], f" {tasks}" if tasks else "")


def run_ended(output_dir: Path, uri: str, run_id: str | None, what: str) -> None:
    log.info("%s; run folder %s; %s", what, output_dir, mlflow_location(uri, run_id))
