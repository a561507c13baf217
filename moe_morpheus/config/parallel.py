"""Process layout: tensor, pipeline, expert and data parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from moe_morpheus.config.errors import check
from moe_morpheus.config.model import ModelConfig


@dataclass
class ParallelConfig:
    """Process layout. Data parallelism is what is left: dp = world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    virtual_pp: int | None = None
    # Expert parallelism spans data-parallel ranks (FastMoE); ep must divide dp * tp (Megatron).
    ep: int = 1
    sequence_parallel: bool = False
    # NCCL on GPU, gloo on CPU; "auto" picks.
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"parallel.{name}={value} must be an integer >= 1")
        check(self.virtual_pp is None or self.virtual_pp >= 1,
              f"parallel.virtual_pp={self.virtual_pp} must be >= 1 or null")
        check(self.virtual_pp is None or self.virtual_pp == 1 or self.pp > 1,
              "parallel.virtual_pp > 1 needs pipeline parallelism (parallel.pp > 1)")
        check(self.backend in ("auto", "nccl", "gloo"), f"parallel.backend={self.backend!r}: auto, nccl or gloo")
        # Megatron-Core's rule: the sequence is split over the tensor-parallel ranks.
        check(not self.sequence_parallel or self.tp > 1,
              "parallel.sequence_parallel=true needs tensor parallelism (parallel.tp > 1): it splits the "
              "sequence over the tensor-parallel ranks")

    @property
    def vpp(self) -> int:
        """Virtual pipeline stages per rank, 1 for plain 1F1B."""
        return self.virtual_pp or 1

    def validate_world(self, world_size: int) -> int:
        """Check the layout against the world size; returns the data-parallel size."""
        check(world_size % (self.tp * self.pp) == 0,
              f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = "
              f"{self.tp} * {self.pp} = {self.tp * self.pp}: change the process count or the layout")
        dp = world_size // (self.tp * self.pp)
        check((dp * self.tp) % self.ep == 0,
              f"parallel.ep={self.ep} must divide data-parallel size x tp = {dp} x {self.tp}: "
              f"expert parallelism spans data-parallel (and tensor-parallel) ranks")
        return dp

    def validate_model(self, model: ModelConfig) -> None:
        """Check that the layout divides the model."""
        check(self.tp <= model.num_attention_heads,
              f"parallel.tp={self.tp} is larger than model.num_attention_heads="
              f"{model.num_attention_heads}: each tensor-parallel rank needs at least one head")
        check(model.num_attention_heads % self.tp == 0,
              f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
              f"parallel.tp={self.tp}")
        check(model.hidden_size % self.tp == 0,
              f"model.hidden_size={model.hidden_size} is not divisible by parallel.tp={self.tp}")
        check(model.ffn_hidden % self.tp == 0,
              f"model.ffn_hidden_size={model.ffn_hidden} is not divisible by parallel.tp={self.tp}")
        check(model.padded_vocab_size % self.tp == 0,
              f"padded vocabulary {model.padded_vocab_size} is not divisible by parallel.tp={self.tp}: "
              f"set model.make_vocab_size_divisible_by to a multiple of {self.tp}")
        check(not self.sequence_parallel or model.seq_length % self.tp == 0,
              f"model.seq_length={model.seq_length} is not divisible by parallel.tp={self.tp}: sequence "
              f"parallelism gives each tensor-parallel rank seq_length / tp positions")
        stages = self.pp * self.vpp
        check(model.num_layers % stages == 0,
              f"model.num_layers={model.num_layers} is not divisible by parallel.pp * virtual_pp = "
              f"{self.pp} * {self.vpp} = {stages}: each pipeline stage needs the same "
              f"number of layers")
