"""Validation sets and loss: every held-out window is in the sets, sets of one text share its
units; the standard error against textbook formulas; the same rows, targets and loss at DP=1 and
DP=2 (dense, and MoE with experts over both ranks) with micro-batch sizes that do not divide the
set, against a row-by-row reference; the intermediate-evaluation subset."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from moe_morpheus.data.tokenizer import MASK_ID
from moe_morpheus.data.validation import STRATUM_SHIFT, unit_stratum
from moe_morpheus.inference.evaluate import cluster_se
from tests.helpers.distributed import run_distributed

SEQ = 64


def _segment_lengths(row: dict) -> list[tuple[int, int]]:
    """(length, [MASK] tokens) of every packed segment of a row."""
    seg = row["segment_ids"]
    return [(int((seg == s).sum()), int(((seg == s) & (row["tokens"] == MASK_ID)).sum()))
            for s in range(1, int(seg.max()) + 1)]


def test_sets_hold_every_held_out_window(demo_data):
    for source in ("en", "zh", "parallel"):
        held_out = demo_data.stats[source]["valid_tokens"]
        # A [gMASK] sample of L text tokens takes L + 1 positions, a [MASK] one L + 2 per span.
        gmask = sum(n - 1 for row in demo_data.valid[f"{source}_gmask"].rows for n, _ in _segment_lengths(row))
        mask = sum(n - 2 * spans for row in demo_data.valid[f"{source}_mask"].rows
                   for n, spans in _segment_lengths(row))
        assert gmask == mask == held_out, source


def test_sets_of_one_text_share_units_and_sources_are_strata(demo_data):
    def units(name):
        ds = demo_data.valid[name]
        return {int(u) for i in range(len(ds)) for u in ds.position_units(i)[ds.rows[i]["loss_mask"] > 0]}

    en, zh, parallel = units("en_mask"), units("zh_mask"), units("parallel_gmask")
    # A [MASK] sample too long for a row continues in a piece that may start in the next chunk.
    for source, mask in (("en", en), ("zh", zh)):
        gmask = units(f"{source}_gmask")
        assert gmask <= mask and len(mask - gmask) < 0.1 * len(mask), source
    assert units("parallel_mask") == parallel  # a pair is one unit, however it is cut
    assert units("mip_heldout") <= parallel and len(units("mip_heldout")) > 0.9 * len(parallel)
    strata = [set(unit_stratum(np.array(sorted(u))).tolist()) for u in (en, zh, parallel)]
    assert all(len(s) == 1 for s in strata) and len(set.union(*strata)) == 3
    # The split unit is a chunk of split_chunk_tokens: ~ held-out tokens / 256 units per text source.
    assert len(en) == pytest.approx(demo_data.stats["en"]["valid_tokens"] / 256, rel=0.2)


def test_cluster_se_against_textbook_formulas():
    rng = np.random.default_rng(0)
    loss = rng.gamma(2.0, 3.0, size=500)
    units = np.arange(500)
    # One target per unit, one stratum: the standard error of a mean, s / sqrt(n).
    assert cluster_se(loss, units) == pytest.approx(loss.std(ddof=1) / math.sqrt(500), rel=1e-12)
    # Two draws of the same text (identical losses, same unit) carry no new information.
    assert cluster_se(np.repeat(loss, 2), np.repeat(units, 2)) == pytest.approx(cluster_se(loss, units), rel=1e-12)
    # Strata (sources) of fixed size: sqrt(sum_h (n_h / n)^2 s_h^2 / n_h), the shift between them is no noise.
    shifted = np.where(units < 200, loss, loss + 30.0)
    strata = np.where(units < 200, units, (1 << STRATUM_SHIFT) | units)
    parts = [shifted[:200], shifted[200:]]
    expected = math.sqrt(sum((len(p) / 500) ** 2 * p.var(ddof=1) / len(p) for p in parts))
    assert cluster_se(shifted, strata) == pytest.approx(expected, rel=1e-12)
    assert cluster_se(shifted, units) > 3 * expected  # unstratified, the shift would count as noise


def _validation_run(valid: dict, micro_batch_sizes: list[int], moe: dict | None, ep: int):
    """Validation of a fixed dense / MoE model in this process's layout, at several micro-batch
    sizes; at DP=1 also a row-by-row reference (the model called on one row at a time)."""
    import torch
    from megatron.core import parallel_state

    from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
    from moe_morpheus.inference.evaluate import validation_losses
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.step import MODEL_INPUTS, wrap_ddp

    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=8192, seq_length=SEQ)
    parallel = ParallelConfig(ep=ep)
    dp = initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, MoEConfig(**moe) if moe else None, parallel, seed=3))
    rank = parallel_state.get_data_parallel_rank()
    out = {mbs: validation_losses(chunks, valid, micro_batch_size=mbs, dp_rank=rank, dp_size=dp)
           for mbs in micro_batch_sizes}
    out["subset"] = validation_losses(chunks, valid, micro_batch_size=micro_batch_sizes[0], dp_rank=rank,
                                      dp_size=dp, fraction=0.5)
    if dp == 1:
        sums = {}
        chunks[0].eval()
        with torch.no_grad():
            for name, ds in valid.items():
                total, count = 0.0, 0.0
                for row in ds.rows:
                    batch = {k: torch.from_numpy(row[k][None]) for k in (*MODEL_INPUTS, "targets", "gmask")}
                    per_token = chunks[0](**{k: batch[k] for k in MODEL_INPUTS}, targets=batch["targets"],
                                          gmask=batch["gmask"])
                    total += float((per_token.double()[0] * torch.from_numpy(row["loss_mask"]).double()).sum())
                    count += float(row["loss_mask"].sum())
                sums[name] = (total, count)
        out["reference"] = sums
    return out


@pytest.fixture(scope="module")
def small_valid(demo_data_cfg):
    from moe_morpheus.data.dataset import build_data

    # 5 rows per set: 35 rows, which micro-batches of 3 and 4 do not divide at DP=1 or DP=2.
    return build_data(replace(demo_data_cfg, valid_rows=5), SEQ, progress=False).valid


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [None, dict(layer_freq=2, num_experts=4, top_k=2)], ids=["dense", "moe-ep2"])
def test_same_validation_at_dp1_and_dp2_and_any_micro_batch(small_valid, moe):
    one = run_distributed(_validation_run, 1, small_valid, [3, 4], moe, 1)[0]
    # MoE: experts split over the two data-parallel ranks, so the padded last micro-batches must keep
    # both ranks' all-to-alls in step.
    two = run_distributed(_validation_run, 2, small_valid, [3, 4], moe, 2 if moe else 1)
    reference = one["reference"]
    total = sum(s for s, _ in reference.values()) / sum(n for _, n in reference.values())
    targets = sum(int(n) for _, n in reference.values())
    for result in (one[3], one[4], two[0][3], two[0][4], two[1][3]):
        assert result.targets == targets
        assert _relative(result.loss, total) <= 1e-6
        for name, (s, n) in reference.items():
            assert result.sets[name][2] == n and _relative(result.sets[name][0], s / n) <= 1e-6, name
        assert _relative(result.se, one[3].se) <= 1e-5
    # The subset: the first ceil(5 / 2) = 3 rows of every set, at both sizes.
    subset_targets = sum(int(r["loss_mask"].sum()) for ds in small_valid.values() for r in ds.rows[:3])
    assert one["subset"].targets == two[0]["subset"].targets == subset_targets
    assert _relative(two[0]["subset"].loss, one["subset"].loss) <= 1e-6


def test_the_logged_unigram_baseline_is_pooled_like_valid_loss():
    from moe_morpheus.data.dataset import unigram_cross_entropy
    from moe_morpheus.data.validation import RowsDataset
    from moe_morpheus.inference.evaluate import pooled_unigram

    rng = np.random.default_rng(0)
    unigram = rng.dirichlet(np.ones(50))

    def rows(n: int) -> RowsDataset:
        made = [{"targets": rng.integers(0, 50, 16), "loss_mask": (rng.random(16) < 0.5).astype(np.float32)}
                for _ in range(n)]
        return RowsDataset(made, [np.array([-1])] * n)

    valid = {"big": rows(40), "small": rows(2)}
    targets = {name: np.concatenate([r["targets"][r["loss_mask"] > 0] for r in ds.rows])
               for name, ds in valid.items()}
    entropy = {name: unigram_cross_entropy(unigram, t) for name, t in targets.items()}
    # The baseline's mean loss over every target of all sets, as valid/loss weighs them.
    every_target = np.concatenate(list(targets.values()))
    assert pooled_unigram(entropy, valid) == pytest.approx(unigram_cross_entropy(unigram, every_target))
    assert pooled_unigram(entropy, valid) != pytest.approx(sum(entropy.values()) / 2)


def test_subset_evaluations_have_their_own_metric_names():
    from moe_morpheus.inference.evaluate import Validation

    valid = Validation(2.0, 0.01, 100, {"en_mask": (2.5, 0.02, 40), "zh_mask": (1.6, 0.02, 60)})
    full, subset = valid.metrics(), valid.metrics("valid_subset")
    assert set(full) == {"valid/loss", "valid/loss_se", "valid/target_tokens", "valid/en_mask/loss",
                         "valid/en_mask/loss_se", "valid/zh_mask/loss", "valid/zh_mask/loss_se"}
    assert set(subset) == {k.replace("valid/", "valid_subset/", 1) for k in full}
    assert list(subset.values()) == list(full.values())
