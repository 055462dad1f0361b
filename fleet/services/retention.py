"""What the fleet keeps, and for how long: metric rollups, and pruning of growing tables.

Raw metric samples serve decisions (gates, experiments, drift: recent windows, per device)
and the device page's charts. History beyond them lives in rollups: per device, version
and metric, an hour's and a day's count, sum, sum of squares, minimum and maximum,
computed in SQL (one GROUP BY per run over the buckets that changed).

What is new: samples are numbered as they are inserted, and :class:`MetricRollupState`
holds the highest number summed so far. Each run reads the highest number now (on
PostgreSQL after taking a SHARE lock, which waits for in-flight inserts to commit, so no
lower-numbered sample can appear later), sums the new samples per bucket in SQL, and adds
the sums to the buckets they were measured in, whatever their age (an offline board's
outbox arrives late), in the same transaction that moves the mark. So each sample is
counted once, and a bucket keeps its counts after its raw samples are pruned.

Pruning (each table by its own setting, in days; deleted in chunks so no lock is long):
raw samples once summed and older than ``METRICS_RAW_DAYS``, never those a running rollout
or experiment may still read (from a day before the oldest one started); hourly rollups
after ``METRICS_HOURLY_DAYS``, daily after ``METRICS_DAILY_DAYS``; metric batch ids (the
resend guard) with the raw samples; deployment events, finished webhook deliveries and
drift reports (a device's newest report is always kept) after their own ages. The audit
log is never pruned.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Count, F, Max, Min, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce, TruncDay, TruncHour
from django.utils import timezone

from fleet.models import (
    DeploymentEvent,
    DriftReport,
    Experiment,
    MetricBatch,
    MetricRollup,
    MetricRollupState,
    MetricSample,
    Rollout,
    WebhookDelivery,
)

# Rows deleted per statement: short locks, and progress kept if the task dies midway.
PRUNE_CHUNK = 5000


def _high_water() -> int:
    """The highest sample id whose insert has committed, with none lower still to come."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {MetricSample._meta.db_table} IN SHARE MODE")
    return int(MetricSample.objects.aggregate(m=Max("pk"))["m"] or 0)


_KEY = ("bucket", "device_id", "key", "name")


def _increments(new: models.QuerySet[MetricSample], trunc: Any) -> list[dict[str, Any]]:
    """The new samples summed per bucket, device, version and metric: one GROUP BY in SQL."""
    return list(
        new.annotate(bucket=trunc, key=Coalesce("version_id", 0))
        .values(*_KEY)
        .annotate(
            n=Count("pk"),
            t=Sum("value"),
            t2=Sum(F("value") * F("value")),
            lo=Min("value"),
            hi=Max("value"),
        )
        .order_by()
    )


def _add(period: str, increments: list[dict[str, Any]]) -> int:
    """Add increments to their buckets' rows (created when new); returns rows written.

    Added, never recomputed from the raw samples, so a bucket keeps what it counted after
    its raw samples are pruned.
    """
    if not increments:
        return 0
    existing = {
        (r.bucket, r.device_id, r.version_key, r.name): r
        for r in MetricRollup.objects.filter(
            period=period,
            bucket__in={g["bucket"] for g in increments},
            device_id__in={g["device_id"] for g in increments},
        )
    }
    rows = []
    for g in increments:
        row = existing.get(tuple(g[k] for k in _KEY))
        if row is None:
            row = MetricRollup(
                period=period,
                bucket=g["bucket"],
                device_id=g["device_id"],
                version_key=g["key"],
                name=g["name"],
                count=0,
                total=0.0,
                total_sq=0.0,
                low=g["lo"],
                high=g["hi"],
            )
        row.count += g["n"]
        row.total += g["t"]
        row.total_sq += g["t2"]
        row.low, row.high = min(row.low, g["lo"]), max(row.high, g["hi"])
        rows.append(row)
    MetricRollup.objects.bulk_create(
        rows,
        batch_size=1000,
        update_conflicts=True,
        unique_fields=["period", "bucket", "device", "version_key", "name"],
        update_fields=["count", "total", "total_sq", "low", "high"],
    )
    return len(rows)


def metrics_rollup() -> dict[str, int]:
    """Add the samples inserted since the last run to their hours and days."""
    with transaction.atomic():
        end = _high_water()  # the lock ends with this short transaction
    with transaction.atomic():
        MetricRollupState.objects.get_or_create(pk=1)
        # Locked for the run: two runs never add the same samples twice.
        state = MetricRollupState.objects.select_for_update().get(pk=1)
        start = state.rolled_up_to
        if end <= start:
            return {"samples": 0, "hours": 0, "days": 0, "rows": 0}
        new = MetricSample.objects.filter(pk__gt=start, pk__lte=end)
        hours = _increments(new, TruncHour("ts", tzinfo=UTC))
        days = _increments(new, TruncDay("ts", tzinfo=UTC))
        rows = _add(MetricRollup.Period.HOUR, hours) + _add(MetricRollup.Period.DAY, days)
        state.rolled_up_to = end
        state.save(update_fields=["rolled_up_to", "updated_at"])
    return {
        "samples": sum(g["n"] for g in hours),
        "hours": len({g["bucket"] for g in hours}),
        "days": len({g["bucket"] for g in days}),
        "rows": rows,
    }


def _delete_in_chunks(queryset: models.QuerySet[Any]) -> int:
    deleted = 0
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:PRUNE_CHUNK])
        if not ids:
            return deleted
        count, _ = queryset.model.objects.filter(pk__in=ids).delete()
        deleted += len(ids) if count else 0


def _raw_cutoff(now: datetime) -> datetime:
    """Raw samples older than this may go: past their age, and read by no running decision."""
    cutoff = now - timedelta(days=float(settings.METRICS_RAW_DAYS))
    starts = [
        Rollout.objects.filter(status__in=Rollout.ACTIVE_STATUSES).aggregate(m=Min("started_at"))["m"],
        Experiment.objects.filter(status=Experiment.Status.RUNNING).aggregate(m=Min("started_at"))["m"],
    ]
    for started in starts:
        if started is not None:
            # A gate's baseline looks back before its rollout started.
            cutoff = min(cutoff, started - timedelta(days=1))
    return cutoff


def prune(*, now: datetime | None = None) -> dict[str, int]:
    """Delete what is past its age (see the module docstring); returns rows deleted per table."""
    now = now or timezone.now()

    def days(setting: str) -> datetime:
        return now - timedelta(days=float(getattr(settings, setting)))

    state = MetricRollupState.objects.filter(pk=1).first()
    rolled_up_to = state.rolled_up_to if state else 0
    newest_report = DriftReport.objects.filter(device_id=OuterRef("device_id")).order_by("-window_end", "-pk")
    finished = [WebhookDelivery.Status.DELIVERED, WebhookDelivery.Status.FAILED]
    return {
        "metric_samples": _delete_in_chunks(
            MetricSample.objects.filter(ts__lt=_raw_cutoff(now), pk__lte=rolled_up_to)
        ),
        "metric_batches": _delete_in_chunks(
            MetricBatch.objects.filter(received_at__lt=days("METRICS_RAW_DAYS"))
        ),
        "hourly_rollups": _delete_in_chunks(
            MetricRollup.objects.filter(
                period=MetricRollup.Period.HOUR, bucket__lt=days("METRICS_HOURLY_DAYS")
            )
        ),
        "daily_rollups": _delete_in_chunks(
            MetricRollup.objects.filter(period=MetricRollup.Period.DAY, bucket__lt=days("METRICS_DAILY_DAYS"))
        ),
        "deployment_events": _delete_in_chunks(
            DeploymentEvent.objects.filter(created_at__lt=days("DEPLOYMENT_EVENTS_DAYS"))
        ),
        "webhook_deliveries": _delete_in_chunks(
            WebhookDelivery.objects.filter(
                status__in=finished, created_at__lt=days("WEBHOOK_DELIVERIES_DAYS")
            )
        ),
        "drift_reports": _delete_in_chunks(
            DriftReport.objects.filter(created_at__lt=days("DRIFT_REPORTS_DAYS")).exclude(
                pk=Subquery(newest_report.values("pk")[:1])
            )
        ),
    }
