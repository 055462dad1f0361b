"""Operator API of the model registry: families, versions, uploads, promotion, downloads, data sets.

Roles: viewers read everything and download artifacts; operators create families, upload
versions and data sets, and move versions between draft, staging and archived; promoting
a version to production needs an admin.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Count
from django.http import StreamingHttpResponse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import (
    ConflictError,
    FilterSet,
    NotFoundError,
    client_ip,
)
from core.audit.services import audit_record
from core.parsers import FormParser, JSONParser, MultiPartParser
from core.roles import ADMIN, has_role
from models_registry import datasets, jobs, selectors, services
from models_registry.api import serializers as s
from models_registry.api.uploads import artifact_upload_handlers, dataset_upload_handlers
from models_registry.models import Artifact, EvaluationDataset, ModelFamily, ModelJob, ModelVersion


@extend_schema_view(
    create=extend_schema(request=s.ModelFamilyCreateSerializer, responses={201: s.ModelFamilySerializer}),
    update=extend_schema(request=s.ModelFamilyUpdateSerializer, responses=s.ModelFamilySerializer),
    partial_update=extend_schema(request=s.ModelFamilyUpdateSerializer, responses=s.ModelFamilySerializer),
)
class ModelFamilyViewSet(viewsets.ModelViewSet[ModelFamily]):
    """Model families: a name, an architecture and the input/output contract of its versions."""

    serializer_class = s.ModelFamilySerializer
    search_fields = ["name", "description"]
    ordering_fields = ["name", "created_at"]
    filterset_fields = ["arch", "task"]

    def get_queryset(self):
        return selectors.family_list().annotate(version_count=Count("versions"))

    def get_serializer_class(self):
        if self.action in ("update", "partial_update"):
            return s.ModelFamilyUpdateSerializer
        return s.ModelFamilySerializer

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.ModelFamilyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        family = services.family_create(actor=request.user, **data.validated_data)
        return Response(s.ModelFamilySerializer(family).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        family = self.get_object()
        data = s.ModelFamilyUpdateSerializer(family, data=request.data, partial=kwargs.get("partial", False))
        data.is_valid(raise_exception=True)
        with transaction.atomic():
            data.save()
            audit_record(
                actor=request.user,
                action="model_family.update",
                target=family,
                data=dict(data.validated_data),
                remote_addr=client_ip(request),
            )
        return Response(s.ModelFamilySerializer(family).data)

    @extend_schema(responses=s.ModelComparisonRowSerializer(many=True))
    @action(detail=True, methods=["get"])
    def comparison(self, request: Request, pk: str | None = None) -> Response:
        """The family's evaluated variants: accuracy, size, latency and ratios to their fp32 base."""
        family = self.get_object()
        include_archived = request.query_params.get("include_archived") in ("1", "true", "yes")
        return Response(selectors.family_comparison(family, include_archived=include_archived))

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        family = self.get_object()
        with transaction.atomic():
            if family.versions.exists():
                raise ConflictError(
                    "A family with versions cannot be deleted; archive its versions instead.",
                    code="family_has_versions",
                )
            audit_record(
                actor=request.user,
                action="model_family.delete",
                target=family,
                data={"name": family.name},
                remote_addr=client_ip(request),
            )
            family.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class VersionFilter(FilterSet):
    family_name = filters.CharFilter(field_name="family__name")

    class Meta:
        model = ModelVersion
        fields = ["family", "stage", "source", "variant", "parent"]


class ModelVersionViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet[ModelVersion],
):
    """Model versions: immutable trained models with their artifacts and lineage."""

    serializer_class = s.ModelVersionSerializer
    filterset_class = VersionFilter
    ordering_fields = ["created_at", "number"]
    parser_classes = [JSONParser, MultiPartParser, FormParser]

    def initialize_request(self, request: Any, *args: Any, **kwargs: Any) -> Request:
        # Upload handlers must be in place before anything reads the body.
        if request.method == "POST":
            request.upload_handlers = artifact_upload_handlers(request)
        return super().initialize_request(request, *args, **kwargs)

    def get_queryset(self):
        return selectors.version_list()

    def get_serializer_class(self):
        if self.action == "retrieve":
            return s.ModelVersionDetailSerializer
        return s.ModelVersionSerializer

    @extend_schema(
        request={"multipart/form-data": s.ModelVersionUploadSerializer},
        responses={
            201: s.ModelVersionSerializer,
            400: OpenApiResponse(
                description="invalid file, pickle_rejected, digest_mismatch, shape_mismatch"
            ),
            413: OpenApiResponse(description="too_large"),
        },
        description=(
            "Upload a new version: `onnx` (what boards run), and to train it on the boards also "
            "`weights` (safetensors by parameter name) and `program` (torch.export JSON; "
            "`devices_agent.program.make_bundle` writes all three). Optional `head` and "
            "`*_sha256` digests the server checks. Pickle (torch.save) is never loaded."
        ),
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.ModelVersionUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        head = [name.strip() for name in v.get("head", "").split(",") if name.strip()]
        version = services.version_create(
            family=v["family"],
            weights=v.get("weights"),
            onnx=v.get("onnx"),
            program=v.get("program"),
            head=head,
            parent=v.get("parent"),
            notes=v.get("notes", ""),
            variant=v.get("variant") or "fp32",
            arch=v.get("arch", ""),
            source=ModelVersion.Source.UPLOADED,
            source_detail={"uploaded_by": getattr(request.user, "username", "")},
            declared_sha256={
                "weights": v.get("weights_sha256", ""),
                "onnx": v.get("onnx_sha256", ""),
                "program": v.get("program_sha256", ""),
            },
            actor=request.user,
        )
        fresh = selectors.version_get(version.pk)
        return Response(s.ModelVersionSerializer(fresh).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.ModelVersionPromoteSerializer, responses=s.ModelVersionSerializer)
    @action(detail=True, methods=["post"])
    def promote(self, request: Request, pk: str | None = None) -> Response:
        """Move the version to another stage (production needs the admin role)."""
        version = self.get_object()
        data = s.ModelVersionPromoteSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        stage = data.validated_data["stage"]
        if stage == ModelVersion.Stage.PRODUCTION and not has_role(request.user, ADMIN):
            raise PermissionDenied("Promoting a version to production needs the admin role.")
        services.version_promote(
            version=version, stage=stage, exclusive=data.validated_data["exclusive"], actor=request.user
        )
        return Response(s.ModelVersionSerializer(selectors.version_get(version.pk)).data)

    @extend_schema(
        parameters=[OpenApiParameter("kind", str, OpenApiParameter.PATH, enum=list(Artifact.Kind.values))],
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    @action(detail=True, methods=["get"], url_path=r"artifacts/(?P<kind>[a-z0-9_]+)")
    def artifact(self, request: Request, pk: str | None = None, kind: str = "") -> StreamingHttpResponse:
        """Download one of the version's artifacts."""
        version = self.get_object()
        artifact = selectors.artifact_for_version(version.pk, kind)
        if artifact is None:
            raise NotFoundError(f"{version.label} has no {kind} artifact.", code="not_found")
        extension = services.artifact_extension(kind)
        response = StreamingHttpResponse(
            selectors.artifact_chunks(artifact), content_type="application/octet-stream"
        )
        response["Content-Length"] = str(artifact.size)
        response["ETag"] = f'"{artifact.sha256}"'
        response["X-Artifact-Signature"] = artifact.signature
        filename = f"{version.family.name}-v{version.number}.{extension}"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response

    def _enqueue(self, request: Request, kind: str, input_class: Any) -> Response:
        version = self.get_object()
        data = input_class(data=request.data)
        data.is_valid(raise_exception=True)
        job = jobs.job_enqueue(
            kind=kind, version=version, params=dict(data.validated_data), actor=request.user
        )
        return Response(s.ModelJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=s.ModelEvaluateInput, responses={202: s.ModelJobSerializer})
    @action(detail=True, methods=["post"])
    def evaluate(self, request: Request, pk: str | None = None) -> Response:
        """Queue an evaluation on the family's newest test set (or the one named).

        A family without a test set is evaluated on the boards (federated): 400 ``no_dataset``.
        """
        return self._enqueue(request, ModelJob.Kind.EVALUATE, s.ModelEvaluateInput)

    @extend_schema(request=s.ModelExportInput, responses={202: s.ModelJobSerializer})
    @action(detail=True, methods=["post"])
    def export(self, request: Request, pk: str | None = None) -> Response:
        """Queue an ONNX graph for a version with weights and a program but no ONNX.

        The weights are written into the nearest ancestor's graph by name and checked
        against the program on sample inputs (the numbers are in a failure).
        """
        return self._enqueue(request, ModelJob.Kind.EXPORT, s.ModelExportInput)

    @extend_schema(request=s.ModelOptimiseInput, responses={202: s.ModelJobSerializer})
    @action(detail=True, methods=["post"])
    def optimise(self, request: Request, pk: str | None = None) -> Response:
        """Queue an optimised variant (int8, fp16, pruned, distilled), registered and evaluated.

        A variant more than ``max_metric_drop`` worse on the family's primary metric
        (accuracy, or mae for regression) than its parent is kept, marked rejected.
        """
        return self._enqueue(request, ModelJob.Kind.OPTIMISE, s.ModelOptimiseInput)

    @extend_schema(request=None, responses={202: s.ModelJobSerializer, 200: s.ModelVersionSerializer})
    @action(detail=True, methods=["post"], url_path="ort-training")
    def ort_training(self, request: Request, pk: str | None = None) -> Response:
        """Build the version's ONNX Runtime training artifacts, for boards without PyTorch.

        202 with the queued (or running) job; 200 with the version when its artifacts are
        built or its graph is known not to be trainable (``ort_training`` says which).
        """
        from models_registry.jobs import ort_training_request

        version = self.get_object()
        job = ort_training_request(version=version, actor=request.user)
        if job is None:
            return Response(s.ModelVersionSerializer(selectors.version_get(version.pk)).data)
        return Response(s.ModelJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses=s.ModelVersionLineageSerializer)
    @action(detail=True, methods=["get"])
    def lineage(self, request: Request, pk: str | None = None) -> Response:
        """The version's ancestors (parent first) and direct children."""
        version = self.get_object()
        body = {
            "version": version,
            "ancestors": selectors.version_lineage(version),
            "children": list(selectors.version_children(version)),
        }
        return Response(s.ModelVersionLineageSerializer(body).data)


class ModelJobViewSet(viewsets.ReadOnlyModelViewSet[ModelJob]):
    """Evaluation, export and optimisation jobs with their status, progress, log and result."""

    serializer_class = s.ModelJobSerializer
    filterset_fields = ["kind", "status", "version"]
    ordering_fields = ["created_at"]

    def get_queryset(self):
        return ModelJob.objects.select_related("version", "version__family").order_by("-created_at", "-id")


class DatasetFilter(FilterSet):
    family_name = filters.CharFilter(field_name="family__name")

    class Meta:
        model = EvaluationDataset
        fields = ["split", "family"]


class EvaluationDatasetViewSet(viewsets.ReadOnlyModelViewSet[EvaluationDataset]):
    """Registered data sets (test, train, reference), read-only: the former route of ``datasets/``."""

    serializer_class = s.EvaluationDatasetSerializer
    filterset_class = DatasetFilter

    def get_queryset(self):
        return EvaluationDataset.objects.select_related("family").order_by("name")


class DatasetViewSet(mixins.CreateModelMixin, EvaluationDatasetViewSet):
    """A family's data sets: ``test`` sets evaluate versions, ``train`` sets calibrate and
    fine-tune variants, ``reference`` sets (else the newest ``train`` set) are what drift is
    measured against."""

    parser_classes = [MultiPartParser, FormParser]

    def initialize_request(self, request: Any, *args: Any, **kwargs: Any) -> Request:
        # Upload handlers must be in place before anything reads the body.
        if request.method == "POST":
            request.upload_handlers = dataset_upload_handlers(request)
        return super().initialize_request(request, *args, **kwargs)

    @extend_schema(
        request={"multipart/form-data": s.DatasetUploadSerializer},
        responses={
            201: s.EvaluationDatasetSerializer,
            400: OpenApiResponse(
                description=(
                    "invalid_dataset, wrong_shape, non_finite, label_out_of_range, invalid_label, "
                    "pickle_rejected, invalid_split, validation_error"
                )
            ),
            409: OpenApiResponse(description="dataset_exists"),
            413: OpenApiResponse(description="too_large (DATASET_MAX_BYTES)"),
        },
        description=(
            "Register a data set of a family from an `.npz` (arrays `x` and `y`), CSV or Parquet file "
            "(one example per row: the flattened input values, then a label column named `y` or "
            "`label`; for regression the last `output_size` columns are the targets; CSV needs a "
            "header row). Checked against the family's contract: input shape and dtype, finite "
            "values, labels in range or targets of the right width. Pickle is never loaded."
        ),
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.DatasetUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        upload = v["file"]
        dataset = datasets.dataset_upload(
            family=v["family"],
            name=v["name"],
            split=v["split"],
            description=v.get("description", ""),
            file=upload,
            filename=getattr(upload, "name", "") or "",
            actor=request.user,
        )
        return Response(s.EvaluationDatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)


class SigningKeyOutput(s.serializers.Serializer[Any]):
    algorithm = s.serializers.CharField()
    public_key = s.serializers.CharField()


class SigningKeyApi(APIView):
    """The artifact-signing public key (Ed25519, raw 32 bytes, base64) that agents pin."""

    @extend_schema(responses=SigningKeyOutput)
    def get(self, request: Request) -> Response:
        return Response({"algorithm": "ed25519", "public_key": selectors.signing_public_key_b64()})
