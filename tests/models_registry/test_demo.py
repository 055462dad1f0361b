from __future__ import annotations

from typing import Any

import pytest

from models_registry.models import ModelVersion

pytestmark = pytest.mark.django_db


def test_seed_demo_registers_a_production_model_once(capsys: Any) -> None:
    from config.demo.__main__ import main
    from devices_agent.data import load_digits_split
    from models_registry.ml.evaluate import run_onnx
    from models_registry.selectors import artifact_for_version

    assert main(["seed"]) == 0
    assert main(["seed"]) == 0
    versions = list(ModelVersion.objects.filter(family__name="digits-mlp"))
    assert len(versions) == 1
    version = versions[0]
    assert version.stage == "production" and version.number == 1
    onnx = artifact_for_version(version.pk, "onnx")
    assert onnx is not None and artifact_for_version(version.pk, "weights") is not None
    _, _, x_test, y_test = load_digits_split(seed=0)
    with onnx.file.open("rb") as handle:
        logits = run_onnx(handle.read(), x_test)
    accuracy = float((logits.argmax(axis=1) == y_test).mean())
    # 300 examples are enough for a clearly working model, with room left for federated rounds.
    assert 0.8 < accuracy < 0.99
    output = capsys.readouterr().out
    assert "digits-mlp:v1 is in production" in output
    # The CNN family is seeded once too, on the same slice, in staging (the fleet runs the MLP).
    assert "digits-cnn:v1 is in staging" in output
    cnns = list(ModelVersion.objects.filter(family__name="digits-cnn"))
    assert len(cnns) == 1
    cnn = cnns[0]
    assert cnn.stage == "staging" and cnn.number == 1 and cnn.effective_arch == "cnn"
    cnn_onnx = artifact_for_version(cnn.pk, "onnx")
    assert cnn_onnx is not None and artifact_for_version(cnn.pk, "weights") is not None
    with cnn_onnx.file.open("rb") as handle:
        cnn_logits = run_onnx(handle.read(), x_test)
    assert float((cnn_logits.argmax(axis=1) == y_test).mean()) > 0.8
    from models_registry.models import EvaluationDataset

    splits = dict(EvaluationDataset.objects.values_list("name", "split"))
    assert splits == {
        "digits-mlp-test": "test",
        "digits-mlp-train": "train",
        "digits-cnn-test": "test",
        "digits-cnn-train": "train",
    }
    # Each family's data sets belong to it and fit its contract.
    owners = dict(EvaluationDataset.objects.values_list("name", "family__name"))
    assert owners["digits-cnn-test"] == "digits-cnn" and owners["digits-mlp-train"] == "digits-mlp"


def test_seed_demo_makes_the_production_model_the_fleet_group_release() -> None:
    from config.demo.seed import DEMO_GROUP, seed_demo
    from fleet.models import DeviceGroup, GroupReleaseChange

    said: list[str] = []
    seed_demo(admin_username="demo-admin", admin_password="pw-Flotilla-1", devices=2, say=said.append)
    seed_demo(admin_username="demo-admin", admin_password="pw-Flotilla-1", devices=2, say=said.append)
    group = DeviceGroup.objects.select_related("release_version__family").get(name=DEMO_GROUP)
    assert group.release_version is not None and group.release_version.label == "digits-mlp:v1"
    assert group.release_version.stage == "production" and group.release_set_by == "demo-admin"
    assert GroupReleaseChange.objects.filter(group=group).count() == 1  # set once, however often seeded
    assert any("release of demo-fleet" in line for line in said)
