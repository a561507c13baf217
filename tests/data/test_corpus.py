"""Indexed corpora: cache keyed by input and tokenizer, atomic writes, bad-input handling."""

from __future__ import annotations

import gzip
import json
import warnings

import numpy as np
import pytest

from moe_morpheus.config.data import SourceConfig
from moe_morpheus.data.corpus import Corpus, DataError, build_corpus
from moe_morpheus.data.tokenizer import EOS_ID
from moe_morpheus.data.tokenizer_training import train_tokenizer

DOCS = ["First document. 第一篇文档。", "Second one,\nwith two lines.", "三国演义 第一回"]


def _jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records] + list(raw_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_build_read_and_cache(tmp_path, demo_tokenizer):
    src = SourceConfig(path=str(_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])))
    first = build_corpus("c", src, demo_tokenizer, tmp_path / "cache", progress=False)
    assert first.built and first.stats["documents"] == 3
    corpus = Corpus(first.prefix, demo_tokenizer)
    for d, text in enumerate(DOCS):
        ids = corpus.doc(d)
        assert ids[-1] == EOS_ID and demo_tokenizer.decode(ids) == text
        assert corpus.tokens(d, 1, 4).tolist() == ids[1:4].tolist()
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".bin", ".idx", ".json"]  # no temporary left
    mtimes = [f.stat().st_mtime_ns for f in files]

    again = build_corpus("c", src, demo_tokenizer, tmp_path / "cache", progress=False)
    assert not again.built and again.prefix == first.prefix
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # re-running does nothing

    _jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:2]])
    changed = build_corpus("c", src, demo_tokenizer, tmp_path / "cache", progress=False)
    assert changed.built and changed.prefix != first.prefix and changed.stats["documents"] == 2


def test_parallel_pairs(tmp_path, demo_tokenizer):
    pairs = [{"en": "Open the file.", "zh": "打开文件。"}, {"en": "Save", "zh": "保存"}]
    src = SourceConfig(path=str(_jsonl(tmp_path / "p.jsonl", pairs)), kind="parallel")
    corpus = Corpus(build_corpus("p", src, demo_tokenizer, tmp_path, progress=False).prefix, demo_tokenizer)
    for d, pair in enumerate(pairs):
        en, zh = corpus.pair(d)
        assert (demo_tokenizer.decode(en), demo_tokenizer.decode(zh)) == (pair["en"], pair["zh"])
        doc = corpus.doc(d)
        assert demo_tokenizer.decode(doc) == pair["en"] + "\n" + pair["zh"] and doc[-1] == EOS_ID
        assert len(doc) == corpus.doc_lengths[d]


def test_plain_text_file_is_one_document(tmp_path, demo_tokenizer):
    text = "A plain text file.\n\nIt has paragraphs.\n第二段。\n"
    path = tmp_path / "book.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    src = SourceConfig(path=str(path))
    assert src.resolved_format == "text"
    corpus = Corpus(build_corpus("book", src, demo_tokenizer, tmp_path, progress=False).prefix, demo_tokenizer)
    assert corpus.num_docs == 1 and demo_tokenizer.decode(corpus.doc(0)) == text


def test_bad_lines_are_skipped_counted_and_warned(tmp_path, demo_tokenizer):
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in DOCS] + [{"text": "   "}],
                  raw_lines=[b"\xff\xfe not utf-8", b"{not json", b"[1, 2]"])
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable line\(s\).*1 invalid UTF-8, 2 not a JSON object"):
        report = build_corpus("bad", SourceConfig(path=str(path)), demo_tokenizer, tmp_path, progress=False)
    assert report.stats == {"tokens": report.stats["tokens"], "documents": 3, "bad_utf8": 1, "bad_json": 2,
                            "empty": 1}
    assert json.loads((tmp_path / (report.prefix.split("/")[-1] + ".json")).read_text())["stats"]["bad_utf8"] == 1


def test_invalid_utf8_in_plain_text(tmp_path, demo_tokenizer):
    (tmp_path / "t.txt").write_bytes(b"good line\n\xc3\x28 broken\nanother good line\n")
    with pytest.warns(UserWarning, match="1 invalid UTF-8"):
        report = build_corpus("t", SourceConfig(path=str(tmp_path / "t.txt")), demo_tokenizer, tmp_path,
                              progress=False)
    assert demo_tokenizer.decode(Corpus(report.prefix, demo_tokenizer).doc(0)) == "good line\nanother good line\n"


def test_missing_and_empty_corpus(tmp_path, demo_tokenizer):
    with pytest.raises(DataError, match=r"data.sources.x: file .*nope.jsonl not found"):
        build_corpus("x", SourceConfig(path=str(tmp_path / "nope.jsonl")), demo_tokenizer, tmp_path)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="has no usable document"):
        build_corpus("x", SourceConfig(path=str(tmp_path / "empty.jsonl")), demo_tokenizer, tmp_path / "c")
    _jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " \n "}])
    with pytest.raises(DataError, match="has no usable document"):
        build_corpus("x", SourceConfig(path=str(tmp_path / "blank.jsonl")), demo_tokenizer, tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())  # a failed build leaves nothing behind


def test_record_without_text_field(tmp_path, demo_tokenizer):
    path = _jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"line 2 has no text field 'text' \(its keys: \['body'\]\).*text_field"):
        build_corpus("f", SourceConfig(path=str(path)), demo_tokenizer, tmp_path)
    pairs = _jsonl(tmp_path / "p.jsonl", [{"en": "a", "chinese": "b"}])
    with pytest.raises(DataError, match="no text field 'zh'.*zh_field"):
        build_corpus("p", SourceConfig(path=str(pairs), kind="parallel"), demo_tokenizer, tmp_path)


def test_tokenizer_must_match_cache(tmp_path, demo_tokenizer):
    src = SourceConfig(path=str(_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])))
    other = train_tokenizer(DOCS * 30, tmp_path / "other.model", vocab_size=330)
    built = build_corpus("c", src, demo_tokenizer, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="was tokenised with tokenizer .*demo_8k.model.*not with .*other.model"):
        Corpus(built.prefix, other)
    # Building with the other tokenizer re-tokenises under a new key instead of reusing ids.
    rebuilt = build_corpus("c", src, other, tmp_path / "cache", progress=False)
    assert rebuilt.built and rebuilt.prefix != built.prefix
    corpus = Corpus(rebuilt.prefix, other)
    assert other.decode(corpus.doc(0)) == DOCS[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not build_corpus("c", src, other, tmp_path / "cache", progress=False).built
    assert np.array_equal(Corpus(rebuilt.prefix, other).doc(1), np.array(other.encode(DOCS[1]) + [EOS_ID]))
