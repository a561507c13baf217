"""End to end through the CLI: ``target_tokens_seen`` (supervised target tokens trained on) equals
the loss-mask sum of the training rows consumed, counted here from the dataset, at DP=1, at DP=2
after a resume, and after resuming a checkpoint written before the count existed (recounted
exactly, or not at all)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from moe_morpheus.config import CheckpointConfig
from moe_morpheus.train.checkpoint import Checkpointer, TrainState, policy
from tests.helpers.train_app import SMALL, train

# SMALL: sequence 64, 4 rows per step (micro-batches of 2: two per step at DP=1, one per rank at DP=2).
RUN = ["+experiment=dense", "trainer.steps=4", "checkpoint.interval_steps=2", "trainer.eval_interval=0",
       "trainer.eval_task_items=0", "data.seed=77", *SMALL]


def _logged(tmp: Path, key: str) -> dict[int, list[float]]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
    values: dict[int, list[float]] = {}
    for m in client.get_metric_history(run.info.run_id, key):
        values.setdefault(m.step, []).append(m.value)
    return values


def _without_target_count(checkpoint: Path, copy: Path) -> Path:
    """A copy of ``checkpoint`` as written before target tokens were counted (checksums updated)."""
    shutil.copytree(checkpoint, copy)
    common = torch.load(copy / "common.pt", weights_only=True)
    del common["trainer"]["target_tokens"]
    torch.save(common, copy / "common.pt")
    data = (copy / "common.pt").read_bytes()
    manifest = json.loads((copy / "checkpoint.json").read_text())
    manifest["files"]["common.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy / "checkpoint.json").write_text(json.dumps(manifest))
    return copy


def _load_legacy(monkeypatch, saved: TrainState, targets: list[int]) -> TrainState:
    """Checkpointer._load of a checkpoint without a target count; ``targets[i]``: row i's."""
    monkeypatch.setattr(policy, "load_checkpoint", lambda *args, **kwargs: saved)
    loader = Checkpointer(CheckpointConfig(), [], None, directory=Path("unused"),
                          manifest={"model_shape": {}, "layout": {}}, count_targets=lambda a, b: sum(targets[a:b]))
    return loader._load(Path("unused"))


def test_a_legacy_recount_leaves_out_rolled_back_rows_and_never_guesses_for_an_upcycled_run(monkeypatch, caplog):
    targets = [3 + i % 7 for i in range(60)]
    # Two rollbacks skipped samples [8, 16) and [24, 28) before the data position 40.
    skipped = {"skipped_ranges": [[24, 28], [8, 16]]}
    state = _load_legacy(monkeypatch, TrainState(step=9, consumed_samples=40, guards=skipped), targets)
    assert state.target_tokens == sum(t for i, t in enumerate(targets[:40]) if not (8 <= i < 16 or 24 <= i < 28))
    assert _load_legacy(monkeypatch, TrainState(consumed_samples=40), targets).target_tokens == sum(targets[:40])
    # Started from a dense checkpoint at its data position, not recorded here: no count, a warning.
    lineage = {"kind": "upcycled", "tokens": 1024, "flops": 1.0, "steps": 4}
    with caplog.at_level(logging.WARNING):
        state = _load_legacy(monkeypatch, TrainState(step=3, consumed_samples=40, lineage=lineage), targets)
    assert state.target_tokens is None and "target_tokens_seen is not logged" in caplog.text


@pytest.mark.slow
def test_target_tokens_seen_counts_the_loss_mask_of_the_rows_consumed(tmp_path, demo_data_cfg):
    from moe_morpheus.data.dataset import build_data

    data = build_data(replace(demo_data_cfg, seed=77, valid_rows=4), 64, progress=False)
    per_step = [sum(float(data.train[i]["loss_mask"].sum()) for i in range(4 * s, 4 * s + 4)) for s in range(4)]
    expected = {step: sum(per_step[:step]) for step in range(1, 5)}
    assert 0 < per_step[0] < 4 * 64  # targets are a share of the positions

    run_dir = tmp_path / "run"
    train(tmp_path, f"hydra.run.dir={run_dir}", *RUN)
    step2 = run_dir / "checkpoints" / "step_00000002"
    # Resumed at DP=2 (the checkpoint reshards), and from a checkpoint without the count (recounted).
    train(tmp_path, f"hydra.run.dir={tmp_path / 'dp2'}", f"checkpoint.resume={step2}", "launch.nproc_per_node=2",
          *RUN)
    legacy = _without_target_count(step2, tmp_path / "legacy" / "step_00000002")
    train(tmp_path, f"hydra.run.dir={tmp_path / 'old'}", f"checkpoint.resume={legacy}", *RUN)

    # The resumed runs continue the first run's MLflow run: steps 3 and 4 are logged three times.
    logged = _logged(tmp_path, "target_tokens_seen")
    assert {step: len(v) for step, v in logged.items()} == {1: 1, 2: 1, 3: 3, 4: 3}
    assert all(v == expected[step] for step, values in logged.items() for v in values), (logged, expected)
    with_sunk = _logged(tmp_path, "target_tokens_with_sunk")  # nothing sunk: a run from scratch
    assert all(v == expected[step] for step, values in with_sunk.items() for v in values)
