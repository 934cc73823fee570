"""Move ``champion`` by hand: ``sdpo promote NAME --version N`` and ``sdpo promote NAME --rollback``.

The same checks as a registration (the version exists, its registration completed, its evaluation
is readable) and the same record (``tracking.champion.record_alias``, on both the version that gets
the alias and the one that loses it). The promotion rule is not a gate here, a person decides: its
verdict (N against the current champion, under the version's ``sdpo.rule``) goes into the record.

Rollback gives ``champion`` back to the version it was taken from: the ``previous`` of the latest
entry of the current champion that is not itself a rollback (two rollbacks go two steps back).

Usage::

    move = promote("sdpo-digits-tiny", version="3", reason="v4 fails on the new prompts")
    print(move.summary)
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from sdpo_core.config import ConfigError
from sdpo_core.tracking import promotion
from sdpo_core.tracking.champion import audit_entries, champion_version, record_alias, version_eval
from sdpo_core.tracking.registry import COMPLETE_TAG
from sdpo_core.tracking.trackers import check_reachable


class PromoteError(ConfigError):
    """The alias cannot move as asked (no such version, an incomplete one, nothing to roll back to);
    nothing was changed."""


@dataclass(frozen=True)
class Move:
    name: str
    version: str
    previous: str | None
    summary: str


def rollback_target(client, name: str) -> tuple[str, str]:
    """(current champion, the version it took the alias from); PromoteError when there is none."""
    current = champion_version(client, name)
    if current is None:
        raise PromoteError(f"{name} has no champion: nothing to roll back")
    earned = [e for e in audit_entries(current) if e["alias"] == promotion.CHAMPION and e["action"] != "rollback"]
    previous = earned[-1]["previous"] if earned else None
    if previous is None:
        raise PromoteError(f"{name} version {current.version} took champion from no earlier version "
                           "(its record names none): nothing to roll back to; use --version N")
    return str(current.version), str(previous)


def _checked_version(client, name: str, version: str):
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise PromoteError(f"{name} has no version {version!r}") from None
    if mv.tags.get(COMPLETE_TAG) != "true":
        raise PromoteError(f"{name} version {version} was never completed (a registration cut half-way); "
                           "register it again instead")
    return mv


def promote(name: str, version: str | None = None, rollback: bool = False, reason: str = "",
            flow_run_id: str | None = None) -> Move:
    """Give ``name@champion`` to ``version`` (or back, with ``rollback``), checked and recorded."""
    if (version is None) == (not rollback):
        raise PromoteError("give exactly one of --version N and --rollback")
    client = mlflow.MlflowClient(tracking_uri=check_reachable())
    current = champion_version(client, name)
    if rollback:
        _, version = rollback_target(client, name)
    mv = _checked_version(client, name, str(version))
    if current is not None and str(current.version) == str(mv.version):
        return Move(name, str(mv.version), str(mv.version), f"{name} version {mv.version} is already champion")
    new_eval = version_eval(client, mv)
    if new_eval is None:
        raise PromoteError(f"{name} version {mv.version} has no readable evaluation (eval.* tags)")
    rule = mv.tags.get("sdpo.rule", promotion.RULES[0])
    verdict = promotion.decide(rule, new_eval, None if current is None else version_eval(client, current))
    action = "rollback" if rollback else "promote"
    why = f"{action} by hand{': ' + reason if reason else ''}; the rule's view: {verdict.reason}"
    previous = None if current is None else str(current.version)
    record_alias(client, name, mv.version, promotion.CHAMPION, why, verdict.margins, previous, flow_run_id, action)
    if current is not None:
        record_alias(client, name, current.version, f"-{promotion.CHAMPION}", f"champion moved to version "
                     f"{mv.version} ({action})", previous=previous, flow_run_id=flow_run_id, action=action)
    client.set_registered_model_alias(name, promotion.CHAMPION, mv.version)
    return Move(name, str(mv.version), previous,
                f"{name}@champion: version {previous} -> {mv.version} ({why})")
