"""``sdpo plan``: the per-GPU memory budget of a training config, from the model's configs alone
(budget.py), its activations measured on the meta device (activations.py)."""

from sdpo_core.plan.budget import (
    ASSETS,
    Budget,
    DoesNotFit,
    GiB,
    PlanError,
    format_budget,
    plan_budget,
    refusal,
    refuse_if_too_big,
)

__all__ = ["ASSETS", "Budget", "DoesNotFit", "GiB", "PlanError", "format_budget", "plan_budget", "refusal",
           "refuse_if_too_big"]
