"""GLM self-attention on Megatron-Core tensor-parallel layers.

Fused QKV: the full [3h, h] weight is ordered head by head, (q_0, k_0, v_0, q_1, ...), each
block head_dim rows, so a column-parallel split gives every TP rank whole heads and the same
model at any TP degree. Softmax in fp32 with GLM-130B's layer scaling: q / (sqrt(d) * l), then
scores * l in fp32, l = 1-based layer number; mathematically the plain softmax(q k^T / sqrt(d)),
it keeps fp16/bf16 scores in range (Megatron-Core: apply_query_key_layer_scaling).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from moe_morpheus.config import ModelConfig
from moe_morpheus.model import init
from moe_morpheus.model.rope import rotate


class SelfAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig, layer_number: int):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.layer_number = layer_number  # 1-based, global over pipeline stages
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_local = model_cfg.num_attention_heads // tp
        self.head_dim = model_cfg.head_dim
        h = model_cfg.hidden_size
        self.qkv = tensor_parallel.ColumnParallelLinear(
            h, 3 * h, config=config, init_method=init.qkv_init(model_cfg), bias=True, gather_output=False
        )
        self.out = tensor_parallel.RowParallelLinear(
            h, h, config=config, init_method=init.output_init(model_cfg), bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(
        self,
        hidden_SBH: torch.Tensor,
        attention_mask: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        kv_cache: dict | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` [b, 1, s_q, s_k] (True = may attend) or None (every key).
        ``rope_cos`` / ``rope_sin`` [s, b, head_dim]: the model's RoPE tables (model/rope.py).
        ``kv_cache`` (generation): a dict holding this layer's rotated keys and values of the
        tokens seen so far; the new ones are appended and the queries attend to all of them,
        so each new token costs one step instead of a forward over the whole sequence."""
        qkv, _ = self.qkv(hidden_SBH)
        # The whole sequence (under sequence parallelism qkv gathered it); fused rows head by head.
        qkv = rearrange(qkv, "s b (n three d) -> s b n three d", n=self.heads_local, three=3, d=self.head_dim)
        # Queries and keys rotated in one pass: [s, b, n, 2, d] against [s, b, 1, 1, d] tables.
        query_key = rotate(qkv[:, :, :, :2], rope_cos[:, :, None, None], rope_sin[:, :, None, None],
                           self.model_cfg.rope)
        query, key = query_key.unbind(dim=3)  # each [s, b, n, d]
        value = qkv[:, :, :, 2]
        if kv_cache is not None:
            if "key" in kv_cache:
                key = torch.cat([kv_cache["key"], key], dim=0)
                value = torch.cat([kv_cache["value"], value], dim=0)
            kv_cache["key"], kv_cache["value"] = key, value

        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            # Selective recomputation (Korthikanti et al. 2022): scores, softmax and dropout
            # ([b, n, s, s] each: 5 a s^2 b bytes per layer in 16 bit) are not kept; q, k, v are.
            context = tensor_parallel.checkpoint(self.core_attention, False, query, key, value, attention_mask)
        else:
            context = self.core_attention(query, key, value, attention_mask)
        output, _ = self.out(context)
        return output

    def core_attention(self, query, key, value, attention_mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v for [s, b, n, d] inputs; returns [s, b, n * d].

        PyTorch's fused scaled-dot-product attention: no [b, n, s, s] score, mask or softmax
        tensor is written (the CPU flash kernel here; flash / memory-efficient kernels on a GPU,
        the latter for the boolean GLM mask). GLM-130B's layer scaling is kept as its kernel
        arithmetic: q is divided by sqrt(d) * l before the product and the scores multiplied
        by l inside the kernel, whose accumulation and softmax are fp32."""
        cfg = self.model_cfg
        # Views; the kernel takes strided inputs.
        query, key, value = (rearrange(t, "s b n d -> b n s d") for t in (query, key, value))
        coeff = float(self.layer_number) if cfg.query_layer_scaling else 1.0
        query = query / (math.sqrt(self.head_dim) * coeff)
        dropout = cfg.attention_dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                     dropout_p=dropout, scale=coeff)
        return rearrange(context, "b n s d -> s b (n d)")
