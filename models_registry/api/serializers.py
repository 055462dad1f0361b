"""Input and output shapes of the model registry's operator API."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.api import IdField, IntegerField, PrimaryKeyRelatedField
from models_registry.models import (
    Artifact,
    EvaluationDataset,
    EvaluationReport,
    ModelFamily,
    ModelJob,
    ModelVersion,
)
from models_registry.selectors import artifact_url


class ModelFamilySerializer(serializers.ModelSerializer[ModelFamily]):
    version_count = serializers.SerializerMethodField()

    class Meta:
        model = ModelFamily
        fields = [
            "id",
            "name",
            "description",
            "arch",
            "task",
            "input_shape",
            "input_dtype",
            "num_classes",
            "output_size",
            "created_at",
            "version_count",
        ]
        read_only_fields = ["id", "created_at", "version_count"]

    def get_version_count(self, obj: ModelFamily) -> int:
        annotated = getattr(obj, "version_count", None)
        return int(annotated) if annotated is not None else obj.versions.count()


class ModelFamilyCreateSerializer(serializers.Serializer[Any]):
    name = serializers.SlugField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    arch = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    task = serializers.ChoiceField(choices=ModelFamily.Task.choices, required=False, default="classification")
    input_shape = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=1 << 20), min_length=1, max_length=8
    )
    input_dtype = serializers.ChoiceField(
        choices=["float32", "int64", "uint8"], required=False, default="float32"
    )
    num_classes = serializers.IntegerField(min_value=2, max_value=10_000, required=False, allow_null=True)
    output_size = serializers.IntegerField(min_value=1, max_value=4096, required=False, allow_null=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("task", "classification") == "classification" and not attrs.get("num_classes"):
            raise serializers.ValidationError({"num_classes": "A classification family needs num_classes."})
        if attrs.get("task") == "regression" and not attrs.get("output_size"):
            raise serializers.ValidationError({"output_size": "A regression family needs output_size."})
        return attrs


class ModelFamilyUpdateSerializer(serializers.ModelSerializer[ModelFamily]):
    """Only descriptive fields change after creation: the input/output contract is fixed."""

    class Meta:
        model = ModelFamily
        fields = ["description"]


class ModelArtifactSerializer(serializers.ModelSerializer[Artifact]):
    download_url = serializers.SerializerMethodField()
    device_url = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = ["kind", "sha256", "size", "signature", "opset", "created_at", "download_url", "device_url"]

    def get_download_url(self, obj: Artifact) -> str:
        return f"/api/v1/model-versions/{obj.version_id}/artifacts/{obj.kind}/"

    def get_device_url(self, obj: Artifact) -> str:
        return artifact_url(obj.sha256)


class ModelVersionBriefSerializer(serializers.ModelSerializer[ModelVersion]):
    family = serializers.CharField(source="family.name", read_only=True)

    class Meta:
        model = ModelVersion
        fields = ["id", "label", "family", "number", "variant", "source", "stage", "created_at"]


class ModelVersionSerializer(serializers.ModelSerializer[ModelVersion]):
    family_name = serializers.CharField(source="family.name", read_only=True)
    parent_label = serializers.SerializerMethodField()
    effective_arch = serializers.CharField(read_only=True)
    artifacts = ModelArtifactSerializer(many=True, read_only=True)

    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "label",
            "family",
            "family_name",
            "number",
            "parent",
            "parent_label",
            "source",
            "source_detail",
            "variant",
            "arch",
            "effective_arch",
            "head",
            "stage",
            "metrics",
            # Whether boards without PyTorch can train it (models_registry.ort_training).
            "ort_training",
            "notes",
            "created_at",
            "artifacts",
        ]

    def get_parent_label(self, obj: ModelVersion) -> str | None:
        return obj.parent.label if obj.parent_id and obj.parent else None


class EvaluationReportSerializer(serializers.ModelSerializer[EvaluationReport]):
    class Meta:
        model = EvaluationReport
        fields = ["id", "dataset", "report", "created_at"]


class ModelVersionDetailSerializer(ModelVersionSerializer):
    ancestors = serializers.SerializerMethodField()
    children = serializers.SerializerMethodField()
    latest_evaluation = serializers.SerializerMethodField()

    class Meta(ModelVersionSerializer.Meta):
        fields = [*ModelVersionSerializer.Meta.fields, "ancestors", "children", "latest_evaluation"]

    def get_ancestors(self, obj: ModelVersion) -> list[dict[str, Any]]:
        from models_registry.selectors import version_lineage

        return list(ModelVersionBriefSerializer(version_lineage(obj), many=True).data)

    def get_children(self, obj: ModelVersion) -> list[dict[str, Any]]:
        from models_registry.selectors import version_children

        return list(ModelVersionBriefSerializer(version_children(obj), many=True).data)

    def get_latest_evaluation(self, obj: ModelVersion) -> dict[str, Any] | None:
        from models_registry.selectors import version_latest_evaluation

        report = version_latest_evaluation(obj)
        return dict(EvaluationReportSerializer(report).data) if report else None


class ModelVersionUploadSerializer(serializers.Serializer[Any]):
    family = PrimaryKeyRelatedField(queryset=ModelFamily.objects.all())
    weights = serializers.FileField(required=False, allow_empty_file=True, use_url=False)
    onnx = serializers.FileField(required=False, allow_empty_file=True, use_url=False)
    program = serializers.FileField(
        required=False,
        allow_empty_file=True,
        use_url=False,
        help_text=(
            "The trainable program: torch.export JSON, or a torch.export.save archive "
            "(only its JSON is read)."
        ),
    )
    head = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Comma-separated parameter names of the last layer (default: the last weight and bias).",
    )
    # "parent" shadows Field.parent for type checkers only: DRF's metaclass moves declared
    # fields off the class, so at run time there is no clash.
    parent = PrimaryKeyRelatedField(  # type: ignore[assignment]
        queryset=ModelVersion.objects.all(), required=False, allow_null=True
    )
    notes = serializers.CharField(required=False, allow_blank=True, default="")
    variant = serializers.CharField(required=False, max_length=50, default="fp32")
    arch = serializers.CharField(required=False, allow_blank=True, max_length=50, default="")
    weights_sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False)
    onnx_sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False)
    program_sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs.get("weights") and not attrs.get("onnx"):
            raise serializers.ValidationError(
                "Upload an ONNX model (with weights and a program to train it)."
            )
        if attrs.get("program") and not attrs.get("weights"):
            raise serializers.ValidationError({"weights": "A program needs its weights."})
        return attrs


class ModelVersionPromoteSerializer(serializers.Serializer[Any]):
    stage = serializers.ChoiceField(choices=ModelVersion.Stage.choices)
    exclusive = serializers.BooleanField(required=False, default=False)


class ModelVersionLineageSerializer(serializers.Serializer[Any]):
    version = ModelVersionBriefSerializer()
    ancestors = ModelVersionBriefSerializer(many=True)
    children = ModelVersionBriefSerializer(many=True)


class ModelJobSerializer(serializers.ModelSerializer[ModelJob]):
    version_label = serializers.CharField(source="version.label", read_only=True)

    class Meta:
        model = ModelJob
        fields = [
            "id",
            "kind",
            "status",
            "version",
            "version_label",
            "params",
            "progress",
            "log",
            "error",
            "result",
            "result_version",
            "attempts",
            "created_at",
            "started_at",
            "finished_at",
        ]


class ModelEvaluateInput(serializers.Serializer[Any]):
    dataset = serializers.CharField(
        required=False, help_text="a test data set of the family (default: the family's newest)"
    )
    latency_repeats = serializers.IntegerField(required=False, min_value=1, max_value=10_000)


class ModelExportInput(serializers.Serializer[Any]):
    atol = serializers.FloatField(
        required=False, min_value=0, max_value=1, help_text="absolute tolerance of the check (1e-4)"
    )
    rtol = serializers.FloatField(
        required=False, min_value=0, max_value=1, help_text="relative tolerance of the check (1e-3)"
    )


class ModelOptimiseInput(serializers.Serializer[Any]):
    kind = serializers.ChoiceField(
        choices=["int8_dynamic", "int8_static", "fp16", "prune_unstructured", "prune_structured", "distil"],
        help_text="prune_structured is refused (not_supported): a program fixes every layer width.",
    )
    dataset = serializers.CharField(required=False, help_text="test set (default: the family's newest)")
    train_dataset = serializers.CharField(
        required=False, help_text="train set for int8_static, pruning, distil (default: the family's newest)"
    )
    max_metric_drop = serializers.FloatField(
        required=False,
        min_value=0,
        help_text="allowed worsening of the family's primary metric (accuracy, or mae for regression)",
    )
    max_accuracy_drop = serializers.FloatField(
        required=False, min_value=0, help_text="the former name of max_metric_drop (same meaning)"
    )
    latency_repeats = serializers.IntegerField(required=False, min_value=1, max_value=10_000)
    per_channel = serializers.BooleanField(required=False)
    amount = serializers.FloatField(required=False, min_value=0, max_value=0.99)
    finetune_epochs = serializers.IntegerField(required=False, min_value=0, max_value=200)
    quantise = serializers.BooleanField(required=False)
    student_version = IdField(
        required=False, help_text="distil: the version of the same family whose program is trained"
    )
    epochs = serializers.IntegerField(required=False, min_value=1, max_value=500)
    batch_size = serializers.IntegerField(required=False, min_value=1, max_value=10_000)
    temperature = serializers.FloatField(required=False, min_value=0.01)
    alpha = serializers.FloatField(required=False, min_value=0, max_value=1)
    lr = serializers.FloatField(required=False, min_value=0)
    seed = IntegerField(required=False)


class ModelComparisonRowSerializer(serializers.Serializer[Any]):
    version_id = serializers.IntegerField()
    label = serializers.CharField()  # type: ignore[assignment]
    variant = serializers.CharField()
    source = serializers.CharField()  # type: ignore[assignment]
    stage = serializers.CharField()
    baseline_id = serializers.IntegerField()
    metric = serializers.CharField(help_text="the family's primary metric: accuracy, or mae for regression")
    metric_value = serializers.FloatField(allow_null=True)
    metric_delta = serializers.FloatField(allow_null=True, help_text="value minus the baseline's")
    metric_drop = serializers.FloatField(allow_null=True, help_text="how much worse than the baseline")
    accuracy = serializers.FloatField(allow_null=True)
    mae = serializers.FloatField(allow_null=True, required=False)
    size_bytes = serializers.IntegerField(allow_null=True)
    p50_batch1_us = serializers.FloatField(allow_null=True)
    p50_batch64_us = serializers.FloatField(allow_null=True)
    size_ratio = serializers.FloatField(allow_null=True)
    latency_ratio_b1 = serializers.FloatField(allow_null=True)
    latency_ratio_b64 = serializers.FloatField(allow_null=True)
    rejected = serializers.BooleanField()


class ModelRecommendRowSerializer(ModelComparisonRowSerializer):
    decision = serializers.CharField(required=False)
    reason = serializers.CharField(required=False)
    latency_source = serializers.ChoiceField(choices=["fleet", "server"], required=False)
    latency_samples = serializers.IntegerField(required=False)
    server_p50_batch1_us = serializers.FloatField(allow_null=True, required=False)
    fleet_p50_batch1_us = serializers.FloatField(allow_null=True, required=False)


class ModelRecommendQuery(serializers.Serializer[Any]):
    latency_budget_us = serializers.FloatField(min_value=0.001)
    max_accuracy_drop = serializers.FloatField(
        required=False,
        min_value=0,
        default=0.01,
        help_text="allowed worsening of the primary metric (accuracy drop, or mae increase for regression)",
    )
    min_accuracy = serializers.FloatField(
        required=False, min_value=0, max_value=1, allow_null=True, default=None
    )
    max_mae = serializers.FloatField(
        required=False, min_value=0, allow_null=True, default=None, help_text="regression: a ceiling on mae"
    )
    base = IdField(required=False, allow_null=True, default=None)
    device = serializers.UUIDField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Use on-device latency of this device's profile.",
    )
    profile = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Hardware profile arch:cores:accelerator whose on-device latency to use.",
    )
    min_samples = IntegerField(required=False, min_value=1, default=50)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("device") and attrs.get("profile"):
            raise serializers.ValidationError("give device or profile, not both")
        return attrs


class ModelRecommendOutput(serializers.Serializer[Any]):
    metric = serializers.CharField(required=False)
    base = ModelComparisonRowSerializer()
    recommended = ModelRecommendRowSerializer(allow_null=True)
    variants = ModelRecommendRowSerializer(many=True)
    profile = serializers.CharField(allow_null=True, required=False)


class EvaluationDatasetSerializer(serializers.ModelSerializer[EvaluationDataset]):
    family_name = serializers.CharField(source="family.name", read_only=True, default=None, allow_null=True)

    class Meta:
        model = EvaluationDataset
        fields = [
            "id",
            "name",
            "description",
            "family",
            "family_name",
            "split",
            "input_shape",
            "num_classes",
            "num_examples",
            "sha256",
            "size",
            "created_at",
        ]


@extend_schema_field(OpenApiTypes.STR)
class FamilyField(serializers.Field[ModelFamily, Any, Any, Any]):
    """A family by id or by name."""

    default_error_messages = {"missing": "No model family {value!r}."}

    def to_internal_value(self, data: Any) -> ModelFamily:
        text = str(data).strip()
        family = None
        if text.isdigit():
            family = ModelFamily.objects.filter(pk=int(text)).first()
        family = family or ModelFamily.objects.filter(name=text).first()
        if family is None:
            self.fail("missing", value=text[:100])
        assert family is not None
        return family

    def to_representation(self, value: ModelFamily) -> Any:
        return value.pk


class DatasetUploadSerializer(serializers.Serializer[Any]):
    family = FamilyField(help_text="the family (id or name) whose contract the data must fit")
    name = serializers.SlugField(max_length=100)
    split = serializers.ChoiceField(choices=EvaluationDataset.Split.choices, default="test")
    description = serializers.CharField(required=False, allow_blank=True, default="")
    file = serializers.FileField(
        allow_empty_file=True,
        use_url=False,
        help_text=(
            ".npz with arrays x and y; or CSV/Parquet with one example per row: the flattened input "
            "values, then a label column named y or label (regression: the last output_size columns)."
        ),
    )
