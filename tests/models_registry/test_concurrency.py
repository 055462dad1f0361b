from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection

from models_registry import services
from models_registry.models import ModelVersion


@pytest.mark.django_db(transaction=True)
def test_concurrent_uploads_get_distinct_numbers(family: Any, mlp_safetensors: bytes) -> None:
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            barrier.wait(timeout=10)
            services.version_create(family=family, weights=mlp_safetensors)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=upload) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    numbers = sorted(ModelVersion.objects.filter(family=family).values_list("number", flat=True))
    assert numbers == [1, 2, 3]
