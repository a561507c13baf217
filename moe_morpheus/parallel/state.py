"""Process groups: ``torch.distributed`` plus Megatron-Core's ``parallel_state``.

One code path for every layout: under ``torchrun`` the rendezvous comes from the environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a plain ``python train.py`` is a world of one.
NCCL on a GPU, gloo on a CPU (where :mod:`moe_morpheus.parallel.cpu_compat` is enabled first).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from moe_morpheus.config import ModelConfig, ParallelConfig
from moe_morpheus.parallel import cpu_compat


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _ranks_from_slurm() -> None:
    """Under srun / submitit (one task per rank) take the ranks from Slurm's variables; the
    launcher config sets MASTER_ADDR / MASTER_PORT (conf/hydra/launcher/slurm.yaml)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def world_size() -> int:
    """How many ranks this run has: torchrun's WORLD_SIZE, Slurm's task count when Slurm started
    one task per rank (submitit with tasks_per_node > 1), else 1."""
    _ranks_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _elastic_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under ``torchrun --max-restarts``, the agent's TCP store outlives a restart and still holds
    the previous attempt's gloo addresses under the same keys: a restarted rank connected to a
    dead peer and hung (measured here, torch 2.13). Keys are prefixed per attempt instead."""
    if world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def initialize(
    parallel: ParallelConfig,
    model: ModelConfig | None = None,
    *,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
) -> int:
    """Initialise ``torch.distributed`` and Megatron-Core's groups; returns the data-parallel size.

    The layout is validated against the world size and the model *before* any collective, on
    every rank with the same inputs, so a layout that cannot work fails everywhere at once and no
    rank is left waiting for a peer that already raised.
    """
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    dp = parallel.validate_world(world)
    if model is not None:
        parallel.validate_model(model)

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.enable()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")

    if not dist.is_initialized():
        if world == 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # A world of one outside torchrun needs no agreed port: always a fresh one, so an
            # inherited MASTER_PORT (another process's store) cannot collide. Under torchrun
            # (even --nproc_per_node=1) the launcher's store is on MASTER_PORT: keep it.
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                store=_elastic_store(world, timeout))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp if parallel.vpp > 1 else None,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=1,
        create_gloo_process_groups=backend == "gloo",
    )
    # Distinct streams per TP rank for dropout inside TP regions, shared ones elsewhere (Megatron).
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dp


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
