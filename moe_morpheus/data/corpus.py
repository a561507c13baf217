"""Reading corpora and tokenising them once into Megatron-Core's indexed format (.bin/.idx).

Input handling (each case is tested):
- missing file, or a file with no usable document: ``DataError``;
- a line that is not valid UTF-8 or not a JSON object: skipped, counted, one warning per file
  naming the count and the first bad line (a few bad lines in a scraped corpus should not stop
  a run; the counts are also stored in the cache metadata);
- a record without the configured text field: ``DataError`` (it means the config names the
  wrong field, so every record would be dropped);
- a record whose text is empty or whitespace: skipped and counted.
Plain text files are one document each (long documents are cut into windows later).

Cache: one ``<cache_dir>/<source>-<key>.{bin,idx,json}`` per source, key = SHA-256 of the file
contents, the reading settings and the tokenizer model bytes. Re-running finds the files and
does no work; a changed input or tokenizer gives a new key and re-tokenises. Files are written
under temporary names and renamed, the .json last, so an interrupted run leaves no corpus
that looks complete. Opening a cached corpus with a different tokenizer is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moe_morpheus.config.data import SourceConfig
from moe_morpheus.data.tokenizer import EOS_ID, Tokenizer

# Bump when the on-disk layout or the reading rules change: old caches are then rebuilt.
CACHE_FORMAT = 1
# Documents per SentencePiece batch call: large enough to use both threads, small enough that
# the progress bar moves (an Austen record is ~40 KB).
_ENCODE_BATCH = 64


class DataError(ValueError):
    """Input data that cannot be used; the message names the source, file and fix."""


@dataclass
class ReadStats:
    documents: int = 0
    bad_utf8: int = 0
    bad_json: int = 0
    empty: int = 0
    first_bad_line: int | None = None

    def bad(self, line_no: int, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if self.first_bad_line is None:
            self.first_bad_line = line_no


def _open_binary(path: Path):
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned pair
    return raw, (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw)


def read_documents(name: str, src: SourceConfig, stats: ReadStats | None = None,
                   progress: bool = False, warn: bool = True) -> Iterator[str | tuple[str, str]]:
    """Documents of a source: ``str`` for ``kind=text``, ``(en, zh)`` for ``kind=parallel``."""
    stats = stats if stats is not None else ReadStats()
    path = src.resolved_path
    if not path.is_file():
        raise DataError(f"data.sources.{name}: file {path} not found (set data.sources.{name}.path)")
    raw, stream = _open_binary(path)
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"tokenising {name}",
               disable=not progress, leave=False)
    jsonl = src.resolved_format == "jsonl"
    # record field -> the config field that names it (for the error message)
    fields_ = ({src.en_field: "en_field", src.zh_field: "zh_field"} if src.kind == "parallel"
               else {src.text_field: "text_field"})
    text_lines: list[str] = []
    try:
        for line_no, line in enumerate(stream, 1):
            bar.update(raw.tell() - bar.n)
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                stats.bad(line_no, "bad_utf8")
                continue
            if not jsonl:
                text_lines.append(line)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                stats.bad(line_no, "bad_json")
                continue
            for f, setting in fields_.items():
                if not isinstance(record.get(f), str):
                    raise DataError(f"data.sources.{name}: {path} line {line_no} has no text field {f!r} "
                                    f"(its keys: {sorted(record)}); set data.sources.{name}.{setting}")
            values = tuple(record[f] for f in fields_)
            if not all(v.strip() for v in values):
                stats.empty += 1
                continue
            stats.documents += 1
            yield values if src.kind == "parallel" else values[0]
        if not jsonl:
            text = "".join(text_lines)
            if text.strip():
                stats.documents += 1
                yield text
    finally:
        bar.close()
        stream.close()
        raw.close()
    skipped = stats.bad_utf8 + stats.bad_json
    if warn and skipped:
        warnings.warn(f"data.sources.{name}: skipped {skipped} unreadable line(s) of {path} "
                      f"({stats.bad_utf8} invalid UTF-8, {stats.bad_json} not a JSON object; first at "
                      f"line {stats.first_bad_line})", stacklevel=2)
    if stats.documents == 0:
        raise DataError(f"data.sources.{name}: {path} has no usable document ({stats}); "
                        f"check the file and data.sources.{name}.format / text_field")


def cache_key(src: SourceConfig, tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    settings = [CACHE_FORMAT, src.kind, src.resolved_format, src.text_field, src.en_field, src.zh_field,
                tokenizer.fingerprint]
    h.update(json.dumps(settings).encode())
    with open(src.resolved_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


class Corpus:
    """A tokenised source, memory-mapped. Text documents end with ``<eos>``; a parallel pair is
    one document of two sequences (en, zh), without ``<eos>``."""

    def __init__(self, prefix: str | os.PathLike, tokenizer: Tokenizer):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        prefix = str(prefix)
        meta_path = Path(prefix + ".json")
        if not meta_path.is_file():
            raise DataError(f"no tokenised corpus at {prefix} (missing {meta_path.name}): build it with build_corpus")
        self.meta = json.loads(meta_path.read_text())
        if self.meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise DataError(
                f"corpus {prefix} was tokenised with tokenizer {self.meta['tokenizer_path']} "
                f"(sha256 {self.meta['tokenizer_fingerprint'][:12]}), not with {tokenizer.path} "
                f"(sha256 {tokenizer.fingerprint[:12]}): its token ids mean other pieces. "
                f"Rebuild it with build_corpus (the cache key includes the tokenizer) or use the matching tokenizer")
        self.name: str = self.meta["source"]
        self.kind: str = self.meta["kind"]
        self.ds = IndexedDataset(prefix)
        self.newline = np.asarray(tokenizer.encode("\n"), dtype=np.int64)
        seq_lengths = self.ds.sequence_lengths.astype(np.int64)
        if self.kind == "parallel":
            self.pair_lengths = seq_lengths.reshape(-1, 2)
            # LM view of a pair: en + "\n" + zh + <eos>.
            self.doc_lengths = self.pair_lengths.sum(1) + len(self.newline) + 1
        else:
            self.doc_lengths = seq_lengths
        self.num_docs = len(self.doc_lengths)

    def doc(self, d: int) -> np.ndarray:
        """Tokens of document d as the infilling objective sees it (ending with <eos>)."""
        if self.kind == "parallel":
            en, zh = self.pair(d)
            return np.concatenate([en, self.newline, zh, [EOS_ID]])
        return self.ds[d].astype(np.int64)

    def tokens(self, d: int, start: int, end: int) -> np.ndarray:
        """doc(d)[start:end], reading only that slice of a text document from the memory map."""
        if self.kind == "parallel":
            return self.doc(d)[start:end]
        return self.ds.get(d, offset=start, length=end - start).astype(np.int64)

    def pair(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ds[2 * d].astype(np.int64), self.ds[2 * d + 1].astype(np.int64)


@dataclass
class BuildReport:
    prefix: str
    built: bool
    stats: dict = field(default_factory=dict)


def build_corpus(name: str, src: SourceConfig, tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                 progress: bool = True) -> BuildReport:
    """Tokenise a source into the cache unless an identical build is there; returns its prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not src.resolved_path.is_file():
        raise DataError(f"data.sources.{name}: file {src.resolved_path} not found (set data.sources.{name}.path)")
    prefix = str(cache_dir / f"{name}-{cache_key(src, tokenizer)}")
    if Path(prefix + ".json").is_file():
        return BuildReport(prefix, built=False, stats=json.loads(Path(prefix + ".json").read_text())["stats"])
    tmp = str(cache_dir / f".{Path(prefix).name}.tmp{os.getpid()}")
    # uint16 halves the file for vocabularies below 65,535 (the demo's 8,192).
    dtype = np.uint16 if tokenizer.vocab_size < 65535 else np.int32
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    stats = ReadStats()
    tokens = 0
    batch: list = []

    def flush() -> None:
        nonlocal tokens
        if src.kind == "parallel":
            ids = tokenizer.encode_batch([t for pair in batch for t in pair])
            for en, zh in zip(ids[0::2], ids[1::2]):
                builder.add_document(np.asarray(en + zh), lengths=[len(en), len(zh)])
                tokens += len(en) + len(zh)
        else:
            for ids in tokenizer.encode_batch(batch):
                builder.add_document(np.asarray(ids + [EOS_ID]), lengths=[len(ids) + 1])
                tokens += len(ids) + 1
        batch.clear()

    try:
        for doc in read_documents(name, src, stats, progress=progress):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                flush()
        flush()
        builder.finalize(tmp + ".idx")
        meta = {"source": name, "kind": src.kind, "path": str(src.resolved_path),
                "tokenizer_path": str(tokenizer.path), "tokenizer_fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size,
                "stats": {"tokens": tokens, **{k: v for k, v in vars(stats).items() if k != "first_bad_line"}}}
        Path(tmp + ".json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
        os.replace(tmp + ".json", prefix + ".json")
    finally:
        builder.data_file.close()
        for ext in (".bin", ".idx", ".json"):
            Path(tmp + ext).unlink(missing_ok=True)
    return BuildReport(prefix, built=True, stats=meta["stats"])
