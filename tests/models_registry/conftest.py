from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.bundles import digits_bundle, digits_weights

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="session")
def digits() -> Digits:
    from devices_agent.data import load_digits_split

    return load_digits_split(seed=0)


@pytest.fixture(scope="session")
def mlp_bundle() -> Any:
    """The digits MLP with seeded initial weights: program, weights and ONNX."""
    return digits_bundle("mlp")


@pytest.fixture(scope="session")
def trained_bundle() -> Any:
    """The digits MLP briefly trained on 300 examples: program, weights and ONNX."""
    return digits_bundle("mlp", trained=True)


@pytest.fixture(scope="session")
def mlp_weights() -> dict[str, np.ndarray]:
    return digits_weights("mlp")


@pytest.fixture(scope="session")
def mlp_safetensors(mlp_bundle: Any) -> bytes:
    return bytes(mlp_bundle.weights)


@pytest.fixture(scope="session")
def mlp_onnx(mlp_bundle: Any) -> bytes:
    return bytes(mlp_bundle.onnx)


@pytest.fixture(scope="session")
def mlp_program(mlp_bundle: Any) -> bytes:
    return bytes(mlp_bundle.program)


@pytest.fixture
def family(db: Any) -> Any:
    from config.demo.nets import spec_fields
    from models_registry.services import family_create

    return family_create(name="digits-mlp", arch="mlp", actor=None, **spec_fields("mlp"))


@pytest.fixture
def family_datasets(family: Any) -> tuple[Any, Any]:
    """The family's digits test split (360 examples) and a 300-example train slice."""
    from config.demo.seed import digits_datasets

    return digits_datasets(family=family)


@pytest.fixture
def trained_version(family: Any, family_datasets: Any, trained_bundle: Any) -> Any:
    """A version of the trained MLP with all three artifacts, its family's data sets registered."""
    from models_registry.services import version_create

    return version_create(
        family=family,
        weights=trained_bundle.weights,
        onnx=trained_bundle.onnx,
        program=trained_bundle.program,
        head=trained_bundle.head,
    )


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


def _files_under(settings: Any, folder: str) -> set[str]:
    from pathlib import Path

    root = Path(settings.STORAGES["default"]["OPTIONS"]["location"]) / folder
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture
def stored_files(settings: Any) -> Any:
    """Names of every file under the storage's artifacts/ directory, for leak checks."""
    return lambda: _files_under(settings, "artifacts")


@pytest.fixture
def stored_datasets(settings: Any) -> Any:
    """Names of every file under the storage's datasets/ directory, for leak checks."""
    return lambda: _files_under(settings, "datasets")


@pytest.fixture(scope="session")
def regression_bundle() -> Any:
    """A small regression net: 4 inputs -> 2 targets (a linear map), as an upload bundle."""
    import torch

    from devices_agent.program import make_bundle

    class Regressor(torch.nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(4, 16)
            self.out = torch.nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.hidden(x)))  # type: ignore[no-any-return, unused-ignore]

    x, y = regression_data(400, seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Regressor()
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
    return make_bundle(model, torch.zeros((2, 4)))


def regression_data(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [n, 4] and targets [n, 2] of a fixed linear map."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    weight = np.array([[1.0, -0.5], [0.5, 0.25], [-1.0, 0.75], [0.2, 0.1]], dtype=np.float32)
    return x, (x @ weight).astype(np.float32)


@pytest.fixture
def regression_version(db: Any, regression_bundle: Any) -> Any:
    """A regression family with test and train sets, and a version of the small net."""
    from models_registry.datasets import dataset_register
    from models_registry.services import family_create, version_create

    family = family_create(name="regress", task="regression", input_shape=[4], output_size=2)
    for split, seed in (("test", 1), ("train", 2)):
        x, y = regression_data(200, seed=seed)
        dataset_register(name=f"regress-{split}", x=x, y=y, family=family, split=split)
    return version_create(
        family=family,
        weights=regression_bundle.weights,
        onnx=regression_bundle.onnx,
        program=regression_bundle.program,
        head=regression_bundle.head,
    )
