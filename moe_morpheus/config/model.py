"""Shape and numerics of the GLM backbone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_morpheus.config.errors import check

NORMS = ("deepnorm", "deepnet", "pre_ln")
ROPE_MODES = ("1d", "2d")


@dataclass
class ModelConfig:
    """Shape and numerics of the GLM backbone (GLM-130B, Zeng et al. 2023; docs/design.md#glm-model)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    # GeGLU hidden size. None: derived from hidden_size (read the size through ffn_hidden, never
    # this field), so a preset that changes the width gets a matching FFN.
    ffn_hidden_size: int | None = None
    vocab_size: int = 1024
    # The embedding is padded to a multiple of this, independent of TP so that parameter counts
    # and checkpoints do not depend on the layout; TP must divide the padded size.
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 128
    # deepnorm: GLM-130B's DeepNorm, post-LN with alpha = (2N)^1/2, beta = (2N)^-1/2.
    # deepnet: GLM-130B's block order (model/layer.py) with the DeepNet paper's decoder constants,
    # alpha = (2N)^1/4, beta = (8N)^-1/4.
    # pre_ln: plain pre-LN (for comparisons; GLM-130B found it unstable at 100B).
    norm: str = "deepnorm"
    # 1d: GLM-130B's RoPE over the whole head; 2d: GLM/ChatGLM, half the head rotated by the
    # position ids, the other half by the block position ids.
    rope: str = "2d"
    rope_base: float = 10000.0
    # Embedding gradient shrink (GLM-130B): emb * a + emb.detach() * (1 - a); 1.0 disables it.
    embedding_grad_shrink: float = 0.1
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # GLM-130B: q / (sqrt(d) * (l + 1)), scores * (l + 1) in fp32 before the softmax.
    query_layer_scaling: bool = True

    def __post_init__(self) -> None:
        check(self.num_layers >= 1, f"model.num_layers={self.num_layers}: needs at least 1 layer")
        check(self.hidden_size >= 1 and self.num_attention_heads >= 1,
              "model.hidden_size and model.num_attention_heads must be positive")
        check(self.hidden_size % self.num_attention_heads == 0,
              f"model.hidden_size={self.hidden_size} is not divisible by "
              f"model.num_attention_heads={self.num_attention_heads}: pick a head count that divides it")
        check(self.norm in NORMS, f"model.norm={self.norm!r}: choose one of {NORMS}")
        check(self.rope in ROPE_MODES, f"model.rope={self.rope!r}: choose one of {ROPE_MODES}")
        quarter = 4 if self.rope == "2d" else 2
        check(self.head_dim % quarter == 0,
              f"head dim {self.head_dim} (hidden {self.hidden_size} / heads {self.num_attention_heads}) "
              f"must be divisible by {quarter} for {self.rope} RoPE (each rotated half needs pairs)")
        check(self.vocab_size >= 8, f"model.vocab_size={self.vocab_size} is too small")
        check(self.seq_length >= 2, f"model.seq_length={self.seq_length} must be at least 2")
        check(0.0 < self.embedding_grad_shrink <= 1.0,
              f"model.embedding_grad_shrink={self.embedding_grad_shrink} must be in (0, 1]")
        check(self.ffn_hidden_size is None or self.ffn_hidden_size >= 1,
              f"model.ffn_hidden_size={self.ffn_hidden_size} must be positive (or null: derived from hidden_size)")

    @property
    def ffn_hidden(self) -> int:
        """The GeGLU hidden size: ``ffn_hidden_size``, or 8/3 * hidden rounded up to a multiple of
        64 when that is None (3 matrices of h x 8h/3 hold as many parameters as the 4h FFN's 2 of
        h x 4h)."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return multiple * math.ceil(self.vocab_size / multiple)

    @property
    def residual_alpha(self) -> float:
        """Scale of the normalised residual in post-LN (GLM-130B): h = alpha * LN(h) + F(LN(h))."""
        n = self.num_layers
        return {"deepnorm": (2 * n) ** 0.5, "deepnet": (2 * n) ** 0.25, "pre_ln": 1.0}[self.norm]

    @property
    def init_beta(self) -> float:
        """Xavier gain on the FFN, value and output projections (DeepNorm)."""
        n = self.num_layers
        return {"deepnorm": (2 * n) ** -0.5, "deepnet": (8 * n) ** -0.25, "pre_ln": 1.0}[self.norm]

    def output_init_std(self, fan_in: int, fan_out: int) -> float:
        """The init std of a [fan_out, fan_in] FFN matrix or attention output projection, the
        dense FFN's and every MoE expert's alike (so that MoE and dense start from the same scale).
        Pre-LN: init_std / sqrt(2N) (GPT-2, Megatron). DeepNorm / DeepNet: Xavier normal with
        gain beta, beta * sqrt(2 / (fan_in + fan_out)) (Wang et al. 2022)."""
        if self.norm == "pre_ln":
            return self.init_std / math.sqrt(2.0 * self.num_layers)
        return self.init_beta * math.sqrt(2.0 / (fan_in + fan_out))
