from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from devices_agent.codecs import encode_tensors
from devices_agent.nets import initial_weights


@pytest.fixture(scope="session")
def mlp_weights() -> dict[str, np.ndarray]:
    return initial_weights("mlp", seed=0)


@pytest.fixture(scope="session")
def mlp_safetensors(mlp_weights: dict[str, np.ndarray]) -> bytes:
    return encode_tensors(mlp_weights, metadata={"arch": "mlp"})


@pytest.fixture(scope="session")
def mlp_onnx(mlp_weights: dict[str, np.ndarray]) -> bytes:
    from models_registry.ml.export import export_onnx

    sample = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    return export_onnx(arch="mlp", weights=mlp_weights, sample_inputs=sample).onnx_bytes


@pytest.fixture
def family(db: Any) -> Any:
    from models_registry.services import family_create

    return family_create(name="digits-mlp", arch="mlp", input_shape=[64], num_classes=10, actor=None)


@pytest.fixture(autouse=True)
def isolated_storage(settings: Any, tmp_path: Any) -> Any:
    """Each test stores artifacts and its signing key in its own directory."""
    storages = dict(settings.STORAGES)
    storages["default"] = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(tmp_path / "storage")},
    }
    settings.STORAGES = storages
    return tmp_path / "storage"


@pytest.fixture
def stored_files(settings: Any) -> Any:
    """Names of every file under the storage's artifacts/ directory, for leak checks."""
    from pathlib import Path

    def names() -> set[str]:
        root = Path(settings.STORAGES["default"]["OPTIONS"]["location"]) / "artifacts"
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()

    return names
