"""Writes of the training app, by concern.

- :mod:`~training.services.jobs`: validation, creation, the operator's transitions, how
  a job ends, the retraining job a drift flag starts;
- :mod:`~training.services.rounds`: opening and closing rounds, the periodic tick that
  recovers their lost messages, and the sweep's re-drive of lost aggregations;
- :mod:`~training.services.updates`: devices' updates, their refusals and the failures
  devices report;
- :mod:`~training.services.aggregation`: aggregating a closed round under its lease,
  checkpoints, registering and evaluating the new version;
- :mod:`~training.services.shards`: a large round's partial sums, shard by shard on any
  worker, and their reduce.

Every transition is a conditional update on the row's status, so a task delivered twice
(acks_late re-delivers after a crash) is a no-op the second time; tasks are sent and
events announced only after the transaction that made their rows visible commits
(:mod:`core.dispatch`, :mod:`core.events`). Device-facing reads are in
:mod:`training.selectors`.
"""

from core.leases import LeaseLost
from training.services.aggregation import AGGREGATION_LEASE, round_aggregate
from training.services.jobs import (
    CODECS,
    JOB_FIELDS,
    OPTIMIZERS,
    job_cancel,
    job_create,
    job_pause,
    job_privacy,
    job_resume,
    job_round_failed,
    job_start,
    job_succeed,
)
from training.services.rounds import (
    round_close,
    round_open,
    round_weights_served,
    rounds_redrive,
    rounds_tick,
)
from training.services.shards import SHARD_LEASE, shard_aggregate
from training.services.updates import (
    MAX_METRICS_JSON,
    UpdateRejected,
    evaluation_receive,
    update_failure_receive,
    update_receive,
)

__all__ = [
    "AGGREGATION_LEASE",
    "CODECS",
    "JOB_FIELDS",
    "MAX_METRICS_JSON",
    "OPTIMIZERS",
    "SHARD_LEASE",
    "LeaseLost",
    "UpdateRejected",
    "evaluation_receive",
    "job_cancel",
    "job_create",
    "job_pause",
    "job_privacy",
    "job_resume",
    "job_round_failed",
    "job_start",
    "job_succeed",
    "round_aggregate",
    "round_close",
    "round_open",
    "round_weights_served",
    "rounds_redrive",
    "rounds_tick",
    "shard_aggregate",
    "update_failure_receive",
    "update_receive",
]
