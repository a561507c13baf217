"""MLflow -> tidy pandas frames: the runs a report covers, their curves and expert loads.

Everything here follows the run contract the trainer logs (tags ``variant``, ``experiment``,
``sweep``, ``mlflow.parentRunId``, ``upcycled_from_run``; flattened dotted params plus the
computed ``count.*``, ``budget.*``, ``flops_per_token``, ``sunk.*``; metrics against the step;
``final/*`` and ``best/*`` summaries; the ``moe_load.json`` artifact). Nothing is fatal except
naming an experiment, sweep or parent run that does not exist: every other gap (a crashed run,
a missing metric or artifact, runs from several sweeps) becomes a line in ``problems`` and the
report is still written.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from moe_morpheus.report.configs import config_signature, differing_keys, group_labels, sweep_role
from moe_morpheus.report.roles import ROLES
from moe_morpheus.tracking.carried import carried_artifact

PARENT_TAG = "mlflow.parentRunId"
VARIANTS = ("dense", "moe", "upcycled")
MOE_LOAD_ARTIFACT = "moe_load.json"

# Params read into typed columns: column -> MLflow param key.
NUMERIC_PARAMS = {
    "total_params": "count.total_params",
    "active_params": "count.active_params",
    "embedding_params": "count.embedding_params",
    "non_embedding_params": "count.non_embedding_params",
    "num_layers": "model.num_layers",
    "hidden_size": "model.hidden_size",
    "num_experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "layer_freq": "moe.layer_freq",
    "seed": "trainer.seed",
    "chinchilla_tokens": "budget.chinchilla_tokens",
    "chinchilla_fraction": "budget.chinchilla_fraction",
    "planned_tokens": "budget.planned_tokens",
    "flops_per_token": "flops_per_token",
    "sunk_tokens": "sunk.tokens",
    "sunk_flops": "sunk.flops",
}
# Summary metrics: column -> MLflow metric key (logged once, at the end of a run).
FINAL_METRICS = {
    "final_valid_loss": "final/valid_loss",
    "best_valid_loss": "best/valid_loss",
    "final_tokens": "final/tokens",
    "final_flops": "final/flops",
    "final_tokens_per_s": "final/tokens_per_s",
    "unigram_entropy": "final/unigram_entropy",
}
# Curves fetched with get_metric_history; train/lr, grad norms and throughput are not plotted.
# ``target_tokens_seen`` (positions with a loss) and ``valid/loss_se`` (standard error of
# valid/loss) are absent from older runs: their cells read "-".
CURVE_KEYS = ("tokens_seen", "target_tokens_seen", "flops", "flops_6nd", "budget_fraction", "train/loss")
# valid_subset/: intermediate evaluations on a fixed share of the validation sets
# (trainer.eval_subset < 1); valid/ holds full-set evaluations only.
CURVE_PREFIXES = ("valid/", "valid_subset/", "epochs/", "moe/")
# x axes a validation point is placed on; logged every step, interpolated over the step where a
# validation step has none of its own.
X_AXES = ("tokens_seen", "flops", "flops_6nd")
VALID_SET = re.compile(r"^valid/(.+)/loss$")


class SelectionError(LookupError):
    """The experiment, sweep or parent run named on the command line does not exist."""


@dataclass
class Collection:
    """What a report covers.

    runs: one row per training run, indexed by run id (columns: see :func:`run_row`).
    curves: run id -> metrics wide by step (index ``step``), x axes filled at every step.
    moe_load: run id -> {"layer{i}": per-expert assignment fractions} from ``moe_load.json``.
    valid_sets: names ``<set>`` of the ``valid/<set>/loss`` metrics, sorted.
    problems: what was skipped or is doubtful, and why, one sentence each.
    config_keys: the params in which the runs' configurations differ (report/configs.py).
    """

    experiment: str
    scope: str
    runs: pd.DataFrame
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    moe_load: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    valid_sets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    config_keys: list[str] = field(default_factory=list)


def _float(value: str | None) -> float:
    """A param as a number; NaN when absent or not numeric (dense runs log moe.num_experts as
    0 or None depending on the config)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment_runs(client: MlflowClient, name: str) -> list[Run]:
    """All runs of MLflow experiment ``name``; when no MLflow experiment has that name, the runs
    of any experiment tagged ``experiment=name`` (the experiment config name). Raises
    :class:`SelectionError` listing the MLflow experiments when neither exists."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "active":
        return _search_all(client, [exp.experiment_id])
    experiments = [e for e in client.search_experiments() if e.lifecycle_stage == "active"]
    if experiments:
        tagged = _search_all(client, [e.experiment_id for e in experiments],
                             f"tags.experiment = '{name}'") if "'" not in name else []
        if tagged:
            return tagged
    names = ", ".join(sorted(e.name for e in experiments)) or "none"
    raise SelectionError(f"no MLflow experiment (or runs tagged experiment={name!r}) named {name!r} "
                         f"in this store. Experiments that exist: {names}")


def select_runs(runs: list[Run], sweep: str | None, parent: str | None) -> tuple[list[Run], str, list[str]]:
    """(training runs, scope sentence, problems) for a sweep name, a parent run id, or neither.

    Training runs are those tagged with a variant; a sweep's parent run carries ``sweep`` but no
    variant and is not one. Runs with some other variant are skipped with a problem line.
    """
    problems: list[str] = []
    by_id = {r.info.run_id: r for r in runs}
    if parent is not None:
        if parent not in by_id:
            parents = sorted({r.data.tags[PARENT_TAG] for r in runs if PARENT_TAG in r.data.tags})
            raise SelectionError(f"parent run {parent!r} is not in this experiment. Parent runs with "
                                 f"children here: {', '.join(parents) or 'none'}")
        chosen = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent]
        scope = f"children of parent run `{parent}` (sweep {by_id[parent].data.tags.get('sweep', 'unnamed')})"
    elif sweep is not None:
        parents = sorted(r.info.run_id for r in runs
                         if r.data.tags.get("sweep") == sweep and PARENT_TAG not in r.data.tags
                         and "variant" not in r.data.tags)
        chosen = [r for r in runs if r.data.tags.get("sweep") == sweep or r.data.tags.get(PARENT_TAG) in parents]
        if not chosen:
            sweeps = sorted({r.data.tags["sweep"] for r in runs if "sweep" in r.data.tags})
            raise SelectionError(f"no runs of sweep {sweep!r} in this experiment. Sweeps here: "
                                 f"{', '.join(sweeps) or 'none'}")
        scope = f"sweep `{sweep}`"
        if len(parents) > 1:
            problems.append(f"sweep {sweep!r} was launched {len(parents)} times (parent runs "
                            f"{', '.join(parents)}); the runs of all launches are included together.")
    else:
        chosen = list(runs)
        scope = "all runs of the experiment"
    training = []
    for r in chosen:
        variant = r.data.tags.get("variant")
        if variant in VARIANTS:
            training.append(r)
        elif variant is not None:
            problems.append(f"run `{r.info.run_id}` has variant {variant!r}, not one of {VARIANTS}: skipped.")
        elif PARENT_TAG in r.data.tags or "sweep" not in r.data.tags:
            # Not a sweep's parent (those have a sweep tag and no parent): a stray run.
            problems.append(f"run `{r.info.run_id}` ({r.data.tags.get('mlflow.runName', 'unnamed')}) has "
                            "no variant tag, so it is not a training run of this project: skipped.")
    lineage = {r.data.tags.get("sweep") or r.data.tags.get(PARENT_TAG) or "(none)" for r in training}
    if len(lineage) > 1:
        problems.append(f"mixed sweeps: the runs come from {len(lineage)} sweeps ({', '.join(sorted(lineage))}); "
                        "their comparison mixes configurations and launches. Pass sweep=NAME or parent=RUN_ID to "
                        "report on one.")
    return training, scope, problems


def curve_frame(histories: dict[str, list[tuple[int, int, float]]]) -> pd.DataFrame:
    """Metric histories -> one frame indexed by step, a column per metric.

    histories: key -> [(step, timestamp, value)]. Where a step was logged twice (a resumed run
    replays steps after its last checkpoint) the latest timestamp wins. The x axes (tokens_seen,
    flops, flops_6nd) are linearly interpolated over the step at steps that lack them (e.g. a
    validation logged on its own), never extrapolated past their first or last logged step.
    """
    columns = {}
    for key, points in histories.items():
        if not points:
            continue
        pts = pd.DataFrame(points, columns=["step", "ts", "value"]).sort_values(["step", "ts"])
        columns[key] = pts.drop_duplicates("step", keep="last").set_index("step")["value"]
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "step"
    for axis in X_AXES:
        if axis in frame:
            known = frame[axis].dropna()
            if len(known):
                steps = frame.index.to_numpy(float)
                filled = np.interp(steps, known.index.to_numpy(float), known.to_numpy())
                inside = (steps >= known.index.min()) & (steps <= known.index.max())
                frame[axis] = np.where(inside, filled, np.nan)
    return frame


def run_row(run: Run, curves: pd.DataFrame, valid_sets: list[str]) -> dict:
    """The table row of one run: tags, typed params, summary metrics, per-set final/best loss.

    ``final_flops_6nd`` is the last ``flops_6nd``; ``total_flops`` = own FLOPs + the sunk FLOPs
    of the dense checkpoint a run started from (what the trainer logs as ``flops_with_sunk``);
    ``tokens_per_active_param`` = final tokens (positions) / active params;
    ``chinchilla_fraction_used`` = final tokens / the Chinchilla budget; ``target_tokens`` is the
    last ``target_tokens_seen`` and ``valid_loss_se`` the last ``valid/loss_se`` (NaN for runs
    that predate them); ``role`` / ``extra`` the staged upcycling sweep's role and extra budget.
    """
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    role, extra = sweep_role(tags)
    row = {
        "run_id": run.info.run_id,
        "name": tags.get("mlflow.runName", run.info.run_id[:8]),
        "variant": tags["variant"],
        "status": run.info.status,
        "sweep": tags.get("sweep"),
        "parent_run_id": tags.get(PARENT_TAG),
        "upcycled_from": tags.get("upcycled_from_run"),
        "experiment_tag": tags.get("experiment"),
        "parallel_layout": tags.get("parallel_layout"),
        "gate": params.get("moe.gate"),
        "role": role,
        "extra": extra,
    }
    row.update({col: _float(params.get(key)) for col, key in NUMERIC_PARAMS.items()})
    row.update({col: metrics.get(key, np.nan) for col, key in FINAL_METRICS.items()})
    last = curves.ffill().iloc[-1] if len(curves) else pd.Series(dtype=float)
    row["final_flops_6nd"] = last.get("flops_6nd", np.nan)
    # A crashed run has no final/ metrics; its last logged tokens and FLOPs still say how far it got.
    row["tokens_reached"] = row["final_tokens"] if np.isfinite(row["final_tokens"]) else last.get("tokens_seen", np.nan)
    row["flops_reached"] = row["final_flops"] if np.isfinite(row["final_flops"]) else last.get("flops", np.nan)
    row["sunk_flops"] = 0.0 if not np.isfinite(row["sunk_flops"]) else row["sunk_flops"]
    row["sunk_tokens"] = 0.0 if not np.isfinite(row["sunk_tokens"]) else row["sunk_tokens"]
    row["total_flops"] = row["flops_reached"] + row["sunk_flops"]
    row["target_tokens"] = last.get("target_tokens_seen", np.nan)
    row["valid_loss_se"] = last.get("valid/loss_se", np.nan)
    row["tokens_per_active_param"] = row["tokens_reached"] / row["active_params"]
    row["chinchilla_fraction_used"] = row["tokens_reached"] / row["chinchilla_tokens"]
    for name in valid_sets:
        series = curves.get(f"valid/{name}/loss", pd.Series(dtype=float)).dropna()
        row[f"final:{name}"] = series.iloc[-1] if len(series) else np.nan
        row[f"best:{name}"] = series.min() if len(series) else np.nan
    # Zero-shot task metrics (moe_morpheus.inference.evaluate) as of the run's last evaluation.
    row["eval"] = {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}
    epochs = {k[len("epochs/"):]: curves[k].max() for k in curves if k.startswith("epochs/")}
    row["epochs"] = epochs
    row["max_epochs"] = max(epochs.values()) if epochs else np.nan
    return row


def _histories(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, int, float]]]:
    keys = [k for k in run.data.metrics if k in CURVE_KEYS or k.startswith(CURVE_PREFIXES)]
    return {k: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, k)]
            for k in keys}


def _moe_load(client: MlflowClient, run_id: str) -> dict[str, list[float]] | None:
    """``moe_load.json`` of a run, or None when absent or unreadable (dense or crashed runs).
    Looked up at the run's artifact URI, then where a store snapshot carried it (a store
    committed from another machine, whose artifact paths are that machine's)."""
    try:
        if any(f.path == MOE_LOAD_ARTIFACT for f in client.list_artifacts(run_id)):
            with tempfile.TemporaryDirectory() as tmp:
                data = json.loads(Path(client.download_artifacts(run_id, MOE_LOAD_ARTIFACT, tmp)).read_text())
        elif carried := carried_artifact(client.tracking_uri, run_id, MOE_LOAD_ARTIFACT):
            data = json.loads(carried.read_text())
        else:
            return None
    except (MlflowException, OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: [float(x) for x in v] for k, v in data.items() if isinstance(v, list) and v}


def _run_problems(row: dict, curves: pd.DataFrame, is_moe: bool, has_load: bool) -> list[str]:
    """Why a run is left out of some part of the report; the comparisons take only FINISHED runs
    that logged a validation curve on the FLOPs axis."""
    rid = f"run `{row['run_id']}` ({row['name']}, {row['variant']})"
    out = []
    if row["status"] == "RUNNING":
        out.append(f"{rid} is still RUNNING (or was killed without ending: a SIGKILLed run stays RUNNING): "
                   "shown in the table and curves, left out of the comparisons and fits.")
    elif row["status"] != "FINISHED":
        out.append(f"{rid} ended {row['status']}: shown in the table and curves, left out of the "
                   "comparisons and fits.")
    if "valid/loss" not in curves or curves["valid/loss"].notna().sum() == 0:
        out.append(f"{rid} logged no valid/loss: no curves, left out of the comparisons.")
    elif "flops" not in curves:
        out.append(f"{rid} logged no flops metric: left out of the FLOPs plots and the matched-compute comparison.")
    if row["status"] == "FINISHED" and not np.isfinite(row["final_valid_loss"]):
        out.append(f"{rid} has no final/valid_loss summary: left out of the scaling fit.")
    if not np.isfinite(row["active_params"]):
        out.append(f"{rid} has no count.active_params param: tokens per parameter unknown.")
    if is_moe and not has_load:
        out.append(f"{rid} has no {MOE_LOAD_ARTIFACT} artifact: no expert-load heatmap.")
    return out


def collect(uri: str, experiment: str, sweep: str | None = None, parent: str | None = None) -> Collection:
    """Read the runs a report covers. Raises :class:`SelectionError` for an unknown experiment,
    sweep or parent run (the CLI turns it into a message and a non-zero exit)."""
    client = MlflowClient(tracking_uri=uri)
    runs, scope, problems = select_runs(experiment_runs(client, experiment), sweep, parent)
    if not runs:
        problems.insert(0, f"no training runs found ({scope} of experiment {experiment!r}): nothing to report.")
        return Collection(experiment, scope, pd.DataFrame(), problems=problems)
    runs.sort(key=lambda r: (VARIANTS.index(r.data.tags["variant"]), r.info.start_time or 0))
    curves = {r.info.run_id: curve_frame(_histories(client, r)) for r in runs}
    valid_sets = sorted({m.group(1) for c in curves.values() for k in c if (m := VALID_SET.match(k))})
    rows, loads = [], {}
    for r in runs:
        row = run_row(r, curves[r.info.run_id], valid_sets)
        is_moe = r.data.tags["variant"] != "dense"
        load = _moe_load(client, r.info.run_id) if is_moe else None
        if load:
            loads[r.info.run_id] = load
        problems.extend(_run_problems(row, curves[r.info.run_id], is_moe, bool(load)))
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("run_id", drop=False)
    # Roles of the staged upcycling sweep name its arms; other runs go by their variant.
    frame["arm"] = [ROLES.get(role, role) if pd.notna(role) else variant
                    for role, variant in zip(frame["role"], frame["variant"])]
    bases = [arm + (f" +{extra}" if pd.notna(extra) else "") for arm, extra in zip(frame["arm"], frame["extra"])]
    signatures = [config_signature(r.data.params) for r in runs]
    frame["group"] = group_labels(bases, signatures)
    dup = frame[frame["seed"].notna()].groupby(["group", "seed"])["run_id"].apply(list)
    for (group, seed), ids in dup[dup.map(len) > 1].items():
        problems.append(f"{len(ids)} runs of {group} share seed {seed:g} ({', '.join(ids)}): a rerun? Their final "
                        "losses are averaged into one value for that seed.")
    return Collection(experiment, scope, frame, curves, loads, valid_sets, problems, differing_keys(signatures))
