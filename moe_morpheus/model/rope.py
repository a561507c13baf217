"""Rotary position embeddings in GLM's two modes (Du et al. 2022; GLM-130B, Zeng et al. 2022; docs/design.md#rope).

- ``1d`` (GLM-130B): the whole head dimension rotates by one position id per token.
- ``2d`` (GLM / ChatGLM-6B): the first half of each head rotates by ``position_ids`` (the
  position in Part A; a Part-B token takes its mask's position), the second half by
  ``block_position_ids`` (0 in Part A, 1, 2, ... inside a span).

Pairing is GPT-NeoX's ``rotate_half`` (dimension i pairs with i + d/2 inside the rotated part),
base 10000. A rotation by angle p * theta_i makes ``<R(p) q, R(p') k>`` a function of p - p'
only, which the tests check.
"""

from __future__ import annotations

import torch


def rope_tables(position_ids: torch.Tensor, block_position_ids: torch.Tensor | None, mode: str, head_dim: int,
                base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [s, b, head_dim] in fp32 for ids [b, s]: computed once per forward and shared by
    every layer (and by queries and keys), instead of per layer and per tensor.

    In ``1d`` mode ``position_ids`` are the final 1D ids (the caller adds block positions for
    ``[gMASK]`` rows, docs/design.md#positions); in ``2d`` mode both id tensors are required, the
    first half of the head dimension taking ``position_ids``, the second ``block_position_ids``."""
    if mode == "1d":
        parts = [(position_ids, head_dim)]
    elif block_position_ids is None:
        raise ValueError("2D RoPE needs block_position_ids (0 in Part A, 1, 2, ... in each span)")
    else:
        parts = [(position_ids, head_dim // 2), (block_position_ids, head_dim // 2)]
    cos, sin = [], []
    for positions, dim in parts:
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
        angles = positions.t().to(torch.float32)[..., None] * inv_freq  # [s, b, dim/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos.append(angles.cos())
        sin.append(angles.sin())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate ``x`` [..., head_dim] by tables that broadcast against it: within the whole head
    (1d) or within each half (2d), dimension i paired with i + (rotated size) / 2."""
    groups = 1 if mode == "1d" else 2
    pairs = x.unflatten(-1, (groups, 2, x.shape[-1] // (2 * groups)))
    rotated = torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2).flatten(-3)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def apply_rope(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    block_position_ids: torch.Tensor | None,
    mode: str,
    base: float = 10000.0,
) -> torch.Tensor:
    """Apply RoPE to queries or keys ``x`` [s, b, heads, head_dim] (ids [b, s], as
    :func:`rope_tables`)."""
    cos, sin = rope_tables(position_ids, block_position_ids, mode, x.shape[-1], base)
    return rotate(x, cos[:, :, None], sin[:, :, None], mode)
