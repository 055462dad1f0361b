"""What the registry does when the product announces something (:mod:`core.events`).

Registered in ``ModelsRegistryConfig.ready``; each handler runs after the commit of the
write that announced the event, on its own.
"""

from __future__ import annotations

import logging

from django.conf import settings

from core.events import Event

log = logging.getLogger(__name__)


def version_created(event: Event) -> None:
    """``model_version.created``: queue the ONNX Runtime training build of a trainable graph.

    Boards without PyTorch train from artifacts built from the version's graph; with
    ``ORT_TRAINING_AUTO`` the build starts as soon as the version exists, so the version
    is ready for them (or marked not trainable, with the operator named) before a job asks.
    """
    if not (getattr(settings, "ORT_TRAINING_AUTO", False) and event.payload.get("trainable_graph")):
        return
    from models_registry.jobs import ort_training_request
    from models_registry.models import ModelVersion

    version = ModelVersion.objects.filter(pk=int(event.payload["version_id"])).first()
    if version is not None:
        ort_training_request(version=version)
