"""The overview's drift and personalisation panels, and the device page's drift facts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.frontend.conftest import Fleet
from tests.frontend.test_query_counts import seed_drift

pytestmark = pytest.mark.django_db


def test_overview_shows_drift_shares_flagged_versions_and_personal_gain(
    page_client: Any, fleet: Fleet
) -> None:
    seed_drift(fleet.devices[:4], fleet.version)  # two of four in alert; gain +10 points each
    fleet.candidate.metrics = {
        **fleet.candidate.metrics,
        "flagged": {"reason": "accuracy_drop", "accuracy": 0.81, "reference_accuracy": 0.95, "samples": 321},
    }
    fleet.candidate.save()
    response = page_client("viewer").get(reverse("frontend:overview"))
    assert response.status_code == 200
    [group] = response.context["drift_groups"]
    assert group["group"] == "cameras" and group["reporting"] == 4 and group["alerting"] == 2
    [personal] = response.context["personal_groups"]
    assert personal["devices"] == 4 and personal["mean_gain"] == pytest.approx(0.1)
    html = response.content.decode()
    drift_panel = html.split('id="drift-panel"')[1].split('id="personalisation-panel"')[0]
    assert "cameras" in drift_panel and "50.0%" in drift_panel
    assert fleet.candidate.label in drift_panel and "81.0%" in drift_panel and "321" in drift_panel
    personal_panel = html.split('id="personalisation-panel"')[1]
    assert "+10.0%" in personal_panel


def test_overview_panels_are_empty_without_reports(page_client: Any, fleet: Fleet) -> None:
    html = page_client("viewer").get(reverse("frontend:overview")).content.decode()
    assert "No drift reports yet." in html and "No device reports a personal head's numbers." in html


def test_device_page_shows_the_latest_drift_report_and_personal_accuracy(
    page_client: Any, fleet: Fleet
) -> None:
    from fleet.models import DriftReport, MetricSample

    device = fleet.devices[0]
    now = timezone.now()
    DriftReport.objects.create(device=device, window_end=now - timedelta(hours=1), alert=False, score=0.1)
    DriftReport.objects.create(
        device=device,
        window_end=now,
        alert=True,
        score=2.5,
        z_max=6.25,
        psi=0.375,
        effect_size=1.75,
        effect_feature=3,
        feature_psi=0.625,
        feature_psi_feature=5,
        psi_band="major",
    )
    MetricSample.objects.create(
        device=device, version=fleet.version, name="global_accuracy", value=0.7, ts=now
    )
    MetricSample.objects.create(
        device=device, version=fleet.version, name="personal_accuracy", value=0.85, ts=now
    )
    response = page_client("viewer").get(reverse("frontend:device", args=[device.pk]))
    assert response.status_code == 200
    assert response.context["drift_report"].score == pytest.approx(2.5)
    assert response.context["personal"]["gain"] == pytest.approx(0.15)
    panel = response.content.decode().split('id="device-drift"')[1].split("</dl>")[0]
    assert "alert" in panel and "2.500" in panel and "6.25" in panel and "0.375" in panel
    assert "1.75" in panel and "feature 3" in panel  # the effect size, next to z
    assert "0.625" in panel and "major" in panel and "feature 5" in panel  # the feature PSI and its band
    assert "70.0%" in panel and "85.0%" in panel and "+15.0%" in panel


def test_device_page_without_reports(page_client: Any, fleet: Fleet) -> None:
    response = page_client("viewer").get(reverse("frontend:device", args=[fleet.devices[1].pk]))
    panel = response.content.decode().split('id="device-drift"')[1].split("</dl>")[0]
    assert "no report yet" in panel and "not personalised" in panel


def test_overview_shows_what_the_fleet_did_about_a_flagged_version(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import VersionDecision

    fleet.candidate.metrics = {
        **fleet.candidate.metrics,
        "flagged": {"reason": "accuracy_drop", "metric": "accuracy", "value": 0.8, "reference": 0.95},
    }
    fleet.candidate.save()
    VersionDecision.objects.create(
        version=fleet.candidate,
        family_id=fleet.candidate.family_id,
        action="reverted",
        trigger="flag",
        devices_reverted=7,
        devices_without_previous=1,
    )
    html = page_client("viewer").get(reverse("frontend:overview")).content.decode()
    drift_panel = html.split('id="drift-panel"')[1].split('id="personalisation-panel"')[0]
    assert "reverted on 7 (1 with none before)" in drift_panel
