"""The committable store snapshot keeps runs, evaluations and the report's curves, and thins
only the other step metrics; the runs' small artifacts are carried beside it (tracking/carried.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from moe_morpheus.report.collect import MOE_LOAD_ARTIFACT, _moe_load
from moe_morpheus.tracking.carried import MAX_ARTIFACT_BYTES, carried_artifact, local_folder
from moe_morpheus.tracking.snapshot import main, snapshot


def _store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/src.db")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "mlruns"))
    run = client.create_run(exp, tags={"run_dir": "/x/multirun/s/0_a"}).info.run_id
    metrics = []
    for step in range(10, 260, 10):  # every 10th step, as the studies log
        metrics += [Metric("train/loss", 9.0 - step / 100, 0, step), Metric("flops", step * 1e9, 0, step),
                    Metric("moe/balance_loss", 1.0, 0, step), Metric("moe/layer2/balance_loss", 1.0, 0, step)]
    for step in (150, 250):  # evaluations, and the last step
        metrics += [Metric("valid_subset/loss", 5.0, 0, step)]
    metrics += [Metric("final/valid_loss", 4.9, 0, 250), Metric("eval/cloze_en/accuracy", 0.1, 0, 250)]
    client.log_batch(run, metrics=metrics, params=[Param("trainer.seed", "1")], tags=[RunTag("sweep", "s")])
    client.set_terminated(run, "FINISHED")
    return client, run


def test_snapshot_keeps_evaluations_and_curves_and_thins_the_rest(tmp_path):
    client, run = _store(tmp_path)
    before, after = snapshot(tmp_path / "src.db", tmp_path / "dst.db")
    copy = MlflowClient(f"sqlite:///{tmp_path}/dst.db")

    def steps(c, key):
        return sorted(m.step for m in c.get_metric_history(run, key))

    every = list(range(10, 260, 10))
    assert steps(copy, "train/loss") == steps(copy, "moe/balance_loss") == every
    # flops: every 100th step, the evaluation steps (150, 250) and the last step (250).
    assert steps(copy, "flops") == steps(copy, "moe/layer2/balance_loss") == [100, 150, 200, 250]
    assert steps(copy, "valid_subset/loss") == [150, 250] and steps(copy, "final/valid_loss") == [250]
    assert before == len(every) * 4 + 4 and after == before - 2 * (len(every) - 4)
    original = client.get_run(run)
    kept = copy.get_run(run)
    assert kept.info.status == "FINISHED" and kept.data.params == original.data.params
    assert kept.data.tags == original.data.tags and kept.data.metrics == original.data.metrics
    assert steps(client, "flops") == every, "the source store is only read"


def test_snapshot_carries_small_artifacts_that_the_report_finds_without_the_original(tmp_path, capsys):
    client, run = _store(tmp_path)
    client.log_dict(run, {"layer2": [0.5, 0.25, 0.25]}, MOE_LOAD_ARTIFACT)
    client.log_text(run, "model: {}\n", "config.yaml")
    client.log_text(run, "x" * (MAX_ARTIFACT_BYTES + 1), "big/trace.txt")
    # Beside the working store, as studies/mlflow.db is beside studies/runs.db.
    assert main([str(tmp_path / "src.db"), str(tmp_path / "dst.db")]) == 0
    out = capsys.readouterr()
    assert "trace.txt is over 1 MiB, not carried" in out.err and "2 artifact files carried" in out.out
    shutil.rmtree(tmp_path / "mlruns")  # the machine that logged them is gone
    for store in ("dst.db", "src.db"):  # the snapshot, and a working store started from it
        assert _moe_load(MlflowClient(f"sqlite:///{tmp_path}/{store}"), run) == {"layer2": [0.5, 0.25, 0.25]}
    uri = f"sqlite:///{tmp_path}/dst.db"
    assert carried_artifact(uri, run, "config.yaml").read_text() == "model: {}\n"
    assert carried_artifact(uri, run, "big/trace.txt") is None
    assert carried_artifact("http://host:5000", run, "config.yaml") is None


def test_artifact_uris_name_local_folders_as_written():
    assert local_folder("file:///a/b%20c/artifacts") == Path("/a/b c/artifacts")
    assert local_folder("file://localhost/a/x") == Path("/a/x")
    # A plain path is a path: '#' and '%' are characters of its names, not URL syntax.
    assert local_folder("/a/run#1/100%25/artifacts") == Path("/a/run#1/100%25/artifacts")
    assert local_folder("file://otherhost/a/x") is None
    assert local_folder("s3://bucket/1/r/artifacts") is None and local_folder("mlflow-artifacts:/1/r") is None
    assert local_folder(None) is None


def test_snapshot_cli_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing.db"), str(tmp_path / "out.db")]) == 2
    assert "no MLflow SQLite store at" in capsys.readouterr().err
    assert not (tmp_path / "out.db").exists()
    _store(tmp_path)
    assert main([str(tmp_path / "src.db"), str(tmp_path / "." / "src.db")]) == 2
    assert "the snapshot would replace its source" in capsys.readouterr().err
    assert snapshot(tmp_path / "src.db", tmp_path / "out.db")[0] > 0, "the source was left whole"
