"""A real MLflow server that goes away: while a run is going (its first records reached the
server), for the whole of a training run, and at the end of a run. The run waits a bounded time
at the end (tracking.finish_timeout_s); what it could not deliver stays in its spool until
``python -m moe_morpheus.tracking sync RUN_FOLDER`` delivers it and ends the run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from moe_morpheus.tracking.names import TrackingWarning
from moe_morpheus.tracking.sync import main
from moe_morpheus.tracking.tracker import Tracker
from tests.helpers.mlflow_server import Server
from tests.helpers.train_app import SMALL, train

pytestmark = pytest.mark.slow


def sync_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_morpheus.tracking", "sync", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"})


def sync(capsys, *args: str) -> tuple[int, str]:
    """The same command in this process (a fresh interpreter costs 3-7 s here)."""
    capsys.readouterr()
    code = main(["sync", *args])
    return code, capsys.readouterr().out


def losses(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


def test_server_away_then_back_sync_delivers_and_ends_runs(tmp_path, capsys):
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server").start()
    client = MlflowClient(tracking_uri=server.uri)
    try:
        # Two runs reach the server with their first records; then it dies.
        during = Tracker(server.uri, "outage", "during", rank=0, tags={}, local_dir=tmp_path / "during",
                         finish_timeout_s=0)
        late = Tracker(server.uri, "outage", "late", rank=0, tags={}, local_dir=tmp_path / "late",
                       finish_timeout_s=300)
        for tracker in (during, late):
            tracker.start({"lr": 0.1}, "lr: 0.1\n")
            tracker.log_metrics({"train/loss": 2.0}, step=0)
        server.stop()

        # 1. Away at the end of a run that does not wait: its step 1 and its end stay in the spool.
        with pytest.warns(TrackingWarning) as caught:
            during.log_metrics({"train/loss": 1.0}, step=1)
            during.finish("FINISHED")
        assert "python -m moe_morpheus.tracking sync" in str(caught[-1].message)

        # 2. Away for a whole training run: it waits 1 s at the end, then leaves its spool.
        t0 = time.monotonic()
        train(tmp_path, "+experiment=moe_8e", "trainer.steps=3", f"tracking.uri={server.uri}",
              "tracking.finish_timeout_s=1", "hydra.run.dir=outputs/away", *SMALL)
        assert time.monotonic() - t0 < 120
        run_dir = tmp_path / "outputs" / "away"
        assert (run_dir / "mlflow" / "spool.jsonl").exists()
        assert sync_command(str(run_dir)).returncode == 1  # still away: the spool is kept

        # 3. Back within tracking.finish_timeout_s of a run's end: finish waits and delivers.
        threading.Thread(target=server.start, daemon=True).start()
        with pytest.warns(TrackingWarning, match="failed"):
            late.log_metrics({"train/loss": 1.0}, step=1)
            t0 = time.monotonic()
            late.finish("FINISHED")
        assert time.monotonic() - t0 < 300 and not late.spool_path.exists()
        assert client.get_run(late.run_id).info.status == "FINISHED"
        assert losses(client, late.run_id) == [(0, 2.0), (1, 1.0)]

        # 4. Back after the other two ended: sync delivers in order and ends each as it ended.
        assert client.get_run(during.run_id).info.status == "RUNNING"
        code, out = sync(capsys, str(tmp_path / "during"))
        assert code == 0 and "FINISHED" in out
        assert client.get_run(during.run_id).info.status == "FINISHED"
        assert losses(client, during.run_id) == [(0, 2.0), (1, 1.0)]
        code, out = sync(capsys, str(run_dir))
        assert code == 0 and "FINISHED" in out
        assert not (run_dir / "mlflow" / "spool.jsonl").exists()
        away = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
        assert len(away) == 1 and away[0].info.status == "FINISHED"
        assert [s for s, _ in losses(client, away[0].info.run_id)] == [1, 2, 3]
        assert away[0].info.run_name.startswith("moe_8e-moe-glm_tiny-")
        assert "config.yaml" in {a.path for a in client.list_artifacts(away[0].info.run_id)}
        assert "nothing to sync" in sync(capsys, str(run_dir))[1]
    finally:
        server.stop()
