"""Celery tasks of the fleet app, one module per area (Celery discovers `fleet.tasks`)."""

from fleet.tasks.devices import *  # noqa: F403
from fleet.tasks.drift import *  # noqa: F403
from fleet.tasks.provisioning import *  # noqa: F403
from fleet.tasks.retention import *  # noqa: F403
from fleet.tasks.rollouts import *  # noqa: F403
