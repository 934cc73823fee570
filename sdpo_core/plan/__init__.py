"""``sdpo plan``: the per-GPU memory budget of a training config, from the model's configs alone
(budget.py), its activations measured on the meta device (activations.py), what FSDP shards
(sharding.py), and the refusal / table (report.py)."""

from sdpo_core.plan.budget import ASSETS, Budget, DoesNotFit, GiB, PlanError, plan_budget
from sdpo_core.plan.report import alternatives, format_budget, refusal, refuse_if_too_big
from sdpo_core.plan.sharding import fsdp_units, launch_shards

__all__ = ["ASSETS", "Budget", "DoesNotFit", "GiB", "PlanError", "alternatives", "format_budget", "fsdp_units",
           "launch_shards", "plan_budget", "refusal", "refuse_if_too_big"]
