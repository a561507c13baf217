"""Tokenised corpora: a source of many shards reads as one corpus, the cache is keyed by input and
tokenizer and written atomically, training tokenises only small gaps, bad data is reported."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from moe_morpheus.config.data import SourceConfig
from moe_morpheus.data.corpus import Corpus, DataError, build_corpus
from moe_morpheus.data.tokenizer import EOS_ID
from moe_morpheus.data.train_tokenizer import train_tokenizer
from tests.helpers.data import write_jsonl

DOCS = ["First document. 第一篇文档。", "Second one,\nwith two lines.", "三国演义 第一回"]


def _build(name, src, tok, cache, **kw):
    return build_corpus(name, src, tok, cache, progress=False, **kw)


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_build_read_and_cache(tmp_path, demo_tokenizer):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])))
    first = _build("c", src, demo_tokenizer, tmp_path / "cache")
    assert first.built and first.stats["documents"] == 3 and first.stats["shards"] == 1
    corpus = Corpus(first.index, demo_tokenizer)
    for d, text in enumerate(DOCS):
        ids = corpus.doc(d)
        assert ids[-1] == EOS_ID and demo_tokenizer.decode(ids) == text
        assert corpus.tokens(d, 1, 4).tolist() == ids[1:4].tolist()
    files = _files(tmp_path / "cache")
    # <source>-<set key>.index.json and shards/<source>/<shard file name>-<key>.{bin,idx,json}; no temporary.
    names = [str(f.relative_to(tmp_path / "cache")) for f in files]
    assert len(names) == 4 and names[0].startswith("c-") and names[0].endswith(".index.json")
    assert [n.rsplit(".", 1)[1] for n in names[1:]] == ["bin", "idx", "json"]
    assert all(n.startswith("shards/c/c.jsonl-") for n in names[1:])
    mtimes = [f.stat().st_mtime_ns for f in files]

    again = _build("c", src, demo_tokenizer, tmp_path / "cache")
    assert not again.built and again.index == first.index
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # re-running does nothing

    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:2]])
    changed = _build("c", src, demo_tokenizer, tmp_path / "cache")
    assert changed.built and changed.index != first.index and changed.stats["documents"] == 2


def test_shards_read_as_one_corpus(tmp_path, demo_tokenizer):
    texts = [f"document {i}: " + "文本 text " * i for i in range(1, 31)]
    write_jsonl(tmp_path / "all.jsonl", [{"text": t} for t in texts])
    (tmp_path / "shards").mkdir()
    cuts = [0, 7, 7, 19, 30]  # the second shard is empty
    for k in range(4):
        write_jsonl(tmp_path / "shards" / f"part-{k}.jsonl.{'gz' if k % 2 else 'zst'}",
                    [{"text": t} for t in texts[cuts[k]:cuts[k + 1]]])
    whole = Corpus(_build("w", SourceConfig(path=str(tmp_path / "all.jsonl")), demo_tokenizer, tmp_path / "c").index,
                   demo_tokenizer)
    with pytest.warns(UserWarning, match=r"data.sources.s: bad data in 1 of 4 shard\(s\): .*part-1.jsonl.gz: no usable"):
        report = _build("s", SourceConfig(path=str(tmp_path / "shards" / "part-*")), demo_tokenizer, tmp_path / "c")
    sharded = Corpus(report.index, demo_tokenizer)
    assert report.stats["shards"] == 4 and report.stats["empty_shards"] == 1 and sharded.num_docs == 30
    assert np.array_equal(sharded.doc_lengths, whole.doc_lengths)
    for d in range(30):
        assert np.array_equal(sharded.doc(d), whole.doc(d))
        assert np.array_equal(sharded.tokens(d, 2, 9), whole.tokens(d, 2, 9))
    # A list of files and globs: in the order written, repeats dropped.
    listed = SourceConfig(path=[str(tmp_path / "shards" / "part-3.jsonl.gz"), str(tmp_path / "shards" / "part-*")])
    with pytest.warns(UserWarning):
        first = Corpus(_build("l", listed, demo_tokenizer, tmp_path / "c").index, demo_tokenizer)
    assert first.num_docs == 30 and np.array_equal(first.doc(0), whole.doc(19))


def test_parallel_pairs(tmp_path, demo_tokenizer):
    pairs = [{"en": "Open the file.", "zh": "打开文件。"}, {"en": "Save", "zh": "保存"}, {"en": "Quit", "zh": "退出"}]
    write_jsonl(tmp_path / "p0.jsonl", pairs[:2])
    write_jsonl(tmp_path / "p1.jsonl", pairs[2:])
    src = SourceConfig(path=str(tmp_path / "p*.jsonl"), kind="parallel")
    corpus = Corpus(_build("p", src, demo_tokenizer, tmp_path).index, demo_tokenizer)
    assert corpus.num_docs == 3
    for d, pair in enumerate(pairs):
        en, zh = corpus.pair(d)
        assert (demo_tokenizer.decode(en), demo_tokenizer.decode(zh)) == (pair["en"], pair["zh"])
        doc = corpus.doc(d)
        assert demo_tokenizer.decode(doc) == pair["en"] + "\n" + pair["zh"] and doc[-1] == EOS_ID
        assert len(doc) == corpus.doc_lengths[d]


def test_bad_data_is_counted_and_warned_once_per_source(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in DOCS] + [{"text": "   "}],
                       raw_lines=[b"\xff\xfe not utf-8", b"{not json", b"[1, 2]"])
    with pytest.warns(UserWarning, match=r"bad data in 1 of 1 shard\(s\): .*bad.jsonl: skipped 1 invalid UTF-8, "
                                         r"2 not JSON, 1 empty \(first at record 4\)"):
        report = _build("bad", SourceConfig(path=str(path)), demo_tokenizer, tmp_path)
    assert {k: report.stats[k] for k in ("documents", "bad_utf8", "bad_json", "empty", "corrupt")} == {
        "documents": 3, "bad_utf8": 1, "bad_json": 2, "empty": 1, "corrupt": 0}
    index = json.loads(open(report.index).read())
    assert index["shards"][0]["stats"]["bad_utf8"] == 1 and index["shards"][0]["path"] == str(path)


def test_missing_and_empty_corpus(tmp_path, demo_tokenizer):
    with pytest.raises(DataError, match=r"data.sources.x: file .*nope.jsonl not found"):
        _build("x", SourceConfig(path=str(tmp_path / "nope.jsonl")), demo_tokenizer, tmp_path)
    with pytest.raises(DataError, match=r"data.sources.x.path: .*nope-\*.jsonl matches no file"):
        _build("x", SourceConfig(path=str(tmp_path / "nope-*.jsonl")), demo_tokenizer, tmp_path)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="has no usable document"):
        _build("x", SourceConfig(path=str(tmp_path / "empty.jsonl")), demo_tokenizer, tmp_path / "c")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " \n "}])
    with pytest.raises(DataError, match="has no usable document"):
        _build("x", SourceConfig(path=str(tmp_path / "blank.jsonl")), demo_tokenizer, tmp_path / "c")
    # No index: training never opens a source that has no document.
    assert not list((tmp_path / "c").glob("*.index.json"))


def test_training_tokenises_only_small_gaps(tmp_path, demo_tokenizer):
    for k in range(3):
        write_jsonl(tmp_path / f"s{k}.jsonl", [{"text": f"shard {k} " * 2000}])
    src = SourceConfig(path=str(tmp_path / "s*.jsonl"))
    with pytest.raises(DataError, match=r"data.sources.s: 3 of 3 shard\(s\) \(0 MB\) are not tokenised yet "
                                        r"\(.*s0.jsonl, .*s1.jsonl, .*s2.jsonl\); run `python -m "
                                        r"moe_morpheus.data.prepare`.*tokenize_on_start_mb=0 MB"):
        _build("s", src, demo_tokenizer, tmp_path / "c", tokenize_limit_mb=0)
    assert not list((tmp_path / "c").rglob("*.bin"))
    assert _build("s", src, demo_tokenizer, tmp_path / "c", tokenize_limit_mb=1).built


def test_tokenizer_must_match_cache(tmp_path, demo_tokenizer):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])))
    other = train_tokenizer(DOCS * 30, tmp_path / "other.model", vocab_size=330)
    built = _build("c", src, demo_tokenizer, tmp_path / "cache")
    with pytest.raises(DataError, match="was tokenised with tokenizer .*demo_8k.model.*not with .*other.model"):
        Corpus(built.index, other)
    # Building with the other tokenizer re-tokenises under a new key instead of reusing ids.
    rebuilt = _build("c", src, other, tmp_path / "cache")
    assert rebuilt.built and rebuilt.index != built.index
    corpus = Corpus(rebuilt.index, other)
    assert other.decode(corpus.doc(0)) == DOCS[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _build("c", src, other, tmp_path / "cache").built
    assert np.array_equal(Corpus(rebuilt.index, other).doc(1), np.array(other.encode(DOCS[1]) + [EOS_ID]))
