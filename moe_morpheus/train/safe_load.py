"""Loading a checkpoint never runs code from it: every pickle the project reads is restricted.

A checkpoint directory may come from elsewhere (a shared drive, a download), and a pickle can
call any importable function while it is read (``__reduce__`` -> ``os.system``). Megatron-Core's
``dist_checkpointing.load`` (torch_dist format) reads three kinds of pickle:

1. ``.metadata``: PyTorch DCP's index, read by ``FileSystemReader.read_metadata`` with a plain
   ``pickle.load``. Replaced here by :class:`RestrictedUnpickler`, which resolves only the
   DCP metadata classes on :data:`ALLOWED_GLOBALS` (the list is exactly what the torch_dist
   writer of torch 2.13 / Megatron-Core 0.16.1 emits; anything else is refused).
2. byte items inside the ``.distcp`` shards (Megatron's ``ShardedObject``, e.g. per-rank RNG
   states), read by DCP's ``DefaultLoadPlanner.load_bytes`` with ``torch.load(weights_only=False)``.
   Replaced by ``torch.load(weights_only=True)`` (PyTorch's own allow-list: tensors, containers,
   numbers, strings).
3. ``common.pt`` (the non-sharded state), read by Megatron's ``TorchCommonLoadStrategy.load_common``
   with a ``torch.load`` whose ``weights_only`` is left to the default, which the environment
   variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off. Replaced by an explicit
   ``weights_only=True`` (an explicit argument wins over that variable).

:func:`install` patches these three methods on their classes (process-wide, idempotent), so any
loader in the project (resume, upcycling) is covered, not only the calls made in
:mod:`moe_morpheus.train.checkpoint`. Each refusal raises :class:`UnsafeCheckpointError` naming
the file and the global it asked for. Saving is untouched.
"""

from __future__ import annotations

import io
import os
import pickle

import torch

# (module, name) pairs a torch_dist checkpoint's .metadata refers to; found by reading the
# globals of checkpoints written at TP/PP/EP 1 and 2 (pickletools over the saved files).
ALLOWED_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id; constructing a path object has no side effects.
    ("pathlib", "PosixPath"),
})


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to load something outside the allow-list; nothing was run."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` and torch dtypes.

    ``source`` names the file in error messages.
    """

    def __init__(self, file, *, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it refers to {module}.{name}, which is not one of the "
            f"classes a checkpoint's metadata needs (loading it could run code); nothing was executed"
        )


def restricted_load(file, *, source: str):
    """Unpickle ``file`` (a binary stream) through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(file, source=source).load()


def weights_only_load(file, *, source: str, map_location="cpu"):
    """``torch.load(weights_only=True)``; a refusal names ``source``."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {source}: it holds objects other than tensors, containers, numbers and "
            f"strings (loading it could run code); nothing was executed. torch said: {error}"
        ) from None


def _read_metadata(self, *args, **kwargs):
    """``FileSystemReader.read_metadata`` with the restricted unpickler (same steps otherwise)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = restricted_load(stream, source=str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True`` (same steps otherwise)."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    obj = weights_only_load(value, source=f"checkpoint object {fqn!r}")
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


def _load_common(self, checkpoint_dir):
    """``TorchCommonLoadStrategy.load_common`` with ``weights_only=True``."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
    if not os.path.exists(path):
        raise CheckpointingException(f"common file {path} does not exist")
    return weights_only_load(path, source=path)


def install() -> None:
    """Patch the three readers (module docstring). Idempotent."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
    TorchCommonLoadStrategy.load_common = _load_common
