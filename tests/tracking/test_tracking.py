"""MLflow tracking: params, metrics, tags, artifacts, sweeps, outages, resume, ranks."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    PERMISSION_DENIED,
    REQUEST_LIMIT_EXCEEDED,
    UNAUTHENTICATED,
)
from omegaconf import OmegaConf

from moe_morpheus.tracking import tracker as tracker_module
from moe_morpheus.tracking.names import (
    PARENT_RUN_ENV,
    PARENT_RUN_FILE,
    TRUNCATION_MARKER,
    TrackingUnreachableError,
    TrackingWarning,
    flatten_config,
    git_commit,
    resolve_uri,
    run_tags,
)
from moe_morpheus.tracking.store import check_reachable, is_permanent
from moe_morpheus.tracking.sweep_callback import MLflowSweepCallback, parent_run_id
from moe_morpheus.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its schema costs seconds, an experiment none."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    check_reachable(uri)  # creates the schema once
    return uri


@pytest.fixture
def experiment(request) -> str:
    return request.node.name


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def runs(uri: str, experiment: str, filter_string: str = ""):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def test_flatten_config_dotted_strings_and_limits():
    long_a = "a" * 300
    cfg = {
        "model": {"hidden": 64, "moe": {"top_k": 2, "gate": None}},
        "layers": [1, 2],
        "long": "x" * 7000,
        "bad key@": 1,
        long_a: {"one": 1, "two": 2},
    }
    flat = flatten_config(cfg)
    assert flat["model.hidden"] == "64"
    assert flat["model.moe.top_k"] == "2"
    assert flat["model.moe.gate"] == "None"
    assert flat["layers"] == "[1, 2]"
    assert len(flat["long"]) == 6000 and flat["long"].endswith(TRUNCATION_MARKER)
    assert flat["bad key_"] == "1"
    long_keys = [k for k in flat if k.startswith("aaa")]
    assert len(long_keys) == 2 and all(len(k) <= 250 for k in long_keys)
    # Already flat input is a fixed point: params can be flattened before or inside start().
    assert flatten_config(flat) == flat


def test_resolve_uri_makes_sqlite_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    assert resolve_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_uri("http://host:5000") == "http://host:5000"


def test_run_tags_and_git_commit(tmp_path):
    tags = run_tags("moe", "moe_64e", None, "tp1_pp1_ep2", {"seed": "3"})
    assert tags["variant"] == "moe" and tags["experiment"] == "moe_64e"
    assert tags["parallel_layout"] == "tp1_pp1_ep2" and tags["seed"] == "3"
    assert "sweep" not in tags
    assert tags["mlflow.source.git.commit"] == git_commit(REPO)
    assert len(git_commit(REPO)) == 40
    assert run_tags("dense", "dense", "ladder", "tp1")["sweep"] == "ladder"
    assert git_commit(tmp_path) is None
    with pytest.raises(ValueError, match="variant='sparse'"):
        run_tags("sparse", "x", None, "tp1")


def test_check_reachable(store):
    check_reachable(store)
    dead = closed_port_uri()
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match=dead.replace(".", r"\.")):
        check_reachable(dead, timeout=2)
    assert time.monotonic() - t0 < 5

    class Health(http.server.BaseHTTPRequestHandler):
        # /health, then the experiment search that proves the credentials (401 when status=401).
        status = 200

        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(Health.status)
            self.end_headers()
            self.wfile.write(b'{"experiments": []}' if Health.status == 200 else b"not authenticated")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2)
        Health.status = 401
        with pytest.raises(TrackingUnreachableError, match="refused the credentials: set MLFLOW_TRACKING_USERNAME"):
            check_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2)
    finally:
        server.shutdown()


def test_run_has_params_metrics_tags_and_config(tmp_path, store, experiment):
    params = {"model": {"hidden": 64}, "wide": {f"p{i}": i for i in range(250)}}
    t = Tracker(store, experiment, "run-a", rank=0, tags={"variant": "moe"}, local_dir=tmp_path)
    t.start(params, "model:\n  hidden: 64\n")
    for step in range(3):
        t.log_metrics({"train/loss": 3.0 - step, "tokens_seen": 1000 * (step + 1)}, step=step)
    t.set_tags({"stage": "done"})
    extra = tmp_path / "extra.txt"
    extra.write_text("hello")
    t.log_artifact(extra)
    t.finish("FINISHED", {"final/val_loss": 1.5})

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["model.hidden"] == "64"
    assert len(run.data.params) == 251  # more than two batches of 100
    assert run.data.tags["variant"] == "moe" and run.data.tags["stage"] == "done"
    assert history(store, t.run_id, "train/loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert history(store, t.run_id, "tokens_seen") == [(0, 1000.0), (1, 2000.0), (2, 3000.0)]
    assert history(store, t.run_id, "final/val_loss") == [(2, 1.5)]
    assert sorted(a.path for a in client.list_artifacts(t.run_id)) == ["config.yaml", "extra.txt"]
    local = client.download_artifacts(t.run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == "model:\n  hidden: 64\n"
    assert not t.spool_path.exists()
    with pytest.raises(ValueError, match="status='DONE'"):
        t.finish("DONE")


def test_nonzero_rank_does_nothing(tmp_path, experiment, recwarn):
    dead = closed_port_uri()
    t = Tracker(dead, experiment, "r", rank=1, tags={"a": "b"}, local_dir=tmp_path)
    t.start({"x": 1}, "x: 1\n")
    t.log_metrics({"train/loss": 1.0}, step=0)
    t.set_tags({"b": "c"})
    t.log_artifact(tmp_path / "nothing.txt")
    t.finish("FINISHED", {"final": 1.0})
    assert t.run_id is None
    assert list(tmp_path.iterdir()) == []
    assert len(recwarn) == 0  # the dead URI was never contacted


@pytest.mark.parametrize("status, waited", [("FINISHED", 300.0), ("KILLED", tracker_module.KILLED_WAIT_S)])
def test_an_interrupted_run_waits_less_for_an_absent_server(tmp_path, monkeypatch, experiment, status, waited):
    # Slurm kills 30 s after its SIGTERM: a KILLED run must not wait tracking.finish_timeout_s (300 s here).
    t = Tracker(closed_port_uri(), experiment, "away", rank=0, tags={}, local_dir=tmp_path, finish_timeout_s=300)
    asked = []
    monkeypatch.setattr(Tracker, "flush", lambda self, timeout_s: asked.append(timeout_s) or False)
    with pytest.warns(TrackingWarning):
        t.start({"lr": 0.1}, "lr: 0.1\n")
        t.finish(status)
    assert asked == [waited] and tracker_module.KILLED_WAIT_S < 30


def test_unreachable_server_spools_then_replays_elsewhere(tmp_path, store, experiment):
    dead = closed_port_uri()
    t = Tracker(dead, experiment, "offline", rank=0, tags={"variant": "dense"}, local_dir=tmp_path,
                finish_timeout_s=0)
    t0 = time.monotonic()
    with pytest.warns(TrackingWarning) as caught:
        t.start({"lr": 0.1}, "lr: 0.1\n")
        for step in range(3):
            t.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        t.finish("FINISHED")
    assert time.monotonic() - t0 < 10  # a dead server costs seconds, not minutes
    messages = [str(w.message) for w in caught]
    assert sum("failed" in m for m in messages) == 1  # warned once per outage
    assert dead in messages[0]
    assert "could not be delivered" in messages[-1] and "moe_morpheus.tracking sync" in messages[-1]
    assert t.run_id is None
    records = [json.loads(line) for line in t.spool_path.read_text().splitlines()]
    assert [r["op"] for r in records] == [
        "create", "tags", "params", "artifact", "metrics", "metrics", "metrics", "terminate"
    ]

    # The same run directory resumed against a working store: the earlier process's records
    # are replayed first, creating its run with its full history.
    with pytest.warns(TrackingWarning, match="undelivered MLflow records"):
        t2 = Tracker(store, experiment, "online", rank=0, tags={}, local_dir=tmp_path)
    t2.start({"lr": 0.1}, "lr: 0.1\n")
    t2.finish("FINISHED")
    df = runs(store, experiment)
    offline = df[df["tags.mlflow.runName"] == "offline"].iloc[0]
    assert offline["status"] == "FINISHED" and offline["params.lr"] == "0.1"
    assert offline["tags.variant"] == "dense"
    assert history(store, offline["run_id"], "train/loss") == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert set(df["tags.mlflow.runName"]) == {"offline", "online"}
    assert not t2.spool_path.exists()


def test_outage_mid_run_spools_and_catches_up_in_order(tmp_path, store, experiment, monkeypatch):
    t = Tracker(store, experiment, "flaky", rank=0, tags={}, local_dir=tmp_path, retry_interval_s=1.0)
    t.start({"x": 1}, "x: 1\n")
    t.log_metrics({"train/loss": 0.0}, step=0)

    real_log_batch = MlflowClient.log_batch

    def down(*args, **kwargs):
        raise ConnectionError("server went away")

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    with pytest.warns(TrackingWarning, match="server went away") as caught:
        for step in (1, 2):
            t.log_metrics({"train/loss": float(step)}, step=step)
    assert len(caught) == 1
    assert len(t.spool_path.read_text().splitlines()) == 2

    # Server back, but the retry interval has not passed: still spooled, in order.
    monkeypatch.setattr(MlflowClient, "log_batch", real_log_batch)
    t.log_metrics({"train/loss": 3.0}, step=3)
    assert len(t.spool_path.read_text().splitlines()) == 3
    time.sleep(1.0)  # the retry interval passes
    t.log_metrics({"train/loss": 4.0}, step=4)
    assert not t.spool_path.exists()
    assert history(store, t.run_id, "train/loss") == [(s, float(s)) for s in range(5)]

    # A record MLflow rejects as invalid is dropped (a retry cannot fix it), not spooled.
    with pytest.warns(TrackingWarning, match="rejected a metrics record"):
        t.log_metrics({"bad//name": 1.0}, step=5)
    assert not t.spool_path.exists()
    t.finish("FINISHED")
    assert MlflowClient(tracking_uri=store).get_run(t.run_id).info.status == "FINISHED"


def test_resume_appends_history_and_tolerates_changed_params(tmp_path, store, experiment):
    t1 = Tracker(store, experiment, "r", rank=0, tags={}, local_dir=tmp_path)
    t1.start({"lr": 0.1, "seed": 1}, "")
    for step in (0, 1):
        t1.log_metrics({"train/loss": float(step)}, step=step)
    t1.finish("KILLED")

    t2 = Tracker(store, experiment, "r", rank=0, tags={}, local_dir=tmp_path, resume_run_id=t1.run_id)
    with pytest.warns(TrackingWarning, match=r"changed params \['lr'\]"):
        t2.start({"lr": 0.05, "seed": 1, "new": "yes"}, "")
    assert MlflowClient(tracking_uri=store).get_run(t1.run_id).info.status == "RUNNING"
    for step in (2, 3):
        t2.log_metrics({"train/loss": float(step)}, step=step)
    t2.finish("FINISHED")

    assert t2.run_id == t1.run_id
    run = MlflowClient(tracking_uri=store).get_run(t1.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1" and run.data.params["new"] == "yes"
    assert run.data.tags["param_changed.lr"] == "0.05"
    assert history(store, t1.run_id, "train/loss") == [(s, float(s)) for s in range(4)]
    assert len(runs(store, experiment)) == 1


def test_sweep_parent_with_nested_children(tmp_path, store, experiment):
    sweep_dir = tmp_path / "multirun"
    cfg = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": ["seed=1,2"]}}}
    )
    cb = MLflowSweepCallback(name="demo_sweep", experiment=experiment, uri=store)
    cb.on_multirun_start(cfg)
    parent = cb.run_id
    assert (sweep_dir / PARENT_RUN_FILE).read_text() == parent
    assert os.environ[PARENT_RUN_ENV] == parent
    assert parent_run_id(sweep_dir) == parent
    assert parent_run_id(None) == parent

    children = []
    for job in range(2):
        t = Tracker(
            store, experiment, f"job{job}", rank=0, tags={}, local_dir=tmp_path / str(job),
            parent_run_id=parent_run_id(sweep_dir),
        )
        t.start({"seed": job}, "")
        t.log_metrics({"train/loss": 1.0}, step=0)
        t.finish("FINISHED")
        children.append(t.run_id)
    cb.on_multirun_end(cfg)

    assert PARENT_RUN_ENV not in os.environ and parent_run_id(None) is None
    nested = runs(store, experiment, f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(nested["run_id"]) == sorted(children)
    parent_row = runs(store, experiment, "tags.sweep = 'demo_sweep'").iloc[0]
    assert parent_row["run_id"] == parent and parent_row["status"] == "FINISHED"
    assert parent_row["tags.sweep_overrides"] == "seed=1,2"


def test_a_relaunched_sweep_reopens_its_parent_and_judges_each_job_by_its_newest_run(tmp_path, store, experiment):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "multirun")}, "overrides": {"task": []}}})

    def launch(*statuses: str) -> str:
        cb = MLflowSweepCallback(name="s", experiment=experiment, uri=store)
        cb.on_multirun_start(cfg)
        for status in statuses:  # one job, folder tmp_path/0, stopped before any checkpoint or finished
            t = Tracker(store, experiment, "job0", rank=0, tags={"run_dir": str(tmp_path / "0")},
                        local_dir=tmp_path / f"0-{status}", parent_run_id=cb.run_id)
            t.start({}, "")
            t.finish(status)
        parent = cb.run_id
        cb.on_multirun_end(cfg)
        return parent

    first = launch("KILLED")
    assert runs(store, experiment, "tags.sweep = 's'").iloc[0]["status"] == "FAILED"
    # The rerun: the same parent, RUNNING again, and FINISHED now that the job's newest run is.
    assert launch("FINISHED") == first
    parents = runs(store, experiment, "tags.sweep = 's'")
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert len(runs(store, experiment, f"tags.mlflow.parentRunId = '{first}'")) == 2


def test_sweep_start_unreachable_warns_and_jobs_run_unnested(tmp_path, experiment):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": []}}})
    cb = MLflowSweepCallback(name="s", experiment=experiment, uri=closed_port_uri())
    with pytest.warns(TrackingWarning, match="parent MLflow run"):
        cb.on_multirun_start(cfg)
    assert cb.run_id is None and parent_run_id(tmp_path) is None
    cb.on_multirun_end(cfg)


APP = """
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from moe_morpheus.tracking import tracker as tracker_module
from moe_morpheus.tracking.sweep_callback import parent_run_id
from moe_morpheus.tracking.tracker import Tracker

@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def main(cfg):
    hc = HydraConfig.get()
    t = Tracker(cfg.uri, cfg.experiment, f"job{hc.job.num}", rank=0, tags={},
                parent_run_id=parent_run_id(hc.sweep.dir), local_dir=hc.runtime.output_dir)
    t.start(OmegaConf.to_container(cfg), OmegaConf.to_yaml(cfg))
    t.log_metrics({"train/loss": float(cfg.x)}, step=0)
    if cfg.x == 2:
        t.finish("FAILED")
        raise RuntimeError("job 2 fails")
    t.finish("FINISHED")

main()
"""


@pytest.mark.slow
def test_hydra_multirun_with_failing_job_ends_parent_failed(tmp_path, store, experiment):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "cfg.yaml").write_text(
        textwrap.dedent(
            f"""\
            x: 1
            uri: {store}
            experiment: {experiment}
            hydra:
              sweep:
                dir: {tmp_path / "multirun"}
              callbacks:
                mlflow_sweep:
                  _target_: moe_morpheus.tracking.sweep_callback.MLflowSweepCallback
                  name: fail_sweep
                  experiment: {experiment}
                  uri: {store}
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != PARENT_RUN_ENV}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", "x=1,2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "job 2 fails" in proc.stderr
    parent = (tmp_path / "multirun" / PARENT_RUN_FILE).read_text()
    children = runs(store, experiment, f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(children["status"]) == ["FAILED", "FINISHED"]
    assert sorted(children["params.x"]) == ["1", "2"]
    # Hydra re-raised before on_multirun_end; the exit handler ended the parent FAILED.
    assert MlflowClient(tracking_uri=store).get_run(parent).info.status == "FAILED"


def test_rejected_run_creation_drops_records_with_warning(tmp_path, store, experiment):
    client = MlflowClient(tracking_uri=store)
    client.delete_experiment(client.create_experiment(experiment))
    t = Tracker(store, experiment, "r", rank=0, tags={}, local_dir=tmp_path)
    with pytest.warns(TrackingWarning) as caught:
        t.start({"x": 1}, "")
        t.log_metrics({"train/loss": 1.0}, step=0)
        t.log_metrics({"train/loss": 1.0}, step=1)
    messages = [str(w.message) for w in caught]
    assert any("is deleted" in m for m in messages)
    assert any("no MLflow run" in m for m in messages)
    assert sum("metrics" in m for m in messages) == 1  # one warning per kind, not per step
    assert t.run_id is None and not t.spool_path.exists()


def test_is_permanent_classifies_errors():
    assert is_permanent(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert is_permanent(MlflowException("deleted run", error_code=INVALID_STATE))
    assert not is_permanent(MlflowException("down", error_code=INTERNAL_ERROR))
    assert not is_permanent(MlflowException("slow", error_code=REQUEST_LIMIT_EXCEEDED))
    assert not is_permanent(ConnectionError("down"))
    # Wrong or missing credentials: the records wait for the right ones instead of being dropped.
    assert not is_permanent(MlflowException("who", error_code=UNAUTHENTICATED))
    assert not is_permanent(MlflowException("no", error_code=PERMISSION_DENIED))



def test_newest_per_folder_names_a_job_by_its_folder_name_wherever_it_ran():
    """A job that restarted on another machine (its run_dir under another root) replaces its
    KILLED run in the parent's outcome; runs without run_dir stand alone."""
    from types import SimpleNamespace

    from moe_morpheus.tracking.sweep_callback import newest_per_folder

    def run(run_id, start, run_dir=None):
        tags = {} if run_dir is None else {"run_dir": run_dir}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=start), data=SimpleNamespace(tags=tags))

    runs = [run("killed", 1, "/work/a/multirun/s/0_+experiment=dense"),
            run("finished", 2, "/home/b/multirun/s/0_+experiment=dense"),
            run("other", 3, "/home/b/multirun/s/1_+experiment=moe_8e"), run("alone", 4), run("alone2", 5)]
    assert sorted(r.info.run_id for r in newest_per_folder(runs)) == ["alone", "alone2", "finished", "other"]


def test_finished_job_matches_a_finished_child_by_folder_name_only(tmp_path):
    """Only a FINISHED child of this parent from a job folder of the same name counts (the path
    above the folder may differ: another clone); KILLED ones and other parents' runs do not."""
    from moe_morpheus.tracking.names import PARENT_TAG
    from moe_morpheus.tracking.store import finished_job

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e")
    parent, other = (client.create_run(exp).info.run_id for _ in range(2))

    def child(parent_id, folder, status):
        run = client.create_run(exp, tags={PARENT_TAG: parent_id, "run_dir": f"/elsewhere/multirun/s/{folder}"})
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    done = child(parent, "0_seed=1", "FINISHED")
    child(parent, "1_seed=2", "KILLED")
    child(other, "2_seed=3", "FINISHED")
    assert finished_job(client, parent, tmp_path / "multirun/s/0_seed=1") == done
    assert finished_job(client, parent, tmp_path / "multirun/s/1_seed=2") is None
    assert finished_job(client, parent, tmp_path / "multirun/s/2_seed=3") is None


def test_finished_job_tells_apart_stages_of_different_seeds(tmp_path):
    """The staged upcycling driver's folders s1/dense and s2/dense share a name: a run is matched
    by its path under the sweep folder its parent recorded (that folder may be on another clone)."""
    from moe_morpheus.tracking.names import PARENT_TAG
    from moe_morpheus.tracking.store import finished_job

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e")
    parent = client.create_run(exp, tags={"sweep_dir": "/elsewhere/multirun/up"}).info.run_id
    run = client.create_run(exp, tags={PARENT_TAG: parent, "run_dir": "/elsewhere/multirun/up/s1/dense"})
    client.set_terminated(run.info.run_id, "FINISHED")
    here = tmp_path / "multirun/up"
    assert finished_job(client, parent, here / "s1/dense") == run.info.run_id
    assert finished_job(client, parent, here / "s2/dense") is None
    assert finished_job(client, parent, here / "s1/x0.012/dense") is None
