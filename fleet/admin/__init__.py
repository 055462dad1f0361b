"""Admin registrations, one module per area."""

from fleet.admin import devices, provisioning, rollouts, shadows  # noqa: F401
