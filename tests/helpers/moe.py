"""The small expert-layer problem of the MoE tests. Shape legend: T tokens, D model dim, F expert
hidden, G experts in total."""

from __future__ import annotations

import torch

from moe_morpheus.config import ModelConfig, MoEConfig

D, F_HIDDEN = 16, 24
EXPERT_PARAMS = ("w_value_EFD", "b_value_EF", "w_gate_proj_EFD", "b_gate_proj_EF", "w_out_EDF", "b_out_ED")
# MoEFeedForward's host model: width D, experts of width F_HIDDEN (the dense FFN's).
FFN_MODEL = ModelConfig(num_layers=2, hidden_size=D, num_attention_heads=2, ffn_hidden_size=F_HIDDEN)


def moe_cfg(**overrides) -> MoEConfig:
    """4 experts, top-2, in every layer."""
    return MoEConfig(**{"layer_freq": 1, "num_experts": 4, "top_k": 2, **overrides})


def problem(seed: int, G: int, num_tokens: int) -> dict:
    """Gate and expert weights for G experts, tokens and a loss projection, from a seeded generator
    (every process builds the same one)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w_value_EFD": (G, F_HIDDEN, D), "b_value_EF": (G, F_HIDDEN), "w_gate_proj_EFD": (G, F_HIDDEN, D),
              "b_gate_proj_EF": (G, F_HIDDEN), "w_out_EDF": (G, D, F_HIDDEN), "b_out_ED": (G, D)}
    prob = {n: torch.randn(s, generator=gen) * 0.3 for n, s in shapes.items()}
    prob["gate_w"] = torch.randn(G, D, generator=gen) * 0.5
    prob["gate_b"] = torch.randn(G, generator=gen) * 0.1
    prob["x"] = torch.randn(num_tokens, D, generator=gen)
    prob["proj"] = torch.randn(num_tokens, D, generator=gen)
    return prob
