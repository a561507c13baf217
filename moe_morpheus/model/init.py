"""Weight initialisation. Megatron-Core calls these on the full (TP=1) master weight when
``use_cpu_initialization`` is set, so every tensor-parallel layout starts from the same model.

DeepNorm (Wang et al. 2022; GLM-130B): Xavier normal, scaled by beta = (2N)^-1/2 on the FFN,
the value projection and the attention output projection; gain 1 on queries and keys.
Pre-LN: normal(0, init_std), output projections scaled by 1/sqrt(2N) (GPT-2 / Megatron).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moe_morpheus.config import ModelConfig


def normal(std: float) -> Callable[[torch.Tensor], None]:
    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight.normal_(0.0, std)

    return init


def output_init(cfg: ModelConfig) -> Callable[[torch.Tensor], None]:
    """FFN matrices and the attention output projection: ``ModelConfig.output_init_std`` (MoE
    experts, moe/experts.py, are drawn with the same std)."""

    def init(weight: torch.Tensor) -> None:
        fan_out, fan_in = weight.shape
        normal(cfg.output_init_std(fan_in, fan_out))(weight)

    return init


def embedding_init(cfg: ModelConfig) -> Callable[[torch.Tensor], None]:
    return normal(cfg.init_std)


def qkv_init(cfg: ModelConfig) -> Callable[[torch.Tensor], None]:
    """Fused QKV weight [3h, h], rows ordered head by head as (q_i, k_i, v_i) (see attention.py).

    Each of Q, K, V is initialised as its own h x h matrix (Xavier std sqrt(1/h)); V gets beta.
    """

    def init(weight: torch.Tensor) -> None:
        if cfg.norm == "pre_ln":
            normal(cfg.init_std)(weight)
            return
        std = math.sqrt(2.0 / (2 * cfg.hidden_size))
        view = weight.view(cfg.num_attention_heads, 3, cfg.head_dim, cfg.hidden_size)
        with torch.no_grad():
            view.normal_(0.0, std)
            view[:, 2].mul_(cfg.init_beta)

    return init
