"""The checkpoint folder on disk: names, atomic writes, manifests, verification, rotation.

A checkpoint is a folder ``step_<8 digits>`` whose ``checkpoint.json`` (written last) records the
size and SHA-256 of every file; ``latest`` names the newest. Saves go to ``.tmp-<name>`` and are
renamed into place, removals to ``.trash-*`` first, so a kill never leaves half a checkpoint under
a valid name (moe_morpheus/train/checkpoint/state.py writes the tensors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

# Format 2 names the GeGLU's activated projection for what it holds, ``gate_proj`` (experts:
# ``w_gate_proj_EFD``, ``b_gate_proj_EF``); format 1 named it after its activation, ``gelu``. Both load:
# a format-1 checkpoint's tensors are requested under their old names (:func:`stored_key`).
FORMAT_VERSION = 2
FORMAT_1_NAMES = {"gate_proj": "gelu", "w_gate_proj_EFD": "w_gelu_EFD", "b_gate_proj_EF": "b_gelu_EF"}
MANIFEST = "checkpoint.json"
LATEST = "latest"
STEP_NAME = re.compile(r"^step_(\d+)$")
# 1 MiB reads: hashing is disk-bound; larger buffers gain nothing measurable.
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message names the path and what is wrong."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def stored_key(key: str, fmt: int) -> str:
    """The name under which a checkpoint of format ``fmt`` stores the tensor this code calls ``key``."""
    if fmt == FORMAT_VERSION:
        return key
    return ".".join(FORMAT_1_NAMES.get(part, part) for part in key.split("."))


def list_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def my_share(items: list[str]) -> list[str]:
    """Files this rank hashes: every world_size-th, so a save or check costs 1/world each."""
    return items[dist.get_rank()::dist.get_world_size()]


def gather_lists(local: list) -> list[list]:
    gathered: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def gather_dicts(local: dict) -> dict:
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    """Rename to ``.trash-*`` first: a kill during rmtree then leaves no half checkpoint under a
    name that resume would consider."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders (``step_*``, renamed into place after a complete write), newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


# Config keys that older checkpoints record and this code no longer has; dropping them loses no
# meaning: upcycle.granularity only restated model.ffn_hidden_size / moe.expert_hidden_size,
# which the recorded moe section still holds (the width is now chosen by moe.granularity).
REMOVED_CONFIG_KEYS = (("upcycle", "granularity"),)


def recorded_config(manifest: dict) -> dict:
    """The experiment config a checkpoint recorded, less the keys this code has removed."""
    config = {section: dict(values) if isinstance(values, dict) else values
              for section, values in manifest["config"].items()}
    for section, key in REMOVED_CONFIG_KEYS:
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    return config


def read_manifest(path: Path) -> dict:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete moe_morpheus checkpoint")
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest} is not valid JSON ({error}): the checkpoint is corrupt") from None
    if data.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{manifest} has format {data.get('format')!r}; this code reads formats 1 and {FORMAT_VERSION}")
    return data


def verify_checkpoint(path: Path, *, checksums: bool) -> list[str]:
    """Problems with the checkpoint at ``path`` (empty: usable). Collective: every rank calls it
    and gets the same answer; each rank hashes a share of the files."""
    problems = []
    try:
        files = read_manifest(path)["files"]
    except CheckpointError as error:
        problems.append(str(error))
        files = {}
    for name in my_share(sorted(files)):
        expected, file = files[name], path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, {MANIFEST} says {expected['size']} "
                            f"(truncated or overwritten)")
        elif checksums and expected.get("sha256") and sha256(file) != expected["sha256"]:
            problems.append(f"{file}: SHA-256 differs from {MANIFEST} (corrupt)")
    return sorted({p for part in gather_lists(problems) for p in part})


def newest_valid(directory: Path, *, checksums: bool) -> Path | None:
    """The newest checkpoint in ``directory`` that verifies; broken ones are skipped, with a
    warning naming what is wrong. Collective."""
    for path in complete_checkpoints(directory):
        problems = verify_checkpoint(path, checksums=checksums)
        if not problems:
            return path
        log.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
    return None


def remove_partial(directory: Path) -> None:
    """Remove what killed saves and removals left (``.tmp-*``, ``.trash-*``). Rank 0, at start,
    when no save can be running."""
    if dist.get_rank() == 0 and directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                log.warning("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def find_checkpoint(path: str | Path, *, checksums: bool = True) -> Path:
    """The checkpoint a tool was pointed at, in any of the forms every tool accepts: one ``step_*``
    folder, a run's ``checkpoints`` folder (its newest valid checkpoint) or the run folder above it.
    A wrong path raises CheckpointError naming what to pass instead."""
    path = Path(path)
    forms = "pass a run's checkpoints folder, the run folder above it or one step_* folder in it"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {forms}")
    if path.is_file():
        hint = f": pass {path.parent}, the folder that holds it" if (path.parent / MANIFEST).is_file() else ""
        raise CheckpointError(f"{path} is a file, not a checkpoint folder{hint or ': ' + forms}")
    if (path / MANIFEST).is_file():
        problems = verify_checkpoint(path, checksums=checksums)
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(problems))
        return path
    if STEP_NAME.match(path.name):
        raise CheckpointError(f"{path} has no {MANIFEST}: a save that did not complete; pass the checkpoints "
                              f"folder {path.parent} to use its newest complete checkpoint")
    if not complete_checkpoints(path) and (path / "checkpoints").is_dir():
        path = path / "checkpoints"  # a run folder
    found = newest_valid(path, checksums=checksums)
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (step_*/{MANIFEST}): {forms}")
    return found
