"""GLM autoregressive blank infilling: one sample, span sampling, packing, attention rule.

A sample is Part A (the text with each span replaced by its mask token) followed by Part B
(the spans, each behind a ``<sop>``). docs/design.md#blank-infilling, #packing and #positions
define it; the paper's Figure 2 (Du et al. 2022), which ``tests/data/test_infilling.py`` checks,
shifted to 0-based positions:

    input      x1 x2 [M] x4 [M] | [S] x5 x6 [S] x3
    position   0  1  2   3  4   | 4   4  4  2   2
    block      0  0  0   0  0   | 1   2  3  1   2
    target     (no loss)        | x5  x6 [E] x3 [E]

Part-A targets are 0 with loss 0 (any in-range id would do; 0 is ``<pad>``).

Packed rows (the batch contract the model consumes), all of length seq_length:
``tokens``, ``targets``, ``position_ids``, ``block_position_ids``, ``segment_ids`` (1, 2, ...
per sample, 0 on padding), ``prefix_mask`` (1 on each sample's Part A) as int64, and
``loss_mask`` as float32. Attention: query q may see key k iff ``segment_ids[q] ==
segment_ids[k]`` and (``prefix_mask[k] == 1`` or ``k <= q``). Padding is segment 0 with no
Part A, so it attends causally to padding only (never a fully masked softmax row, never seen by
a real token) and carries no loss.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One blank-infilling sample: Part A then Part B, ``sep`` = length of Part A."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    block_position_ids: np.ndarray
    sep: int
    # A [gMASK] sample (its Part B continues the text): 1D RoPE positions it linearly.
    gmask: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


def _i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def build_sample(tokens, spans, *, mask_id: int, sop_id: int, eop_id: int, span_order=None,
                 rng: np.random.Generator | None = None) -> Sample:
    """A ``[MASK]`` sample (docs/design.md#public-contracts): each half-open ``(start, end)`` span of
    ``tokens`` becomes one ``mask_id`` in Part A and ``[sop] + span`` / ``span + [eop]`` in
    Part B. ``span_order`` lists indices into ``spans`` in their Part-B order; when None the
    order is a random permutation from ``rng`` (GLM shuffles: removing the shuffle hurts)."""
    text = _i64(tokens)
    spans = [(int(s), int(e)) for s, e in spans]
    if not spans:
        raise ValueError("build_sample needs at least one span")
    by_start = sorted(range(len(spans)), key=lambda k: spans[k][0])
    previous_end = 0
    for k in by_start:
        s, e = spans[k]
        if not 0 <= s < e <= len(text):
            raise ValueError(f"span {spans[k]} is empty or outside the text of {len(text)} tokens")
        if s < previous_end:
            raise ValueError(f"spans overlap: {spans[k]} starts before {previous_end}")
        previous_end = e
    if span_order is None:
        if rng is None:
            raise ValueError("build_sample: pass span_order or an rng to shuffle Part B")
        span_order = rng.permutation(len(spans))
    span_order = [int(k) for k in span_order]
    if sorted(span_order) != list(range(len(spans))):
        raise ValueError(f"span_order {span_order} is not a permutation of the {len(spans)} spans")

    # Part A: text pieces between spans, one mask per span; mask_pos[k] = its Part-A index.
    part_a, mask_pos, cursor = [], {}, 0
    for k in by_start:
        s, e = spans[k]
        part_a.append(text[cursor:s])
        mask_pos[k] = sum(len(p) for p in part_a)
        part_a.append(_i64([mask_id]))
        cursor = e
    part_a.append(text[cursor:])
    part_a = np.concatenate(part_a)

    b_tokens, b_targets, b_pos, b_block = [], [], [], []
    for k in span_order:
        s, e = spans[k]
        span = text[s:e]
        b_tokens += [_i64([sop_id]), span]
        b_targets += [span, _i64([eop_id])]
        b_pos.append(np.full(e - s + 1, mask_pos[k], dtype=np.int64))
        b_block.append(np.arange(1, e - s + 2, dtype=np.int64))
    return _assemble(part_a, np.concatenate(b_tokens), np.concatenate(b_targets),
                     np.concatenate(b_pos), np.concatenate(b_block))


def build_gmask_sample(tokens, start: int, *, gmask_id: int, sop_id: int) -> Sample:
    """A ``[gMASK]`` sample: the suffix ``tokens[start:]`` is the one span. Part A is
    ``tokens[:start] + [gMASK]``; Part B input is ``[sop] + suffix[:-1]`` and its targets are
    ``suffix`` (no ``<eop>``; docs/design.md#blank-infilling), positions (start, 1..len)."""
    text = _i64(tokens)
    start = int(start)
    if not 0 <= start < len(text):
        raise ValueError(f"[gMASK] suffix start {start} must be in [0, {len(text)}): the suffix cannot be empty")
    suffix = text[start:]
    part_a = np.concatenate([text[:start], _i64([gmask_id])])
    sample = _assemble(part_a, np.concatenate([_i64([sop_id]), suffix[:-1]]), suffix,
                       np.full(len(suffix), start, dtype=np.int64), np.arange(1, len(suffix) + 1, dtype=np.int64))
    return dataclasses.replace(sample, gmask=True)


def _assemble(part_a, b_tokens, b_targets, b_pos, b_block) -> Sample:
    sep, n_b = len(part_a), len(b_tokens)
    return Sample(
        tokens=np.concatenate([part_a, b_tokens]),
        targets=np.concatenate([np.zeros(sep, dtype=np.int64), b_targets]),
        loss_mask=np.concatenate([np.zeros(sep, dtype=np.int64), np.ones(n_b, dtype=np.int64)]),
        position_ids=np.concatenate([np.arange(sep, dtype=np.int64), b_pos]),
        block_position_ids=np.concatenate([np.zeros(sep, dtype=np.int64), b_block]),
        sep=sep,
    )


def span_length_probs(lam: float, max_len: int) -> np.ndarray:
    """P(length = 1..max_len): Poisson(lam) truncated to 1..max_len (GLM: lambda 3, 1..39)."""
    k = np.arange(1, max_len + 1)
    log_pmf = k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k])
    pmf = np.exp(log_pmf)
    return pmf / pmf.sum()


def span_length_cdf(probs: np.ndarray) -> list[float]:
    """The cumulative distribution of ``probs`` as the list :func:`sample_mask_spans` bisects."""
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # rounding must not let a uniform draw fall past the longest span
    return cdf.tolist()


def sample_mask_spans(length: int, rng: np.random.Generator, *, ratio: float, cdf: list[float]
                      ) -> list[tuple[int, int]]:
    """Sorted non-overlapping spans of a text of ``length`` tokens covering >= ``ratio`` of it:
    lengths drawn from ``cdf`` (:func:`span_length_cdf` of ``span_length_probs``) until the cover
    is reached, then placed uniformly with at least one unmasked token between two spans.

    Called once per [MASK] sample while an epoch is planned (~70k times for the demo corpus at
    sequence 64), so the arithmetic is plain Python on short lists; numpy is called only for the
    three random draws (2.4x faster than with numpy arithmetic on 20k demo-length texts, the same draws).
    """
    if length < 1:
        raise ValueError("cannot mask an empty text")
    target = max(1, math.ceil(ratio * length))
    lengths: list[int] = []
    total = 0
    while total < target:
        # A batch of uniform draws per numpy call, mapped through the inverse CDF; the mean span
        # is ~3.2, so target / 3 + 2 draws usually suffice. The draws past the cover are unused.
        for u in rng.random(target // 3 + 2).tolist():
            lengths.append(bisect.bisect_right(cdf, u) + 1)
            total += lengths[-1]
            if total >= target:
                break
    # Short texts: drop spans until they fit with their gaps; a lone span is clipped to the text.
    while len(lengths) > 1 and total + len(lengths) - 1 > length:
        total -= lengths.pop()
    lengths[0] = min(lengths[0], length)
    n = len(lengths)
    free = length - sum(lengths) - (n - 1)
    # Stars and bars: n sorted distinct picks from free + n slots split the `free` spare tokens
    # into n + 1 gaps, every split equally likely. pick_k = (spare tokens before span k) + k,
    # and the k in it is exactly the one mandatory gap after each earlier span, so span k
    # starts at pick_k + (lengths of the spans before it).
    picks = sorted(rng.choice(free + n, size=n, replace=False).tolist())
    spans, before = [], 0
    for pick, span in zip(picks, rng.permutation(lengths).tolist()):
        spans.append((pick + before, pick + before + span))
        before += span
    return spans


def sample_gmask_start(length: int, rng: np.random.Generator, *, min_ratio: float) -> int:
    """Start of a [gMASK] suffix whose length is uniform in [ceil(min_ratio * length), length]."""
    shortest = max(1, math.ceil(min_ratio * length))
    return length - int(rng.integers(shortest, length + 1))


# ``gmask``: 1 on every token of a [gMASK] sample (MIP included), which 1D RoPE (GLM-130B) needs:
# its Part B continues the positions linearly, a [MASK] sample's stays at the mask (docs/design.md#rope).
ROW_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "segment_ids", "prefix_mask",
            "gmask")


def pack(samples: list[Sample], seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate samples into one row of ``seq_length`` (the batch contract above)."""
    used = sum(len(s) for s in samples)
    if used > seq_length:
        raise ValueError(f"samples of {used} tokens do not fit a row of {seq_length}")
    row = {key: np.zeros(seq_length, dtype=np.int64) for key in ROW_KEYS}
    row["tokens"][used:] = pad_id
    at = 0
    for segment, s in enumerate(samples, 1):
        end = at + len(s)
        row["tokens"][at:end] = s.tokens
        row["targets"][at:end] = s.targets
        row["loss_mask"][at:end] = s.loss_mask
        row["position_ids"][at:end] = s.position_ids
        row["block_position_ids"][at:end] = s.block_position_ids
        row["segment_ids"][at:end] = segment
        row["prefix_mask"][at:at + s.sep] = 1
        row["gmask"][at:end] = int(s.gmask)
        at = end
    row["loss_mask"] = row["loss_mask"].astype(np.float32)
    return row


def attention_mask(segment_ids, prefix_mask) -> np.ndarray:
    """Reference mask of a packed row, True = query (row) may attend to key (column)."""
    seg = np.asarray(segment_ids)
    prefix = np.asarray(prefix_mask).astype(bool)
    n = len(seg)
    causal = np.tril(np.ones((n, n), dtype=bool))
    return (seg[:, None] == seg[None, :]) & (prefix[None, :] | causal)
