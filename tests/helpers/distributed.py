"""Run a function in N processes on gloo (CPU), as torchrun would, and collect the results.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes with the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one thread each, calls
``fn(*args)`` in each and returns the per-rank return values in rank order. If any rank raises,
the others are killed at once (no test waits on a peer that already failed) and the first
traceback is re-raised in the test process.

The ranks fork from multiprocessing's fork server, a fresh interpreter (not the test process)
that imports PyTorch and Megatron-Core once per test session: a spawned rank spent ~8 s of CPU
importing them, and the suite starts about 80 ranks (measured on 2 cores: 4 starts of 2 ranks
37 s spawned, 7 s forked, the server's one import included).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback


def free_port() -> int:
    # Not moe_morpheus.parallel.free_port: importing that package imports Megatron-Core (~4.5 s of
    # CPU) into the test process, for every test module that imports this one.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    torch.set_num_threads(1)
    try:
        # Plain pickle bytes: multiprocessing would pass tensors as shared-memory handles, which
        # die with this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import sys

        import torch.distributed as dist

        if "moe_morpheus.parallel" in sys.modules:
            sys.modules["moe_morpheus.parallel"].destroy()
        elif dist.is_initialized():
            dist.destroy_process_group()


# Imported by the fork server before it forks any rank (a module that fails to import is skipped).
PRELOAD = ["torch", "moe_morpheus.parallel"]
# Set by tests/conftest.py before each test: whether it is marked slow. Ranks take seconds (start,
# gloo rendezvous, first calls), so only slow tests may start them (make test-fast runs the others).
SPAWN_ALLOWED = True


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0):
    if not SPAWN_ALLOWED:
        raise RuntimeError("run_distributed in a test not marked slow: add @pytest.mark.slow "
                           "(make test-fast leaves out the tests that spawn processes)")
    # The fork server, and so every rank, keeps the environment it started with (a test's later
    # changes do not reach the ranks); Megatron-Core's import-time warnings about Transformer
    # Engine / Apex are noise here.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    try:
        while len(outputs) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"distributed test: no result from ranks "
                                   f"{sorted(set(range(world_size)) - set(outputs))} within {timeout}s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world_size)]
