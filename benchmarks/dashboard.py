"""Server time of the dashboard's heaviest pages on a large fleet, and their query counts.

    python -m benchmarks.dashboard [--quick] [--json] [--devices N] [--samples N] [--repeats N]

What it does, in one process:

1. a fresh data directory with a SQLite database (or ``DATABASE_URL`` when set), migrated,
   using the demo settings (DEBUG off);
2. registers five versions of a digits family the way a user would (program, weights
   and ONNX each, through the registry; ``config.demo.seed.digits_version``), seeds a
   small fleet first (``--devices`` / 10), and measures the query count of each page on
   it;
3. grows the fleet to ``--devices`` devices (bulk_create in batches, each board with its
   example counts and training backends) with ``--samples`` metric samples (most
   devices ~100 samples, the device the detail page shows a full day: 5,000 per
   metric), a drift report per device (one in five in alert), deployments, commands,
   and a federated job of 50 rounds judged by accuracy with 20 client updates each
   (backend and holdout numbers) and a final evaluation round on the boards;
4. measures each page through Django's test client in this process (the whole
   middleware stack, session authentication, template rendering; no network): warm-up
   requests, then ``--repeats`` timed requests; p50 and p95 of the wall time, and the
   query count (CaptureQueriesContext) of one request;
5. the baseline, measured the same way in the same run: the device list rendered from
   a naive queryset (no select_related / prefetch_related: one query per related row),
   the way a list page is usually written first. The ratio optimised/naive is the
   machine-independent figure.

`queries_independent_of_devices` is true when every page made as many queries on the
large fleet as on the small one.

With ``--json`` the last line is one JSON object:
``{"pages": [{"page", "p50_ms", "p95_ms", "queries"}...], "queries_independent_of_devices": bool, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

BATCH = 5000
METRICS = ("latency_ms", "correct", "confidence", "cpu_percent", "ram_mb")


def _setup() -> None:
    work = tempfile.mkdtemp(prefix="flotilla-bench-dashboard-")
    os.environ["FLOTILLA_DATA_DIR"] = work
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.demo")
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver,localhost,127.0.0.1"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    from django.db import connection

    if connection.vendor == "sqlite":
        # A scratch database: seeding need not survive a power cut, so skip the fsyncs.
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA synchronous=OFF")


def _seed_base() -> dict[str, Any]:
    from django.contrib.auth.models import Group, User

    from config.demo.seed import digits_version
    from fleet.models import DeviceGroup
    from models_registry.models import ModelVersion

    viewer = User.objects.create_user(username="bench-viewer")  # signed in with force_login
    viewer.groups.add(Group.objects.get(name="viewer"))
    versions = [digits_version(seed=n, family_name="digits")[0] for n in range(1, 6)]
    ModelVersion.objects.filter(pk__in=[v.pk for v in versions]).update(
        stage="production", metrics={"accuracy": 0.9, "loss": 0.35, "evaluation": "central"}
    )
    for version in versions:
        version.refresh_from_db()
    family = versions[0].family
    groups = [DeviceGroup.objects.create(name=f"site-{i}") for i in range(10)]
    return {"viewer": viewer, "family": family, "versions": versions, "groups": groups}


def _add_devices(base: dict[str, Any], *, start: int, count: int) -> list[Any]:
    from django.utils import timezone

    from fleet.models import Deployment, Device, DriftReport

    now = timezone.now()
    rng = random.Random(start)
    created: list[Any] = []
    through = Device.groups.through
    for offset in range(0, count, BATCH):
        rows = [
            Device(
                name=f"board-{start + i:06d}",
                status=rng.choice(["online", "online", "online", "offline", "pending"]),
                last_seen=now - timedelta(seconds=rng.randint(0, 3600)),
                arch="aarch64",
                cores=4,
                ram_mb=2048,
                tags=["camera", f"line-{(start + i) % 7}"],
                running_version=rng.choice(base["versions"]),
                desired_version=base["versions"][-1],
                deployment_state=rng.choice(["active", "active", "downloading", "failed", ""]),
                state={
                    "local_examples": rng.randint(20, 200),
                    "holdout_examples": rng.randint(5, 50),
                    "training_backends": rng.choice([["torch"], ["torch", "ort"], ["ort"], []]),
                },
                hardware={"python": "3.11.2"},
                # Every board reports drift; one in five is in alert (what ingest keeps here).
                drift_alert=(start + i) % 5 == 0,
                drift_window_end=now,
            )
            for i in range(offset, min(offset + BATCH, count))
        ]
        Device.objects.bulk_create(rows, batch_size=BATCH)
        through.objects.bulk_create(
            [through(device_id=d.pk, devicegroup_id=base["groups"][i % 10].pk) for i, d in enumerate(rows)],
            batch_size=BATCH,
        )
        DriftReport.objects.bulk_create(
            [
                DriftReport(device=d, version=d.running_version, window_end=now, alert=bool(d.drift_alert))
                for d in rows
            ],
            batch_size=BATCH,
        )
        Deployment.objects.bulk_create(
            [
                Deployment(
                    device=d, version=base["versions"][-1], state="failed", error="health check: latency"
                )
                for d in rows[:: max(1, len(rows) // 50)]
            ]
        )
        created.extend(rows)
    return created


def _add_samples(base: dict[str, Any], devices: list[Any], *, total: int, focus: Any) -> int:
    """`total` samples: a full day for the focus device, the rest spread over the others."""
    from django.utils import timezone

    from fleet.models import MetricSample

    now = timezone.now()
    rng = random.Random(7)
    version = base["versions"][0]
    written = 0
    focus_rows = [
        MetricSample(
            device=focus,
            version=version,
            name=name,
            value=rng.random() * 20,
            ts=now - timedelta(seconds=17 * i),
        )
        for name in METRICS
        for i in range(5000)
    ]
    MetricSample.objects.bulk_create(focus_rows, batch_size=BATCH)
    written += len(focus_rows)
    buffer: list[Any] = []
    index = 0
    while written + len(buffer) < total:
        device = devices[index % len(devices)]
        index += 1
        buffer.append(
            MetricSample(
                device=device,
                version=version,
                name=METRICS[index % len(METRICS)],
                value=rng.random() * 20,
                ts=now - timedelta(seconds=rng.randint(0, 86400)),
            )
        )
        if len(buffer) >= BATCH:
            MetricSample.objects.bulk_create(buffer, batch_size=BATCH)
            written += len(buffer)
            buffer = []
    if buffer:
        MetricSample.objects.bulk_create(buffer, batch_size=BATCH)
        written += len(buffer)
    return written


def _add_job(base: dict[str, Any], devices: list[Any]) -> Any:
    from training.models import ClientUpdate, FederatedJob, FederatedRound

    job = FederatedJob.objects.create(
        name="bench job",
        family=base["family"],
        base_version=base["versions"][0],
        target_group=base["groups"][0],
        status="running",
        rounds=60,
        current_round=50,
    )
    rng = random.Random(3)
    for number in range(1, 52):
        selected = devices[number : number + 25]
        evaluation_round = number == 51
        value = 0.5 + min(number, 50) / 120
        spread = {"metric": "accuracy", "value": value, "devices": 20, "examples": 600}
        rnd = FederatedRound.objects.create(
            job=job,
            number=number,
            kind="evaluate" if evaluation_round else "train",
            base_version=base["versions"][0],
            status="done",
            selected=[str(d.pk) for d in selected],
            participants=20,
            dropped=5,
            bytes_in=0 if evaluation_round else 20 * 40_000,
            bytes_out=25 * 80_000,
            accuracy=value,
            loss=None if evaluation_round else 1.5 - number / 50,
            metric_name="accuracy",
            metric=value,
            evaluation="federated" if evaluation_round else "central",
            evaluation_detail={**spread, "min": value - 0.1, "max": value + 0.05, "std": 0.04}
            if evaluation_round
            else {},
        )
        ClientUpdate.objects.bulk_create(
            [
                ClientUpdate(
                    round=rnd,
                    device=d,
                    status="accepted",
                    num_examples=rng.randint(20, 200),
                    bytes=40_000,
                    norm=1.0,
                    metrics={
                        "holdout_accuracy": rng.random(),
                        "holdout_examples": 30,
                        f"backend_{rng.choice(['torch', 'ort'])}": 1.0,
                    },
                )
                for d in selected[:20]
            ]
        )
    return job


def _client(viewer: Any) -> Any:
    from django.test import Client

    client = Client()
    client.force_login(viewer)
    return client


def _queries(client: Any, url: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}")
    return len(ctx.captured_queries)


def _time(fn: Any, *, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _naive_device_list(viewer: Any) -> Any:
    """The device list rendered from a queryset without joins: the baseline."""
    from django.core.paginator import Paginator
    from django.test import RequestFactory

    from fleet.models import Device
    from frontend import selectors
    from frontend.views.base import render_page

    factory = RequestFactory()

    def render() -> Any:
        request = factory.get("/devices/")
        request.user = viewer
        request.session = {}  # type: ignore[assignment]
        page_obj = Paginator(Device.objects.order_by("name", "id"), 50).get_page(1)
        return render_page(
            request,
            "frontend/devices.html",
            section="devices",
            title="Devices",
            page_obj=page_obj,
            filters={},
            query="",
            choices=selectors.device_filter_choices(),
        )

    return render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 devices and 100,000 samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    devices_total = args.devices or (2_000 if args.quick else 10_000)
    samples_total = args.samples or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (10 if args.quick else 30)
    small_total = max(50, devices_total // 10)

    _setup()
    from django.db import connection

    seed_start = time.perf_counter()
    from django.db import transaction

    base = _seed_base()
    small = _add_devices(base, start=0, count=small_total)
    focus = small[1]
    job = _add_job(base, small)
    client = _client(base["viewer"])
    pages = {
        "overview": "/",
        "device list": "/devices/",
        "device list, filtered": f"/devices/?status=online&tag=camera&group={base['groups'][3].pk}",
        "device detail": f"/devices/{focus.pk}/",
        "federated job": f"/federated/{job.pk}/",
        "model family": f"/models/{base['family'].pk}/",
        "model version": f"/versions/{base['versions'][0].pk}/",
    }
    with transaction.atomic():
        _add_samples(base, small, total=min(samples_total, 60_000), focus=focus)
    from django.utils import timezone

    from fleet.services.drift import drift_groups_count

    # What beat's drift check does every DRIFT_CHECK_S: the per-group drift counts pages read.
    drift_groups_count(now=timezone.now())
    small_queries = {name: _queries(client, url) for name, url in pages.items()}

    with transaction.atomic():
        grown = _add_devices(base, start=small_total, count=devices_total - small_total)
    from fleet.models import MetricSample

    remaining = samples_total - MetricSample.objects.count()
    if remaining > 0:
        # The focus device already has its day; the rest is spread over the whole fleet.
        with transaction.atomic():
            _add_samples_spread(base, small + grown, total=remaining)
    seed_s = time.perf_counter() - seed_start
    sample_count = MetricSample.objects.count()
    beat_samples = _time(lambda: drift_groups_count(now=timezone.now()), repeats=3, warmup=0)
    beat_count = {
        "job": "beat: drift counts per group",
        "median_ms": round(statistics.median(beat_samples), 2),
    }

    results: list[dict[str, Any]] = []
    for name, url in pages.items():
        queries = _queries(client, url)
        samples = _time(lambda url=url: client.get(url), repeats=repeats)
        results.append(
            {
                "page": name,
                "p50_ms": round(statistics.median(samples), 2),
                "p95_ms": round(_p95(samples), 2),
                "queries": queries,
                "queries_small_fleet": small_queries[name],
            }
        )
    naive = _naive_device_list(base["viewer"])
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        naive()
    naive_samples = _time(naive, repeats=repeats)
    baseline = {
        "page": "baseline: device list, naive queryset",
        "p50_ms": round(statistics.median(naive_samples), 2),
        "p95_ms": round(_p95(naive_samples), 2),
        "queries": len(ctx.captured_queries),
    }
    independent = all(r["queries"] == r["queries_small_fleet"] for r in results)
    list_row = next(r for r in results if r["page"] == "device list")

    print(
        f"dashboard pages, Django test client in-process ({connection.vendor}); "
        f"{devices_total:,} devices, {sample_count:,} metric samples, seeded in {seed_s:.0f} s; "
        f"{repeats} timed requests per page"
    )
    header = f"{'page':<40} {'p50 ms':>8} {'p95 ms':>8} {'queries':>8} {f'at {small_total:,}':>9}"
    print(header)
    print("-" * len(header))
    for r in [*results, baseline]:
        timing = f"{r['page']:<40} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f}"
        print(f"{timing} {r['queries']:>8} {r.get('queries_small_fleet', ''):>9}")
    print(
        f"{beat_count['job']:<40} {beat_count['median_ms']:>8.1f} ms median, once every DRIFT_CHECK_S "
        "(not a page: what the overview's drift panel reads)"
    )
    ratio = list_row["p50_ms"] / baseline["p50_ms"] if baseline["p50_ms"] else float("nan")
    print(
        f"device list / naive baseline, p50: {ratio:.2f}x; "
        f"queries independent of fleet size: {'yes' if independent else 'NO'}; "
        f"p95 goal 150 ms met: {'yes' if all(r['p95_ms'] < 150 for r in results) else 'NO'}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "pages": results,
                    "baseline": baseline,
                    "beat_drift_counts": beat_count,
                    "device_list_vs_naive_p50": round(ratio, 3),
                    "queries_independent_of_devices": independent,
                    "devices": devices_total,
                    "small_fleet_devices": small_total,
                    "metric_samples": sample_count,
                    "repeats": repeats,
                    "database": connection.vendor,
                    "client": "django.test.Client in-process",
                }
            )
        )
    return 0


def _add_samples_spread(base: dict[str, Any], devices: list[Any], *, total: int) -> None:
    from django.utils import timezone

    from fleet.models import MetricSample

    now = timezone.now()
    rng = random.Random(11)
    version = base["versions"][0]
    for offset in range(0, total, BATCH):
        n = min(BATCH, total - offset)
        MetricSample.objects.bulk_create(
            [
                MetricSample(
                    device=devices[(offset + i) % len(devices)],
                    version=version,
                    name=METRICS[(offset + i) % len(METRICS)],
                    value=rng.random() * 20,
                    ts=now - timedelta(seconds=rng.randint(0, 86400)),
                )
                for i in range(n)
            ],
            batch_size=BATCH,
        )


if __name__ == "__main__":
    sys.exit(main())
