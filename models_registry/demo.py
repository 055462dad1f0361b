"""The demo models: a digits MLP (production v1) and a digits CNN (staging v1), each trained in seconds."""

from __future__ import annotations

from typing import Any

import numpy as np
from django.db import transaction

from devices_agent.codecs import encode_tensors
from models_registry import services
from models_registry.models import ModelFamily, ModelVersion

DEMO_FAMILY = "digits-mlp"
DEMO_ARCH = "mlp"
DEMO_CNN_FAMILY = "digits-cnn"
DEMO_CNN_ARCH = "cnn"
# Adam converges on the small CNN in a few epochs; more buys little on 300 examples.
DEMO_CNN_EPOCHS = 10


def demo_train_weights(
    *, examples: int = 300, epochs: int = 40, seed: int = 0, arch: str = DEMO_ARCH
) -> dict[str, np.ndarray]:
    """Train ``arch`` (default the digits MLP) on the first ``examples`` of the training split.

    Fixed seed, one torch thread.

    A deliberately small, public slice: the demo's federated rounds then have room to
    improve on it with the devices' own partitions.
    """
    from devices_agent.data import load_digits_split
    from devices_agent.local_train import apply_delta, train_local
    from devices_agent.nets import initial_weights

    x_train, y_train, _, _ = load_digits_split(seed=seed)
    start = initial_weights(arch, seed=seed)
    result = train_local(
        arch=arch,
        global_weights=start,
        x=x_train[:examples],
        y=y_train[:examples],
        epochs=epochs,
        batch_size=32,
        lr=0.01,
        optimizer="adam",
        seed=seed,
        num_threads=1,
    )
    return apply_delta(start, result.delta)


def registry_seed_demo(*, examples: int = 300, seed: int = 0, actor: Any = None) -> ModelVersion:
    """Make sure family ``digits-mlp`` exists with a production version; return that version.

    Family ``digits-cnn`` gets a staging v1 trained on the same public slice (see
    :func:`registry_seed_demo_cnn`), so the demo can compare architectures; the demo fleet
    keeps running the MLP. The digits test split and calibration slice are registered as
    data sets too.
    Idempotent: when the family already has a production version nothing is trained or
    written. Otherwise the MLP is trained (:func:`demo_train_weights`), exported to ONNX
    with a parity check, registered with both artifacts and promoted to production.
    """
    from devices_agent.data import load_digits_split
    from models_registry.datasets import dataset_register_digits_test, dataset_register_digits_train
    from models_registry.ml.export import export_onnx

    # The held-out test split and the public calibration slice: evaluation and
    # optimisation jobs of the demo model use them.
    dataset_register_digits_test(seed=seed, actor=actor)
    dataset_register_digits_train(seed=seed, actor=actor)
    family = ModelFamily.objects.filter(name=DEMO_FAMILY).first()
    if family is not None:
        existing = family.versions.filter(stage=ModelVersion.Stage.PRODUCTION).order_by("number").first()
        if existing is not None:
            registry_seed_demo_cnn(examples=examples, seed=seed, actor=actor)
            return existing
    weights = demo_train_weights(examples=examples, seed=seed)
    _, _, x_test, _ = load_digits_split(seed=seed)
    exported = export_onnx(arch=DEMO_ARCH, weights=weights, sample_inputs=x_test[:64])
    with transaction.atomic():
        family = ModelFamily.objects.filter(name=DEMO_FAMILY).first() or services.family_create(
            name=DEMO_FAMILY,
            arch=DEMO_ARCH,
            input_shape=[64],
            num_classes=10,
            description="scikit-learn digits (8x8 pixels scaled to [0, 1]), 64 -> 64 -> 64 -> 10 MLP.",
            actor=actor,
        )
        version = services.version_create(
            family=family,
            weights=encode_tensors(weights, metadata={"arch": DEMO_ARCH}),
            onnx=exported.onnx_bytes,
            source=ModelVersion.Source.UPLOADED,
            source_detail={"demo": True, "examples": examples, "seed": seed},
            notes=f"Demo baseline: trained on {examples} examples of the digits training split.",
            actor=actor,
        )
        services.version_promote(version=version, stage=ModelVersion.Stage.STAGING, actor=actor)
        production = services.version_promote(
            version=version, stage=ModelVersion.Stage.PRODUCTION, actor=actor
        )
    registry_seed_demo_cnn(examples=examples, seed=seed, actor=actor)
    return production


def registry_seed_demo_cnn(*, examples: int = 300, seed: int = 0, actor: Any = None) -> ModelVersion:
    """Make sure family ``digits-cnn`` has a version; return its first one.

    Idempotent: when the family has any version nothing is trained. Otherwise the small
    CNN is trained on the same public slice as the MLP, exported to ONNX with a parity
    check, registered with both artifacts and moved to staging (not production: the demo
    fleet runs the MLP).
    """
    from devices_agent.data import load_digits_split
    from models_registry.ml.export import export_onnx

    family = ModelFamily.objects.filter(name=DEMO_CNN_FAMILY).first()
    if family is not None:
        existing = family.versions.order_by("number").first()
        if existing is not None:
            return existing
    weights = demo_train_weights(examples=examples, epochs=DEMO_CNN_EPOCHS, seed=seed, arch=DEMO_CNN_ARCH)
    _, _, x_test, _ = load_digits_split(seed=seed)
    exported = export_onnx(arch=DEMO_CNN_ARCH, weights=weights, sample_inputs=x_test[:64])
    with transaction.atomic():
        family = ModelFamily.objects.filter(name=DEMO_CNN_FAMILY).first() or services.family_create(
            name=DEMO_CNN_FAMILY,
            arch=DEMO_CNN_ARCH,
            input_shape=[64],
            num_classes=10,
            description="scikit-learn digits as 1x8x8 images; two small conv layers and a linear head.",
            actor=actor,
        )
        version = services.version_create(
            family=family,
            weights=encode_tensors(weights, metadata={"arch": DEMO_CNN_ARCH}),
            onnx=exported.onnx_bytes,
            source=ModelVersion.Source.UPLOADED,
            source_detail={"demo": True, "examples": examples, "seed": seed},
            notes=f"Demo CNN: trained on {examples} examples of the digits training split.",
            actor=actor,
        )
        return services.version_promote(version=version, stage=ModelVersion.Stage.STAGING, actor=actor)
