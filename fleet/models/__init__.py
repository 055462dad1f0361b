"""Fleet models, one module per area; each is imported here so Django finds it."""

from fleet.models.devices import (
    Deployment,
    DeploymentEvent,
    Device,
    DeviceCommand,
    DeviceGroup,
    EnrollmentToken,
    GroupReleaseChange,
    MetricBatch,
    MetricSample,
)
from fleet.models.drift import DriftBaseline, DriftReport  # noqa: F401
from fleet.models.experiments import Experiment, ExperimentAssignment, ExperimentDecision  # noqa: F401
from fleet.models.metrics import MetricRollup, MetricRollupState  # noqa: F401
from fleet.models.policies import UpdatePolicy
from fleet.models.provisioning import KnownHost, ProvisioningJob  # noqa: F401
from fleet.models.revert import FamilyPolicy, VersionDecision  # noqa: F401
from fleet.models.rollouts import Rollout, RolloutDecision, RolloutDevice  # noqa: F401
from fleet.models.shadows import Shadow, ShadowMember  # noqa: F401
from fleet.models.webhooks import WebhookDelivery, WebhookEndpoint  # noqa: F401

__all__ = [
    "Deployment",
    "DeploymentEvent",
    "Device",
    "DeviceCommand",
    "DeviceGroup",
    "EnrollmentToken",
    "GroupReleaseChange",
    "MetricBatch",
    "MetricSample",
    "UpdatePolicy",
]
