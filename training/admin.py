"""Admin: federated jobs, rounds, client updates, aggregation shards (read-mostly: services write)."""

from __future__ import annotations

from django.contrib import admin

from training.models import AggregationShard, ClientUpdate, FederatedJob, FederatedRound, PartialAggregate


@admin.register(FederatedJob)
class FederatedJobAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "family",
        "status",
        "current_round",
        "rounds",
        "strategy",
        "codec",
        "best_accuracy",
    ]
    list_filter = ["status", "strategy", "codec"]
    search_fields = ["name"]
    raw_id_fields = ["base_version", "best_version"]
    readonly_fields = [
        "status",
        "current_round",
        "consecutive_failures",
        "best_version",
        "best_accuracy",
        "error",
    ]


@admin.register(FederatedRound)
class FederatedRoundAdmin(admin.ModelAdmin):
    list_display = ["job", "number", "status", "participants", "dropped", "rejected", "accuracy", "version"]
    list_filter = ["status"]
    raw_id_fields = ["job", "base_version", "version"]
    readonly_fields = [f.name for f in FederatedRound._meta.fields]


@admin.register(ClientUpdate)
class ClientUpdateAdmin(admin.ModelAdmin):
    list_display = [
        "round",
        "device",
        "status",
        "reason_code",
        "num_examples",
        "bytes",
        "norm",
        "received_at",
    ]
    list_filter = ["status", "reason_code"]
    raw_id_fields = ["round", "device"]
    readonly_fields = [f.name for f in ClientUpdate._meta.fields]


@admin.register(PartialAggregate)
class PartialAggregateAdmin(admin.ModelAdmin):
    list_display = ["round", "path", "updated_at"]
    raw_id_fields = ["round"]


@admin.register(AggregationShard)
class AggregationShardAdmin(admin.ModelAdmin):
    list_display = ["round", "index", "status", "claims", "worker", "aggregate_s", "updated_at"]
    list_filter = ["status"]
    raw_id_fields = ["round"]
    readonly_fields = [f.name for f in AggregationShard._meta.fields]
