"""build_sample / build_gmask_sample contracts, span statistics, packing and the attention rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_morpheus.data.infilling import (
    attention_mask,
    build_gmask_sample,
    build_sample,
    pack,
    sample_gmask_start,
    sample_mask_spans,
    span_length_cdf,
    span_length_probs,
)

M, G, S, E = 103, 104, 106, 107  # stand-in ids for [MASK], [gMASK], <sop>, <eop>
X = [11, 12, 13, 14, 15, 16]  # x1..x6


def test_paper_figure_2():
    # The worked example of docs/design.md#positions: spans {x3} and {x5, x6}, Part B puts {x5, x6} first; 0-based positions.
    s = build_sample(X, [(2, 3), (4, 6)], mask_id=M, sop_id=S, eop_id=E, span_order=[1, 0])
    assert s.tokens.tolist() == [11, 12, M, 14, M, S, 15, 16, S, 13]
    assert s.position_ids.tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert s.block_position_ids.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.targets.tolist()[5:] == [15, 16, E, 13, E]
    assert s.loss_mask.tolist() == [0] * 5 + [1] * 5
    assert s.sep == 5
    # The other Part-B order, and spans given out of text order (span_order indexes `spans`).
    t = build_sample(X, [(4, 6), (2, 3)], mask_id=M, sop_id=S, eop_id=E, span_order=[1, 0])
    assert t.tokens.tolist() == [11, 12, M, 14, M, S, 13, S, 15, 16]
    assert t.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 2, 4, 4, 4]
    assert t.targets.tolist()[5:] == [13, E, 15, 16, E]


def test_gmask_sample():
    # tokens = source + [gMASK, sop] + target[:-1] (GLM-10B), targets = suffix, no <eop>.
    s = build_gmask_sample(X, 2, gmask_id=G, sop_id=S)
    assert s.tokens.tolist() == [11, 12, G, S, 13, 14, 15]
    assert s.targets.tolist() == [0, 0, 0, 13, 14, 15, 16]
    assert s.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert s.position_ids.tolist() == [0, 1, 2, 2, 2, 2, 2]
    assert s.block_position_ids.tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert s.sep == 3
    whole = build_gmask_sample(X, 0, gmask_id=G, sop_id=S)  # unconditional generation
    assert whole.tokens.tolist() == [G, S, 11, 12, 13, 14, 15] and whole.sep == 1


def test_build_sample_rejects_bad_spans():
    kw = dict(mask_id=M, sop_id=S, eop_id=E, span_order=None, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="overlap"):
        build_sample(X, [(0, 3), (2, 4)], **kw)
    with pytest.raises(ValueError, match="empty or outside"):
        build_sample(X, [(3, 3)], **kw)
    with pytest.raises(ValueError, match="empty or outside"):
        build_sample(X, [(4, 7)], **kw)
    with pytest.raises(ValueError, match="not a permutation"):
        build_sample(X, [(0, 1), (3, 4)], mask_id=M, sop_id=S, eop_id=E, span_order=[0, 0])
    with pytest.raises(ValueError, match="pass span_order or an rng"):
        build_sample(X, [(0, 1)], mask_id=M, sop_id=S, eop_id=E)
    with pytest.raises(ValueError, match="cannot be empty"):
        build_gmask_sample(X, 6, gmask_id=G, sop_id=S)


def test_rng_shuffles_part_b():
    spans = [(0, 1), (2, 3), (4, 5)]
    orders = {tuple(build_sample(X, spans, mask_id=M, sop_id=S, eop_id=E, rng=np.random.default_rng(k)
                                 ).tokens[3:].tolist()) for k in range(40)}
    assert len(orders) == 6  # every order of three spans occurs


def test_truncated_poisson_probs():
    p = span_length_probs(3.0, 39)
    ref = np.array([3.0 ** k * math.exp(-3.0) / math.factorial(k) for k in range(1, 40)])
    np.testing.assert_allclose(p, ref / ref.sum(), rtol=1e-12)


def test_span_statistics_over_many_samples():
    rng = np.random.default_rng(1)
    cdf = span_length_cdf(span_length_probs(3.0, 39))
    covered = total = 0
    lengths = []
    for _ in range(2000):
        n = int(rng.integers(64, 256))
        spans = sample_mask_spans(n, rng, ratio=0.15, cdf=cdf)
        assert all(0 <= s < e <= n for s, e in spans)
        assert all(e + 1 <= s2 for (_, e), (s2, _) in zip(spans, spans[1:]))  # one unmasked token between
        assert sum(e - s for s, e in spans) >= math.ceil(0.15 * n)
        covered += sum(e - s for s, e in spans)
        total += n
        lengths += [e - s for s, e in spans]
    assert 0.15 <= covered / total <= 0.20
    mean = np.mean(lengths)
    assert abs(mean - 3.0) <= 0.3  # within 10% of lambda = 3
    assert mean == pytest.approx(3.0 / (1.0 - math.exp(-3.0)), rel=0.03)  # the truncated mean, 3.157
    assert max(lengths) <= 39


def test_span_placement_is_uniform():
    # One span of fixed length 1 in a text of 10: every start equally likely.
    rng = np.random.default_rng(2)
    cdf = span_length_cdf(np.array([1.0]))
    starts = np.bincount([sample_mask_spans(10, rng, ratio=0.1, cdf=cdf)[0][0] for _ in range(5000)],
                         minlength=10)
    assert starts.min() > 400 and starts.max() < 600


def test_short_texts_still_get_a_span():
    rng = np.random.default_rng(3)
    cdf = span_length_cdf(span_length_probs(3.0, 39))
    for n in range(1, 12):
        for _ in range(50):
            spans = sample_mask_spans(n, rng, ratio=0.15, cdf=cdf)
            assert spans and all(0 <= s < e <= n for s, e in spans)
            assert all(e + 1 <= s2 for (_, e), (s2, _) in zip(spans, spans[1:]))


def test_gmask_suffix_range():
    rng = np.random.default_rng(4)
    for n in (1, 2, 5, 100, 255):
        starts = [sample_gmask_start(n, rng, min_ratio=0.2) for _ in range(400)]
        suffix = n - np.array(starts)
        assert suffix.min() >= max(1, math.ceil(0.2 * n)) and suffix.max() <= n
    # Uniform over [ceil(0.2 * 255), 255] = [51, 255]: both ends reached, mean 153.
    suffix = 255 - np.array([sample_gmask_start(255, rng, min_ratio=0.2) for _ in range(4000)])
    assert suffix.min() == 51 and suffix.max() == 255
    assert suffix.mean() == pytest.approx(153, abs=3)


def _reference_mask(segment_ids, prefix_mask):
    n = len(segment_ids)
    return np.array([[segment_ids[q] == segment_ids[k] and (prefix_mask[k] == 1 or k <= q)
                      for k in range(n)] for q in range(n)])


def test_pack_and_attention_mask():
    a = build_sample(X, [(2, 3), (4, 6)], mask_id=M, sop_id=S, eop_id=E, span_order=[1, 0])
    b = build_gmask_sample(X[:3], 1, gmask_id=G, sop_id=S)
    row = pack([a, b], 20, pad_id=0)
    assert all(len(v) == 20 for v in row.values())
    assert {k: v.dtype.name for k, v in row.items()} == {
        "tokens": "int64", "targets": "int64", "loss_mask": "float32", "position_ids": "int64",
        "block_position_ids": "int64", "segment_ids": "int64", "prefix_mask": "int64", "gmask": "int64"}
    assert row["segment_ids"].tolist() == [1] * 10 + [2] * 4 + [0] * 6
    assert row["gmask"].tolist() == [0] * 10 + [1] * 4 + [0] * 6  # the [gMASK] sample only (1D RoPE)
    assert row["prefix_mask"].tolist() == [1] * 5 + [0] * 5 + [1] * 2 + [0] * 2 + [0] * 6
    assert row["position_ids"][10:14].tolist() == [0, 1, 1, 1]  # positions restart per segment
    assert row["loss_mask"][14:].sum() == 0 and row["tokens"][14:].tolist() == [0] * 6
    mask = attention_mask(row["segment_ids"], row["prefix_mask"])
    assert np.array_equal(mask, _reference_mask(row["segment_ids"], row["prefix_mask"]))
    assert not mask[:5, 5:10].any()  # Part A never sees its Part B
    assert not mask[:10, 10:].any() and not mask[10:, :10].any()  # segments are separate
    assert mask.any(1).all()  # every row, padding included, attends to something
    with pytest.raises(ValueError, match="do not fit"):
        pack([a, b], 13, pad_id=0)
