"""Multi-node torchrun: two "nodes" on this machine (two torchrun agents, one rank each, meeting
through a c10d rendezvous as on a cluster) train one run with expert and data parallelism across
them. Its losses equal those of the single-node run of the same layout (2 ranks, EP=2), exactly:
the same two ranks do the same arithmetic, and gloo's sum of two addends is order-free. Each
node's only rank has LOCAL_RANK 0, so a LOCAL_RANK-for-RANK mix-up would show here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers.distributed import free_port
from tests.helpers.train_app import REPO, SMALL

pytestmark = pytest.mark.slow

ARGS = ["+experiment=moe_8e", "parallel.ep=2", "trainer.steps=3", *SMALL]


def torchrun(folder: Path, launcher: list[str], *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONWARNINGS="ignore::UserWarning", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launcher, str(REPO / "train.py"), *args,
         f"tracking.uri=sqlite:///{folder}/mlflow.db"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def single_node(folder: Path, *args: str) -> None:
    """``torchrun --standalone --nproc_per_node=2`` (what ``launch.nproc_per_node=2`` starts, without
    the extra Hydra process in front)."""
    node = torchrun(folder, ["--standalone", "--nproc_per_node=2"], *args)
    log = node.communicate(timeout=600)[0]
    assert node.returncode == 0, log[-5000:]


def two_nodes(folder: Path, *args: str) -> None:
    """``torchrun --nnodes=2 --node_rank=R --nproc_per_node=1 --rdzv_backend=c10d`` for R = 0, 1,
    both from ``folder`` (a cluster's shared filesystem)."""
    port = free_port()
    nodes = [torchrun(folder, ["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=multinode-test"], *args)
             for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-5000:]


def the_run(folder: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    return runs[0], sorted(losses)


def test_two_nodes_train_one_run_with_the_single_node_losses(tmp_path):
    (tmp_path / "nodes").mkdir()
    two_nodes(tmp_path / "nodes", *ARGS)
    (tmp_path / "single").mkdir()
    single_node(tmp_path / "single", *ARGS)

    multi, multi_losses = the_run(tmp_path / "nodes")
    single, single_losses = the_run(tmp_path / "single")
    assert multi.data.tags["parallel_layout"] == "tp1-pp1-ep2-dp2" and multi.data.params["world_size"] == "2"
    assert [s for s, _ in multi_losses] == [1, 2, 3]
    assert multi_losses == single_losses
    assert multi.data.metrics["valid/loss"] == single.data.metrics["valid/loss"]
    # One run folder, written by global rank 0 wherever it ran; the other node wrote none.
    folders = list((tmp_path / "nodes" / "outputs" / "moe_8e").iterdir())
    assert len(folders) == 1 and (folders[0] / "result.txt").exists()
    assert len(list((folders[0] / "checkpoints").glob("step_*"))) >= 1
