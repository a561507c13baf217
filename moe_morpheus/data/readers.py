"""Reading the documents of one shard: JSONL (plain, .gz, .zst), Parquet, or plain text.

Records are streamed (memory does not grow with the shard), and bad data is counted per shard
rather than stopping a long job (each case is tested):
- a line that is not valid UTF-8 or not a JSON object: skipped, counted (``bad_utf8``, ``bad_json``);
- a record without the configured text field(s) (``no_field``) or with empty text (``empty``):
  skipped, counted; a shard where *every* record lacks the field fails instead, because the
  config then names the wrong field and the whole source would be dropped;
- a compressed shard that breaks part-way (truncated download, flipped bits): the documents
  before the damage are kept and ``corrupt`` is set, with the error;
- a shard that cannot be opened or read at all (missing, not the format its name says, no such
  Parquet column): ``DataError`` naming the shard's path.
Plain text files are one document each (long documents are cut into windows later).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_morpheus.config.data import SourceConfig, format_of

# Read blocks for JSONL and text: a line longer than this is still read whole (readline).
_BLOCK = 1 << 20
# Parquet rows per batch: a few MB of text at a time, whatever the row group size.
_PARQUET_BATCH = 1024


class DataError(ValueError):
    """Input data that cannot be used; the message names the source, file and fix."""


@dataclass
class ReadStats:
    """What one shard (or, summed, one source) held."""

    documents: int = 0
    bad_utf8: int = 0
    bad_json: int = 0
    no_field: int = 0
    empty: int = 0
    # 1 when the shard's compressed stream broke part-way (the error is in ``error``).
    corrupt: int = 0
    first_bad_line: int | None = None
    error: str | None = None

    def bad(self, line_no: int, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if self.first_bad_line is None:
            self.first_bad_line = line_no

    @property
    def skipped(self) -> int:
        return self.bad_utf8 + self.bad_json + self.no_field + self.empty

    def problems(self) -> str:
        """One phrase for a report ("" when the shard was clean)."""
        parts = [f"{n} {label}" for n, label in ((self.bad_utf8, "invalid UTF-8"), (self.bad_json, "not JSON"),
                                                 (self.no_field, "without the text field"),
                                                 (self.empty, "empty")) if n]
        text = f"skipped {', '.join(parts)} (first at record {self.first_bad_line})" if parts else ""
        if self.corrupt:
            text = "; ".join(filter(None, [text, f"corrupt after {self.documents} documents: {self.error}"]))
        if not self.documents:
            text = "; ".join(filter(None, ["no usable document", text]))
        return text

    def as_dict(self) -> dict:
        return asdict(self)


def _decompressed(path: Path, raw: io.BufferedReader) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if path.suffix == ".zst":
        import zstandard

        # A small read-ahead: what is buffered when the stream breaks is lost (1 MB lost ~2 in 3 of
        # a test shard's last documents before the damage; 64 KiB loses at most that much text).
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True),
                                 buffer_size=1 << 16)
    return raw


# What a broken compressed stream raises: gzip (BadGzipFile is an OSError, a cut file EOFError,
# a bad block zlib.error), zstandard (ZstdError, imported lazily: a subclass of Exception).
def _is_stream_damage(error: Exception) -> bool:
    return isinstance(error, (OSError, EOFError, zlib.error)) or type(error).__name__ == "ZstdError"


def _lines(path: Path, on_bytes: Callable[[int], None] | None) -> Iterator[bytes]:
    with open(path, "rb") as raw, _decompressed(path, raw) as stream:
        seen = 0
        for line in stream:
            yield line
            if on_bytes is not None and raw.tell() - seen >= _BLOCK:
                on_bytes(raw.tell() - seen)
                seen = raw.tell()
        if on_bytes is not None:
            on_bytes(path.stat().st_size - seen)


def _json_records(lines: Iterator[bytes], stats: ReadStats) -> Iterator[tuple[int, dict]]:
    for line_no, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            stats.bad(line_no, "bad_utf8")
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            stats.bad(line_no, "bad_json")
            continue
        yield line_no, record


def _parquet_records(path: Path, fields: list[str], on_bytes) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        missing = [f for f in fields if f not in file.schema_arrow.names]
        if missing:
            raise KeyError(f"no column {missing[0]!r} (its columns: {file.schema_arrow.names})")
        groups, size, row = file.metadata.num_row_groups, path.stat().st_size, 0
        for g in range(groups):
            for batch in file.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[g], columns=fields):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
            if on_bytes is not None:  # row groups are the unit of progress: bytes in proportion
                on_bytes(size * (g + 1) // groups - size * g // groups)


def read_shard(where: str, src: SourceConfig, path: Path, stats: ReadStats | None = None,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[str | tuple[str, str]]:
    """Documents of one shard: ``str`` for ``kind=text``, ``(en, zh)`` for ``kind=parallel``.
    ``where`` names the source in messages (``data.sources.NAME``); ``on_bytes`` is called with
    the input bytes consumed since its last call (for progress bars)."""
    stats = stats if stats is not None else ReadStats()
    fmt = format_of(src.format, path)
    if not path.is_file():
        raise DataError(f"{where}: shard {path} not found (set {where}.path)")
    # record field -> the config field that names it (for messages)
    fields = ({src.en_field: "en_field", src.zh_field: "zh_field"} if src.kind == "parallel"
              else {src.text_field: "text_field"})
    first_missing: tuple[str, list[str]] | None = None  # (field, the record's keys), for the message
    try:
        if fmt == "text":
            chunks: list[str] = []
            for line_no, line in enumerate(_lines(path, on_bytes), 1):
                try:
                    chunks.append(line.decode("utf-8"))
                except UnicodeDecodeError:
                    stats.bad(line_no, "bad_utf8")
            text = "".join(chunks)
            if text.strip():
                stats.documents += 1
                yield text
            else:
                stats.empty += 1
            return
        records = (_json_records(_lines(path, on_bytes), stats) if fmt == "jsonl"
                   else _parquet_records(path, list(fields), on_bytes))
        for number, record in records:
            values = tuple(record.get(f) for f in fields)
            if not all(isinstance(v, str) for v in values):
                stats.bad(number, "no_field")
                missing = next(f for f, v in zip(fields, values) if not isinstance(v, str))
                first_missing = first_missing or (missing, sorted(record))
                continue
            if not all(v.strip() for v in values):
                stats.bad(number, "empty")
                continue
            stats.documents += 1
            yield values if src.kind == "parallel" else values[0]
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - sorted into damage (kept) and unreadable (raised)
        readable = stats.documents + stats.skipped > 0
        if readable and _is_stream_damage(error):
            stats.corrupt, stats.error = 1, f"{type(error).__name__}: {error}"
            return
        raise DataError(f"{where}: cannot read shard {path} as {fmt} ({type(error).__name__}: {error}); "
                        f"fix or remove the file, or set {where}.format") from error
    if first_missing and not stats.documents and not (stats.bad_utf8 + stats.bad_json + stats.empty):
        name, keys = first_missing
        raise DataError(f"{where}: no record of {path} has the text field {name!r} (the first one's keys: "
                        f"{keys}); set {where}.{fields[name]}")
