"""The GLM backbone on Megatron-Core tensor-parallel layers."""

from moe_morpheus.model.glm import GLMModel, build_model, megatron_config

__all__ = ["GLMModel", "build_model", "megatron_config"]
