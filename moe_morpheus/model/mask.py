"""GLM's attention mask for packed rows (docs/design.md#attention-mask, #packing).

Query q may attend to key k iff they are in the same segment and the key is in that segment's
Part A (bidirectional context) or k <= q (causal Part B, which also sees earlier spans).
Padding carries segment id 0 and so attends only to other padding, never to real tokens; every
row can see at least itself, so no softmax row is empty.
"""

from __future__ import annotations

import torch


def glm_attention_mask(segment_ids: torch.Tensor, prefix_mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask [b, 1, s, s], True where attention is allowed.

    ``segment_ids`` [b, s] int: 1, 2, ... per packed sample, 0 for padding.
    ``prefix_mask`` [b, s]: 1 where the token is in its segment's Part A.
    """
    seq = segment_ids.shape[1]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    visible = causal[None] | prefix_mask.bool()[:, None, :]
    return (same_segment & visible)[:, None]
