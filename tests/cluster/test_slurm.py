"""``python train.py -m hydra/launcher=slurm`` against a real Slurm (``scripts/local_slurm.sh up``):
one job submitted through hydra-submitit-launcher runs its 2 ranks (train.py's torchrun) inside
its allocation and logs under the sweep's MLflow parent run. Skipped, with the reason, when
``sinfo`` does not answer or the launcher plugin is not installed (CI without Slurm stays green).

A second test preempts a job (``scancel --signal=USR1``: the ranks save, the MLflow run ends
KILLED), requeues it (``scontrol requeue``, as a cluster's preemption policy or the user would)
and checks that it resumes from its checkpoint into the same MLflow run, which ends FINISHED."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.train_app import REPO, SMALL, wait_for

pytestmark = pytest.mark.slow


def _slurm_missing() -> str | None:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=5)
    except FileNotFoundError:
        return "no sinfo: Slurm is not installed (scripts/local_slurm.sh up)"
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 5 s (scripts/local_slurm.sh up)"
    if answer.returncode != 0:
        return f"sinfo failed: {answer.stderr.strip()} (scripts/local_slurm.sh up)"
    # A busy node (alloc, mix, completing: the previous test's job) takes the job when free.
    if not {"idle", "mix", "alloc", "comp"} & set(answer.stdout.split()):
        return f"no Slurm node up (sinfo: {answer.stdout.strip()})"
    return None


@pytest.fixture
def slurm():
    reason = _slurm_missing()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)


# The allocation this machine can give: no GPUs, its 2 cores, a few GB. The job folder is named
# by its number only, for the test to find it.
LOCAL = [
    "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_gb=4",
    "hydra.launcher.timeout_min=10", "hydra.sweep.subdir=job${hydra.job.num}",
]
CPUS = min(os.cpu_count() or 2, 2)
# The two ways a job gets its 2 ranks: one Slurm task that starts them with torchrun
# (launch.nproc_per_node), or one Slurm task per rank (the shipped conf/hydra/launcher/slurm.yaml:
# tasks_per_node ranks, which read RANK and WORLD_SIZE from Slurm's variables).
RANKS = {
    "torchrun": ["hydra.launcher.tasks_per_node=1", f"hydra.launcher.cpus_per_task={CPUS}", "launch.nproc_per_node=2"],
    "slurm_tasks": ["hydra.launcher.tasks_per_node=2", f"hydra.launcher.cpus_per_task={CPUS // 2}"],
}


@pytest.mark.parametrize("ranks", list(RANKS))
def test_a_sweep_job_runs_its_ranks_in_a_slurm_allocation(slurm, tmp_path: Path, ranks: str):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(REPO / "train.py"), "-m", *LOCAL, *RANKS[ranks], "hydra/callbacks=mlflow",
               "+experiment=moe_8e", "sweep=slurm_test", "trainer.seed=1", "trainer.steps=2", "trainer.eval_interval=0",
               *SMALL, "parallel.ep=2", f"hydra.sweep.dir={tmp_path}/multirun", f"tracking.uri={db}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400)
    logs = _job_logs(tmp_path)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}\n{logs[-3000:]}"
    # The job ran under Slurm (submitit's log of the job) with its 2 ranks.
    assert "Starting with JobEnvironment" in logs, logs[-3000:]
    assert ("--nproc_per_node=2" in logs) == (ranks == "torchrun"), logs[-3000:]
    assert (tmp_path / "multirun" / "job0" / "result.txt").is_file()

    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1, [r.data.tags.get("mlflow.runName") for r in runs]
    assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert children[0].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    # One run of 2 ranks, expert parallel over them: not two runs of one rank each.
    assert children[0].data.params["world_size"] == "2" and children[0].data.tags["parallel_layout"] == "tp1-pp1-ep2-dp2"


def _job_logs(tmp_path: Path) -> str:
    """What the sweep's Slurm jobs printed (submitit's per-job stdout and stderr files)."""
    return "\n".join(p.read_text() for p in (tmp_path / "multirun" / ".submitit").rglob("*_log.*"))


def test_a_preempted_job_resumes_in_its_mlflow_run_after_a_requeue(slurm, tmp_path: Path):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(REPO / "train.py"), "-m", *LOCAL, "hydra.launcher.tasks_per_node=1",
               f"hydra.launcher.cpus_per_task={CPUS}", "hydra/callbacks=mlflow", "+experiment=dense",
               "sweep=slurm_preempt", "trainer.seed=1", "trainer.steps=40", "checkpoint.interval_steps=5",
               "trainer.eval_interval=0", *SMALL, f"hydra.sweep.dir={tmp_path}/multirun", f"tracking.uri={db}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning")
    log = tmp_path / "launcher.log"
    job = tmp_path / "multirun" / "job0"
    with log.open("w") as out:
        # The launcher waits for the job's result, through the requeue (no accounting here).
        launcher = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for((job / "checkpoints" / "step_00000010" / "checkpoint.json").exists, launcher, log)
        # submitit keeps each job's files in .submitit/<job id>/ (beside its own .submission* files).
        (job_id,) = {d.name.split("_")[0] for d in (tmp_path / "multirun" / ".submitit").iterdir()
                     if d.name.split("_")[0].isdigit()}
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        wait_for(lambda: "resume with: " in _job_logs(tmp_path), launcher, log)
        stopped_at = int(re.search(r"after step (\d+)", _job_logs(tmp_path)).group(1))
        wait_for(lambda: subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout == "",
                 launcher, log)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        time.sleep(1)
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)  # no 2-min hold
        assert launcher.wait(timeout=400) == 0, log.read_text()[-3000:] + _job_logs(tmp_path)[-3000:]

    assert stopped_at < 40 and f"resumed from {job}" in _job_logs(tmp_path), _job_logs(tmp_path)[-3000:]
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(child.info.run_id, "train/loss")})
    assert steps == list(range(1, 41))
