"""What finds a run in MLflow: the experiment's kind (the UI opens on the runs table), readable
unique run names, and the short filter tags."""

from __future__ import annotations

import time

from mlflow import MlflowClient

from moe_morpheus.tracking.names import filter_tags, readable_run_name, short_count
from moe_morpheus.tracking.store import EXPERIMENT_KIND_TAG, check_reachable, ensure_experiment


def test_experiment_is_marked_for_model_development(tmp_path):
    """MLflow 3 opens an experiment tagged custom_model_development on its runs table (not the
    GenAI overview); experiments made elsewhere get the tag, a kind someone chose is kept."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    check_reachable(store)
    experiment = "kinds"
    client = MlflowClient(tracking_uri=store)
    made = client.get_experiment(ensure_experiment(client, experiment))
    assert made.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    bare = client.create_experiment(experiment + "_bare")
    ensure_experiment(client, experiment + "_bare")
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment(experiment + "_genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_experiment(client, experiment + "_genai")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_readable_run_names_and_filter_tags():
    started = time.mktime((2026, 12, 4, 0, 6, 29, 0, 0, -1))
    assert readable_run_name("moe_8e", "moe", "glm_tiny-633K", 7, started) == "moe_8e-moe-glm_tiny-633K-s7-20261204-000629"
    # Two jobs of one multirun starting in the same second stay apart by their job number.
    assert readable_run_name("d", "dense", "1.2B", 1, started, job=3).endswith("-20261204-000629-j3")
    assert [short_count(n) for n in (999, 633_416, 1_234_567, 34_950_000_000)] == ["999", "633K", "1.2M", "35B"]
    dense = filter_tags(model=None, experts=0, top_k=0, active_params=10, total_params=10, budget_fraction=0.0123456,
                        seed=3)
    assert dense == {"experts": "0", "top_k": "0", "active_params": "10", "total_params": "10",
                     "budget_fraction": "0.01235", "seed": "3"}
