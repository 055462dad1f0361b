"""Celery tasks: rollouts, experiments and webhooks. Thin: ids in, a service call, safe twice."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)

__all__ = [
    "experiments_evaluate",
    "rollouts_advance",
    "rollouts_advance_one",
    "webhooks_deliver",
    "webhooks_retry_due",
]


@shared_task(name="fleet.rollouts_advance")
def rollouts_advance() -> int:
    """Advance every running rollout by one step (periodic)."""
    from fleet.services.rollouts import rollout_advance, running_rollout_ids

    ids = running_rollout_ids()
    for rollout_id in ids:
        try:
            rollout_advance(rollout_id=rollout_id)
        except Exception:  # one broken rollout must not stall the others
            logger.exception("advancing rollout %s failed", rollout_id)
    return len(ids)


@shared_task(name="fleet.rollouts_advance_one")
def rollouts_advance_one(rollout_id: int) -> str:
    """Advance one rollout now (after start/resume, instead of waiting for the beat)."""
    from fleet.services.rollouts import rollout_advance

    return rollout_advance(rollout_id=rollout_id).action


@shared_task(name="fleet.experiments_evaluate")
def experiments_evaluate() -> int:
    """Evaluate every running experiment (periodic): guardrails, late joiners, winner."""
    from fleet.services.experiments import experiment_evaluate, running_experiment_ids

    ids = running_experiment_ids()
    for experiment_id in ids:
        try:
            experiment_evaluate(experiment_id=experiment_id)
        except Exception:
            logger.exception("evaluating experiment %s failed", experiment_id)
    return len(ids)


@shared_task(name="fleet.webhooks_deliver")
def webhooks_deliver(delivery_id: int) -> str:
    """Send one webhook delivery if it is due."""
    from fleet.services.webhooks import webhook_deliver

    delivery = webhook_deliver(delivery_id=delivery_id)
    return delivery.status if delivery is not None else "not_due"


@shared_task(name="fleet.webhooks_retry_due")
def webhooks_retry_due() -> int:
    """Send every delivery whose retry is due (periodic)."""
    from fleet.services.webhooks import webhook_deliver, webhook_deliveries_due

    ids = webhook_deliveries_due()
    for delivery_id in ids:
        try:
            webhook_deliver(delivery_id=delivery_id)
        except Exception:
            logger.exception("webhook delivery %s failed", delivery_id)
    return len(ids)
