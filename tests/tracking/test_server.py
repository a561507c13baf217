"""Training, a sweep, evaluation and the report against a real MLflow server with basic
authentication, started by scripts/mlflow_server.sh (the shared-server recipe): the server refuses
a client without credentials, runs given them through the environment log everything, and the
parameters a researcher filters on are found through the search API as the compare view does."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from moe_morpheus.tracking.names import PARENT_TAG, TrackingUnreachableError
from moe_morpheus.tracking.store import EXPERIMENT_KIND_TAG, check_reachable
from tests.helpers.mlflow_server import ADMIN, Server
from tests.helpers.train_app import SMALL, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = Server(tmp_path_factory.mktemp("mlflow_server"), auth=True).start()
    yield started
    started.stop()


def test_server_listens_on_localhost_and_refuses_unauthenticated_clients(server, monkeypatch):
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == server.port]
    assert [a.ip for a in listening] == ["127.0.0.1"]
    for key in ADMIN:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(tracking_uri=server.uri).search_experiments()
    assert refused.value.get_http_status_code() == 401
    with pytest.raises(TrackingUnreachableError, match="refused the credentials: set MLFLOW_TRACKING_USERNAME"):
        check_reachable(server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(TrackingUnreachableError, match="refused the credentials"):
        check_reachable(server.uri)
    for key, value in ADMIN.items():
        monkeypatch.setenv(key, value)
    check_reachable(server.uri)


def test_sweep_evaluate_and_report_against_the_server(server, tmp_path, monkeypatch):
    # Two jobs of one multirun, credentials from the environment only.
    train(tmp_path, "-m", "+sweeps=dense_vs_moe", "+experiment=moe_8e", "trainer.seed=1,2",
          "budget.chinchilla_fraction=0.0005", "trainer.steps=2", f"tracking.uri={server.uri}", *SMALL, env=ADMIN)
    for key, value in ADMIN.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("moe_morpheus")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # the UI opens on the runs table
    ids = [experiment.experiment_id]

    # What the compare view filters on, as flat tags and params.
    children = client.search_runs(ids, "tags.variant = 'moe' and tags.experts = '8' and tags.top_k = '2' and "
                                       "tags.model = 'glm_tiny' and tags.sweep = 'dense_vs_moe'")
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    parent = client.search_runs(ids, "tags.sweep = 'dense_vs_moe' and attributes.run_name = 'dense_vs_moe'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert {r.data.tags[PARENT_TAG] for r in children} == {parent[0].info.run_id}
    names = sorted(r.info.run_name for r in children)
    assert names[0] != names[1] and all(n.startswith("moe_8e-moe-glm_tiny-") for n in names)
    assert "-s1-" in names[0] and names[0].endswith("-j0") and "-s2-" in names[1] and names[1].endswith("-j1")
    seed2 = client.search_runs(ids, "tags.seed = '2' and params.`trainer.seed` = '2' and params.`moe.num_experts` = '8'")
    assert [r.info.run_name for r in seed2] == [names[1]]
    run = seed2[0]
    assert run.data.tags["active_params"] == run.data.params["count.active_params"]
    assert run.data.tags["total_params"] == run.data.params["count.total_params"]
    assert float(run.data.tags["budget_fraction"]) == pytest.approx(run.data.metrics["budget_fraction"], rel=1e-3)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "moe_load.json"]

    # evaluate mlflow=true logs into the checkpoint's run on the same server.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    evaluated = subprocess.run(
        [sys.executable, "-m", "moe_morpheus.inference.evaluate", f"checkpoint={run.data.tags['run_dir']}/checkpoints",
         "items=2", "mlflow=true"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**env, "PYTHONWARNINGS": "ignore::UserWarning"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval/cloze_en/accuracy" in client.get_run(run.info.run_id).data.metrics

    from moe_morpheus.report.__main__ import main as report

    out = tmp_path / "report"
    assert report(["experiment=moe_morpheus", "sweep=dense_vs_moe", f"tracking_uri={server.uri}", f"out={out}"]) == 0
    text = (out / "report.md").read_text()
    assert all(r.info.run_id in text for r in children)
