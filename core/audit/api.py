from django_filters import rest_framework as filters
from rest_framework import serializers, viewsets

from core.api import FilterSet
from core.audit.models import AuditEvent
from core.audit.selectors import audit_event_list


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "actor_name",
            "action",
            "target_type",
            "target_id",
            "data",
            "remote_addr",
        ]


class AuditEventFilter(FilterSet):
    since = filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ["action", "target_type", "target_id", "actor_name"]


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet[AuditEvent]):
    """The audit log: every operator write, newest first. Admins only."""

    serializer_class = AuditEventSerializer
    filterset_class = AuditEventFilter
    required_role = "admin"
    ordering_fields = ["created_at"]

    def get_queryset(self):
        return audit_event_list()
