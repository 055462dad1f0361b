"""On-device latency per hardware profile, for recommending a model variant to a kind of board."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from django.utils import timezone

from fleet.models import Device, MetricSample

LATENCY_METRIC = "latency_ms"


@dataclass(frozen=True)
class HardwareProfile:
    """The facts that decide how fast a board runs a model: CPU arch, core count, accelerator."""

    arch: str
    cores: int | None
    accelerator: str

    def label(self) -> str:
        """The ``arch:cores:accelerator`` text form (empty parts for unknown facts)."""
        return f"{self.arch}:{'' if self.cores is None else self.cores}:{self.accelerator}"


def device_profile(*, device: Device) -> HardwareProfile:
    """The hardware profile a device reported."""
    return HardwareProfile(arch=device.arch, cores=device.cores, accelerator=device.accelerator)


def parse_profile(*, text: str) -> HardwareProfile:
    """Parse ``arch:cores:accelerator`` (cores and accelerator may be empty); ``ValueError`` if malformed."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError("profile must look like arch:cores:accelerator, e.g. aarch64:4:")
    cores_text = parts[1].strip()
    if cores_text and not cores_text.isdigit():
        raise ValueError("cores must be a whole number")
    return HardwareProfile(
        arch=parts[0].strip(), cores=int(cores_text) if cores_text else None, accelerator=parts[2].strip()
    )


def profile_latency_p50(
    *,
    profile: HardwareProfile,
    version_ids: Iterable[int],
    since: datetime | None = None,
) -> dict[int, tuple[float, int]]:
    """Per version: the median ``latency_ms`` reported by devices of ``profile`` and the sample count.

    Only samples newer than ``since`` (default: the last 24 hours) count, so a board
    model's latency reflects the current agent and runtime. Versions without samples are
    absent from the answer.
    """
    if since is None:
        since = timezone.now() - timedelta(hours=24)
    devices = Device.objects.filter(arch=profile.arch, accelerator=profile.accelerator)
    devices = (
        devices.filter(cores__isnull=True) if profile.cores is None else devices.filter(cores=profile.cores)
    )
    rows = MetricSample.objects.filter(
        name=LATENCY_METRIC,
        version_id__in=list(version_ids),
        ts__gte=since,
        device__in=devices.values("pk"),
    ).values_list("version_id", "value")
    values: dict[int, list[float]] = {}
    for version_id, value in rows.iterator(chunk_size=5000):
        values.setdefault(int(version_id), []).append(float(value))
    return {vid: (float(np.median(np.asarray(vs))), len(vs)) for vid, vs in values.items()}
