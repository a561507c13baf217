"""Tiny shapes shared by the model, parallel, checkpoint and inference tests (keyword dicts, so a
test can override one field and send them to spawned ranks): small enough for gloo on two CPU
cores, divisible enough for TP=2/4, PP=2 and EP=2/4."""

from __future__ import annotations

# 4 heads of 16; seq 32 splits into TP=2/4 sequence-parallel slices.
TINY_GLM = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=200, seq_length=32)
# Two pipeline stages of two layers, or interleaved PP with two virtual chunks of one layer each.
TINY_GLM_4_LAYERS = dict(TINY_GLM, num_layers=4)
# Experts in every second layer; 96 = half the dense FFN of hidden 64 (8/3 * 64 rounded up to 64: 192).
TINY_MOE = dict(layer_freq=2, num_experts=4, top_k=2, expert_hidden_size=96)
