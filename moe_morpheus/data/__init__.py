"""Bilingual data: tokenizer, cached indexed corpora, GLM blank infilling, MIP, blended stream.

Public API (imported lazily: ``python -m moe_morpheus.data.tokenizer`` should not pay for torch):
``DataConfig``, ``SourceConfig``, ``build_data``, ``Data``, ``batch_iterator``,
``unigram_cross_entropy``, ``Tokenizer``, and in ``infilling``: ``build_sample``,
``build_gmask_sample``, ``attention_mask``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config", "SourceConfig": "config", "build_data": "dataset", "Data": "dataset",
    "batch_iterator": "dataset", "unigram_cross_entropy": "dataset", "Tokenizer": "tokenizer",
    "DataError": "readers", "TokenizerError": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
