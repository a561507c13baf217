"""The training loop and its parts: step, optimiser and schedule, checkpointing, guards."""
