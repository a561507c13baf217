"""Synthetic packed GLM batches (the batch contract of moe_morpheus.data), for model tests."""

from __future__ import annotations

import torch


def packed_row(seq: int, vocab: int, generator: torch.Generator, segments: int = 2, pad: int = 3) -> dict:
    """One row of ``segments`` samples (Part A then Part B each) followed by ``pad`` padding."""
    row = {k: torch.zeros(seq, dtype=torch.long) for k in
           ("tokens", "targets", "position_ids", "block_position_ids", "segment_ids", "prefix_mask", "gmask")}
    row["loss_mask"] = torch.zeros(seq)
    usable = seq - pad
    bounds = [0] + sorted(torch.randperm(usable - 8, generator=generator)[: segments - 1].add(4).tolist()) + [usable]
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        length = end - start
        sep = int(torch.randint(1, length, (1,), generator=generator))
        part_b = length - sep
        row["tokens"][start:end] = torch.randint(0, vocab, (length,), generator=generator)
        row["targets"][start:end] = torch.randint(0, vocab, (length,), generator=generator)
        row["segment_ids"][start:end] = index
        row["prefix_mask"][start: start + sep] = 1
        row["position_ids"][start: start + sep] = torch.arange(sep)
        row["position_ids"][start + sep: end] = sep - 1  # Part B sits at its mask's position
        row["block_position_ids"][start + sep: end] = torch.arange(1, part_b + 1)
        row["loss_mask"][start + sep: end] = 1.0
        row["gmask"][start:end] = index % 2
    return row


def micro_batches(count: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = [packed_row(seq, vocab, generator) for _ in range(batch)]
        out.append({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    return out
