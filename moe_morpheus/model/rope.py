"""Rotary position embeddings in GLM's two modes (reference/glm.md, section 2).

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate ``x`` [s, b, n, d] by ``positions`` [b, s] (d even)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = positions.t().to(torch.float32)[..., None] * inv_freq  # [s, b, d/2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [s, b, 1, d]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def apply_rope(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    block_position_ids: torch.Tensor | None,
    mode: str,
    base: float = 10000.0,
) -> torch.Tensor:
    """Apply RoPE to queries or keys ``x`` [s, b, heads, head_dim].

    In ``1d`` mode ``position_ids`` are the final 1D ids (the caller adds block positions for
    ``[gMASK]`` rows, DESIGN.md "Positions"); in ``2d`` mode both id tensors are required.
    """
    if mode == "1d":
        return _rotate(x, position_ids, base)
    if block_position_ids is None:
        raise ValueError("2D RoPE needs block_position_ids (0 in Part A, 1, 2, ... in each span)")
    half = x.shape[-1] // 2
    return torch.cat(
        (_rotate(x[..., :half], position_ids, base), _rotate(x[..., half:], block_position_ids, base)), dim=-1
    )
