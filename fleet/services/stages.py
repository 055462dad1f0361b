"""Stages gate deployment: which model versions a target may be given.

Every path that puts a version on devices (a rollout's create and start, an experiment's
create and start for every arm, a manual assignment, a shadow's start) asks
:func:`check_deployable` first:

- a version in ``production`` may go anywhere;
- a version in ``staging`` only to a canary group (``DeviceGroup.canary``): a rollout
  aimed at exactly one canary group (no extra tags or device ids, which could reach any
  device), an experiment on a canary group, or a device that belongs to a canary group;
- a ``draft`` or ``archived`` version never, nor one the registry marked rejected
  (``metrics["rejected"]``: an optimised variant that lost too much of its parent's
  quality), whatever its stage.

Refusals are 409s with a stable code: ``version_stage_not_allowed`` (the details name the
stage and the stages the target allows) or ``version_rejected``. Going back to a version
a device ran before (a rollback, an experiment's restore) is never refused: that is how a
bad version is undone.
"""

from __future__ import annotations

from typing import Any

from core.api import ConflictError

PRODUCTION = "production"
STAGING = "staging"


def allowed_stages(*, canary: bool) -> list[str]:
    """The stages a target may take: production, and staging too for a canary target."""
    return [PRODUCTION, STAGING] if canary else [PRODUCTION]


def check_deployable(*, version: Any, canary: bool, target: str, what: str = "") -> None:
    """Refuse (409) a version its target may not take; ``target`` names it for people.

    ``what`` prefixes the message (e.g. "arm 1: ") where several versions are checked.
    """
    allowed = allowed_stages(canary=canary)
    details = {
        "version": version.pk,
        "stage": version.stage,
        "allowed": allowed,
        "target": target,
        "canary": canary,
    }
    if (version.metrics or {}).get("rejected"):
        raise ConflictError(
            f"{what}{version.label} was rejected by the registry (it lost too much against its "
            "parent) and is never deployed.",
            code="version_rejected",
            details=details,
        )
    if version.stage not in allowed:
        if canary:
            hint = "promote it to staging or production first"
        else:
            hint = "promote it to production first, or target a canary group to try a staging version"
        raise ConflictError(
            f"{what}{version.label} is in {version.stage}; {target} takes versions in "
            f"{' or '.join(allowed)} only ({hint}).",
            code="version_stage_not_allowed",
            details=details,
        )
