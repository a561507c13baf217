"""A source's shards, and the cache keys of their tokenised forms.

A source's ``path`` is a file, a glob or a list of them; its shards are the files in the order
written, each glob's matches sorted by path, repeats dropped.

Cache key of a shard (tokenised into ``<cache_dir>/shards/<source>/<file name>-<key>.{bin,idx,json}``):
the reading settings, the tokenizer's fingerprint, the shard's absolute path, size, modification
time and a SHA-256 of three 64 KiB samples (start, middle, end). Computing it costs a stat and
192 KiB of reads, not a pass over the file: 100 GB of shards would take 10-15 minutes to hash at
disk speed before every run. What it cannot see is an edit inside the unsampled bytes that
keeps the size and the modification time (a copy with ``cp -p`` of other content of the same
length, a file system that does not keep mtimes); ``python -m moe_morpheus.data.prepare
verify=true`` hashes every byte and compares with the SHA-256 recorded when the shard was
tokenised. Moving or touching a shard re-tokenises it.

Index of a source: ``<cache_dir>/<source>-<set key>.index.json`` (set key: a hash of the shard
keys in order) lists the shards' caches with their statistics; it is written when the last
shard of the set is tokenised, and training reads it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from moe_morpheus.config.data import SourceConfig, format_of, resolve_path
from moe_morpheus.data.readers import DataError

# Bump when the on-disk layout or the reading rules change: old caches are then rebuilt.
# 2: sharded sources (per-shard caches and an index), records without the field counted.
CACHE_FORMAT = 2
SAMPLE_BYTES = 1 << 16


@dataclass(frozen=True)
class Shard:
    path: Path
    size: int
    key: str
    # <cache_dir>/shards/<source>/<name>-<key>, without extension
    prefix: str

    @property
    def done(self) -> bool:
        # The .json is renamed into place last (corpus.tokenise_shard): it marks a complete shard.
        return Path(self.prefix + ".json").is_file()


def shard_paths(name: str, src: SourceConfig) -> list[Path]:
    """The shards of ``src``: its paths in order, globs expanded and sorted, repeats dropped."""
    where = f"data.sources.{name}"
    paths: dict[Path, None] = {}
    for pattern in src.patterns:
        full = resolve_path(pattern)
        if glob.has_magic(str(full)):
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{where}.path: {pattern} matches no file ({full}); check the pattern")
        elif full.is_file():
            matches = [full]
        else:
            raise DataError(f"{where}: file {full} not found (set {where}.path)")
        paths.update(dict.fromkeys(matches))
    return list(paths)


def _sample_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _settings(src: SourceConfig, path: Path, tokenizer_fingerprint: str) -> list:
    return [CACHE_FORMAT, src.kind, format_of(src.format, path), src.text_field, src.en_field, src.zh_field,
            tokenizer_fingerprint]


def source_shards(name: str, src: SourceConfig, tokenizer_fingerprint: str, cache_dir: Path) -> list[Shard]:
    """Every shard of a source with its cache key and cache prefix."""
    shards = []
    for path in shard_paths(name, src):
        stat = path.stat()
        digest = hashlib.sha256(json.dumps(
            [*_settings(src, path, tokenizer_fingerprint), str(path), stat.st_size, stat.st_mtime_ns,
             _sample_digest(path, stat.st_size)]).encode()).hexdigest()[:20]
        # The file name keeps the cache readable; the key (which includes the full path) keeps two
        # shards of one name in different folders apart.
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:80]
        shards.append(Shard(path, stat.st_size, digest, str(cache_dir / "shards" / name / f"{label}-{digest}")))
    return shards


def index_path(name: str, shards: list[Shard], cache_dir: Path) -> Path:
    digest = hashlib.sha256("".join(s.key for s in shards).encode()).hexdigest()[:20]
    return cache_dir / f"{name}-{digest}.index.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
