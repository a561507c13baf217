"""How a run is sized against its Chinchilla budget."""

from __future__ import annotations

from dataclasses import dataclass

from moe_morpheus.config.errors import ConfigError

BUDGET_PARAMS = ("active", "active_non_embedding", "total")


@dataclass
class BudgetConfig:
    """How a run is sized against the Chinchilla budget ``tokens_per_param x budget params``."""

    # Run length as a fraction of the budget (0.1 = a tenth of 20 tokens/param); None: the run
    # length comes from steps or tokens instead.
    chinchilla_fraction: float | None = None
    tokens_per_param: float = 20.0
    # Which count is "N": active (with embeddings, as Chinchilla), active_non_embedding, total.
    params: str = "active"

    def __post_init__(self) -> None:
        if self.chinchilla_fraction is not None and not self.chinchilla_fraction > 0:
            raise ConfigError(f"budget.chinchilla_fraction={self.chinchilla_fraction} must be positive "
                              f"(or null to size the run by steps or tokens)")
        if not self.tokens_per_param > 0:
            raise ConfigError(f"budget.tokens_per_param={self.tokens_per_param} must be positive "
                              f"(Chinchilla: 20)")
        if self.params not in BUDGET_PARAMS:
            raise ConfigError(f"budget.params={self.params!r}: choose one of {BUDGET_PARAMS}")
