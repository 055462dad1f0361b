"""The operator API of rollouts and experiments: error codes, actions, roles, decisions."""

from __future__ import annotations

from typing import Any


def test_create_errors_use_the_one_error_shape(fleet: Any, operator_client: Any, make_version: Any) -> None:
    f = fleet(6)
    url = "/api/v1/rollouts/"
    empty = operator_client.post(
        url, {"version": f.v2.pk, "target_tags": ["ghost"], "waves": [{"percent": 100}]}, format="json"
    )
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_target"
    no_onnx = make_version(onnx=None, weights=b"w")
    r = operator_client.post(
        url, {"version": no_onnx.pk, "target_group": f.group.pk, "waves": [{"percent": 100}]}, format="json"
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_compatible_artifact"
    r = operator_client.post(
        url,
        {
            "version": f.v2.pk,
            "target_group": f.group.pk,
            "waves": [{"percent": 100}],
            "gates": [{"metric": "mood", "max": 1}],
        },
        format="json",
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_metric"


def test_accuracy_gate_on_a_regression_family_is_a_400_naming_the_fitting_gates(
    fleet: Any, operator_client: Any
) -> None:
    f = fleet(4, regression=True)
    body = {
        "version": f.v2.pk,
        "target_group": f.group.pk,
        "waves": [{"percent": 100}],
        "gates": [{"metric": "accuracy", "max_decrease_pct": 2}],
    }
    r = operator_client.post("/api/v1/rollouts/", body, format="json")
    assert r.status_code == 400, r.content
    error = r.json()["error"]
    assert error["code"] == "gate_not_for_task"
    assert error["details"] == {
        "task": "regression",
        "metrics": ["accuracy"],
        "fits": ["latency_p95_ms", "error_rate", "mae"],
    }
    body["gates"] = [{"metric": "mae", "max_increase_pct": 10}]
    created = operator_client.post("/api/v1/rollouts/", body, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["gates"][0]["metric"] == "mae"


def test_rollout_lifecycle_over_http(fleet: Any, operator_client: Any, viewer_client: Any) -> None:
    f = fleet(10)
    body = {
        "version": f.v2.pk,
        "target_group": f.group.pk,
        "waves": [{"percent": 20, "soak_s": 60}, {"percent": 100, "soak_s": 0}],
        "gates": [{"metric": "latency_p95_ms", "max_increase_pct": 20, "min_samples": 10}],
    }
    assert viewer_client.post("/api/v1/rollouts/", body, format="json").status_code == 403
    created = operator_client.post("/api/v1/rollouts/", body, format="json")
    assert created.status_code == 201, created.content
    rid = created.json()["id"]
    assert created.json()["status"] == "draft"
    started = operator_client.post(f"/api/v1/rollouts/{rid}/start/")
    assert started.status_code == 200 and started.json()["status"] == "running"
    assert started.json()["summary"]["members"] == 2
    overlap = operator_client.post("/api/v1/rollouts/", body, format="json")
    assert overlap.status_code == 409
    assert overlap.json()["error"]["code"] == "overlapping_rollout"
    assert overlap.json()["error"]["details"]["rollout_id"] == rid
    assert (
        operator_client.post(f"/api/v1/rollouts/{rid}/pause/", {"reason": "look"}, format="json").json()[
            "status"
        ]
        == "paused"
    )
    assert operator_client.post(f"/api/v1/rollouts/{rid}/pause/").status_code == 409
    assert operator_client.post(f"/api/v1/rollouts/{rid}/resume/").json()["status"] == "running"
    advanced = operator_client.post(f"/api/v1/rollouts/{rid}/advance-now/")
    assert advanced.status_code == 200 and advanced.json()["current_wave"] == 1
    devices = viewer_client.get(f"/api/v1/rollouts/{rid}/devices/").json()
    assert devices["count"] == 10
    aborted = operator_client.post(f"/api/v1/rollouts/{rid}/abort/", {"reason": "enough"}, format="json")
    assert aborted.json()["status"] == "aborted"
    decisions = viewer_client.get(f"/api/v1/rollouts/{rid}/decisions/").json()["results"]
    actions = [d["action"] for d in decisions]
    assert actions[:3] == ["created", "started", "paused"]
    assert "advanced_by_operator" in actions and actions[-1] == "aborted"
    assert {d["actor"] for d in decisions if d["action"] == "paused"} == {operator_client.user.username}


def test_experiment_over_http(fleet: Any, operator_client: Any) -> None:
    f = fleet(8)
    body = {
        "name": "ab",
        "target_group": f.group.pk,
        "arms": [
            {"name": "a", "version_id": f.v1.pk, "share": 0.5},
            {"name": "b", "version_id": f.v2.pk, "share": 0.5},
        ],
        "guardrails": [{"metric": "error_rate", "max": 0.1}],
    }
    created = operator_client.post("/api/v1/experiments/", body, format="json")
    assert created.status_code == 201, created.content
    eid = created.json()["id"]
    started = operator_client.post(f"/api/v1/experiments/{eid}/start/")
    assert started.json()["status"] == "running"
    assert sum(a["devices"] for a in started.json()["arm_devices"]) == 8
    evaluated = operator_client.post(f"/api/v1/experiments/{eid}/evaluate/")
    assert evaluated.status_code == 200 and evaluated.json()["status"] == "running"
    promote = operator_client.post(f"/api/v1/experiments/{eid}/promote/", {}, format="json")
    assert promote.status_code == 409 and promote.json()["error"]["code"] == "invalid_state"
    bad = operator_client.post(
        "/api/v1/experiments/", {**body, "guardrails": [{"metric": "vibes", "max": 1}]}, format="json"
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_metric"
