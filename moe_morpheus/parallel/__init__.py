"""Process groups and the CPU compatibility layer for Megatron-Core."""

from moe_morpheus.parallel.state import destroy, device, free_port, initialize, world_size

__all__ = ["initialize", "destroy", "device", "free_port", "world_size"]
