"""Evaluation pieces: segments of packed rows, cloze items, translation and cloze scoring against
known answers, and deterministic validation losses."""

from __future__ import annotations

import numpy as np
import pytest

from moe_morpheus.data.tokenizer import GMASK_ID
from moe_morpheus.inference.evaluate import cloze_accuracy, cloze_items, segments, translation_scores
from moe_morpheus.inference.generate import Generator


def row_of(pairs: list[tuple[list[int], list[int]]], seq: int = 64) -> dict:
    """A packed row of [gMASK] samples: Part A (ending in [gMASK]) then the continuation."""
    row = {k: np.zeros(seq, dtype=np.int64) for k in ("tokens", "targets", "segment_ids", "prefix_mask")}
    row["loss_mask"] = np.zeros(seq, dtype=np.float32)
    at = 0
    for index, (part_a, answer) in enumerate(pairs, start=1):
        n_a, n_b = len(part_a), len(answer)
        row["tokens"][at: at + n_a] = part_a
        row["prefix_mask"][at: at + n_a] = 1
        row["targets"][at + n_a: at + n_a + n_b] = answer
        row["loss_mask"][at + n_a: at + n_a + n_b] = 1
        row["segment_ids"][at: at + n_a + n_b] = index
        at += n_a + n_b
    return row


class Oracle:
    """A stand-in generator that answers from a table (the scoring is what is tested)."""

    seq_length = 256
    room = Generator.room  # the real model's rule for how much a prompt leaves

    def __init__(self, answers: dict[tuple, list[int]], seq_length: int = 256):
        self.answers, self.seq_length, self.asked = answers, seq_length, []

    def generate(self, prompt, sampling):
        assert len(prompt) + 1 + sampling.max_new_tokens <= self.seq_length, "Generator would raise"
        self.asked.append(sampling.max_new_tokens)
        span = self.answers[tuple(prompt)]
        return prompt + span, [span]


def test_segments_split_packed_rows():
    row = row_of([([5, 6, GMASK_ID], [7, 8]), ([9, GMASK_ID], [10])])
    assert segments([row]) == [([5, 6, GMASK_ID], [7, 8]), ([9, GMASK_ID], [10])]


def test_translation_scores_against_known_answers(demo_tokenizer):
    tok = demo_tokenizer
    pairs = [(tok.encode("English: good morning\nChinese: ") + [GMASK_ID], tok.encode("早上好")),
             (tok.encode("中文：谢谢\n英文：") + [GMASK_ID], tok.encode("thank you"))]
    rows = [row_of(pairs, seq=128)]
    perfect = translation_scores(Oracle({tuple(p): a for p, a in pairs}), tok, rows)
    assert perfect == {"chrf": pytest.approx(100.0), "exact_match": 1.0, "items": 2.0, "items_cut": 0.0}
    wrong = translation_scores(Oracle({tuple(p): tok.encode("xyz") for p, _ in pairs}), tok, rows)
    assert wrong["exact_match"] == 0.0 and wrong["chrf"] < 10


def test_translation_allowance_stays_within_the_sequence():
    # Prompts of 3 and 9 tokens in a model of 12 positions: 12 - 3 - 1 = 8 new tokens at most for
    # the first (its answer would get 2 + 8 = 10); the second leaves 12 - 9 - 1 = 2.
    pairs = [([5, 6, GMASK_ID], [7, 8]), ([9] * 8 + [GMASK_ID], [10])]
    oracle = Oracle({tuple(p): a for p, a in pairs}, seq_length=12)
    assert oracle.room([9] * 12) < 1 and oracle.room([5, 6]) == 8  # a [gMASK] is added to the second
    scores = translation_scores(oracle, _Tokens(), [row_of(pairs, seq=16)])
    assert oracle.asked == [8, 2] and scores["items"] == 2 and scores["items_cut"] == 0
    # A prompt that fills the sequence is skipped, not an error at the end of a run.
    full = Oracle({}, seq_length=8)
    assert translation_scores(full, _Tokens(), [row_of(pairs[1:], seq=16)]) == {}
    # An answer longer than the room left is scored, and counted as cut.
    long = [([9] * 8 + [GMASK_ID], [10, 11, 12])]
    assert translation_scores(Oracle({tuple(long[0][0]): [10, 11]}, seq_length=12), _Tokens(),
                              [row_of(long, seq=16)])["items_cut"] == 1


class _Tokens:
    """Token ids as text: enough for scoring."""

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_cloze_items_and_accuracy(demo_tokenizer):
    tok = demo_tokenizer
    en = tok.encode("It is a truth universally acknowledged that a single man must be in want of a wife.")
    zh = tok.encode("滚滚长江东逝水，浪花淘尽英雄。是非成败转头空，青山依旧在，几度夕阳红。")
    en_rows = [row_of([(en[:10] + [GMASK_ID], en[10:])], seq=128)]
    zh_rows = [row_of([(zh[:8] + [GMASK_ID], zh[8:])], seq=128)]
    (context, word), = cloze_items(tok, en_rows, "en", 4)
    assert word == "wife" and context.endswith("in want of a ")
    (zh_context, zh_word), = cloze_items(tok, zh_rows, "zh", 4)
    assert zh_word == "红" and zh_context.endswith("几度夕阳")

    def oracle_for(ctx, answer):
        return Oracle({tuple(tok.encode(ctx)[-(Oracle.seq_length - 16):] + [GMASK_ID]): tok.encode(answer)})

    assert cloze_accuracy(oracle_for(context, " wife."), tok, en_rows, "en") == 1.0
    assert cloze_accuracy(oracle_for(context, " husband."), tok, en_rows, "en") == 0.0
    assert cloze_accuracy(oracle_for(zh_context, "红。"), tok, zh_rows, "zh") == 1.0


def test_validation_losses_are_deterministic(demo_data):
    from moe_morpheus.config import ModelConfig, ParallelConfig
    from moe_morpheus.inference.evaluate import validation_losses
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=8192,
                      seq_length=len(next(iter(demo_data.valid.values()))[0]["tokens"]))
    initialize(ParallelConfig(), cfg)
    model = build_model(cfg, None, ParallelConfig(), seed=1)
    # Two sets of 8 rows keep this fast; determinism does not depend on the size.
    valid = {name: demo_data.valid[name].head(8) for name in ("en_gmask", "zh_mask")}
    first = validation_losses(model, valid, micro_batch_size=4)
    second = validation_losses(model, valid, micro_batch_size=4)
    assert first == second and set(first.sets) == set(valid)
    assert all(np.isfinite(v) for v in first.losses().values()) and 0 < first.se < 0.1
