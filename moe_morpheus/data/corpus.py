"""Tokenising a source's shards once into Megatron-Core's indexed format, and reading them back
as one corpus.

Each shard becomes ``<cache_dir>/shards/<source>/<file name>-<key>.{bin,idx,json}`` (keys:
moe_morpheus/data/shards.py), written under temporary names and renamed, the .json last, so an
interrupted build leaves no shard that looks complete and a rerun does only what is missing.
When every shard of a source is there, an index over them (``<source>-<set key>.index.json``)
records the shards and their statistics; training opens a source through its index.

Who tokenises: ``python -m moe_morpheus.data.prepare`` (a pool of workers, shard ranges across
machines), or training itself for what is missing when that is at most
``data.tokenize_on_start_mb`` of input (the demo corpus). Bad data is counted per shard
(moe_morpheus/data/readers.py), reported in one warning per source and kept in the index.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moe_morpheus.config.data import SourceConfig
from moe_morpheus.data.readers import DataError, ReadStats, read_shard
from moe_morpheus.data.shards import Shard, file_sha256, index_path, source_shards
from moe_morpheus.data.tokenizer import EOS_ID, Tokenizer

# Documents per SentencePiece batch call: large enough to use both threads, small enough that
# the progress bar moves (an Austen record is ~40 KB).
_ENCODE_BATCH = 64
# Shards named in a warning or an error; the index (or the prepare report) has them all.
_NAMED = 3


class Corpus:
    """A tokenised source (all its shards), memory-mapped. Text documents end with ``<eos>``; a
    parallel pair is one document of two sequences (en, zh), without ``<eos>``. Documents are
    numbered across shards in shard order."""

    def __init__(self, index: str | os.PathLike, tokenizer: Tokenizer):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        index = Path(index)
        if not index.is_file():
            raise DataError(f"no tokenised corpus index at {index}: build it with build_corpus or "
                            f"`python -m moe_morpheus.data.prepare`")
        self.meta = json.loads(index.read_text())
        if self.meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise DataError(
                f"corpus {index} was tokenised with tokenizer {self.meta['tokenizer_path']} "
                f"(sha256 {self.meta['tokenizer_fingerprint'][:12]}), not with {tokenizer.path} "
                f"(sha256 {tokenizer.fingerprint[:12]}): its token ids mean other pieces. "
                f"Rebuild it with build_corpus (the cache key includes the tokenizer) or use the matching tokenizer")
        self.name: str = self.meta["source"]
        self.kind: str = self.meta["kind"]
        # Shards without a document have no .bin/.idx (tokenise_shard).
        self.shards = [IndexedDataset(str(index.parent / s["prefix"]))
                       for s in self.meta["shards"] if s["stats"]["documents"]]
        self.newline = np.asarray(tokenizer.encode("\n"), dtype=np.int64)
        seq_lengths = [ds.sequence_lengths.astype(np.int64) for ds in self.shards]
        if self.kind == "parallel":
            self.pair_lengths = np.concatenate(seq_lengths).reshape(-1, 2)
            # LM view of a pair: en + "\n" + zh + <eos>.
            self.doc_lengths = self.pair_lengths.sum(1) + len(self.newline) + 1
            per_shard = [len(s) // 2 for s in seq_lengths]
        else:
            self.doc_lengths = np.concatenate(seq_lengths)
            per_shard = [len(s) for s in seq_lengths]
        self.num_docs = len(self.doc_lengths)
        # First document of each shard: document d lives in shard bisect_right(_first, d) - 1.
        self._first = np.cumsum([0, *per_shard])[:-1].tolist()

    def _locate(self, d: int):
        s = bisect.bisect_right(self._first, d) - 1
        return self.shards[s], d - self._first[s]

    def doc(self, d: int) -> np.ndarray:
        """Tokens of document d as the infilling objective sees it (ending with <eos>)."""
        if self.kind == "parallel":
            en, zh = self.pair(d)
            return np.concatenate([en, self.newline, zh, [EOS_ID]])
        ds, i = self._locate(d)
        return ds[i].astype(np.int64)

    def tokens(self, d: int, start: int, end: int) -> np.ndarray:
        """doc(d)[start:end], reading only that slice of a text document from the memory map."""
        if self.kind == "parallel":
            return self.doc(d)[start:end]
        ds, i = self._locate(d)
        return ds.get(i, offset=start, length=end - start).astype(np.int64)

    def pair(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        ds, i = self._locate(d)
        return ds[2 * i].astype(np.int64), ds[2 * i + 1].astype(np.int64)


# A shard's temporaries: "." + its cache name + ".tmp-<host>-<pid>" + .bin/.idx/.json. Host and
# pid in the name let prepare remove the temporaries of dead processes of its own host only
# (machines sharing the cache folder each tokenise their own shard ranges).
_TEMPORARY = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)\.(bin|idx|json)$")


def temporary_prefix(prefix: Path) -> str:
    return str(prefix.parent / f".{prefix.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def temporary_owner(path: Path) -> tuple[str, int] | None:
    """(host, pid) of the process writing the temporary ``path``; None for another file."""
    match = _TEMPORARY.search(path.name)
    return (match["host"], int(match["pid"])) if path.name.startswith(".") and match else None


def tokenise_shard(name: str, src: SourceConfig, shard: Shard, tokenizer: Tokenizer, *,
                   threads: int | None = None, on_bytes: Callable[[int], None] | None = None) -> dict:
    """Tokenise one shard into its cache files (atomically) and return its metadata. A shard
    without a usable document gets only its .json (it is done, and empty)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(shard.prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_prefix(prefix)
    # uint16 halves the file for vocabularies below 65,535 (the demo's 8,192).
    dtype = np.uint16 if tokenizer.vocab_size < 65535 else np.int32
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    stats = ReadStats()
    tokens = 0
    batch: list = []

    def flush() -> None:
        nonlocal tokens
        if src.kind == "parallel":
            ids = tokenizer.encode_batch([t for pair in batch for t in pair], threads=threads)
            for en, zh in zip(ids[0::2], ids[1::2]):
                builder.add_document(np.asarray(en + zh), lengths=[len(en), len(zh)])
                tokens += len(en) + len(zh)
        else:
            for ids in tokenizer.encode_batch(batch, threads=threads):
                builder.add_document(np.asarray(ids + [EOS_ID]), lengths=[len(ids) + 1])
                tokens += len(ids) + 1
        batch.clear()

    try:
        # Hashed before reading: a file that changes while it is tokenised fails `verify`.
        sha256 = file_sha256(shard.path)
        for doc in read_shard(f"data.sources.{name}", src, shard.path, stats, on_bytes):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                flush()
        flush()
        meta = {"source": name, "kind": src.kind, "path": str(shard.path), "size": shard.size, "sha256": sha256,
                "tokenizer_path": str(tokenizer.path), "tokenizer_fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size, "stats": {"tokens": tokens, **stats.as_dict()}}
        if stats.documents:
            builder.finalize(tmp + ".idx")
        Path(tmp + ".json").write_text(json.dumps(meta, indent=1))
        if stats.documents:
            os.replace(tmp + ".bin", shard.prefix + ".bin")
            os.replace(tmp + ".idx", shard.prefix + ".idx")
        os.replace(tmp + ".json", shard.prefix + ".json")
    finally:
        builder.data_file.close()
        for ext in (".bin", ".idx", ".json"):
            Path(tmp + ext).unlink(missing_ok=True)
    return meta


# Statistics summed over a source's shards (ReadStats fields, counts only).
_COUNTS = ("tokens", "documents", "bad_utf8", "bad_json", "no_field", "empty", "corrupt")


def write_index(name: str, src: SourceConfig, shards: list[Shard], tokenizer: Tokenizer, cache_dir: Path) -> dict:
    """The index over a source's tokenised shards (all must be done); warns once about the shards
    that had bad data, and fails when the source has no usable document at all."""
    entries = []
    for shard in shards:
        meta = json.loads(Path(shard.prefix + ".json").read_text())
        entries.append({"path": meta["path"], "prefix": os.path.relpath(shard.prefix, cache_dir),
                         "sha256": meta["sha256"], "stats": meta["stats"]})
    totals = {k: sum(e["stats"][k] for e in entries) for k in _COUNTS}
    totals.update(shards=len(entries), empty_shards=sum(not e["stats"]["documents"] for e in entries))
    where = f"data.sources.{name}"
    if not totals["documents"]:
        raise DataError(f"{where}: {src.patterns} has no usable document ({totals}); check the file(s) and "
                        f"{where}.format / text_field")
    reports = [(e["path"], ReadStats(**{k: v for k, v in e["stats"].items() if k != "tokens"}).problems())
               for e in entries]
    problems = [(path, text) for path, text in reports if text]
    index = index_path(name, shards, cache_dir)
    meta = {"source": name, "kind": src.kind, "tokenizer_path": str(tokenizer.path),
            "tokenizer_fingerprint": tokenizer.fingerprint, "stats": totals, "shards": entries}
    tmp = index.with_name(f".{index.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, index)
    if problems:
        listed = "; ".join(f"{path}: {text}" for path, text in problems[:_NAMED])
        more = f"; and {len(problems) - _NAMED} more (all in {index})" if len(problems) > _NAMED else ""
        warnings.warn(f"{where}: bad data in {len(problems)} of {len(entries)} shard(s): {listed}{more}",
                      stacklevel=2)
    return meta


@dataclass
class BuildReport:
    index: str
    built: bool
    stats: dict = field(default_factory=dict)


def build_corpus(name: str, src: SourceConfig, tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                 progress: bool = True, tokenize_limit_mb: float = float("inf")) -> BuildReport:
    """Find a source's index in the cache, or tokenise its missing shards here (at most
    ``tokenize_limit_mb`` MB of input; more is an error naming them) and write the index."""
    cache_dir = Path(cache_dir)
    shards = source_shards(name, src, tokenizer.fingerprint, cache_dir)
    index = index_path(name, shards, cache_dir)
    if index.is_file():
        return BuildReport(str(index), built=False, stats=json.loads(index.read_text())["stats"])
    missing = [s for s in shards if not s.done]
    missing_mb = sum(s.size for s in missing) / 1e6
    if missing_mb > tokenize_limit_mb:
        named = ", ".join(str(s.path) for s in missing[:_NAMED]) + (", ..." if len(missing) > _NAMED else "")
        raise DataError(
            f"data.sources.{name}: {len(missing)} of {len(shards)} shard(s) ({missing_mb:,.0f} MB) are not "
            f"tokenised yet ({named}); run `python -m moe_morpheus.data.prepare` with this data config first "
            f"(training tokenises at most data.tokenize_on_start_mb={tokenize_limit_mb:g} MB itself)")
    with tqdm(total=sum(s.size for s in missing), unit="B", unit_scale=True, desc=f"tokenising {name}",
              disable=not progress or not missing, leave=False) as bar:
        for shard in missing:
            tokenise_shard(name, src, shard, tokenizer, on_bytes=bar.update)
    meta = write_index(name, src, shards, tokenizer, cache_dir)
    return BuildReport(str(index), built=bool(missing), stats=meta["stats"])
