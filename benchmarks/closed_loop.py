"""The closed loop on real boards: drift -> alert -> job -> shadow -> waves vs control -> promotion,
then a bad candidate stopped and rolled back everywhere.

    python -m benchmarks.closed_loop [--quick] [--json] [--boards 30] [--drifted 10]

The stack is the production one (``config.stack.Stack``: uvicorn, two Celery workers, beat
with short ticks, SQLite scratch, the embedded Redis-protocol server). The ``activity``
family is registered through the REST API with its reference data set
(``config.demo.seed.seed_activity_family``: neutral public windows from
``devices_agent.data``), its group's release is v1 (``seed_activity_fleet``), and the
family policy is set through ``PUT /api/v1/models/<id>/policy/``: revert on failure, a
drift job on an input-drift flag, auto ship. ``--boards`` ``python -m devices_agent run``
processes (``benchmarks.boards``) join the group and get v1 from the release. Beside each,
its application (``devices_agent.simulate.GeneratedApp`` over one person's windows: their
own mix of activities, the board mounted the same way on everyone) hands over its history
and then makes predictions, each followed by the right answer, at a steady pace, all run
long: drift sketches, accuracy, shadows and control gates see live traffic throughout.

1. **drift**: ``--drifted`` boards are remounted (their live windows turned 90 degrees on two
   axes, scaled by 1.25 and offset, as a sensor knocked loose would read; labels stay
   right). Their drift reports alert, ``fleet.drift_check`` flags v1 for input drift, the
   policy starts a job on the drifted boards, the job succeeds and is auto-shipped with a
   shadow phase and a control cohort, the shadow passes, the waves pass against control,
   the group's release becomes the new version and every board runs it. ``loop_minutes``:
   injection -> promotion.
2. **bad candidate**: the promoted version with its output layer's rows permuted (every
   class answered as another; ONNX, program and weights rebuilt together), registered
   through the API, assigned by hand to two boards, then shipped to the group by a rollout
   with a shadow phase. It must be stopped in shadow (or its first wave) and the policy must
   revert it on every device. ``bad_devices_exposed``: devices that served its answers.

Every automatic decision (version decisions, and the rollouts' decisions by the system) is
printed on the timeline with its numbers. With ``--json`` the last line is one JSON object
with ``loop_closed``, ``loop_minutes``, ``good_promoted``, ``bad_devices_exposed``,
``bad_rolled_back_everywhere``, ``decisions_recorded`` and the details.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import boards as harness
from benchmarks.rollout_drill import Timeline

BOARDS = 30
DRIFTED = 10
QUICK_BOARDS = 8
QUICK_DRIFTED = 4
HEARTBEAT_S = 3.0
WINDOWS_PER_BOARD = 240
# Predictions per second each application makes once its history is in.
PACE_PER_BOARD = 1.0
WARMUP_S = 120.0
# A remounted accelerometer: the axes turned (x <- -z, y <- x, z <- -y), a gain and an offset (g).
REMOUNT = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
REMOUNT_GAIN = 1.25
REMOUNT_OFFSET = np.array([0.6, -0.4, 0.3])
LOOP_TIMEOUT_S = 17 * 60
BAD_TIMEOUT_S = 4 * 60
SHADOW = {
    "sample_rate": 1.0,
    "min_devices": 3,
    "min_samples": 10,
    "max_drop": 0.02,
    "min_agreement": None,
    "timeout_s": 600,
    "on_timeout": "continue",
}
# Decisions that only say a rollout is waiting: counted, not printed one by one.
QUIET_ROLLOUT_ACTIONS = ("waiting_for_samples", "created")


# --------------------------------------------------------------------------- pure parts


def remount(x: np.ndarray) -> np.ndarray:
    """Windows ``[n, 3, T]`` (or one ``[3, T]``) as the remounted sensor reads them."""
    windows = np.asarray(x, dtype=np.float64)
    turned = np.einsum("ij,...jt->...it", REMOUNT, windows) * REMOUNT_GAIN
    return (turned + REMOUNT_OFFSET[:, None]).astype(np.float32)


def permute_output(weights: dict[str, np.ndarray], *, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The weights with the last output layer's rows (weight and bias) permuted: a derangement,
    so no class keeps its own row and every answer names another class."""
    names = [k for k, v in weights.items() if v.ndim == 2 and v.shape[0] == classes]
    if not names:
        raise ValueError(f"no layer with {classes} output rows")
    weight = names[-1]
    bias = weight.rsplit(".", 1)[0] + ".bias"
    order = np.roll(np.arange(classes), 1 + seed % (classes - 1))
    out = dict(weights)
    out[weight] = np.ascontiguousarray(weights[weight][order])
    if bias in weights:
        out[bias] = np.ascontiguousarray(weights[bias][order])
    return out


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def decision_line(kind: str, action: str, reason: str, metrics: dict[str, Any]) -> str:
    """One timeline line for a decision: what, why, and the scalar numbers behind it."""
    numbers = ", ".join(
        f"{k}={_num(v)}"
        for k, v in sorted(metrics.items())
        if isinstance(v, int | float) and not isinstance(v, bool) or v is None
    )
    nested = []
    for key in ("gates", "control_gates", "shadow"):
        value = metrics.get(key)
        if isinstance(value, list):
            for g in value:
                if isinstance(g, dict):
                    nested.append(
                        f"{g.get('metric', key)} {_num(g.get('value'))} vs {_num(g.get('baseline_value'))}"
                        f" [{g.get('outcome', '?')}]"
                    )
        elif isinstance(value, dict):
            nested.append(
                f"{key}: " + ", ".join(f"{k}={_num(v)}" for k, v in sorted(value.items()) if _scalar(v))
            )
    text = f"{kind} {action}"
    if reason:
        text += f" - {reason}"
    if numbers:
        text += f" ({numbers})"
    if nested:
        text += " [" + "; ".join(nested) + "]"
    return text


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, int | float | str) and len(str(value)) <= 40


def summary(
    *,
    injected_at: float | None,
    promoted_at: float | None,
    good_promoted: bool,
    every_board_on_good: bool,
    bad_exposed: set[str],
    bad_left: int,
    bad_stopped_in: str | None,
    decisions: int,
) -> dict[str, Any]:
    """The drill's verdict from what it observed (seconds on the timeline's clock)."""
    closed = bool(good_promoted and every_board_on_good and injected_at is not None and promoted_at)
    minutes = (promoted_at - injected_at) / 60.0 if closed and promoted_at and injected_at else None
    return {
        "loop_closed": closed,
        "loop_minutes": None if minutes is None else round(minutes, 2),
        "good_promoted": bool(good_promoted),
        "bad_devices_exposed": len(bad_exposed),
        "bad_rolled_back_everywhere": bad_stopped_in is not None and bad_left == 0,
        "bad_stopped_in": bad_stopped_in,
        "decisions_recorded": decisions,
    }


# --------------------------------------------------------------------------- the applications


class Feeder:
    """Every board's application in one thread: history once, then a prediction and its
    answer per board at ``pace`` per second each, until stopped."""

    def __init__(self, fleet: list[harness.Board], apps: list[Any], *, pace: float) -> None:
        self.fleet = fleet
        self.apps = apps
        self.pace = pace
        self.errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="applications", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def predictions(self) -> int:
        return sum(a.predictions for a in self.apps)

    def _run(self) -> None:
        from devices_agent.local_client import AgentClient

        clients: list[Any] = [None] * len(self.fleet)
        period = 1.0 / self.pace
        while not self._stop.is_set():
            started = time.monotonic()
            for i, board in enumerate(self.fleet):
                try:
                    if clients[i] is None:
                        clients[i] = AgentClient(str(board.socket), timeout=10)
                    self.apps[i].step(clients[i], predictions=1)
                except Exception as exc:  # noqa: BLE001 - a board busy installing answers later
                    self.errors += 1
                    self.last_error = f"{board.name}: {exc}"[:300]
                    if clients[i] is not None:
                        clients[i].close()
                    clients[i] = None
            self._stop.wait(max(0.0, period - (time.monotonic() - started)))
        for client in clients:
            if client is not None:
                client.close()


# --------------------------------------------------------------------------- watching


class Decisions:
    """Prints each new automatic decision once (version decisions and rollout decisions)."""

    def __init__(self, log: Timeline) -> None:
        self.log = log
        self.seen_version: set[int] = set()
        self.seen_rollout: set[int] = set()
        self.quiet = 0
        self.recorded: list[dict[str, Any]] = []

    def poll(self) -> None:
        from fleet.models import RolloutDecision, VersionDecision

        for d in VersionDecision.objects.exclude(pk__in=self.seen_version).order_by("pk"):
            self.seen_version.add(d.pk)
            if d.actor != "system":
                continue
            metrics = {**(d.metrics or {}), "devices_reverted": d.devices_reverted}
            if d.job_id:
                metrics["job"] = d.job_id
            self.log(decision_line(f"v{d.version.number} [{d.trigger}]", d.action, d.reason, metrics))
            self.recorded.append({"kind": "version", "action": d.action, "trigger": d.trigger, "at": d.pk})
        for r in RolloutDecision.objects.exclude(pk__in=self.seen_rollout).order_by("pk"):
            self.seen_rollout.add(r.pk)
            if r.actor != "system":
                continue
            self.recorded.append({"kind": "rollout", "action": r.action, "rollout": r.rollout_id})
            if r.action in QUIET_ROLLOUT_ACTIONS:
                self.quiet += 1
                continue
            self.log(
                decision_line(f"rollout {r.rollout_id} wave {r.wave + 1}", r.action, r.reason, r.metrics)
            )


def _until(check: Callable[[], Any], *, timeout: float, tick: Callable[[], None], every: float = 1.0) -> Any:
    """``check()``'s first truthy answer, calling ``tick()`` between tries; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tick()
        answer = check()
        if answer:
            return answer
        time.sleep(every)
    return None


def _accuracy(version_id: int, device_ids: list[Any], since: Any) -> tuple[float | None, int]:
    """Mean of the ``correct`` feedback samples of ``version_id`` on those devices since ``since``."""
    from fleet.models import MetricSample

    values = list(
        MetricSample.objects.filter(
            version_id=version_id, name="correct", device_id__in=device_ids, ts__gte=since
        ).values_list("value", flat=True)
    )
    return (float(np.mean(values)) if values else None), len(values)


# --------------------------------------------------------------------------- the run


def run(
    *, boards: int, drifted: int, quick: bool, quiet: bool, loop_timeout_s: float = LOOP_TIMEOUT_S
) -> dict[str, Any]:
    from config.stack import Stack

    log = Timeline(quiet=quiet)
    load_before = os.getloadavg()[0]
    root = Path(tempfile_dir())
    stack = Stack.scratch(
        "flotilla-closed-loop-",
        production=True,
        heartbeat_interval_s=int(HEARTBEAT_S),
        extra_env={
            "ROLLOUT_TICK_S": "2",
            "ROUNDS_TICK_S": "2",
            "DRIFT_CHECK_S": "5",
            "HEARTBEAT_CACHE_TTL_S": "1",
            "OFFLINE_AFTER_MISSED": "20",
            "DRIFT_JOB_LOOKBACK_S": "120",
            "DRIFT_JOB_ROUNDS": "2",
            # Shipped waves soak a minute, not the production ten, so the drill ends in minutes.
            "SHIP_SOAK_S": "60",
            # A board's first 90 inputs on a version are its drift baseline (the warm-up
            # gives each about 100), not the production 200, for the same reason.
            "DRIFT_BASELINE_SAMPLES": "90",
        },
    )
    result: dict[str, Any] = {"boards": boards, "drifted": drifted, "quick": quick}
    fleet: list[harness.Board] = []
    feeder: Feeder | None = None
    try:
        stack.migrate()
        stack.setup_django()
        stack.start_web(workers=1, wait=False)
        stack.start_worker("loop-a", concurrency=1)
        stack.start_worker("loop-b", concurrency=1)
        stack.start_beat()
        stack.wait_web(timeout=90)
        log(f"stack up: web, 2 workers, beat; database {stack.database}; load {load_before:.1f}")

        import httpx

        from config.demo.seed import seed_activity_family, seed_activity_fleet, seed_admin
        from devices_agent.data import activity_windows
        from devices_agent.simulate import GeneratedApp
        from fleet.models import Device, DeviceGroup, UpdatePolicy

        admin, token = seed_admin(username="loop-admin", password=secrets.token_urlsafe(16))
        api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Token {token}"}, timeout=120)
        v1_id = seed_activity_family(url=stack.url, api_token=token, say=log)
        family_id = int(api.get(f"/api/v1/model-versions/{v1_id}/").json()["family"])
        seeded = seed_activity_fleet(devices=boards, actor=admin)
        group = DeviceGroup.objects.get(name=seeded["group"])
        # The boards' health check times inference on 2 cores shared with 30 boards, the
        # server and the workers: a roomy latency budget keeps the drill about the model's answers.
        group.policy = UpdatePolicy.objects.create(name="closed-loop", health_latency_budget_ms=500.0)
        group.save(update_fields=["policy"])
        answer = api.put(
            f"/api/v1/models/{family_id}/policy/",
            json={"on_failure": "revert", "drift_job": True, "auto_ship": True, "drift_job_interval_s": 600},
        )
        answer.raise_for_status()
        log(
            f"family {family_id}: v1 = version {v1_id}, group {group.name} release v1; policy {answer.json()}"
        )

        log(f"starting {boards} board processes")
        fleet = [
            harness.spawn(
                root,
                i,
                url=stack.url,
                token=seeded["enrollment_token"],
                heartbeat_s=HEARTBEAT_S,
                extra={"drift_every": 2},
            )
            for i in range(boards)
        ]
        logs = lambda: harness.logs(fleet)  # noqa: E731

        def on_v1() -> bool:
            harness.alive(fleet)
            return all((s := harness.status(b)) is not None and s["version_id"] == v1_id for b in fleet)

        harness.wait_for(on_v1, timeout=120 + 10 * boards, what="v1 on every board", logs=logs)
        ids = {d.name: d.pk for d in Device.objects.filter(groups=group)}
        device_ids = [ids[b.name] for b in fleet]
        log(f"{boards} boards enrolled, joined {group.name} and run v1 from its release")

        apps = []
        for i in range(boards):
            x, y = activity_windows(user=i, n=WINDOWS_PER_BOARD, seed=0, style=False)
            apps.append(GeneratedApp(x=x, y=y, rng=random.Random(i)))
        feeder = Feeder(fleet, apps, pace=PACE_PER_BOARD)
        feeder.start()
        decisions = Decisions(log)
        from django.utils import timezone

        warm_since = timezone.now()
        _until(lambda: False, timeout=WARMUP_S, tick=decisions.poll, every=2.0)
        drifted_ids = device_ids[:drifted]
        steady_ids = device_ids[drifted:]
        before = {
            "drifted": _accuracy(v1_id, drifted_ids, warm_since),
            "steady": _accuracy(v1_id, steady_ids, warm_since),
        }
        log(
            f"applications feeding ({feeder.predictions} predictions so far); v1 accuracy on feedback: "
            f"boards to drift {before['drifted'][0]}, the others {before['steady'][0]} "
            f"(n={before['drifted'][1]}, {before['steady'][1]})"
        )

        # 1. the drift
        for i in range(drifted):
            apps[i].x = remount(apps[i].x)
        injected = time.perf_counter() - log.t0
        injected_at = timezone.now()
        log(
            f"drift injected: {drifted} boards remounted "
            f"(axes turned, x{REMOUNT_GAIN}, offset {REMOUNT_OFFSET} g)"
        )
        result.update(
            _loop(
                log,
                decisions,
                api,
                group,
                v1_id,
                device_ids,
                drifted_ids,
                injected_at,
                feeder,
                loop_timeout_s,
            )
        )
        promoted = result.get("promoted_at")
        after = _accuracy(v1_id, drifted_ids, injected_at)
        result["v1_accuracy"] = {"before": before, "drifted_after": after}

        # 2. the bad candidate
        if result.get("good_version"):
            result.update(_bad(log, decisions, api, group, result["good_version"], device_ids, family_id))
        result["decisions"] = decisions.recorded
        result["quiet_rollout_decisions"] = decisions.quiet
        result["predictions"] = feeder.predictions
        result["feed_errors"] = feeder.errors
        result["feed_last_error"] = feeder.last_error
        result.update(
            summary(
                injected_at=injected,
                promoted_at=promoted,
                good_promoted=bool(result.get("good_promoted")),
                every_board_on_good=bool(result.get("every_board_on_good")),
                bad_exposed=set(result.get("bad_exposed_devices", [])),
                bad_left=int(result.get("bad_left", -1)),
                bad_stopped_in=result.get("bad_stopped_in"),
                decisions=len(decisions.recorded),
            )
        )
    finally:
        if feeder is not None:
            feeder.stop()
        harness.stop(fleet)
        stack.close()
    result["load_average_after"] = os.getloadavg()[0]
    result["load_average_before"] = load_before
    result["timeline"] = [[round(t, 1), m] for t, m in log.steps]
    return result


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="flotilla-closed-loop-boards-")


def _loop(
    log: Timeline,
    decisions: Decisions,
    api: Any,
    group: Any,
    v1_id: int,
    device_ids: list[Any],
    drifted_ids: list[Any],
    injected_at: Any,
    feeder: Feeder,
    timeout_s: float,
) -> dict[str, Any]:
    """Injection -> alert -> flag -> job -> auto ship -> shadow -> waves -> promotion."""
    from django.db import close_old_connections

    from fleet.models import Device, DeviceGroup, DriftReport, Rollout, VersionDecision
    from training.models import FederatedJob

    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    marks: dict[str, float] = {}

    def mark(name: str, message: str) -> None:
        if name not in marks:
            marks[name] = time.perf_counter() - log.t0
            log(message)

    def alerts() -> tuple[int, int]:
        rows = DriftReport.objects.filter(alert=True, created_at__gte=injected_at)
        on_drifted = rows.filter(device_id__in=drifted_ids).values("device_id").distinct().count()
        elsewhere = rows.exclude(device_id__in=drifted_ids).values("device_id").distinct().count()
        return on_drifted, elsewhere

    job: Any = None
    rollout: Any = None
    seen_status = ""
    while time.monotonic() < deadline:
        close_old_connections()
        decisions.poll()
        offline = Device.objects.filter(pk__in=device_ids, status="offline").count()
        if offline and "offline" not in marks:
            mark("offline", f"{offline} boards offline")
        on_drifted, elsewhere = alerts()
        if on_drifted:
            report = (
                DriftReport.objects.filter(alert=True, created_at__gte=injected_at, device_id__in=drifted_ids)
                .order_by("pk")
                .first()
            )
            assert report is not None
            mark(
                "alert",
                f"first drift alert on a remounted board: z_max {report.z_max:.1f}, effect size "
                f"{report.effect_size:.2f} (feature {report.effect_feature}), psi {report.psi}",
            )
        if on_drifted >= len(drifted_ids) and "all_alerted" not in marks:
            mark("all_alerted", f"every remounted board alerted ({elsewhere} other boards alerted too)")
        out["alerted_drifted"], out["alerted_elsewhere"] = on_drifted, elsewhere
        started = VersionDecision.objects.filter(version_id=v1_id, action="drift_job_started").first()
        if started is not None and job is None:
            job = FederatedJob.objects.filter(pk=started.job_id or 0).first()
            detail = started.detail or {}
            chosen = set(detail.get("devices") or [])
            hit = len(chosen & {str(d) for d in drifted_ids})
            mark(
                "job",
                f"job {started.job_id} started on {detail.get('device_count')} boards "
                f"({hit} of them remounted)",
            )
        if job is not None:
            job.refresh_from_db()
            if job.status != seen_status:
                seen_status = job.status
                log(
                    f"job {job.pk}: {job.status}"
                    + (f" (best version {job.best_version_id})" if job.best_version_id else "")
                )
            if job.status in ("failed", "cancelled"):
                out["job_status"] = job.status
                break
            if job.status == "succeeded":
                out["job_status"] = "succeeded"
                out["good_version"] = job.best_version_id
        good = out.get("good_version")
        if good and rollout is None:
            rollout = Rollout.objects.filter(version_id=good).order_by("pk").first()
            if rollout is not None:
                mark("shipped", f"rollout {rollout.pk} of version {good} created ({rollout.status})")
        if rollout is not None:
            rollout.refresh_from_db()
            key = f"rollout-{rollout.status}"
            if key not in marks:
                mark(key, f"rollout {rollout.pk}: {rollout.status} (wave {rollout.current_wave + 1})")
            if rollout.status in ("failed", "rolled_back", "aborted", "paused", "cancelled"):
                out["rollout_status"] = rollout.status
                break
            if rollout.status == "succeeded":
                release = DeviceGroup.objects.filter(pk=group.pk).values_list(
                    "release_version_id", flat=True
                )[0]
                on_good = Device.objects.filter(pk__in=device_ids, running_version_id=good).count()
                if release == good and "promoted" not in marks:
                    mark("promoted", f"group {group.name} release = version {good}")
                if release == good and on_good == len(device_ids):
                    mark("everywhere", f"every board runs version {good}")
                    out["rollout_status"] = "succeeded"
                    break
        time.sleep(1.0)
    decisions.poll()
    good = out.get("good_version")
    release = DeviceGroup.objects.filter(pk=group.pk).values_list("release_version_id", flat=True)[0]
    out["good_promoted"] = bool(good and release == good)
    out["every_board_on_good"] = bool(
        good and Device.objects.filter(pk__in=device_ids, running_version_id=good).count() == len(device_ids)
    )
    out["promoted_at"] = marks.get("promoted")
    out["marks_s"] = marks
    if good:
        out["good_accuracy_drifted"] = _accuracy(good, drifted_ids, injected_at)
        out["good_accuracy_steady"] = _accuracy(
            good, [d for d in device_ids if d not in drifted_ids], injected_at
        )
    if rollout is not None:
        out["good_rollout"] = rollout.pk
        out["good_rollout_detail"] = api.get(f"/api/v1/rollouts/{rollout.pk}/").json()
    out["feed_predictions_at_loop_end"] = feeder.predictions
    return out


def _bad(
    log: Timeline,
    decisions: Decisions,
    api: Any,
    group: Any,
    good_id: int,
    device_ids: list[Any],
    family_id: int,
) -> dict[str, Any]:
    """A deranged candidate: by hand on two boards, then a rollout with a shadow phase."""
    from django.db import close_old_connections

    from config.demo.nets import bundle
    from devices_agent.codecs import decode_tensors
    from fleet.models import Device, MetricSample, Rollout

    weights = api.get(f"/api/v1/model-versions/{good_id}/artifacts/weights/")
    weights.raise_for_status()
    state = {k: np.asarray(v) for k, v in decode_tensors(weights.content)[0].items()}
    made = bundle("activity", permute_output(state, classes=6))
    uploaded = api.post(
        "/api/v1/model-versions/",
        data={"family": str(family_id), "notes": "closed loop drill: output rows permuted"},
        files={
            "weights": ("weights.safetensors", made.weights),
            "onnx": ("model.onnx", made.onnx),
            "program": ("program.json", made.program),
        },
    )
    uploaded.raise_for_status()
    bad_id = int(uploaded.json()["id"])
    for stage in ("staging", "production"):
        api.post(f"/api/v1/model-versions/{bad_id}/promote/", json={"stage": stage}).raise_for_status()
    log(f"bad candidate registered: version {bad_id} (version {good_id} with its output rows permuted)")
    by_hand = device_ids[-2:]
    for device_id in by_hand:
        api.post(f"/api/v1/devices/{device_id}/assign-version/", json={"version": bad_id}).raise_for_status()
    since = time.perf_counter()

    def served() -> bool:
        close_old_connections()
        return bool(
            MetricSample.objects.filter(version_id=bad_id, name="correct", device_id__in=by_hand)
            .values("device_id")
            .distinct()
            .count()
            == len(by_hand)
        )

    _until(served, timeout=120, tick=decisions.poll)
    values = list(
        MetricSample.objects.filter(version_id=bad_id, name="correct").values_list("value", flat=True)
    )
    accuracy, n = (float(np.mean(values)) if values else None), len(values)
    log(
        f"assigned by hand to 2 boards: serving its answers after {time.perf_counter() - since:.0f} s "
        f"(accuracy {accuracy if accuracy is None else round(accuracy, 3)} on {n} answers)"
    )
    created = api.post(
        "/api/v1/rollouts/",
        json={
            "name": "bad candidate",
            "version": bad_id,
            "target_group": group.pk,
            "waves": [{"count": 5, "soak_s": 30}, {"percent": 100, "soak_s": 0}],
            "control_percent": 20,
            "shadow": SHADOW,
        },
    )
    if created.status_code >= 400:
        log(f"rollout with a shadow phase refused: {created.status_code} {created.text[:300]}")
        samples = MetricSample.objects.filter(version_id=bad_id, name="correct")
        served_by = samples.values_list("device_id", flat=True).distinct()
        left = Device.objects.filter(running_version_id=bad_id).count()
        return {
            "bad_version": bad_id,
            "bad_rollout_refused": created.text[:500],
            "bad_exposed_devices": sorted(str(d) for d in served_by),
            "bad_left": left + Device.objects.filter(desired_version_id=bad_id).count(),
        }
    rollout_id = int(created.json()["id"])
    api.post(f"/api/v1/rollouts/{rollout_id}/start/").raise_for_status()
    rollout = Rollout.objects.get(pk=rollout_id)
    log(f"rollout {rollout_id} of the bad candidate started: {rollout.status}")
    exposed: set[str] = set()
    stopped_in: str | None = None
    deadline = time.monotonic() + BAD_TIMEOUT_S
    while time.monotonic() < deadline:
        close_old_connections()
        decisions.poll()
        exposed |= {
            str(d) for d in Device.objects.filter(running_version_id=bad_id).values_list("pk", flat=True)
        }
        rollout.refresh_from_db()
        if rollout.status not in ("shadow", "running", "draft"):
            stopped_in = (
                "shadow"
                if rollout.current_wave < 0 or _shadow_failed(rollout_id)
                else (f"wave {rollout.current_wave + 1}")
            )
            log(f"rollout {rollout_id}: {rollout.status} ({stopped_in})")
            break
        time.sleep(1.0)

    def cleared() -> bool:
        close_old_connections()
        decisions.poll()
        return not Device.objects.filter(running_version_id=bad_id).exists() and not (
            Device.objects.filter(desired_version_id=bad_id).exists()
        )

    clean = _until(cleared, timeout=120, tick=lambda: None, every=2.0)
    exposed |= {
        str(d)
        for d in MetricSample.objects.filter(version_id=bad_id, name="correct")
        .values_list("device_id", flat=True)
        .distinct()
    }
    left = (
        Device.objects.filter(running_version_id=bad_id).count()
        + Device.objects.filter(desired_version_id=bad_id).count()
    )
    log(
        f"after the revert: {left} devices run or desire the bad candidate"
        + (" (rolled back everywhere)" if clean else "")
        + f"; {len(exposed)} devices served its answers"
    )
    return {
        "bad_version": bad_id,
        "bad_rollout": rollout_id,
        "bad_rollout_status": rollout.status,
        "bad_stopped_in": stopped_in,
        "bad_exposed_devices": sorted(exposed),
        "bad_left": left,
        "bad_rollout_detail": api.get(f"/api/v1/rollouts/{rollout_id}/").json(),
    }


def _shadow_failed(rollout_id: int) -> bool:
    from fleet.models import RolloutDecision

    return RolloutDecision.objects.filter(rollout_id=rollout_id, action="shadow_failed").exists()


def _share(value: Any) -> str:
    """An (accuracy, samples) pair as "0.991 (n=1165)"; "-" when there is none."""
    if not value or value[0] is None:
        return "-"
    return f"{float(value[0]):.3f} (n={int(value[1])})"


def table(r: dict[str, Any]) -> str:
    """The run's table (markdown, as the README shows it)."""
    rows = [
        ("boards (agent processes) / remounted", f"{r['boards']} / {r['drifted']}"),
        (
            "remounted boards alerted / others alerted",
            f"{r.get('alerted_drifted')} / {r.get('alerted_elsewhere')}",
        ),
        ("loop closed (promoted, every board on it)", str(r.get("loop_closed"))),
        (
            "accuracy on remounted boards: v1 before / v1 after / promoted",
            " / ".join(
                _share(v)
                for v in (
                    (r.get("v1_accuracy") or {}).get("before", {}).get("drifted"),
                    (r.get("v1_accuracy") or {}).get("drifted_after"),
                    r.get("good_accuracy_drifted"),
                )
            ),
        ),
        (
            "accuracy on the other boards: v1 before / promoted",
            " / ".join(
                _share(v)
                for v in (
                    (r.get("v1_accuracy") or {}).get("before", {}).get("steady"),
                    r.get("good_accuracy_steady"),
                )
            ),
        ),
        ("loop minutes (injection -> promotion)", str(r.get("loop_minutes"))),
        ("good promoted", str(r.get("good_promoted"))),
        ("bad stopped in", str(r.get("bad_stopped_in"))),
        ("bad devices exposed (2 by hand + wave members)", str(r.get("bad_devices_exposed"))),
        ("bad rolled back everywhere", str(r.get("bad_rolled_back_everywhere"))),
        ("automatic decisions recorded", str(r.get("decisions_recorded"))),
        (
            "predictions with feedback (application errors)",
            f"{r.get('predictions')} ({r.get('feed_errors')})",
        ),
        ("load average before / after", f"{r['load_average_before']:.1f} / {r['load_average_after']:.1f}"),
    ]
    marks = r.get("marks_s") or {}
    for name, seconds in marks.items():
        rows.append((f"t({name}) s", f"{seconds:.0f}"))
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a:<{width}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_BOARDS} boards, {QUICK_DRIFTED} remounted"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--boards", type=int, default=None)
    parser.add_argument("--drifted", type=int, default=None)
    parser.add_argument(
        "--loop-timeout", type=float, default=LOOP_TIMEOUT_S, help="seconds the loop may take after the drift"
    )
    args = parser.parse_args(argv)
    boards = args.boards or (QUICK_BOARDS if args.quick else BOARDS)
    drifted = args.drifted or (QUICK_DRIFTED if args.quick else DRIFTED)
    if not 3 <= drifted < boards:
        parser.error("--drifted must be at least 3 (a flag needs 3 boards) and below --boards")
    r = run(boards=boards, drifted=drifted, quick=args.quick, quiet=False, loop_timeout_s=args.loop_timeout)
    print()
    print(table(r))
    if args.json:
        print(json.dumps(r, default=str))
    sys.stdout.flush()
    return 0 if r.get("loop_closed") and r.get("bad_rolled_back_everywhere") else 1


if __name__ == "__main__":
    sys.exit(main())
