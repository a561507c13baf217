"""Run Megatron-Core 0.16.1 on a machine without CUDA (CPU tensors, gloo collectives).

Megatron-Core assumes CUDA in a handful of places. When ``torch.cuda.is_available()`` is False,
:func:`enable` redirects exactly these, and nothing else:

1. ``torch.cuda.current_device()`` returns ``"cpu"``: tensor-parallel layers and the
   pipeline schedules allocate with ``device=torch.cuda.current_device()``.
2. Factory functions called with ``device="cuda"`` (or a CUDA index) allocate on the CPU: the
   schedules create ``total_num_tokens = torch.zeros(..., device="cuda")`` in three places. This
   is a :class:`torch.overrides.TorchFunctionMode` that only rewrites a ``device`` keyword; it
   costs no measurable time on a 256-wide layer (measured; docs/design.md#cpu-compatibility).
3. ``Tensor.cuda()`` returns the tensor itself: ``LanguageModule.setup_embeddings_and_output_layer``
   moves the tied output weight with ``.cuda()`` before all-reducing it under PP.
4. ``torch.cuda.synchronize`` becomes a no-op and ``torch.cuda.Stream`` a stand-in whose
   ``wait_stream`` / context manager do nothing: the CPU runs one stream.
5. The model-parallel RNG tracker (``tensor_parallel/random.py``) reads and writes the CPU
   generator instead of the CUDA one, so ``get_cuda_rng_tracker().fork()`` (dropout, init)
   behaves as on a GPU: a separate, seeded stream per tracker name.
6. ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` is defined as ``None``: 0.16.1
   references it without Transformer Engine installed (a ``NameError`` in the router of
   Megatron-Core's own ``MoELayer``, used by benchmarks as a comparison point).

It also tunes the CPU allocator (:func:`keep_freed_memory`), a speed setting rather than a
redirection: on a GPU the CUDA caching allocator does this job.

On a GPU machine :func:`enable` does nothing: the same code path is plain Megatron-Core on NCCL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuDevices(TorchFunctionMode):
    """Rewrites ``device=<cuda>`` keyword arguments of any torch function to ``"cpu"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on a CPU: one implicit stream, nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, 4 * 1024 * 1024 * 8).
_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next allocation instead of returning it to
    the kernel. Every activation of a training step is a fresh allocation; by default glibc
    serves those over 128 KB to 32 MB (its dynamic threshold) with a new ``mmap`` and unmaps
    them on free, so each step page-faults its whole working set again (a freed and
    reallocated 16 MB tensor: 4,066 faults by default, none with this setting). From the heap
    (mmap threshold 32 MB, trim and top pad large) a glm_small step went from 1,121 to
    1,052 ms (same process set-up, glibc's variables set at start against unset).
    Returns False where the C library has no ``mallopt`` (not glibc): nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2**30), (_M_TOP_PAD, 256 * 2**20)))


def enable() -> bool:
    """Install the redirections when CUDA is absent. Idempotent. Returns True when active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    torch.cuda.stream = lambda stream=None: _CpuStream()
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, clone=False, **kwargs: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # The tracker warns when the CPU generator moves inside a CUDA fork; here the CPU generator
    # *is* the forked one, so the warning would fire on every dropout and means nothing.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    keep_freed_memory()
    _CudaToCpuDevices().__enter__()
    _ENABLED = True
    return True
