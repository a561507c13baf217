"""Reading one shard: every format gives the same documents, bad data is counted per shard, and
a shard that cannot be read names its path."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from moe_morpheus.config.data import SourceConfig
from moe_morpheus.data.readers import DataError, ReadStats, read_shard
from tests.helpers.data import write_jsonl

DOCS = ["First document. 第一篇文档。", "Second one,\nwith two lines.", "三国演义 第一回"]
PAIRS = [{"en": "Open the file.", "zh": "打开文件。"}, {"en": "Save", "zh": "保存"}]


def _read(path, **src):
    stats = ReadStats()
    return list(read_shard("data.sources.s", SourceConfig(path=str(path), **src), path, stats)), stats


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz", "s.jsonl.zst", "s.json", "s.parquet"])
def test_every_format_reads_the_same_documents(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": DOCS, "id": [1, 2, 3]}), path, row_group_size=2)
    else:
        write_jsonl(path, [{"text": t, "id": i} for i, t in enumerate(DOCS)])
    docs, stats = _read(path)
    assert docs == DOCS and stats.documents == 3 and stats.problems() == ""


def test_parallel_pairs_from_jsonl_and_parquet(tmp_path):
    write_jsonl(tmp_path / "p.jsonl.zst", PAIRS)
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "p.parquet")
    for name in ("p.jsonl.zst", "p.parquet"):
        docs, _ = _read(tmp_path / name, kind="parallel")
        assert docs == [(p["en"], p["zh"]) for p in PAIRS]


def test_plain_text_is_one_document(tmp_path):
    text = "A plain text file.\n\nIt has paragraphs.\n第二段。\n"
    (tmp_path / "book.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (tmp_path / "t.txt").write_bytes(b"good line\n\xc3\x28 broken\nanother good line\n")
    assert _read(tmp_path / "book.txt.zst")[0] == [text]
    docs, stats = _read(tmp_path / "t.txt")
    assert docs == ["good line\nanother good line\n"] and stats.bad_utf8 == 1


def test_bad_records_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [{"text": t} for t in DOCS] + [{"text": "   "}, {"body": "x"}],
                       raw_lines=[b"\xff\xfe not utf-8", b"{not json", b"[1, 2]"])
    docs, stats = _read(path)
    assert docs == DOCS
    assert (stats.bad_utf8, stats.bad_json, stats.no_field, stats.empty, stats.corrupt) == (1, 2, 1, 1, 0)
    assert stats.first_bad_line == 4
    assert stats.problems() == ("skipped 1 invalid UTF-8, 2 not JSON, 1 without the text field, 1 empty "
                                "(first at record 4)")


def test_a_shard_broken_part_way_keeps_what_came_before(tmp_path):
    records = [{"text": f"document {i} " * 50} for i in range(2000)]
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", records).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    docs, stats = _read(tmp_path / "cut.jsonl.gz")
    assert 0 < len(docs) < 2000 and docs == [r["text"] for r in records[: len(docs)]]
    assert stats.corrupt == 1 and "EOFError" in stats.error and "corrupt after" in stats.problems()
    flipped = bytearray(whole)
    flipped[len(whole) // 2: len(whole) // 2 + 64] = bytes(64)  # damaged blocks
    (tmp_path / "flipped.jsonl.gz").write_bytes(bytes(flipped))
    docs, stats = _read(tmp_path / "flipped.jsonl.gz")
    assert stats.corrupt == 1 and 0 < len(docs) < 2000


def test_unreadable_shards_fail_with_their_path(tmp_path):
    (tmp_path / "fake.jsonl.gz").write_bytes(b"this is not gzip data\n")
    with pytest.raises(DataError, match=r"data.sources.s: cannot read shard .*fake.jsonl.gz as jsonl .*BadGzipFile"):
        _read(tmp_path / "fake.jsonl.gz")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match=r"cannot read shard .*fake.parquet as parquet"):
        _read(tmp_path / "fake.parquet")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "col.parquet")
    with pytest.raises(DataError, match=r"col.parquet as parquet .*no column 'text' \(its columns: \['body'\]\)"):
        _read(tmp_path / "col.parquet")
    with pytest.raises(DataError, match=r"shard .*nope.jsonl not found"):
        _read(tmp_path / "nope.jsonl")


def test_a_wrong_field_name_is_an_error_not_an_empty_shard(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"body": "no text here"}, {"body": "nor here"}])
    with pytest.raises(DataError, match=r"no record of .*f.jsonl has the text field 'text' \(the first one's keys: "
                                        r"\['body'\]\); set data.sources.s.text_field"):
        _read(path)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"en": "a", "chinese": "b"}])
    with pytest.raises(DataError, match="text field 'zh'.*zh_field"):
        _read(pairs, kind="parallel")
    # Empty shards are counted, not errors: a source of thousands of shards may have some.
    (tmp_path / "empty.jsonl").write_bytes(b"")
    docs, stats = _read(tmp_path / "empty.jsonl")
    assert docs == [] and stats.problems() == "no usable document"


def test_progress_counts_every_input_byte(tmp_path):
    # 3 MB of incompressible text: the callback fires about once per MB of compressed input.
    path = write_jsonl(tmp_path / "p.jsonl.gz", [{"text": os.urandom(1500).hex()} for _ in range(1000)])
    seen = []
    docs = list(read_shard("s", SourceConfig(path=str(path)), path, on_bytes=seen.append))
    assert len(docs) == 1000 and sum(seen) == path.stat().st_size and len(seen) >= 2
