"""The ONNX Runtime backend: train with the runtime that serves inference, without PyTorch.

A board with ``onnxruntime-training`` (and no torch) trains a version from its training
artifacts (:mod:`devices_agent.ort_artifacts`): the ``ort_training`` archive the server
built for the version's graph, verified like every artifact. ``program`` in
:meth:`OrtBackend.train` and :meth:`OrtBackend.evaluate` is that archive.

One round of local training, the same contract as the PyTorch backend:

1. the archive is unpacked once per digest into the backend's cache directory;
2. the checkpoint is loaded and the training ``Module`` created, and only then are the
   round's global weights written into the checkpoint by name (writing into a freshly
   loaded checkpoint before the Module exists crashes ONNX Runtime 1.19); every
   trainable parameter must be in the checkpoint with the weights' shape, or the
   artifacts are refused as not matching (``artifacts_mismatch``);
3. mini-batches in the order :func:`devices_agent.backends.order.epoch_orders` gives for
   the round's seed (torch's order), one optimizer step each (SGD, or Adam with
   PyTorch's formula), ``should_stop`` polled before every batch;
4. the parameters are read back by name; the delta ``new - global`` is clipped after
   training exactly as the PyTorch backend clips it (:func:`devices_agent.codecs.clip_by_norm`).

What it refuses, with the reason: FedProx (``prox_mu > 0``: the proximal term is not in
the training graph) and momentum (ORT's SGD graph has none). Parameters of the archive
that a round does not train (``trainable`` a subset) are put back after every step, so
they stay frozen whatever the optimizer.

``onnxruntime.training``'s package ``__init__`` imports torch (an upstream bug, open in
1.19), so only its ``api`` subpackage is imported, under a package entry that does not
run that ``__init__`` (:func:`training_api`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.backends.base import LocalResult, TrainConfig, Weights
from devices_agent.backends.order import epoch_orders
from devices_agent.codecs import clip_by_norm, l2_norm
from devices_agent.family import FamilySpec, outputs_metrics
from devices_agent.ort_artifacts import LOSSES, Manifest, read_manifest_file, unpack

__all__ = ["OrtBackend", "OrtTrainingError", "training_api"]

_IMPORT = threading.Lock()
# Unpacked archives kept per backend; beyond this the least recently used go.
KEEP_ARCHIVES = 4


class OrtTrainingError(ValueError):
    """Artifacts or a request the ONNX Runtime backend cannot train with; ``code`` says why."""

    def __init__(self, message: str, *, code: str = "ort_training_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def training_api() -> Any:
    """``onnxruntime.training.api``, imported without ``onnxruntime.training``'s ``__init__``.

    Raises ``ImportError`` where the training build of ONNX Runtime is not installed.
    """
    with _IMPORT:
        if "onnxruntime.training" not in sys.modules:
            import onnxruntime

            spec = importlib.util.find_spec("onnxruntime.training")
            if spec is None or spec.submodule_search_locations is None:
                raise ImportError(
                    f"onnxruntime {onnxruntime.__version__} is not a training build (onnxruntime-training)"
                )
            # The package object without running its __init__: its subpackages import
            # as usual, and nothing pulls torch in.
            sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)
        return importlib.import_module("onnxruntime.training.api")


def _labels(spec: FamilySpec, y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if spec.task == "classification":
        return np.ascontiguousarray(y, dtype=np.int64)
    return np.ascontiguousarray(y, dtype=np.float32).reshape(len(y), -1)


class _Run:
    """One training or evaluation session over an unpacked archive."""

    def __init__(self, *, api: Any, folder: Path, manifest: Manifest, optimizer: str | None, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.manifest = manifest
        try:
            self.state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
            self.module = api.Module(
                str(folder / "training_model.onnx"),
                self.state,
                str(folder / "eval_model.onnx"),
                session_options=options,
            )
            self.optimizer = (
                api.Optimizer(str(folder / manifest["optimizers"][optimizer]), self.module)
                if optimizer is not None
                else None
            )
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises many types; all mean "does not load"
            raise OrtTrainingError(
                f"ONNX Runtime cannot load the training artifacts: {exc}"[:2000], code="invalid_ort_artifacts"
            ) from None
        names = list(self.module.input_names())
        declared = [manifest["input"], manifest["labels"]]
        if names[:2] != declared:
            raise OrtTrainingError(
                f"the training graph takes {names}, its manifest {declared}", code="invalid_ort_artifacts"
            )
        self.parameters = {name: param for name, param in self.state.parameters}

    def load(self, state: Mapping[str, npt.ArrayLike], trainable: list[str]) -> None:
        """Write the round's weights into the checkpoint (after the Module exists), by name."""
        problems: list[str] = []

        def shapes(name: str) -> str:
            return (
                f"{name} is {tuple(self.parameters[name].data.shape)} in the checkpoint, "
                f"{tuple(np.shape(state[name]))} in the weights"
            )

        for name in trainable:
            param = self.parameters.get(name)
            if param is None:
                problems.append(f"{name} is not in the checkpoint")
            elif not param.requires_grad:
                problems.append(f"{name} is frozen in the training graph")
            elif name not in state:
                problems.append(f"{name} is not in the round's weights")
            elif tuple(param.data.shape) != tuple(np.shape(state[name])):
                problems.append(shapes(name))
        for name, param in self.parameters.items():
            if name in trainable:
                continue
            if param.requires_grad and name not in state:
                problems.append(f"the checkpoint trains {name}, which the round's weights lack")
            elif name in state and tuple(param.data.shape) != tuple(np.shape(state[name])):
                problems.append(shapes(name))
        if problems:
            raise OrtTrainingError(
                "the training artifacts do not match the round's weights: " + "; ".join(problems[:5]),
                code="artifacts_mismatch",
            )
        for name, param in self.parameters.items():
            if name in state:
                self.state.parameters[name] = np.ascontiguousarray(state[name], dtype=param.data.dtype)

    def read(self, names: list[str]) -> Weights:
        return {name: np.array(self.state.parameters[name].data, dtype=np.float32) for name in names}

    def outputs(
        self, x: npt.NDArray[Any], labels: npt.NDArray[Any], batch: int = 1024
    ) -> npt.NDArray[np.float64]:
        """The model's outputs on ``x`` (the eval graph: no gradients, nothing updated)."""
        self.module.eval()
        parts = []
        for start in range(0, len(x), batch):
            _, out = self.module(
                np.ascontiguousarray(x[start : start + batch]), labels[start : start + batch]
            )
            parts.append(np.asarray(out, dtype=np.float64))
        return np.concatenate(parts) if parts else np.zeros((0, 1))


class OrtBackend:
    """Trains and evaluates versions from their ONNX Runtime training artifacts (module docstring)."""

    name = "ort"
    # The round task's key of the artifact this backend trains from.
    artifact = "ort_training"

    def __init__(self, *, num_threads: int | None = 1, cache_dir: str | Path | None = None) -> None:
        self.num_threads = int(num_threads or 1)
        self._api = training_api()
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flotilla-ort-")
            cache_dir = self._tmp.name
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _unpacked(self, archive: bytes) -> tuple[Path, Manifest]:
        """The archive's folder in the cache (unpacked on first use) and its manifest."""
        folder = self.cache / hashlib.sha256(archive).hexdigest()
        done = folder / ".complete"
        with self._lock:
            if done.exists():
                manifest = read_manifest_file(folder)
            else:
                manifest = unpack(archive, folder)
            done.touch()
            kept = sorted(
                (p for p in self.cache.iterdir() if (p / ".complete").exists()),
                key=lambda p: (p / ".complete").stat().st_mtime,
            )
            for old in kept[:-KEEP_ARCHIVES]:
                shutil.rmtree(old, ignore_errors=True)
        return folder, manifest

    def _run(self, archive: bytes, spec: FamilySpec, optimizer: str | None) -> _Run:
        folder, manifest = self._unpacked(archive)
        if manifest["loss"] != LOSSES[spec.task]:
            raise OrtTrainingError(
                f"the artifacts train with {manifest['loss']}; a {spec.task} family trains with "
                f"{LOSSES[spec.task]}",
                code="artifacts_mismatch",
            )
        if optimizer is not None and optimizer not in manifest["optimizers"]:
            raise OrtTrainingError(
                f"the artifacts have no {optimizer} optimizer graph", code="artifacts_mismatch"
            )
        return _Run(
            api=self._api, folder=folder, manifest=manifest, optimizer=optimizer, threads=self.num_threads
        )

    def evaluate(
        self,
        *,
        program: bytes,
        state: Mapping[str, npt.ArrayLike],
        spec: FamilySpec,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
    ) -> dict[str, Any]:
        """The task's metrics of the model on ``(x, y)``; ``program`` is the artifacts archive."""
        x = spec.inputs(x)
        y = spec.labels(y, count=len(x))
        run = self._run(program, spec, None)
        run.load(state, [n for n in run.manifest["trainable"] if n in state])
        return outputs_metrics(spec, run.outputs(x, _labels(spec, y)), y)

    def train(
        self,
        *,
        program: bytes,
        state: Mapping[str, npt.ArrayLike],
        spec: FamilySpec,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        config: TrainConfig,
        trainable: list[str] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> LocalResult:
        """Train from ``state`` on ``(x, y)`` and return the update of ``trainable`` parameters.

        ``program`` is the version's ``ort_training`` archive. Raises
        :class:`OrtTrainingError` for what this backend does not do (FedProx, momentum)
        and for artifacts that do not fit the weights, ``ValueError`` for data that does
        not fit and when training diverges.
        """
        if config.prox_mu > 0:
            raise OrtTrainingError(
                "FedProx (prox_mu > 0) is not trained by the ONNX Runtime backend: its proximal term is not "
                "in the training graph; the job must run on torch boards",
                code="fedprox_unsupported",
            )
        if config.optimizer == "sgd" and config.momentum > 0:
            raise OrtTrainingError("ONNX Runtime's SGD graph has no momentum", code="momentum_unsupported")
        if len(x) == 0:
            raise ValueError("no examples to train on")
        x = spec.inputs(x)
        y = spec.labels(y, count=len(x))
        labels = _labels(spec, y)
        run = self._run(program, spec, config.optimizer)
        built = run.manifest["trainable"]
        chosen = list(built) if trainable is None else list(trainable)
        unknown = [n for n in chosen if n not in built]
        if unknown:
            raise OrtTrainingError(
                f"the training artifacts do not train {unknown[:10]}", code="artifacts_mismatch"
            )
        run.load(state, chosen)
        frozen = {n: np.ascontiguousarray(state[n], dtype=np.float32) for n in built if n not in chosen}
        initial_loss = float(outputs_metrics(spec, run.outputs(x, labels), y)["loss"])
        assert run.optimizer is not None
        run.optimizer.set_learning_rate(float(config.lr))
        orders = epoch_orders(len(y), int(config.seed))
        steps = 0
        stopped = False
        for _ in range(config.epochs):
            order = next(orders)
            run.module.train()
            for start in range(0, len(y), config.batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                batch = order[start : start + config.batch_size]
                loss, _ = run.module(np.ascontiguousarray(x[batch]), labels[batch])
                if not math.isfinite(float(loss)):
                    raise ValueError(f"training diverged at step {steps} (loss {float(loss)})")
                run.optimizer.step()
                run.module.lazy_reset_grad()
                for name, value in frozen.items():
                    run.state.parameters[name] = value
                steps += 1
            if stopped:
                break
        new = run.read(chosen)
        local = outputs_metrics(spec, run.outputs(x, labels), y)
        delta: Weights = {
            name: (new[name].astype(np.float64) - np.asarray(state[name], np.float64)).astype(np.float32)
            for name in chosen
        }
        norm = l2_norm(delta)
        if not math.isfinite(norm):
            raise ValueError("training produced a non-finite update")
        scale = 1.0
        if config.clip_norm is not None:
            delta, scale = clip_by_norm(delta, max_norm=config.clip_norm)
        metrics: dict[str, float] = {
            "initial_loss": initial_loss,
            "train_loss": float(local["loss"]),
            f"train_{spec.primary_metric}": float(local[spec.primary_metric]),
            "delta_norm": norm,
            "clip_scale": scale,
            "steps": float(steps),
            "stopped": 1.0 if stopped else 0.0,
        }
        return LocalResult(delta=delta, num_examples=len(y), metrics=metrics)
