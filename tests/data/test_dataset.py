"""The blended training stream, validation sets, DP sharding, resume, epochs and config."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from moe_morpheus.config import ConfigError
from moe_morpheus.config.data import DataConfig, SourceConfig, resolve_path
from moe_morpheus.data.dataset import batch_iterator, build_data, unigram_cross_entropy
from moe_morpheus.data.infilling import ROW_KEYS, attention_mask
from moe_morpheus.data.mip import TEMPLATES
from moe_morpheus.data.streams import GMASK, MASK, MIP
from moe_morpheus.data.tokenizer import EOP_ID, EOS_ID, GMASK_ID, MASK_ID, SOP_ID
from tests.helpers.data import DATA_SEQ_LENGTH as SEQ
from tests.helpers.data import train_rows_digest


def segments(row):
    """(Part A, Part B) index arrays of each packed segment."""
    out = []
    for seg in range(1, int(row["segment_ids"].max()) + 1):
        idx = np.flatnonzero(row["segment_ids"] == seg)
        a = idx[row["prefix_mask"][idx] == 1]
        out.append((a, idx[len(a):]))
    return out


def reconstruct(row, a, b):
    """The original text of one segment, rebuilt from the row alone (independent of the builder),
    checking the position and target conventions of docs/design.md#positions on the way."""
    tok, tgt = row["tokens"], row["targets"]
    pos, block = row["position_ids"], row["block_position_ids"]
    assert pos[a].tolist() == list(range(len(a))) and not block[a].any()
    assert not row["loss_mask"][a].any() and row["loss_mask"][b].all()
    starts = [i for i in range(len(b)) if block[b[i]] == 1]
    assert all(tok[b[i]] == SOP_ID for i in starts)
    if tok[a[-1]] == GMASK_ID:  # one suffix: input [sop] + span[:-1], targets span, no <eop>
        assert starts == [0] and (pos[b] == len(a) - 1).all()
        assert block[b].tolist() == list(range(1, len(b) + 1))
        assert tok[b[1:]].tolist() == tgt[b[:-1]].tolist()
        return tok[a[:-1]].tolist() + tgt[b].tolist()
    spans = {}
    for k, i in enumerate(starts):
        j = starts[k + 1] if k + 1 < len(starts) else len(b)
        span = b[i:j]
        assert len(set(pos[span].tolist())) == 1 and block[span].tolist() == list(range(1, len(span) + 1))
        assert tok[span[1:]].tolist() == tgt[span[:-1]].tolist() and tgt[span[-1]] == EOP_ID
        assert tok[a[pos[span[0]]]] == MASK_ID
        spans[int(pos[span[0]])] = tok[span[1:]].tolist()
    text = []
    for i, t in enumerate(tok[a].tolist()):
        text += spans.pop(i) if t == MASK_ID else [t]
    assert not spans
    return text


def test_rows_match_corpus_and_contract(demo_data):
    train = demo_data.train
    kinds = Counter()
    for i in range(400):
        row = train[i]
        assert set(row) == set(ROW_KEYS) and all(len(v) == SEQ for v in row.values())
        name, j = train.schedule.locate(i)
        stream = train.streams[name]
        pieces = stream.pieces(j)
        assert len(segments(row)) == len(pieces)
        assert (row["loss_mask"] == ((row["segment_ids"] > 0) & (row["prefix_mask"] == 0))).all()
        for (a, b), piece in zip(segments(row), pieces):
            text = reconstruct(row, a, b)
            kinds[piece[0]] += 1
            # The per-token [gMASK] flag (1D RoPE) marks exactly the [gMASK] and MIP samples.
            assert set(row["gmask"][np.concatenate([a, b])].tolist()) == {int(piece[0] in (GMASK, MIP))}
            if piece[0] == MIP:
                _, c, d, t, _ = piece
                en, zh = stream.corpora[c].pair(d)
                src, ans = (en, zh) if TEMPLATES[t].direction == "en-zh" else (zh, en)
                assert not TEMPLATES[t].heldout
                assert text[-len(ans) - 1:] == ans.tolist() + [EOS_ID]  # answer then <eos> in Part B
                assert row["tokens"][a[-1]] == GMASK_ID and len(b) == len(ans) + 1
                prompt = demo_data.tokenizer.decode(text[: len(text) - len(ans) - 1])
                assert prompt == TEMPLATES[t].prefix + demo_data.tokenizer.decode(src) + TEMPLATES[t].suffix
            else:
                _, d, start, end, _ = piece
                assert text == stream.corpus.tokens(d, start, end).tolist()
        if i < 20:
            mask = attention_mask(row["segment_ids"], row["prefix_mask"])
            for a, b in segments(row):
                assert not mask[np.ix_(a, b)].any()  # no Part-A position sees Part-B tokens
    assert kinds[MASK] and kinds[GMASK] and kinds[MIP]


def test_objective_statistics(demo_data):
    covered = total = 0
    span_lengths, mask_segments, text_segments = [], 0, 0
    for i in range(1500):
        row = demo_data.train[i]
        for a, b in segments(row):
            kind = "gmask" if row["tokens"][a[-1]] == GMASK_ID else "mask"
            if demo_data.train.stream_of(i) == "mip":
                continue
            text_segments += 1
            if kind == "gmask":
                length = len(a) - 1 + len(b)
                assert max(1, math.ceil(0.2 * length)) <= len(b) <= length
                continue
            mask_segments += 1
            n = int((row["tokens"][a] == MASK_ID).sum())
            covered += len(b) - n
            total += len(a) - n + len(b) - n
            span_lengths += (np.diff(np.flatnonzero(np.r_[row["block_position_ids"][b] == 1, True])) - 1).tolist()
    assert 0.15 <= covered / total <= 0.20
    assert abs(np.mean(span_lengths) - 3.0) <= 0.3
    # 30% of windows are [MASK]; splitting a too-long [MASK] sample adds a few segments.
    assert 0.27 <= mask_segments / text_segments <= 0.40


def test_rows_are_full(demo_data):
    fill, segs = {}, {}
    for i in range(2000):
        row = demo_data.train[i]
        name = demo_data.train.stream_of(i)
        fill.setdefault(name, []).append((row["segment_ids"] > 0).mean())
        segs.setdefault(name, []).append(row["segment_ids"].max())
    assert set(fill) == {"en", "zh", "parallel", "mip"}
    assert all(np.mean(f) >= 0.97 for f in fill.values()), {k: np.mean(v) for k, v in fill.items()}
    assert np.mean(segs["mip"]) >= 3 and np.mean(segs["parallel"]) >= 3  # short samples share rows


ROWS = [0, 7, 999, 1000, 4321]


@pytest.mark.slow
def test_same_rows_in_a_new_process(demo_data, demo_data_cfg):
    script = (
        "from moe_morpheus.config.data import DataConfig\n"
        "from moe_morpheus.data.dataset import build_data\n"
        "from tests.helpers.data import train_rows_digest\n"
        f"data = build_data(DataConfig(cache_dir={demo_data_cfg.cache_dir!r}, seed={demo_data_cfg.seed}), {SEQ}, "
        f"progress=False)\n"
        # reversed: row i must not depend on which rows were made before it in the process
        f"print(train_rows_digest(data, {ROWS[::-1]}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=resolve_path("."),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == train_rows_digest(demo_data, ROWS[::-1])


def _tokens(batch):
    return [tuple(r) for r in batch["tokens"].tolist()]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_partition_the_same_stream(demo_data, dp_size):
    gbs, mbs, steps = 8, 2, 3
    reference = [tuple(demo_data.train[i]["tokens"].tolist()) for i in range(100, 100 + gbs * steps)]
    per_rank = {}
    for rank in range(dp_size):
        it = batch_iterator(demo_data.train, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=rank,
                            dp_size=dp_size, start_sample=100)
        micro = gbs // (mbs * dp_size)
        per_rank[rank] = [_tokens(b) for b in _take(it, micro * steps)]
    for step in range(steps):
        chunk = reference[step * gbs:(step + 1) * gbs]
        rows = [row for rank in range(dp_size) for b in per_rank[rank][step * (gbs // (mbs * dp_size)):
                                                                       (step + 1) * (gbs // (mbs * dp_size))]
                for row in b]
        assert rows == chunk  # rank r reads the r-th slice of every global batch, nothing twice


def test_batches_resume_and_types(demo_data):
    full = batch_iterator(demo_data.train, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1)
    first = _take(full, 6)
    resumed = batch_iterator(demo_data.train, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1,
                             start_sample=16)
    assert [_tokens(b) for b in _take(resumed, 2)] == [_tokens(b) for b in first[4:6]]
    assert first[0]["tokens"].shape == (4, SEQ) and first[0]["tokens"].dtype == torch.int64
    assert first[0]["loss_mask"].dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp_size"):
        next(batch_iterator(demo_data.train, global_batch_size=6, micro_batch_size=4, dp_rank=0, dp_size=1))
    with pytest.raises(ValueError, match="dp_rank=2"):
        next(batch_iterator(demo_data.train, global_batch_size=8, micro_batch_size=4, dp_rank=2, dp_size=2))


def test_blend_and_epochs_are_exact(demo_data, demo_data_cfg):
    train = demo_data.train
    shares = demo_data_cfg.row_shares()
    assert train.schedule.consumed(1000) == {k: round(v * 1000) for k, v in shares.items()}
    assert Counter(train.stream_of(i) for i in range(3000)) == train.schedule.consumed(3000)
    # One epoch of a stream holds every training token exactly once.
    for name in ("en", "zh", "parallel"):
        stream = train.streams[name]
        rows_per_epoch = stream.epoch_rows(0)
        seen = Counter()
        for j in range(rows_per_epoch):
            for _, d, start, end, _ in stream.pieces(j):
                seen[d] += end - start
        assert sum(seen.values()) == demo_data.stats[name]["train_tokens"]
        assert stream.epochs(rows_per_epoch) == 1.0 and stream.epochs(rows_per_epoch // 2) == pytest.approx(0.5, abs=1e-3)
    epochs = demo_data.epochs(50_000)
    assert set(epochs) == {"en", "zh", "parallel", "mip"} and all(v > 0 for v in epochs.values())
    # Sanguo has 0.42x Austen's tokens and 0.7x its rows: about 1.7x the passes.
    assert epochs["zh"] / epochs["en"] == pytest.approx(0.7 * 1.119 / 0.466, rel=0.1)
    assert demo_data.epochs(0) == {name: 0.0 for name in epochs}


def test_split_is_complete_disjoint_and_seed_independent(demo_data, demo_data_cfg):
    newline = len(demo_data.tokenizer.encode("\n"))
    for name in ("en", "zh", "parallel"):
        s = demo_data.stats[name]
        # Every token is on exactly one side; a pair's document adds "\n" and <eos> to its halves.
        extra = s["documents"] * (newline + 1) if name == "parallel" else 0
        assert s["train_tokens"] + s["valid_tokens"] == s["tokens"] + extra
        share = s["valid_tokens"] / (s["train_tokens"] + s["valid_tokens"])
        assert 0.6 * demo_data_cfg.valid_fraction < share < 1.4 * demo_data_cfg.valid_fraction
    other = build_data(replace(demo_data_cfg, seed=99), SEQ, progress=False)
    assert set(demo_data.valid) == {"en_mask", "en_gmask", "zh_mask", "zh_gmask", "parallel_mask",
                                    "parallel_gmask", "mip_heldout"}
    for name, ds in demo_data.valid.items():
        assert len(ds) == len(other.valid[name]) > 0
        assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(ds.rows, other.valid[name].rows))
    assert other.unigram_entropy == demo_data.unigram_entropy
    assert not np.array_equal(other.train[0]["tokens"], demo_data.train[0]["tokens"])  # the seed matters


def test_validation_sets_hold_out_text(demo_data):
    # No validation window is in a training row: compare token 8-grams of en_gmask with epoch 0 of en.
    def grams(tokens, k=8):
        return {tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}

    stream = demo_data.train.streams["en"]
    train_grams = set()
    for j in range(stream.epoch_rows(0)):
        for _, d, start, end, _ in stream.pieces(j):
            train_grams |= grams(stream.corpus.tokens(d, start, end).tolist())
    for row in demo_data.valid["en_gmask"].rows[:8]:
        for a, b in segments(row):
            text = reconstruct(row, a, b)
            assert len(grams(text) & train_grams) < 0.05 * max(1, len(text))


def test_mip_heldout_uses_heldout_templates_and_pairs(demo_data):
    heldout = [t for t in TEMPLATES if t.heldout]
    trained = [t for t in TEMPLATES if not t.heldout]
    assert len(heldout) == 4 and len(trained) == 8 and {t.direction for t in heldout} == {"en-zh", "zh-en"}
    tok = demo_data.tokenizer
    mip = demo_data.train.streams["mip"]
    heldout_pairs = {tuple(p) for p in mip.heldout.tolist()}
    assert not heldout_pairs & {tuple(p) for p in mip.train.tolist()}
    for row in demo_data.valid["mip_heldout"].rows[:8]:
        for a, _ in segments(row):
            prompt = tok.decode(row["tokens"][a[:-1]])
            assert any(prompt.startswith(t.prefix) and prompt.endswith(t.suffix) for t in heldout)
            assert not any(prompt.startswith(t.prefix) and prompt.endswith(t.suffix) for t in trained)
    assert demo_data.stats["mip"]["heldout_pairs"] == len(heldout_pairs) > 500


def test_unigram_baseline(demo_data):
    unigram = np.array([0.5, 0.25, 0.25])
    assert unigram_cross_entropy(unigram, [0, 1]) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    for name, h in demo_data.unigram_entropy.items():
        ds = demo_data.valid[name]
        targets = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in ds.rows])
        counts = np.bincount(targets)
        p = counts[counts > 0] / counts.sum()
        empirical = float(-(p * np.log(p)).sum())
        # Gibbs: the corpus model's cross entropy is at least the targets' own empirical entropy.
        assert empirical < h < math.log(8192), name


@pytest.mark.parametrize("change, message", [
    (dict(mask_prob=1.5), r"data.mask_prob=1.5 must be in \[0, 1\]"),
    (dict(sources=["x.jsonl"]), "data.sources must map names to corpora"),
    (dict(sources={"en": SourceConfig(path=["a.jsonl", ""])}), r"data.sources.en.path=\['a.jsonl', ''\] must be a path"),
    (dict(sources={"en": SourceConfig(path="a/*.txt.zst", kind="parallel")}),
     r"data.sources.en: parallel pairs must be JSONL records or Parquet rows .*a/\*.txt.zst"),
    (dict(tokenize_on_start_mb=-1), "data.tokenize_on_start_mb=-1"),
    (dict(sources={"en": SourceConfig(path="x.jsonl", weight=-1)}), r"data.sources.en.weight=-1"),
    (dict(sources={"en": SourceConfig(path="x.jsonl", kind="book")}), r"data.sources.en.kind='book'"),
    (dict(sources={"en": {"path": "x.jsonl"}}), "data.mip_ratio=0.1 needs a source with kind=parallel"),
    (dict(sources={"p": SourceConfig(path="p.txt", kind="parallel")}), "parallel pairs must be JSONL"),
    (dict(gmask_min_ratio=0.0), "data.gmask_min_ratio=0.0"),
    (dict(valid_fraction=0.7), "data.valid_fraction=0.7"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**change)


def test_config_errors_at_build(demo_data_cfg):
    with pytest.raises(ConfigError, match="unknown field.*'mask_probability'"):
        DataConfig.from_dict({"mask_probability": 0.3})
    with pytest.raises(ConfigError, match="window_tokens=300 does not fit seq_length=256"):
        build_data(replace(demo_data_cfg, window_tokens=300), 256, progress=False)
    cfg = DataConfig(sources={"en": {"path": "data/demo_corpus/en_austen.jsonl.gz", "weight": 1.0}}, mip_ratio=0.0)
    assert isinstance(cfg.sources["en"], SourceConfig) and cfg.row_shares() == {"en": 1.0}


def test_first_fit_against_brute_force():
    from moe_morpheus.data.streams import OPEN_ROWS, first_fit

    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 40, size=600).tolist() + [40] * 5
    rows = first_fit(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each item once
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    # Replay in item order: a new row is only opened when none of the OPEN_ROWS most recently
    # created rows had room (those are never dropped from the open list while they have room).
    row_of = {i: r for r, items in enumerate(rows) for i in items}
    room = []
    for i, length in enumerate(lengths):
        r = row_of[i]
        if r == len(room):
            assert all(left < length for left in room[-OPEN_ROWS:])
            room.append(40)
        room[r] -= length
    assert sum(lengths) / (40 * len(rows)) > 0.95


def test_model_mask_agrees_with_the_data_contract(demo_data):
    from moe_morpheus.model.mask import glm_attention_mask

    batch = next(batch_iterator(demo_data.train, global_batch_size=4, micro_batch_size=4, start_sample=500))
    model_mask = glm_attention_mask(batch["segment_ids"], batch["prefix_mask"])[:, 0].numpy()
    for b in range(4):
        assert np.array_equal(model_mask[b], attention_mask(batch["segment_ids"][b], batch["prefix_mask"][b]))


def test_a_data_config_of_ones_own_replaces_the_demo_sources():
    from omegaconf import OmegaConf

    from moe_morpheus.config.data import demo_sources, sources_left_to_configs
    from moe_morpheus.config.experiment import ExperimentConfig, to_experiment

    schema = sources_left_to_configs(OmegaConf.structured(ExperimentConfig))
    assert to_experiment(schema).data.sources == demo_sources()  # nothing configured: the demo corpus
    # conf/data/NAME.yaml is merged into the schema: its corpora alone, not added to the demo's.
    mine = OmegaConf.merge(schema, {"data": {"mip_ratio": 0, "sources": {"web": {"path": ["a/*.jsonl.zst", "b.parquet"]}}}})
    assert to_experiment(mine).data.sources == {"web": SourceConfig(path=["a/*.jsonl.zst", "b.parquet"])}
    assert DataConfig(sources={}).sources == demo_sources()
