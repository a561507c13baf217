"""One GLM transformer layer: attention and a pluggable FFN (dense GeGLU or MoE).

Post-LN with DeepNorm (``deepnorm``, ``deepnet``) in the order GLM-130B's and ChatGLM-6B's
``GLMBlock`` compute it::

    a = LN_in(h);   h = alpha * a + Attn(a)      # LN_in: attention_norm
    m = LN_post(h); out = alpha * m + FFN(m)     # LN_post: ffn_norm

and one final LayerNorm after the last layer (model/glm.py). So the embeddings are normalised by
layer 0's LN_in and the model's output exactly once, by the final norm. (The DeepNet paper's
``x = LN(alpha * x + F(x))`` per sub-layer would feed raw embeddings to layer 0 and normalise the
end twice.) alpha = (2N)^1/2 for ``deepnorm`` (N = layers; 11.83 for the 70-layer 130B),
(2N)^1/4 for ``deepnet``. ``pre_ln`` is ``x = x + F(LN(x))``.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from moe_morpheus.config import ModelConfig, MoEConfig
from moe_morpheus.model.attention import SelfAttention
from moe_morpheus.model.ffn import GeGLU

# What the layer's parameters mean, recorded in every checkpoint (train/checkpoint.py). Change it
# whenever the block's arithmetic changes, so older checkpoints are refused instead of loading
# with another meaning. v2: GLM-130B's order above (v1, unmarked: LN after the residual sum).
BLOCK_FORMAT = "glm130b_deepnorm_v2"


def mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    """Under sequence parallelism a replicated LayerNorm sees only this TP rank's positions: its
    gradients are partial sums, which ``finalize_model_grads`` sums over the TP group for
    parameters marked ``sequence_parallel`` (Megatron-Core's own LayerNorms carry the mark)."""
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


def build_ffn(config: TransformerConfig, model_cfg: ModelConfig, moe_cfg: MoEConfig | None, layer_index: int):
    """The FFN switch: layer ``layer_index`` (0-based) is MoE iff ``moe.is_moe_layer(i)``."""
    if moe_cfg is not None and moe_cfg.is_moe_layer(layer_index):
        from moe_morpheus.moe import MoEFeedForward

        # Under sequence parallelism the input is already this TP rank's share of the tokens.
        ffn = MoEFeedForward(model_cfg, moe_cfg, sequence_parallel=config.sequence_parallel)
        ffn.layer_number = layer_index + 1
        return ffn
    return GeGLU(config, model_cfg)


class GLMLayer(MegatronModule):
    def __init__(
        self, config: TransformerConfig, model_cfg: ModelConfig, moe_cfg: MoEConfig | None, layer_index: int
    ):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.layer_number = layer_index + 1
        h, eps = model_cfg.hidden_size, model_cfg.layernorm_epsilon
        self.attention_norm = torch.nn.LayerNorm(h, eps=eps)
        self.attention = SelfAttention(config, model_cfg, self.layer_number)
        self.ffn_norm = torch.nn.LayerNorm(h, eps=eps)
        mark_sequence_parallel(self.attention_norm, config)
        mark_sequence_parallel(self.ffn_norm, config)
        self.ffn = build_ffn(config, model_cfg, moe_cfg, layer_index)
        self.alpha = model_cfg.residual_alpha
        self.pre_ln = model_cfg.norm == "pre_ln"

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.model_cfg.hidden_dropout
        if p == 0:
            return x
        if self.config.sequence_parallel:
            # TP ranks hold different positions here: draw from the per-TP-rank stream (Megatron).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, p=p, training=self.training)
        return torch.nn.functional.dropout(x, p=p, training=self.training)

    def forward(self, hidden_SBH, attention_mask, rope_cos, rope_sin, kv_cache=None):
        def attend(x):
            return self._dropout(self.attention(x, attention_mask, rope_cos, rope_sin, kv_cache=kv_cache))

        if self.pre_ln:
            hidden_SBH = hidden_SBH + attend(self.attention_norm(hidden_SBH))
            return hidden_SBH + self._dropout(self.ffn(self.ffn_norm(hidden_SBH)))
        normed = self.attention_norm(hidden_SBH)
        hidden_SBH = self.alpha * normed + attend(normed)
        normed = self.ffn_norm(hidden_SBH)
        return self.alpha * normed + self._dropout(self.ffn(normed))
