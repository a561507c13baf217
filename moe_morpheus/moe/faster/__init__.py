"""FasterMoE (He et al., PPoPP'22) on the project's FMoE: smart schedule (``schedule.py``),
dynamic shadowing (``shadow.py``), both decided by the performance model (``policy.py``) with
costs measured on the machine (``calibrate.py``), the topology-aware gate (``gate.py``) and
their statistics (``stats.py``); ``runtime.py`` attaches them to a layer
(docs/design.md#fastermoe)."""

from moe_morpheus.moe.faster.gate import TopologyGate
from moe_morpheus.moe.faster.policy import (
    Costs,
    decide_schedule,
    decide_shadow,
    predict_latency,
    predict_schedule,
)
from moe_morpheus.moe.faster.runtime import FasterMoE

__all__ = ["FasterMoE", "TopologyGate", "Costs", "decide_schedule", "decide_shadow", "predict_latency",
           "predict_schedule"]
