"""What a board learns from its own data: the data itself, its personal model, the model it serves.

- :class:`LocalData`: the labelled examples a board may learn from — its sample store
  (:mod:`devices_agent.samples`) and, when configured, a data source of its own: a
  directory of ``.npz`` files holding ``x`` and ``y``, or a Python entry point
  ``module:function`` returning ``(x, y)`` or an iterable of ``(x, y)`` batches. Each
  part is split into training examples and a fixed local holdout.
- :class:`Personaliser`: a personal last layer fine-tuned on the training examples, kept
  on the board, and *used* for predictions when it beats the global model on the
  holdout (both numbers are reported; the personal weights never leave).
- :class:`ModelRuntime`: the model that answers the local API now — the installed ONNX
  graph, with the personal head written into it when that one is better.
- :func:`fetch_artifact`: a version's program or weights, downloaded resumably and
  checked against the signed digest under the pinned key, cached by digest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.backends import Backend, TrainConfig, get_backend
from devices_agent.client import AgentClient
from devices_agent.codecs import decode_tensors, encode_tensors
from devices_agent.family import FamilySpec, SpecError
from devices_agent.local_api import ActiveModel
from devices_agent.samples import SampleStore
from devices_agent.state import AgentState, InstalledModel, atomic_write
from devices_agent.updater import download_resumable, verify_artifact, verify_statement
from devices_agent.wire import ArtifactRef

__all__ = [
    "LocalData",
    "ModelRuntime",
    "NotEnoughData",
    "PersonalResult",
    "Personaliser",
    "fetch_artifact",
    "spec_of",
]

log = logging.getLogger("devices_agent.learning")

Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]
Recorder = Callable[[str, float, int | None], None]


class NotEnoughData(Exception):  # noqa: N818  (a condition, not a failure)
    """The board holds too few labelled examples for what was asked."""


# --------------------------------------------------------------------------- artifacts


def fetch_artifact(
    *,
    client: AgentClient,
    ref: ArtifactRef,
    public_key: bytes,
    folder: Path,
    version_id: int,
    keep: int = 4,
) -> Path:
    """Download an artifact (resumable), verify its signed statement and digest, return its path.

    The statement must name ``version_id`` (the version the artifact is fetched for) and
    the reference's kind, and must not have expired. The verified file is kept as
    ``<folder>/<sha256>`` so a later call reads it from disk; beyond ``keep`` files the
    least recently used go. Raises :class:`devices_agent.updater.VerificationError`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / ref["sha256"]
    if not final.exists():
        part = folder / f"{ref['sha256']}.part"
        # The statement first: nothing is downloaded for a replayed or expired one.
        verify_statement(ref, public_key=public_key, kind=ref["kind"], version_id=version_id, now=time.time())
        download_resumable(client=client, url=ref["url"], part=part, expected_size=int(ref["size"]))
        try:
            verify_artifact(part, ref=ref, public_key=public_key, version_id=version_id)
        except ValueError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, final)
        part.with_name(part.name + ".etag").unlink(missing_ok=True)
    os.utime(final)
    cached = sorted((p for p in folder.iterdir() if len(p.name) == 64), key=lambda p: p.stat().st_mtime)
    for old in cached[:-keep]:
        old.unlink(missing_ok=True)
    return final


def read_weights(path: Path) -> dict[str, npt.NDArray[Any]]:
    """A safetensors weights file as numpy arrays (names as the program's)."""
    tensors, _ = decode_tensors(path.read_bytes())
    return {name: np.asarray(value) for name, value in tensors.items()}


def spec_of(model: InstalledModel) -> FamilySpec | None:
    """The family contract an installed model was shipped with, or None for an old install."""
    raw = model.meta.get("spec")
    if not isinstance(raw, dict):
        return None
    try:
        return FamilySpec.from_dict(raw)
    except SpecError:
        return None


# --------------------------------------------------------------------------- data


def _holdout_key(x: npt.NDArray[Any], percent: int) -> bool:
    # By content, not position: a data source that grows or reorders keeps each example
    # on the same side of the split.
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


class LocalData:
    """The board's labelled examples: its sample store plus an optional data source."""

    def __init__(
        self,
        store: SampleStore,
        *,
        data_dir: Path | str | None = None,
        entry_point: str | None = None,
        holdout_percent: int = 20,
        max_source_examples: int = 200_000,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.entry_point = entry_point
        self.holdout_percent = holdout_percent
        self.max_source_examples = max_source_examples
        self._source_cache: tuple[Any, Arrays | None] | None = None
        self._counts: dict[str, int] | None = None
        self._lock = threading.Lock()

    # --- the configured source -------------------------------------------------------
    def _source_token(self) -> Any:
        if self.data_dir is not None:
            try:
                return tuple(
                    sorted(
                        (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in self.data_dir.glob("*.npz")
                    )
                )
            except OSError:
                return None
        return self.entry_point

    def _load_source(self) -> Arrays | None:
        batches: Iterable[Any]
        if self.data_dir is not None:
            files = sorted(self.data_dir.glob("*.npz"))
            loaded = []
            for path in files:
                try:
                    with np.load(path, allow_pickle=False) as data:
                        loaded.append((np.asarray(data["x"]), np.asarray(data["y"])))
                except (OSError, KeyError, ValueError) as exc:
                    log.warning("data file %s skipped: %s", path, exc)
            batches = loaded
        elif self.entry_point:
            module_name, _, function_name = self.entry_point.partition(":")
            if not module_name or not function_name:
                raise ValueError(f"data_entry_point must look like module:function, got {self.entry_point!r}")
            function = getattr(importlib.import_module(module_name), function_name)
            result = function()
            batches = [result] if isinstance(result, tuple) and len(result) == 2 else result
        else:
            return None
        xs, ys, total = [], [], 0
        for batch in batches:
            x, y = batch
            x, y = np.asarray(x), np.asarray(y)
            if len(x) != len(y):
                raise ValueError(f"the data source gave {len(x)} inputs and {len(y)} labels")
            xs.append(x)
            ys.append(y)
            total += len(x)
            if total >= self.max_source_examples:
                break
        if not xs:
            return None
        return np.concatenate(xs)[: self.max_source_examples], np.concatenate(ys)[: self.max_source_examples]

    def _source(self) -> Arrays | None:
        token = self._source_token()
        with self._lock:
            if self._source_cache is not None and self._source_cache[0] == token and token is not None:
                return self._source_cache[1]
        try:
            loaded = self._load_source()
        except Exception as exc:  # noqa: BLE001 - a broken user data source is reported, not fatal
            log.warning("data source unusable: %s", exc)
            loaded = None
        with self._lock:
            self._source_cache = (token, loaded)
        return loaded

    def _source_split(self, *, holdout: bool) -> Arrays | None:
        source = self._source()
        if source is None:
            return None
        x, y = source
        mask = np.array([_holdout_key(row, self.holdout_percent) == holdout for row in x], dtype=bool)
        if not mask.any():
            return None
        return x[mask], y[mask]

    # --- what training and evaluation read ----------------------------------------------
    def _part(self, spec: FamilySpec, *, holdout: bool) -> Arrays | None:
        parts: list[Arrays] = []
        stored = self.store.arrays(holdout=holdout)
        if stored is not None:
            parts.append(stored)
        source = self._source_split(holdout=holdout)
        if source is not None:
            parts.append(source)
        xs, ys = [], []
        for x, y in parts:
            try:
                checked = spec.inputs(x), spec.labels(y, count=len(x))
            except SpecError as exc:
                log.warning("local examples that do not fit the family are left out: %s", exc.message)
                continue
            xs.append(checked[0])
            ys.append(checked[1])
        if not xs:
            return None
        return np.concatenate(xs), np.concatenate(ys)

    def training_set(self, spec: FamilySpec) -> Arrays | None:
        """The labelled examples to train on (the holdout left out), checked against ``spec``."""
        return self._part(spec, holdout=False)

    def holdout_set(self, spec: FamilySpec) -> Arrays | None:
        """The fixed local holdout: what models are judged on, never trained on."""
        return self._part(spec, holdout=True)

    def counts(self) -> dict[str, int]:
        """``local_examples`` (training) and ``holdout_examples``: what the board reports."""
        stored = self.store.counts()
        training, holdout = stored.training, stored.holdout
        source = self._source()
        if source is not None:
            marks = [_holdout_key(row, self.holdout_percent) for row in source[0]]
            holdout += sum(marks)
            training += len(marks) - sum(marks)
        return {"local_examples": int(training), "holdout_examples": int(holdout)}


# --------------------------------------------------------------------------- personal


@dataclass(frozen=True)
class PersonalResult:
    """One personalisation: both models' primary metric on the holdout, and which is used."""

    version_id: int
    metric: str
    global_value: float
    personal_value: float
    used: bool
    rebase: str  # "kept": the previous head was the start; "reset": the global head was

    @property
    def gain(self) -> float:
        """How much better the personal model is (positive = better) on the primary metric."""
        diff = self.personal_value - self.global_value
        return diff if self.metric == "accuracy" else -diff


class Personaliser:
    """Keeps a personal head per global version, fine-tuned on the board's own examples.

    The head is ``<state_dir>/personal/head.safetensors`` with ``meta.json`` (base version,
    head names, both metrics, whether it is used). When a new global version arrives the
    previous head is the starting point if its shapes still fit (``kept``), else the new
    global head is (``reset``).
    """

    def __init__(
        self,
        *,
        state_dir: Path | str,
        data: LocalData,
        record: Recorder | None = None,
        backend: str = "torch",
        epochs: int = 5,
        lr: float = 0.05,
        min_examples: int = 20,
        seed: int = 0,
    ) -> None:
        self.folder = Path(state_dir) / "personal"
        self.data = data
        self.record = record
        self.backend_name = backend
        self.epochs = epochs
        self.lr = lr
        self.min_examples = min_examples
        self.seed = seed
        self._backend: Backend | None = None
        self.generation = 0  # bumped whenever the head in use changes

    @property
    def head_path(self) -> Path:
        return self.folder / "head.safetensors"

    @property
    def meta_path(self) -> Path:
        return self.folder / "meta.json"

    def meta(self) -> dict[str, Any] | None:
        """The stored metadata, or None before the first personalisation."""
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def load_head(self) -> dict[str, npt.NDArray[np.float32]] | None:
        """The stored personal head, or None."""
        try:
            tensors, _ = decode_tensors(self.head_path.read_bytes())
        except (OSError, ValueError):
            return None
        return {name: np.asarray(value, dtype=np.float32) for name, value in tensors.items()}

    def needs(self, version_id: int) -> bool:
        """Whether the head is not yet personalised for ``version_id``."""
        meta = self.meta()
        return meta is None or meta.get("base_version_id") != version_id

    def overrides(self, version_id: int) -> dict[str, npt.NDArray[np.float32]] | None:
        """The personal head to serve predictions with, when it is for ``version_id`` and better."""
        meta = self.meta()
        if meta is None or meta.get("base_version_id") != version_id or not meta.get("used"):
            return None
        return self.load_head()

    def personalise(
        self,
        *,
        version_id: int,
        spec: FamilySpec,
        program: bytes,
        global_state: Mapping[str, npt.ArrayLike],
        head: list[str],
    ) -> PersonalResult:
        """Fine-tune the head on the training examples; judge both models on the holdout."""
        train = self.data.training_set(spec)
        hold = self.data.holdout_set(spec)
        if train is None or hold is None or len(train[0]) < self.min_examples or len(hold[0]) < 2:
            raise NotEnoughData(
                f"personalisation needs {self.min_examples} training and 2 holdout examples; the board has "
                f"{0 if train is None else len(train[0])} and {0 if hold is None else len(hold[0])}"
            )
        if self._backend is None:
            self._backend = get_backend(self.backend_name)
        backend = self._backend
        base = {name: np.asarray(value) for name, value in global_state.items()}
        previous = self.load_head()
        rebase = "reset"
        start = dict(base)
        if previous is not None and all(
            n in previous and n in base and previous[n].shape == base[n].shape for n in head
        ):
            start.update({n: previous[n] for n in head})
            rebase = "kept"
        result = backend.train(
            program=program,
            state=start,
            spec=spec,
            x=train[0],
            y=train[1],
            config=TrainConfig(epochs=self.epochs, batch_size=32, lr=self.lr, momentum=0.9, seed=self.seed),
            trainable=head,
        )
        personal_head = {
            n: (np.asarray(start[n], np.float64) + result.delta[n]).astype(np.float32) for n in head
        }
        metric = spec.primary_metric
        global_value = float(
            backend.evaluate(program=program, state=base, spec=spec, x=hold[0], y=hold[1])[metric]
        )
        personal_value = float(
            backend.evaluate(
                program=program, state={**base, **personal_head}, spec=spec, x=hold[0], y=hold[1]
            )[metric]
        )
        used = spec.better(personal_value, global_value)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.head_path, encode_tensors(personal_head, metadata={"base_version_id": str(version_id)})
        )
        meta = {
            "base_version_id": version_id,
            "head": head,
            "metric": metric,
            "global": global_value,
            "personal": personal_value,
            "used": used,
            "rebase": rebase,
            "training_examples": int(len(train[0])),
            "holdout_examples": int(len(hold[0])),
        }
        atomic_write(self.meta_path, json.dumps(meta, indent=2).encode())
        self.generation += 1
        if self.record is not None:
            self.record(f"global_{metric}", global_value, version_id)
            self.record(f"personal_{metric}", personal_value, version_id)
        return PersonalResult(
            version_id=version_id,
            metric=metric,
            global_value=global_value,
            personal_value=personal_value,
            used=used,
            rebase=rebase,
        )


# --------------------------------------------------------------------------- serving


class ModelRuntime:
    """The :class:`ActiveModel` that answers predictions now (rebuilt when the model changes)."""

    def __init__(
        self,
        state: AgentState,
        *,
        personaliser: Personaliser | None = None,
        session_provider: Callable[[InstalledModel], Any] | None = None,
        extra_delay_ms: float = 0.0,
    ) -> None:
        self.state = state
        self.personaliser = personaliser
        self.session_provider = session_provider
        self.extra_delay_ms = extra_delay_ms
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._active: ActiveModel | None = None

    def invalidate(self) -> None:
        """Forget the loaded model (after an activation or a rollback)."""
        with self._lock:
            self._key = None
            self._active = None

    def active(self) -> ActiveModel | None:
        """The model to serve with, or None when none is installed."""
        from devices_agent.inference import load_session

        current = self.state.current()
        if current is None:
            return None
        generation = self.personaliser.generation if self.personaliser is not None else 0
        key = (current.version_id, current.sha256, generation)
        with self._lock:
            if self._key == key and self._active is not None:
                return self._active
            spec = spec_of(current)
            overrides = (
                self.personaliser.overrides(current.version_id) if self.personaliser is not None else None
            )
            if overrides:
                session = load_session(current.path, initializers=overrides)
                kind = "personal"
            elif self.session_provider is not None:
                session = self.session_provider(current)
                kind = "global"
            else:
                session = load_session(current.path)
                kind = "global"
            if spec is None:
                spec = _spec_from_session(session)
            self._active = ActiveModel(
                version_id=current.version_id,
                spec=spec,
                session=session,
                kind=kind,
                extra_delay_ms=self.extra_delay_ms,
            )
            self._key = key
            return self._active


def _spec_from_session(session: Any) -> FamilySpec:
    """A contract read off the graph, for a model installed before families declared one."""
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in session.get_inputs()[0].shape[1:]] or [1]
    out = session.get_outputs()[0].shape
    classes = out[-1] if out and isinstance(out[-1], int) and out[-1] > 1 else 2
    return FamilySpec(task="classification", input_shape=tuple(dims), num_classes=int(classes))
