"""The fleet's side of shipping a version to a group: which boards can run it, which
hardware most of them are, and the decision row that records why the rollout exists.

The caller (`training.services.shipping`, shipping a federated job's result) decides what
to ship; this module knows the devices.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from core.api import ServiceError
from core.audit.services import actor_label
from fleet.models import DeviceGroup, Rollout, RolloutDecision
from fleet.rollouts.compat import cannot_run, explain
from fleet.selectors import hardware
from fleet.selectors.rollouts import target_devices


def group_resolve(*, value: Any) -> DeviceGroup:
    """A group by id or name; 400 ``validation_error`` naming the value when there is none."""
    group = None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        group = DeviceGroup.objects.filter(pk=int(value)).first()
    if group is None and isinstance(value, str) and value:
        group = DeviceGroup.objects.filter(name=value).first()
    if group is None:
        raise ServiceError(
            f"Unknown device group {value!r}.", code="validation_error", details={"target_group": value}
        )
    return group


def onnx_facts(version: Any) -> tuple[int | None, int]:
    """The opset and size of the version's ONNX graph; 400 ``no_compatible_artifact`` without one."""
    from models_registry.models import Artifact

    row = Artifact.objects.filter(version=version, kind=Artifact.Kind.ONNX).values("opset", "size").first()
    if row is None:
        raise ServiceError(
            f"{version.label} has no ONNX artifact, which is what devices install.",
            code="no_compatible_artifact",
            details={"version": version.pk},
        )
    return row["opset"], int(row["size"] or 0)


def group_boards_check(*, group: DeviceGroup, version: Any) -> dict[str, Any]:
    """Which of the group's boards can run ``version`` (`fleet.rollouts.compat`).

    Returns the counts, the boards held back with their reason (``held_back``: device id
    -> reason code), the count per reason in words, and the group's most common hardware
    profile. Refuses with 409 ``no_compatible_devices`` when none of the boards can.
    """
    opset, size = onnx_facts(version)
    boards = list(
        target_devices(group=group).values(
            "pk", "status", "ram_mb", "hardware", "arch", "cores", "accelerator"
        )
    )
    if not boards:
        raise ServiceError(f"Group {group.name} has no devices.", code="empty_target")
    held: dict[str, str] = {}
    for board in boards:
        reason = cannot_run(facts=board, opset=opset, onnx_bytes=size)
        if reason:
            held[str(board["pk"])] = reason
    reasons = Counter(held.values())
    numbers = {
        "group": group.name,
        "boards": len(boards),
        "can_run": len(boards) - len(held),
        "held_back": held,
        "held_back_count": len(held),
        "reasons": {
            code: {"count": n, "why": explain(code, opset=opset, onnx_bytes=size)}
            for code, n in reasons.items()
        },
        "opset": opset,
        "onnx_bytes": size,
    }
    if len(held) == len(boards):
        raise ServiceError(
            f"None of the {len(boards)} boards of {group.name} can run {version.label}: "
            + "; ".join(f"{n} {explain(c, opset=opset, onnx_bytes=size)}" for c, n in reasons.items()),
            code="no_compatible_devices",
            status_code=409,
            details={k: v for k, v in numbers.items() if k != "held_back"},
        )
    profiles = Counter(
        hardware.HardwareProfile(arch=b["arch"], cores=b["cores"], accelerator=b["accelerator"])
        for b in boards
        if str(b["pk"]) not in held
    )
    numbers["profile"] = profiles.most_common(1)[0][0].label() if profiles else None
    return numbers


def profile_latency(*, profile: str | None, version_ids: list[int]) -> dict[int, tuple[float, int]] | None:
    """On-device median latency per version for boards of ``profile`` (for the recommendation)."""
    try:
        parsed = hardware.parse_profile(text=profile or "")
    except ValueError:
        return None  # boards that did not report their architecture: server latency only
    return hardware.profile_latency_p50(profile=parsed, version_ids=version_ids)


def rollout_record_shipped(*, rollout: Rollout, reason: str, metrics: dict[str, Any], actor: Any) -> None:
    """The decision that says why a rollout exists, with the numbers behind it."""
    RolloutDecision.objects.create(
        rollout=rollout,
        wave=rollout.current_wave,
        action="shipped",
        reason=reason,
        metrics=metrics,
        actor=actor_label(actor),
    )
