from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from config.demo.nets import initial_weights
from devices_agent.codecs import encode_tensors


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
def isolated_storage(request: pytest.FixtureRequest, settings: Any, tmp_path: Any) -> Any:
    """Each test stores artifacts in its own directory (live-stack tests share the servers')."""
    if "live_stack" in request.fixturenames:
        return None
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


@pytest.fixture(scope="session")
def demo_artifacts() -> tuple[bytes, bytes]:
    """The demo digits MLP (trained on 300 examples) as safetensors and ONNX bytes."""
    from config.demo.seed import demo_train_weights
    from devices_agent.data import load_digits_split
    from models_registry.ml.export import export_onnx

    weights = demo_train_weights()
    _, _, x_test, _ = load_digits_split(seed=0)
    onnx = export_onnx(arch="mlp", weights=weights, sample_inputs=x_test[:64]).onnx_bytes
    return encode_tensors(weights, metadata={"arch": "mlp"}), onnx


@pytest.fixture
def trained_version(family: Any, demo_artifacts: tuple[bytes, bytes]) -> Any:
    from models_registry.services import version_create

    weights, onnx = demo_artifacts
    return version_create(family=family, weights=weights, onnx=onnx)
