"""Shared types for aggregation: the aggregator protocol and update sources.

Everything here is pure numpy (plus safetensors for reading update files): no Django,
no ORM. A model state is ``dict[str, np.ndarray]`` of float32 arrays; an *update* is a
decoded delta (new local weights minus the global weights) with the same names and
shapes as the global model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]
Weights = dict[str, Array]

# Elements per chunk for the order-statistics rules: with n updates the working set is
# about n * chunk * 4 bytes (one float32 block, sorted or partitioned in place; Krum
# adds an n x n float64 matrix and one float64 copy of the block for its distances),
# e.g. 1000 devices -> ~130 MB at 32768. Pass a smaller chunk for larger fleets.
DEFAULT_CHUNK = 32_768


class Aggregator(Protocol):
    """What every aggregation rule offers; the round's orchestration uses nothing else.

    ``accept`` takes one decoded update at a time and ``finalize`` returns the new global
    weights. The rest says how the rule is driven:

    - ``mergeable`` rules keep a running sum: ``checkpoint`` serialises it (with the ids
      in it) and ``resume`` folds a checkpoint back in, so a crashed aggregation carries
      on where it stopped. The others need every update at once and read them chunk by
      chunk with ``finalize_source``; ``checkpoint``/``resume`` raise ``TypeError``.
    - Rules with server state across rounds (FedAdam, FedYogi) return it from
      ``state_bytes`` after ``finalize`` and take it back with ``load_state`` in the
      next round; the others return None.
    - Differential privacy is part of the rule (see :class:`~.privacy.Privacy`): the
      mean family clips, weighs equally and adds the noise itself; a rule the noise does
      not fit refuses it when it is created.
    """

    name: str
    mergeable: bool

    @property
    def accepted_ids(self) -> set[str]:
        """Ids of the updates already counted."""
        ...

    @property
    def num_accepted(self) -> int:
        """How many distinct updates were accepted."""
        ...

    def accept(
        self, update: Mapping[str, npt.ArrayLike], *, weight: float, update_id: str | None = None
    ) -> bool:
        """Add one update; returns False when ``update_id`` was already accepted."""
        ...

    def merge(self, other: object) -> None:
        """Fold in another partial aggregate of the same kind (``TypeError`` when not mergeable)."""
        ...

    def checkpoint(self) -> bytes:
        """The running aggregate and the ids in it, for :meth:`resume` after a crash."""
        ...

    def resume(self, data: bytes) -> None:
        """Fold in a :meth:`checkpoint`; its ids are skipped by later ``accept`` calls."""
        ...

    def finalize(self) -> Weights:
        """Return the new global weights."""
        ...

    def finalize_source(self, source: UpdateSource) -> Weights:
        """New global weights from every update in ``source`` (rules that are not mergeable)."""
        ...

    def state_bytes(self) -> bytes | None:
        """Server state to carry into the next round, or None for a rule without any."""
        ...

    def load_state(self, data: bytes) -> None:
        """Continue from the state a previous round's :meth:`state_bytes` returned."""
        ...


class NoServerState:
    """For rules whose rounds are independent: there is no state to carry or load."""

    name: str

    def state_bytes(self) -> bytes | None:
        """No server state."""
        return None

    def load_state(self, data: bytes) -> None:
        """Refuse a state: this rule never produced one."""
        raise ValueError(f"{self.name} keeps no server state between rounds")


@runtime_checkable
class UpdateSource(Protocol):
    """Reads the same flat slice of one tensor from every update.

    ``read(name, start, stop)`` returns a float32 array of shape
    ``(num_updates, stop - start)``: row ``i`` is ``update_i[name].ravel()[start:stop]``.
    The array must be new (not a view of the source's own data): rules sort it in place.
    Order-statistics rules only ever hold one such block, so their peak memory is
    ``num_updates x chunk`` rather than ``num_updates x model``.
    """

    @property
    def num_updates(self) -> int:
        """Number of updates the source serves."""
        ...

    def read(self, name: str, start: int, stop: int) -> Array:
        """Stacked flat slice ``[start, stop)`` of tensor ``name`` from every update."""
        ...


def shapes_of(weights: Mapping[str, npt.ArrayLike]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape."""
    return {name: tuple(np.shape(t)) for name, t in weights.items()}


def as_float32(weights: Mapping[str, npt.ArrayLike]) -> Weights:
    """Contiguous float32 view (or copy, when needed) of every tensor."""
    return {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in weights.items()}


def check_update(update: Mapping[str, npt.ArrayLike], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ``ValueError`` unless ``update`` has exactly the model's names and shapes."""
    missing = set(shapes) - set(update)
    extra = set(update) - set(shapes)
    if missing or extra:
        raise ValueError(
            f"update tensors do not match the model: missing {sorted(missing)}, extra {sorted(extra)}"
        )
    for name, shape in shapes.items():
        got = tuple(np.shape(update[name]))
        if got != shape:
            raise ValueError(f"update tensor {name!r} has shape {got}, expected {shape}")


def check_weight(weight: float) -> float:
    """Aggregation weights must be finite and positive."""
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"weight must be finite and positive, got {weight!r}")
    return value


def iter_chunks(shapes: Mapping[str, tuple[int, ...]], chunk: int) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, start, stop)`` flat slices covering every tensor."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    for name, shape in shapes.items():
        size = math.prod(shape)
        for start in range(0, size, chunk):
            yield name, start, min(size, start + chunk)


class InMemoryUpdateSource:
    """An :class:`UpdateSource` over updates already in memory."""

    def __init__(self, updates: Sequence[Mapping[str, npt.ArrayLike]]) -> None:
        self._flat = [
            {name: np.ascontiguousarray(t, dtype=np.float32).ravel() for name, t in u.items()}
            for u in updates
        ]

    @property
    def num_updates(self) -> int:
        """Number of updates the source serves."""
        return len(self._flat)

    def read(self, name: str, start: int, stop: int) -> Array:
        """Stacked flat slice ``[start, stop)`` of tensor ``name`` from every update."""
        out = np.empty((len(self._flat), stop - start), dtype=np.float32)
        for row, update in enumerate(self._flat):
            out[row] = update[name][start:stop]
        return out


class SafetensorsFileSource:
    """An :class:`UpdateSource` over safetensors files of dense float32 updates.

    Only the headers are parsed up front; each :meth:`read` seeks into every file and
    reads just the requested slice straight into the output block, so memory stays at
    one block however large the files are. Files are opened per read, which keeps the
    number of open descriptors at one even with thousands of devices.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self._paths = [os.fspath(p) for p in paths]
        self._offsets: list[dict[str, tuple[int, int]]] = [_float32_offsets(p) for p in self._paths]

    @property
    def num_updates(self) -> int:
        """Number of updates the source serves."""
        return len(self._paths)

    def read(self, name: str, start: int, stop: int) -> Array:
        """Stacked flat slice ``[start, stop)`` of tensor ``name`` from every update."""
        out = np.empty((len(self._paths), stop - start), dtype=np.float32)
        for row, (path, offsets) in enumerate(zip(self._paths, self._offsets, strict=True)):
            if name not in offsets:
                raise ValueError(f"{path}: no tensor {name!r}")
            begin, size = offsets[name]
            if stop > size:
                raise ValueError(f"{path}: slice {start}:{stop} exceeds {name!r} ({size})")
            with open(path, "rb") as handle:
                handle.seek(begin + start * 4)
                view = memoryview(out[row]).cast("B")
                if handle.readinto(view) != view.nbytes:
                    raise ValueError(f"{path}: file is truncated")
        return out


def _float32_offsets(path: str) -> dict[str, tuple[int, int]]:
    """Absolute byte offset and element count of every float32 tensor in a file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        header: dict[str, Any] = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    offsets: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name!r} is {info['dtype']}, expected F32")
        begin, _ = info["data_offsets"]
        offsets[name] = (8 + header_len + int(begin), math.prod(info["shape"]))
    return offsets


class UpdateFileReader:
    """Reads dense float32 safetensors update files one at a time into one reused buffer.

    :meth:`read` copies the file with one ``os.preadv`` straight into a buffer the
    reader keeps (grown to the largest update, never shrunk) and returns read-only
    float32 views of it. A streaming aggregator so goes through thousands of
    update files with no allocation, no memory map and no page fault per update: the
    copy out of the page cache costs less than mapping a file, faulting its pages in and
    unmapping it again. The views are valid until the next :meth:`read`, which reuses
    the buffer: accept each update, then read the next.

    Every update of a round has the same header (same names, shapes and offsets), so
    the parsed layout is cached and reused whenever the header bytes are identical;
    for small models parsing JSON would otherwise cost as much as the arithmetic. With a
    cached layout the whole file is read at once and its header compared in the buffer;
    any other file (first of a round, another layout, truncated or longer) goes through
    the header first.
    """

    def __init__(self) -> None:
        self._header = b""
        self._layout: list[tuple[str, tuple[int, ...], int, int]] = []
        self._data_start = 0
        self._data_end = 0
        self._buffer = bytearray()

    def _parse(self, header_bytes: bytes, base: int, name_of: str) -> None:
        try:
            header: dict[str, Any] = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{name_of}: not a safetensors file") from None
        header.pop("__metadata__", None)
        layout = []
        data_end = base
        for name, info in header.items():
            if info["dtype"] != "F32":
                raise ValueError(f"{name_of}: tensor {name!r} is not F32")
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            count = math.prod(shape)
            if end - begin != 4 * count or begin < 0:
                raise ValueError(f"{name_of}: bad offsets for {name!r}")
            layout.append((name, shape, count, base + begin))
            data_end = max(data_end, base + end)
        self._header, self._layout = header_bytes, layout
        self._data_start, self._data_end = base, data_end

    def read(self, path: str | os.PathLike[str]) -> Weights:
        """Tensors of the file at ``path`` as read-only views of the reader's buffer."""
        name_of = os.fspath(path)
        fd = os.open(name_of, os.O_RDONLY)
        try:
            if not self._fast_read(fd):
                self._slow_read(fd, name_of)
        finally:
            os.close(fd)
        out: Weights = {}
        for name, shape, _, offset in self._layout:
            array = np.ndarray(shape, dtype=np.float32, buffer=self._buffer, offset=offset)
            array.flags.writeable = False
            out[name] = array
        return out

    def _fast_read(self, fd: int) -> bool:
        """One ``preadv`` of the whole file when it has the cached layout (the common case:
        every update of a round has the same header); False when it may not."""
        if not self._header:
            return False
        end = self._data_end
        if len(self._buffer) < end + 1:
            self._buffer = bytearray(end + 1)
        # One byte more than the layout needs: a longer file is not taken on trust.
        view = memoryview(self._buffer)[: end + 1]
        got = os.preadv(fd, [view], 0)
        header_len = len(self._header)
        return (
            got == end
            and int.from_bytes(view[:8], "little") == header_len
            and view[8 : 8 + header_len] == self._header
        )

    def _slow_read(self, fd: int, name_of: str) -> None:
        """Read the header, parse it when it changed, then the tensor bytes."""
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise ValueError(f"{name_of}: not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(f"{name_of}: truncated header")
        header_bytes = os.pread(fd, header_len, 8)
        if header_bytes != self._header:
            self._parse(header_bytes, 8 + header_len, name_of)
        if self._data_end > size:
            raise ValueError(f"{name_of}: bad offsets, the file is truncated")
        if len(self._buffer) < self._data_end + 1:
            self._buffer = bytearray(self._data_end + 1)
        view = memoryview(self._buffer)
        got = self._data_start
        while got < self._data_end:  # preadv may return short counts (signals, huge reads)
            step = os.preadv(fd, [view[got : self._data_end]], got)
            if step <= 0:
                raise ValueError(f"{name_of}: the file is truncated")
            got += step
