"""The tokenizer's training sample (spread over every shard, shares, determinism, streaming,
held-out text), its vocabulary bounds and its compression report."""

from __future__ import annotations

import base64
import random

import pytest

from moe_morpheus.config.data import DataConfig, SourceConfig, resolve_path
from moe_morpheus.data import tokenizer as T
from moe_morpheus.data import train_tokenizer as TT
from tests.helpers.data import write_jsonl


def _shards(folder, sizes, suffixes=(".jsonl.gz", ".jsonl.zst"), chars=250):
    """One shard per entry of ``sizes`` (documents), suffixes alternating; each document is
    unique and names its shard and number ("s2 d17 ...")."""
    rng = random.Random(0)
    folder.mkdir(exist_ok=True)
    for i, n in enumerate(sizes):
        docs = [f"s{i} d{j} " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "天下", "三国"])
                                       for _ in range(chars // 3)) for j in range(n)]
        write_jsonl(folder / f"s{i}{suffixes[i % len(suffixes)]}", [{"text": d[:chars]} for d in docs])
    return SourceConfig(path=str(folder / "s*"), lang="en")


def _taken(sample):
    """(shard, document) numbers of everything sampled, training and held-out."""
    texts = sample.train + [t for _, t in sample.heldout]
    return [tuple(int(part[1:]) for part in t.split()[:2]) for t in texts]


def test_sample_takes_from_every_shard_a_spread_of_its_documents(tmp_path):
    src = _shards(tmp_path / "src", [40, 40, 40, 40])  # 4 x 10k characters
    sample = TT.sample_source("web", src, budget=20_000, seed=0, min_shard_quota=1000)
    assert sample.shards == sample.shards_read == 4 and sample.chars == 20_000
    taken = _taken(sample)
    for shard in range(4):
        docs = sorted(d for s, d in taken if s == shard)
        assert sum(len(t) for t in sample.train + [t for _, t in sample.heldout]
                   if t.startswith(f"s{shard} ")) == 5_000  # the quota of each: 20k / 4
        assert docs != list(range(len(docs)))  # a random subset, not the first records
    assert len(set(taken)) == len(taken)


@pytest.mark.parametrize("seed", range(4))
def test_short_shards_are_made_up_and_a_small_source_gives_all(tmp_path, seed):
    # One 20k shard and two of 500 characters: whatever the order, the big one makes up the rest
    # (a second pass when it came first), without taking a document twice.
    src = _shards(tmp_path / "src", [80, 2, 2], chars=250)
    sample = TT.sample_source("web", src, budget=15_000, seed=seed, min_shard_quota=1000)
    taken = _taken(sample)
    assert sample.chars == 15_000 and len(set(taken)) == len(taken)
    assert {s for s, _ in taken} == {0, 1, 2}
    everything = TT.sample_source("web", src, budget=10**6, seed=seed, min_shard_quota=1000)
    assert everything.chars == 84 * 250 and sorted(_taken(everything)) == \
        [(0, d) for d in range(80)] + [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_shares_of_max_chars_and_determinism(tmp_path):
    cfg = DataConfig(sources={"web": _shards(tmp_path / "web", [60, 60, 60]),
                              "books": SourceConfig(path="data/demo_corpus/zh_sanguo.jsonl.gz", lang="zh", weight=3)},
                     mip_ratio=0)
    samples = TT.sample_blend(cfg, 40_000, seed=1, min_shard_quota=1000)
    assert [(s.name, s.chars) for s in samples] == [("web", 10_000), ("books", 30_000)]
    again = TT.sample_blend(cfg, 40_000, seed=1, min_shard_quota=1000)
    assert [(s.train, s.heldout) for s in samples] == [(s.train, s.heldout) for s in again]
    other = TT.sample_blend(cfg, 40_000, seed=2, min_shard_quota=1000)
    assert [s.train for s in samples] != [s.train for s in other]


def _corrupt_tail_shard(path, docs=3000):
    """3 M characters of incompressible documents, then bytes that break the compressed stream."""
    rng = random.Random(0)
    records = [{"text": base64.b64encode(rng.randbytes(750)).decode()} for _ in range(docs)]
    write_jsonl(path, records)
    with open(path, "ab") as f:
        f.write(b"\x00garbage after the last complete frame" * 100)
    return SourceConfig(path=str(path))


@pytest.mark.parametrize("name", ["tail.jsonl.gz", "tail.jsonl.zst"])
def test_a_small_quota_never_reads_to_the_corrupt_tail(tmp_path, name):
    src = _corrupt_tail_shard(tmp_path / name)
    sample = TT.sample_source("web", src, budget=10_000, seed=0, min_shard_quota=1000)
    # The window is 8 x 10k characters: 80 documents of 1,000, and the 3 M-character shard
    # (2.3 MB compressed) is read no further.
    assert sample.chars == 10_000 and sample.documents_read == 80
    assert sample.problems == [] and sample.skipped == 0
    whole = TT.sample_source("web", src, budget=10**7, seed=0)
    # (.zst loses the last MB read ahead before the damage: 2070 documents of 3000 come back.)
    assert whole.documents_read > 2000 and "corrupt after" in whole.problems[0]


def test_heldout_documents_are_not_trained_on(tmp_path):
    samples = TT.sample_blend(DataConfig(), 300_000) + [
        TT.sample_source("web", _shards(tmp_path / "web", [100, 100]), 40_000, min_shard_quota=1000)]
    for s in samples:
        held = [t for _, t in s.heldout]
        assert held and not set(held) & set(s.train), s.name
        assert len(s.heldout) >= s.heldout_documents >= 1
    parallel = samples[2]
    assert 0.02 < parallel.heldout_documents / parallel.documents < 0.09  # 5% of the pairs
    assert [lang for lang, _ in parallel.heldout[:4]] == ["en", "zh", "en", "zh"]


@pytest.mark.parametrize("seed", range(5))
def test_a_source_of_few_documents_still_holds_one_out(tmp_path, seed):
    sample = TT.sample_source("few", _shards(tmp_path / "few", [8]), 10**6, seed=seed)
    assert sample.heldout_documents >= 1 and len(sample.train) + len(sample.heldout) == 8
    assert not {t for _, t in sample.heldout} & set(sample.train)


def test_vocab_size_bounds(tmp_path, capsys):
    TT.check_vocab_size(T.MIN_VOCAB_SIZE)
    TT.check_vocab_size(TT.MAX_VOCAB_SIZE)
    with pytest.raises(T.TokenizerError, match=r"vocab_size=150001 is too large: use at most 150,000"):
        TT.check_vocab_size(150_001)
    with pytest.raises(T.TokenizerError, match=f"use at least {T.MIN_VOCAB_SIZE}"):
        TT.check_vocab_size(T.MIN_VOCAB_SIZE - 1)
    # The command says so in one line before it reads any corpus.
    assert TT.main(["vocab_size=200000", f"output={tmp_path / 't.model'}", "data_config=missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "at most 150,000" in err


def test_compression_report_per_source_and_language(tmp_path, demo_tokenizer):
    samples = TT.sample_blend(DataConfig(), 300_000)
    # 4000: at coverage 0.9995 the 285k training characters need 2,884 single-character pieces.
    tok = TT.train_tokenizer([t for s in samples for t in s.train], tmp_path / "small.model", vocab_size=4000)
    rows = {(r["source"], r["lang"]): r for r in TT.compression(tok, samples)}
    assert list(rows) == [("en", "en"), ("zh", "zh"), ("parallel", "en"), ("parallel", "zh"),
                          ("all", "en"), ("all", "zh")]
    for lang in ("en", "zh"):  # the language rows add up their sources
        for key in ("documents", "chars", "bytes", "tokens"):
            assert rows["all", lang][key] == sum(r[key] for (s, la), r in rows.items() if s != "all" and la == lang)
    en, zh = rows["all", "en"], rows["all", "zh"]
    # English is ASCII (a byte a character); Chinese is 3 bytes a character, about one per token.
    assert en["bytes_per_token"] == pytest.approx(en["chars_per_token"], rel=0.01)
    assert 2.5 * zh["chars_per_token"] < zh["bytes_per_token"] <= 3 * zh["chars_per_token"]
    assert 2 < en["bytes_per_token"] < 5 and 0.8 < zh["chars_per_token"] < 1.6
    assert en["bytes_per_token"] > zh["chars_per_token"] and en["chars_per_token"] > 2 * zh["chars_per_token"]
    assert en["byte_token_share"] < 0.01 and zh["byte_token_share"] < 0.1
    # The 8k demo tokenizer compresses the same held-out text better than a 4000-piece one.
    big = {(r["source"], r["lang"]): r for r in TT.compression(demo_tokenizer, samples)}
    assert all(big[k]["bytes_per_token"] > rows[k]["bytes_per_token"] for k in rows)
    assert "all           zh " in TT.format_table(list(rows.values()), "t")


def test_the_demo_model_is_untouched():
    # Every committed number depends on this file (data/tokenizer/README.md).
    import hashlib

    digest = hashlib.sha256(resolve_path("data/tokenizer/demo_8k.model").read_bytes()).hexdigest()
    assert digest == "d12d3aab00bff3fba52024071a34767e27d2ad85b7498802726111d65a8efc1f"
