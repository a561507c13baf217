"""Epoch plans of the text streams, kept on disk next to the tokenised corpora.

Planning an epoch (a permutation of the windows, the objective and spans of each, the packing
into rows) is deterministic in its inputs and costs seconds at every start of ``train.py``
(110k pieces per epoch of the demo corpus at sequence 64), paid again by every rank, every sweep
job and every test that starts a run. A plan is ~0.6 MB and loads in ~0.02 s: a one-step run of
a small model on one core takes 14.5 s with its plans read against 18.6 s planning them.

The key hashes everything the plan is made from: the stream's inputs (its windows, the objective
settings, the sequence length, the seed tuple, the options; a plan holds indices, no tokens), numpy's version (the generator's draws),
and the source of the modules that plan (``streams.py``, ``infilling.py``), so an edited planner
never reads an old plan. Files are written atomically with a SHA-256 of their pickle and read with an unpickler that
admits no class at all (a plan is tuples, lists and ints): a cache folder cannot make the loader
run code, and a damaged or unreadable file is planned again and replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_PLANNER_SOURCES = ("streams.py", "infilling.py")


def _planner_fingerprint() -> bytes:
    digest = hashlib.sha256(np.__version__.encode())
    for name in _PLANNER_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.digest()


_PLANNER = _planner_fingerprint()


def plan_key(*parts: object) -> str:
    """SHA-256 of the planner and ``parts`` (arrays by dtype, shape and bytes, the rest by repr)."""
    digest = hashlib.sha256(_PLANNER)
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a plan holds no objects, found {module}.{name}")


def _load(data: bytes) -> list:
    """A plan file: the SHA-256 of the pickle, then the pickle (a damaged file fails the check)."""
    digest, payload = data[:32], data[32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    plan = _PlainUnpickler(io.BytesIO(payload)).load()
    if not isinstance(plan, list):
        raise ValueError(f"a plan is a list, found {type(plan).__name__}")
    return plan


class PlanCache:
    """``get(key, compute)``: the plan stored under ``key``, else ``compute()``, stored."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def get(self, key: str, compute: Callable[[], list]) -> list:
        path = self.directory / f"{key}.pkl"
        try:
            return _load(path.read_bytes())
        except FileNotFoundError:
            pass
        except Exception as error:  # any damage: a plan read wrong would silently change the data
            log.warning("plan cache file %s is unreadable (%s): planning again", path, error)
        plan = compute()
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.write_bytes(hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)
        except OSError as error:  # a read-only or full cache folder costs speed, not the run
            log.warning("plan cache: cannot write %s (%s)", path, error)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return plan
