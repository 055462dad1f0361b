"""What happens to a version after its rollout: a family's policy and the decisions taken.

``FamilyPolicy`` is one row per model family (none: every default). It lives beside the
update policies, in the fleet, because what it governs is the fleet's reaction to a bad
version: update policies say how a device may update, this one what the fleet does when a
version of the family fails a gate or is flagged while watched (``fleet.services.revert``),
and whether a flag may start a federated job (``training.services.drift_jobs``).
"""

from __future__ import annotations

from django.db import models


class FamilyPolicy(models.Model):
    """A family's policy for bad versions and for drift (defaults: alert, no job)."""

    class OnFailure(models.TextChoices):
        ALERT = "alert"  # record the decision and announce it; move no device
        REVERT = "revert"  # revert the version on every device running or desiring it

    family = models.OneToOneField(
        "models_registry.ModelFamily", on_delete=models.CASCADE, related_name="fleet_policy"
    )
    on_failure = models.CharField(max_length=10, choices=OnFailure.choices, default=OnFailure.ALERT)
    # How long a version stays watched after its rollout succeeded (None: VERSION_WATCH_S).
    watch_s = models.PositiveIntegerField(null=True, blank=True)
    # Whether a flag (model.flagged) starts a federated job from the flagged version on the
    # boards where it drifted, at most one per family per interval (None: DRIFT_JOB_INTERVAL_S).
    drift_job = models.BooleanField(default=False)
    drift_job_interval_s = models.PositiveIntegerField(null=True, blank=True)
    # Whether a drift-started job's result should be shipped without an operator's click.
    # (`training.services.shipping.job_auto_ship`, on the job's success.)
    auto_ship = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.CharField(max_length=150, default="system")

    class Meta:
        verbose_name_plural = "family policies"

    def __str__(self) -> str:
        return f"policy of family {self.family_id}"


class VersionDecision(models.Model):
    """A decision about a version after (or outside) its rollout, with the numbers behind it."""

    class Action(models.TextChoices):
        REVERTED = "reverted"
        ALERTED = "alerted"
        DRIFT_JOB_STARTED = "drift_job_started"
        DRIFT_JOB_SKIPPED = "drift_job_skipped"
        AUTO_SHIPPED = "auto_shipped"
        AUTO_SHIP_SKIPPED = "auto_ship_skipped"

    class Trigger(models.TextChoices):
        GATE = "gate"  # a rollout's gate or error threshold failed
        FLAG = "flag"  # model.flagged on a watched version (or, for a job, any flag)
        SHADOW = "shadow"  # a rollout's shadow phase failed
        JOB = "job"  # a federated job started by drift finished
        OPERATOR = "operator"

    version = models.ForeignKey(
        "models_registry.ModelVersion", on_delete=models.CASCADE, related_name="fleet_decisions"
    )
    family = models.ForeignKey("models_registry.ModelFamily", on_delete=models.CASCADE, related_name="+")
    action = models.CharField(max_length=30, choices=Action.choices, db_index=True)
    trigger = models.CharField(max_length=20, choices=Trigger.choices)
    reason = models.TextField(blank=True)
    # The numbers behind the decision: the flag's or the gate's metric values.
    metrics = models.JSONField(default=dict, blank=True)
    devices_reverted = models.PositiveIntegerField(default=0)
    devices_without_previous = models.PositiveIntegerField(default=0)
    # Which devices, rollouts, experiments and groups it touched; a job's devices and group.
    detail = models.JSONField(default=dict, blank=True)
    job_id = models.BigIntegerField(null=True, blank=True)
    actor = models.CharField(max_length=150, default="system")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
