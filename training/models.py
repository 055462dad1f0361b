"""How versions are learned: federated jobs, their rounds and the devices' updates.

Every step of a round is a row (the round's status, each client update, the partial
aggregate checkpoint), so a round resumes after any restart of the web server or a
worker.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class FederatedJob(models.Model):
    """A federated training run: ``rounds`` rounds over the devices of ``target_group``."""

    class Status(models.TextChoices):
        DRAFT = "draft"
        RUNNING = "running"
        PAUSED = "paused"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Codec(models.TextChoices):
        NONE = "none"
        FP16 = "fp16"
        INT8 = "int8"
        TOPK = "topk"

    name = models.CharField(max_length=150)
    family = models.ForeignKey("models_registry.ModelFamily", on_delete=models.PROTECT, related_name="+")
    base_version = models.ForeignKey(
        "models_registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    target_group = models.ForeignKey("fleet.DeviceGroup", on_delete=models.PROTECT, related_name="+")
    rounds = models.PositiveIntegerField(default=10)
    # Selection: max(min_clients, ceil(clients_fraction * eligible)) devices per round.
    clients_fraction = models.FloatField(default=1.0)
    min_clients = models.PositiveIntegerField(default=2)
    require_online = models.BooleanField(default=True)
    min_local_examples = models.PositiveIntegerField(default=0)
    # No update weighs more than this many examples, whatever its board reported: one
    # board's count cannot outvote the round.
    max_examples_per_update = models.PositiveIntegerField(default=100_000)
    # Local training on the device.
    local_epochs = models.PositiveIntegerField(default=1)
    batch_size = models.PositiveIntegerField(default=32)
    optimizer = models.CharField(max_length=20, default="sgd")
    lr = models.FloatField(default=0.05)
    prox_mu = models.FloatField(default=0.0)
    # Aggregation.
    strategy = models.CharField(max_length=30, default="fedavg")
    strategy_params = models.JSONField(default=dict, blank=True)
    # Privacy: devices clip to clip_norm, the server clips again and adds noise.
    clip_norm = models.FloatField(null=True, blank=True)
    noise_multiplier = models.FloatField(default=0.0)
    dp_delta = models.FloatField(default=1e-5)
    # An update whose L2 norm exceeds clip_norm * norm_slack (or max_update_norm when
    # set) is rejected: slack because fp16/int8 rounding grows the norm a little.
    norm_slack = models.FloatField(default=1.05)
    max_update_norm = models.FloatField(null=True, blank=True)
    codec = models.CharField(max_length=10, choices=Codec.choices, default=Codec.NONE)
    # The training backends the job accepts; a board with none of them is not selected.
    backends = models.JSONField(default=list, blank=True, help_text='e.g. ["torch", "ort"]; empty: any.')
    topk_fraction = models.FloatField(default=0.1)
    round_deadline_s = models.PositiveIntegerField(default=300)
    # Minimum accepted updates for a round to aggregate at its deadline.
    quorum = models.PositiveIntegerField(default=2)
    max_consecutive_failures = models.PositiveIntegerField(default=3)
    seed = models.IntegerField(default=0)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT, db_index=True)
    current_round = models.PositiveIntegerField(default=0)
    consecutive_failures = models.PositiveIntegerField(default=0)
    best_version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    best_accuracy = models.FloatField(null=True, blank=True)
    # The best version's primary metric (accuracy, or mae for regression), by whichever
    # evaluation it has: on the family's test set, or federated on the boards' holdouts.
    best_metric = models.FloatField(null=True, blank=True)
    # Storage name of the server optimiser state (FedAdam/FedYogi) carried between rounds.
    server_state_path = models.CharField(max_length=300, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"job {self.pk} {self.name}"


class FederatedRound(models.Model):
    """One round: selection, collection, aggregation, evaluation; a new version when done."""

    class Status(models.TextChoices):
        PENDING = "pending"
        COLLECTING = "collecting"
        AGGREGATING = "aggregating"
        EVALUATING = "evaluating"
        DONE = "done"
        FAILED = "failed"

    job = models.ForeignKey(FederatedJob, on_delete=models.CASCADE, related_name="round_set")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    base_version = models.ForeignKey(
        "models_registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    weights_path = models.CharField(max_length=300, blank=True)
    weights_sha256 = models.CharField(max_length=64, blank=True)
    weights_size = models.BigIntegerField(default=0)
    selected = models.JSONField(default=list, blank=True, help_text="Device ids chosen for this round.")
    # What each chosen device reported when it was chosen: {device id: [training examples,
    # holdout examples]}. An update's weight is capped by it, so a board cannot claim more.
    selected_examples = models.JSONField(default=dict, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    opened_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    # Expiry of the aggregating worker's lease (core.leases): set when a worker claims
    # the closed round, pushed settings.ROUND_AGGREGATION_LEASE_S ahead at every
    # checkpoint, cleared when the round ends. A round whose worker died is claimed
    # again once the expiry has passed.
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # When the sweep (core.sweep) last sent the aggregation again because no live lease
    # held the round: it sends again at most once per settings.SWEEP_GRACE_S.
    redriven_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    participants = models.PositiveIntegerField(default=0)
    dropped = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField(default=0)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    # Devices eligible when the round selected its devices (the DP sampling rate).
    eligible = models.PositiveIntegerField(null=True, blank=True)
    # The group's devices at selection and how many each reason left out
    # (training.selectors.eligibility), so an operator sees why a round waits.
    funnel = models.JSONField(default=dict, blank=True)
    # The round's secret key for differential-privacy noise (32 random bytes, set when
    # the round is first aggregated with noise); never shown by any API.
    noise_key = models.BinaryField(null=True, blank=True, editable=False)
    # Seconds spent in each phase, once it ran.
    collect_s = models.FloatField(null=True, blank=True)
    aggregate_s = models.FloatField(null=True, blank=True)
    evaluate_s = models.FloatField(null=True, blank=True)
    # Storage name of the server optimiser state after this round (FedAdam/FedYogi); the
    # job takes it over when the round is done.
    server_state_path = models.CharField(max_length=300, blank=True)

    class Kind(models.TextChoices):
        TRAIN = "train"
        # After the last round, when the family has no central test set: the boards
        # evaluate the final version on their holdouts, nothing is trained.
        EVALUATE = "evaluate"

    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.TRAIN)
    accuracy = models.FloatField(null=True, blank=True)
    loss = models.FloatField(null=True, blank=True)
    confusion = models.JSONField(default=list, blank=True)
    # The round's version judged by the family's primary metric (accuracy, or mae), and
    # how: "central" (the family's test set) or "federated" (the next round's boards on
    # their holdouts: weighted mean, with the per-device spread in evaluation_detail).
    metric_name = models.CharField(max_length=20, blank=True)
    metric = models.FloatField(null=True, blank=True)
    evaluation = models.CharField(max_length=10, blank=True)
    evaluation_detail = models.JSONField(default=dict, blank=True)
    epsilon = models.FloatField(null=True, blank=True)
    version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    failure_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["job_id", "number"]
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="unique_round_number")]

    def __str__(self) -> str:
        return f"job {self.job_id} round {self.number}"

    @property
    def durations(self) -> dict[str, float]:
        """Seconds per phase (``collect_s``, ``aggregate_s``, ``evaluate_s``) that ran."""
        phases = {"collect_s": self.collect_s, "aggregate_s": self.aggregate_s, "evaluate_s": self.evaluate_s}
        return {name: seconds for name, seconds in phases.items() if seconds is not None}


class ClientUpdate(models.Model):
    """One device's upload for a round, accepted or rejected with its reason (a refusal by
    the server, or a failure the device reported)."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted"
        REJECTED = "rejected"

    round = models.ForeignKey(FederatedRound, on_delete=models.CASCADE, related_name="updates")
    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=20, choices=Status.choices)
    reason_code = models.CharField(max_length=40, blank=True)
    reason_message = models.TextField(blank=True)
    num_examples = models.PositiveIntegerField(default=0)
    bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    norm = models.FloatField(null=True, blank=True)
    # Storage name of the decoded dense float32 delta (safetensors).
    path = models.CharField(max_length=300, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    # The training runtime the device used ("torch", "ort"); empty when it did not say.
    backend = models.CharField(max_length=20, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["round_id", "id"]
        constraints = [models.UniqueConstraint(fields=["round", "device"], name="one_update_per_device")]


class PartialAggregate(models.Model):
    """Checkpoint of a round's running weighted sum and the update ids inside it.

    Written in one row update together with the ids, so a worker killed mid-aggregation
    is resumed from the last checkpoint without counting any update twice.
    """

    round = models.OneToOneField(FederatedRound, on_delete=models.CASCADE, related_name="partial")
    path = models.CharField(max_length=300)
    accepted_ids = models.JSONField(default=list)
    updated_at = models.DateTimeField(auto_now=True)


class AggregationShard(models.Model):
    """One slice of a large round's accepted updates, aggregated into a partial sum by
    its own task (``training.shard_aggregate``) on any worker.

    ``update_ids`` is fixed when the shards are made. A worker takes the shard with the
    lease on ``lease_expires_at``, checkpoints its running sum (``checkpoint_path`` with
    ``accepted_ids``) and finishes by writing the partial sum to ``path`` and ``done``
    in one conditional update under its lease: a shard's result is committed once, and
    a killed worker's shard is resumed from its checkpoint by whichever worker claims
    it next. The round's own worker merges the partial sums in shard order.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"

    round = models.ForeignKey(FederatedRound, on_delete=models.CASCADE, related_name="shards")
    index = models.PositiveIntegerField()
    update_ids = models.JSONField(default=list)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    checkpoint_path = models.CharField(max_length=300, blank=True)
    accepted_ids = models.JSONField(default=list, blank=True)
    # Storage name of the finished partial sum (a weighted-mean checkpoint).
    path = models.CharField(max_length=300, blank=True)
    # How many times a worker claimed the shard (more than one: a worker died on it).
    claims = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    aggregate_s = models.FloatField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["round_id", "index"]
        constraints = [models.UniqueConstraint(fields=["round", "index"], name="one_shard_per_index")]
