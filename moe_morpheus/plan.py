"""Memory planning: :class:`SavedActivations` measures the activation memory a forward keeps."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedActivations:
    """Measures activation memory: the bytes of the distinct tensor storages autograd keeps for
    backward while this context is open (``torch.autograd.graph.saved_tensors_hooks``: every
    tensor an op or a custom Function saves passes the pack hook), parameters left out.

    This is what activation memory *is* (Korthikanti et al. 2022 count the same thing), and it is
    exact on any device: RSS or tracemalloc would see the allocator's caching and torch's
    C++ allocations not at all or only in pages. Views of one tensor count once (by storage).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())
