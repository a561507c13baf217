"""moe_morpheus: scaling a bilingual GLM with Mixture-of-Experts on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Megatron-Core warns at import about optional CUDA kernels (Transformer Engine, Apex) that a CPU
# run cannot have, and its checkpoint loader about a deprecated PyTorch call: noise on every
# command's console, nothing a user can act on.
warnings.filterwarnings(
    "ignore",
    message=r"(Transformer Engine and Apex|Apex is not installed|full scope is deprecated|When using async"
    r"|`load_state_dict` is deprecated)",
)
