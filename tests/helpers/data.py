"""The demo corpus as the data fixtures build it (tests/conftest.py): its sequence length, and a
digest of training rows that a second process can print for comparison."""

from __future__ import annotations

import hashlib

DATA_SEQ_LENGTH = 256


def train_rows_digest(data, indices) -> str:
    """SHA-256 over the given training rows, every field in key order."""
    h = hashlib.sha256()
    for i in indices:
        for key in sorted(data.train[i]):
            h.update(data.train[i][key].tobytes())
    return h.hexdigest()


def write_jsonl(path, records, raw_lines=()):
    """JSONL records (then raw byte lines) at ``path``, compressed by its suffix (.gz, .zst)."""
    import gzip
    import json

    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records] + list(raw_lines)
    data = b"\n".join(lines) + b"\n"
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
