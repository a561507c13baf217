"""Dense GeGLU feed-forward: ``fc2(value(x) * gelu(gate_proj(x)))`` with exact (erf) GeLU.

Three separate linears, so it is explicit which half gets the activation: ``gate_proj`` is
GLM-130B's second half of ``dense_h_to_4h`` (the activated one), ``value`` its first half. MoE
experts (moe/) store the same three matrices per expert, so upcycling is a copy.
Hidden size 8/3 h keeps the parameter count of a 4h two-matrix FFN (3 * 8/3 = 2 * 4).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from moe_morpheus.config import ModelConfig
from moe_morpheus.model import init


class GeGLU(MegatronModule):
    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig):
        super().__init__(config=config)
        h, f = model_cfg.hidden_size, model_cfg.ffn_hidden
        w_init = init.output_init(model_cfg)
        self.value = tensor_parallel.ColumnParallelLinear(
            h, f, config=config, init_method=w_init, bias=True, gather_output=False
        )
        self.gate_proj = tensor_parallel.ColumnParallelLinear(
            h, f, config=config, init_method=w_init, bias=True, gather_output=False
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            f, h, config=config, init_method=w_init, bias=True, input_is_parallel=True, skip_bias_add=False
        )

    def forward(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        value, _ = self.value(hidden_SBH)
        gate, _ = self.gate_proj(hidden_SBH)
        output, _ = self.fc2(value * torch.nn.functional.gelu(gate))
        return output
