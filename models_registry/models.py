"""What exists: model families, their versions with lineage, artifacts and evaluations."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from devices_agent.family import FamilySpec


class ModelFamily(models.Model):
    """A line of models solving one task with one input/output contract.

    The contract, not an architecture: the task (classification with ``num_classes``
    classes, or regression with ``output_size`` outputs), the shape and dtype of one
    input example. The loss boards train with and the metrics versions are judged by
    follow from the task (``devices_agent.family``). Architectures travel with each
    version as its program artifact.
    """

    class Task(models.TextChoices):
        CLASSIFICATION = "classification"
        REGRESSION = "regression"

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    # A label for people (e.g. "1-D CNN"); nothing reads it to build a model.
    arch = models.CharField(max_length=50, blank=True)
    task = models.CharField(max_length=50, choices=Task.choices, default=Task.CLASSIFICATION)
    input_shape = models.JSONField(default=list, help_text="Shape of one input example, e.g. [3, 64].")
    input_dtype = models.CharField(max_length=10, default="float32")
    num_classes = models.PositiveIntegerField(null=True, blank=True)
    output_size = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "model families"

    def __str__(self) -> str:
        return self.name

    @property
    def spec(self) -> FamilySpec:
        """The family's contract as the boards and the evaluation read it."""
        return FamilySpec(
            task=self.task,
            input_shape=tuple(int(d) for d in self.input_shape),
            input_dtype=self.input_dtype or "float32",
            num_classes=self.num_classes if self.task == self.Task.CLASSIFICATION else None,
            output_size=self.output_size if self.task == self.Task.REGRESSION else None,
        )


class ModelVersion(models.Model):
    """One trained model. Versions are numbered per family and never change once created."""

    class Stage(models.TextChoices):
        DRAFT = "draft"
        STAGING = "staging"
        PRODUCTION = "production"
        ARCHIVED = "archived"

    class Source(models.TextChoices):
        UPLOADED = "uploaded"
        FEDERATED = "federated"
        OPTIMISED = "optimised"

    family = models.ForeignKey(ModelFamily, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.UPLOADED)
    # Where it came from, e.g. {"job": 3, "round": 7} or {"optimisation": "int8_dynamic"}.
    source_detail = models.JSONField(default=dict, blank=True)
    variant = models.CharField(max_length=50, default="fp32", help_text="fp32, fp16, int8_dynamic, ...")
    # A label for people; the architecture is the version's program artifact.
    arch = models.CharField(max_length=50, blank=True)
    # The parameters of the program's last layer, which boards personalise.
    head = models.JSONField(default=list, blank=True)
    # Whether boards without PyTorch can train this version with ONNX Runtime
    # (models_registry.ort_training): {"status": pending | ready | not_trainable | failed,
    # "reason", "op" and "node" (an operator without a gradient), "from_version" (whose
    # ort_training artifact serves it: itself, or the version a federated one descends from)}.
    # Empty: never asked.
    ort_training = models.JSONField(default=dict, blank=True)
    stage = models.CharField(max_length=20, choices=Stage.choices, default=Stage.DRAFT, db_index=True)
    # Headline numbers copied from the latest evaluation, for lists and gates.
    metrics = models.JSONField(default=dict, blank=True)
    notes = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["family_id", "-number"]
        constraints = [models.UniqueConstraint(fields=["family", "number"], name="unique_version_number")]

    def __str__(self) -> str:
        return f"{self.family.name}:v{self.number}"

    @property
    def label(self) -> str:
        return f"{self.family.name}:v{self.number}"

    @property
    def effective_arch(self) -> str:
        return self.arch or self.family.arch


class Artifact(models.Model):
    """A file belonging to a version: weights (safetensors), an inference model (ONNX), the
    trainable program, or the ONNX Runtime training artifacts built from its graph."""

    class Kind(models.TextChoices):
        WEIGHTS = "weights", "Weights by parameter name (safetensors)"
        ONNX = "onnx", "ONNX model"
        PROGRAM = "program", "Trainable program (torch.export JSON)"
        ORT_TRAINING = "ort_training", "ONNX Runtime training artifacts (tar.gz)"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    file = models.FileField(upload_to="artifacts/%Y/%m/", max_length=300)
    sha256 = models.CharField(max_length=64, db_index=True)
    size = models.BigIntegerField()
    # Ed25519 over the 32 raw bytes of the SHA-256 digest, base64.
    signature = models.CharField(max_length=100)
    opset = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["version", "kind"], name="one_artifact_per_kind")]

    def __str__(self) -> str:
        return f"{self.version}:{self.kind}:{self.sha256[:12]}"


class EvaluationReport(models.Model):
    """How a version did on a held-out data set, with latency and size on the server's CPU."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="evaluations")
    dataset = models.CharField(max_length=100)
    report = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class EvaluationDataset(models.Model):
    """A registered labelled data set of a family, stored as safetensors (``x`` and ``y``).

    ``x`` holds examples of the family's input shape and dtype; ``y`` int64 class labels
    or float32 regression targets. ``split`` says what it may be used for: ``test`` sets
    measure versions; ``train`` sets calibrate quantisation and fine-tune pruned or
    distilled variants, never measure; ``reference`` sets (or, without one, the newest
    ``train`` set) are what the boards' inputs are compared with for drift.
    """

    class Split(models.TextChoices):
        TEST = "test"
        TRAIN = "train"
        REFERENCE = "reference"

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    # The family whose contract the data was checked against (None: registered before
    # data sets belonged to a family).
    family = models.ForeignKey(
        ModelFamily, null=True, blank=True, on_delete=models.PROTECT, related_name="datasets"
    )
    split = models.CharField(max_length=10, choices=Split.choices, default=Split.TEST)
    input_shape = models.JSONField(default=list)
    num_classes = models.PositiveIntegerField(null=True, blank=True)
    num_examples = models.PositiveIntegerField()
    file = models.FileField(upload_to="datasets/", max_length=300)
    sha256 = models.CharField(max_length=64)
    size = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelJob(models.Model):
    """One evaluation, export, optimisation or ORT artifact build of a version: a row with a lifecycle.

    The Celery task only carries the id; everything the dashboard shows (status,
    progress, log, error, result) lives here.
    """

    class Kind(models.TextChoices):
        EVALUATE = "evaluate"
        EXPORT = "export"
        OPTIMISE = "optimise"
        ORT_TRAINING = "ort_training", "ORT training artifacts"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="jobs")
    params = models.JSONField(default=dict, blank=True)
    progress = models.FloatField(default=0.0)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)
    result_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    attempts = models.PositiveIntegerField(default=0)
    # Until when the worker running the job holds it (core.leases); past it, the job is
    # taken over by a redelivery or re-sent by the sweep (core.sweep, jobs_redrive).
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # When the sweep last sent the job's task again (at most once per settings.SWEEP_GRACE_S).
    redriven_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk} ({self.status})"
