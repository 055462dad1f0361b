"""Input and output shapes of the model registry's operator API."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from models_registry.models import Artifact, EvaluationReport, ModelFamily, ModelVersion
from models_registry.selectors import artifact_url


class FamilySerializer(serializers.ModelSerializer[ModelFamily]):
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
            "num_classes",
            "created_at",
            "version_count",
        ]
        read_only_fields = ["id", "created_at", "version_count"]

    def get_version_count(self, obj: ModelFamily) -> int:
        annotated = getattr(obj, "version_count", None)
        return int(annotated) if annotated is not None else obj.versions.count()


class FamilyCreateSerializer(serializers.Serializer[Any]):
    name = serializers.SlugField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    arch = serializers.CharField(max_length=50)
    task = serializers.CharField(max_length=50, required=False, default="classification")
    input_shape = serializers.ListField(child=serializers.IntegerField(min_value=1), min_length=1)
    num_classes = serializers.IntegerField(min_value=2)


class FamilyUpdateSerializer(serializers.ModelSerializer[ModelFamily]):
    """Only descriptive fields change after creation: the input/output contract is fixed."""

    class Meta:
        model = ModelFamily
        fields = ["description"]


class ArtifactSerializer(serializers.ModelSerializer[Artifact]):
    download_url = serializers.SerializerMethodField()
    device_url = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = ["kind", "sha256", "size", "signature", "opset", "created_at", "download_url", "device_url"]

    def get_download_url(self, obj: Artifact) -> str:
        return f"/api/v1/model-versions/{obj.version_id}/artifacts/{obj.kind}/"

    def get_device_url(self, obj: Artifact) -> str:
        return artifact_url(obj.sha256)


class VersionBriefSerializer(serializers.ModelSerializer[ModelVersion]):
    family = serializers.CharField(source="family.name", read_only=True)

    class Meta:
        model = ModelVersion
        fields = ["id", "label", "family", "number", "variant", "source", "stage", "created_at"]


class VersionSerializer(serializers.ModelSerializer[ModelVersion]):
    family_name = serializers.CharField(source="family.name", read_only=True)
    parent_label = serializers.SerializerMethodField()
    effective_arch = serializers.CharField(read_only=True)
    artifacts = ArtifactSerializer(many=True, read_only=True)

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
            "stage",
            "metrics",
            "notes",
            "created_at",
            "artifacts",
        ]

    def get_parent_label(self, obj: ModelVersion) -> str | None:
        return obj.parent.label if obj.parent_id and obj.parent else None


class EvaluationSerializer(serializers.ModelSerializer[EvaluationReport]):
    class Meta:
        model = EvaluationReport
        fields = ["id", "dataset", "report", "created_at"]


class VersionDetailSerializer(VersionSerializer):
    children = serializers.SerializerMethodField()
    latest_evaluation = serializers.SerializerMethodField()

    class Meta(VersionSerializer.Meta):
        fields = [*VersionSerializer.Meta.fields, "children", "latest_evaluation"]

    def get_children(self, obj: ModelVersion) -> list[dict[str, Any]]:
        from models_registry.selectors import version_children

        return list(VersionBriefSerializer(version_children(obj), many=True).data)

    def get_latest_evaluation(self, obj: ModelVersion) -> dict[str, Any] | None:
        from models_registry.selectors import version_latest_evaluation

        report = version_latest_evaluation(obj)
        return dict(EvaluationSerializer(report).data) if report else None


class VersionUploadSerializer(serializers.Serializer[Any]):
    family = serializers.PrimaryKeyRelatedField(queryset=ModelFamily.objects.all())
    weights = serializers.FileField(required=False, allow_empty_file=True, use_url=False)
    onnx = serializers.FileField(required=False, allow_empty_file=True, use_url=False)
    # "parent" shadows Field.parent for type checkers only: DRF's metaclass moves declared
    # fields off the class, so at run time there is no clash.
    parent = serializers.PrimaryKeyRelatedField(  # type: ignore[assignment]
        queryset=ModelVersion.objects.all(), required=False, allow_null=True
    )
    notes = serializers.CharField(required=False, allow_blank=True, default="")
    variant = serializers.CharField(required=False, max_length=50, default="fp32")
    arch = serializers.CharField(required=False, allow_blank=True, max_length=50, default="")
    weights_sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False)
    onnx_sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs.get("weights") and not attrs.get("onnx"):
            raise serializers.ValidationError("Upload weights (safetensors), an ONNX model, or both.")
        return attrs


class PromoteSerializer(serializers.Serializer[Any]):
    stage = serializers.ChoiceField(choices=ModelVersion.Stage.choices)
    exclusive = serializers.BooleanField(required=False, default=False)


class LineageSerializer(serializers.Serializer[Any]):
    version = VersionBriefSerializer()
    ancestors = VersionBriefSerializer(many=True)
    children = VersionBriefSerializer(many=True)
