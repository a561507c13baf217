"""MLflow names: the tracking URI, keys and values cleaned to what MLflow accepts, the run tags
every run carries, and the constants shared by the tracker, the sweep callback and the reports."""


from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
)

PARENT_RUN_ENV = "MOE_MORPHEUS_PARENT_RUN_ID"
PARENT_RUN_FILE = "mlflow_parent_run_id"
PARENT_TAG = "mlflow.parentRunId"
TRUNCATION_MARKER = "...[truncated]"
VARIANTS = ("dense", "moe", "upcycled")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# The folder inside a run's local_dir that holds the spool and the staged config artifact.
LOCAL_SUBDIR = "mlflow"

# MLflow accepts only these characters in param, metric and tag keys (on POSIX); one bad key
# would get a whole batch of 100 params rejected, so keys are sanitised instead.
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


class TrackingWarning(UserWarning):
    """Tracking degraded (server unreachable, record rejected); training goes on."""


class TrackingUnreachableError(RuntimeError):
    """The tracking store cannot be reached; raised only by :func:`check_reachable` (strict mode)."""


SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (as written: relative paths stay relative), or None."""
    return Path(uri[len(SQLITE_PREFIX):]) if uri.startswith(SQLITE_PREFIX) else None


def resolve_uri(uri: str | None) -> str:
    """The tracking URI with any SQLite path made absolute against the current directory.

    None means MLflow's default, ``mlflow.db`` in the launch directory (the current directory
    under Hydra's ``hydra.job.chdir=False``). Resolving once, up front, keeps every job and
    rank on the same database even if something changes directory later.
    """
    if uri is None:
        return f"{SQLITE_PREFIX}{Path.cwd() / 'mlflow.db'}"
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"{SQLITE_PREFIX}{(Path.cwd() / path).resolve()}"
    return uri


def fit_key(key: str) -> str:
    """A valid MLflow key: bad characters replaced, over-long keys shortened with a hash so two
    long keys sharing a prefix stay distinct."""
    key = _BAD_KEY_CHARS.sub("_", key)
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{key[: MAX_ENTITY_KEY_LENGTH - 9]}-{digest}"


def fit_value(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values, within MLflow's param limits.

    Lists are stringified whole (a list index is not a config key a researcher filters on).
    Keys longer than 250 characters are shortened with a hash suffix, values longer than
    6000 characters end in ``...[truncated]``.
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, dotted))
        else:
            flat[fit_key(dotted)] = fit_value(str(value), MAX_PARAM_VAL_LENGTH)
    return flat


def batched(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package (or ``repo_dir``); None when
    git or the repository is missing, so it never fails a run."""
    cwd = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(
    variant: str,
    experiment: str,
    sweep: str | None,
    parallel_layout: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The tags every training run carries (reports group and filter on them)."""
    if variant not in VARIANTS:
        raise ValueError(f"run_tags: variant={variant!r} is not one of {VARIANTS}")
    tags = {"variant": variant, "experiment": experiment, "parallel_layout": parallel_layout}
    if sweep is not None:
        tags["sweep"] = sweep
    commit = git_commit()
    if commit is not None:
        # MLflow's own key, so the UI links the commit; set explicitly because MLflow only
        # fills it in for fluent runs started from a script inside the checkout.
        tags["mlflow.source.git.commit"] = commit
    tags.update(extra or {})
    return tags


def short_count(n: float) -> str:
    """634_421 -> '634K', 1_234_567_890 -> '1.2B': a parameter count readable in a run name."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            value = n / div
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(int(n))


def readable_run_name(experiment: str, variant: str, size: str, seed: int, started: float,
                      job: int | None = None) -> str:
    """A run name that tells runs apart in the MLflow table: experiment, variant, size (model
    preset and active parameters), seed, start time (to the second), and the job number within a
    multirun (two jobs of one sweep may start in the same second with the same seed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    job_part = f"-j{job}" if job is not None else ""
    return f"{experiment}-{variant}-{size}-s{seed}-{stamp}{job_part}"


def filter_tags(*, model: str | None, experts: int, top_k: int, active_params: int, total_params: int,
                budget_fraction: float, seed: int) -> dict[str, str]:
    """Short tags for what a researcher filters on in the runs table and search API
    (``tags.experts = '8' and tags.model = 'glm_tiny'``), next to ``variant`` and ``sweep``; the
    same values are also params under their config keys (``moe.num_experts``, ``trainer.seed``).
    A dense run has 0 experts and top-k 0."""
    tags = {"experts": str(experts), "top_k": str(top_k), "active_params": str(active_params),
            "total_params": str(total_params), "budget_fraction": f"{budget_fraction:.4g}", "seed": str(seed)}
    if model is not None:
        tags["model"] = model
    return tags
