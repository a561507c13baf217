"""moe_morpheus: scaling a bilingual GLM with Mixture-of-Experts on Megatron-Core."""

__version__ = "0.1.0"
