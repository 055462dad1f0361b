"""The board's own labelled examples, kept in its state directory and never sent anywhere.

The application beside the agent adds examples (``add_samples``) or labels a prediction
after the fact (``feedback``); training, personalisation and the local evaluation read
them from here. The store is bounded three ways — count, bytes and age — and evicts the
oldest first, counting what it evicted (the agent reports the count as a metric, the
examples themselves never leave the board).

Every example is assigned once, for good, to the training part or to the local holdout
(about ``holdout_percent`` of them), by a keyed hash of its id: the holdout never trains
a model, so the accuracy measured on it says how a model does on data it has not seen,
and an example never moves between the two.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["SampleCounts", "SampleStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    holdout INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    x BLOB NOT NULL,
    y BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_created ON samples (created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class SampleCounts:
    """How many examples the board holds; what the agent reports, never the examples."""

    examples: int
    training: int
    holdout: int
    evicted: int
    nbytes: int


def _encode(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)  # a scalar stays a scalar
    return buffer.getvalue()


def _decode(blob: bytes) -> npt.NDArray[Any]:
    return np.load(io.BytesIO(blob), allow_pickle=False)  # type: ignore[no-any-return]


class SampleStore:
    """A bounded SQLite store of (x, y) examples with a fixed local holdout split."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_examples: int = 20_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float | None = 30 * 86_400.0,
        holdout_percent: int = 20,
    ) -> None:
        if max_examples < 1 or max_bytes < 1:
            raise ValueError("max_examples and max_bytes must be at least 1")
        if not 0 <= holdout_percent < 100:
            raise ValueError("holdout_percent must be in [0, 100)")
        self.path = Path(path)
        self.max_examples = max_examples
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.holdout_percent = holdout_percent
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        os.chmod(self.path, 0o600)
        self._key = self._meta("holdout_key") or self._set_meta("holdout_key", secrets.token_hex(16))

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> str:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        return value

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _is_holdout(self, sample_id: int) -> int:
        digest = hashlib.sha256(f"{self._key}:{sample_id}".encode()).digest()
        return 1 if int.from_bytes(digest[:4], "big") % 100 < self.holdout_percent else 0

    def add(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> list[int]:
        """Store the examples ``x[i]`` with labels ``y[i]`` (already checked by the caller).

        All or nothing: one transaction. Evicts the oldest examples past the bounds, and
        refuses (``ValueError``) a batch that alone exceeds the byte bound.
        """
        if len(x) != len(y):
            raise ValueError("x and y must have the same length")
        rows = [(_encode(x[i]), _encode(np.asarray(y[i]))) for i in range(len(x))]
        total = sum(len(a) + len(b) for a, b in rows)
        if total > self.max_bytes or len(rows) > self.max_examples:
            raise ValueError(
                f"the batch ({len(rows)} examples, {total} bytes) is larger than the store "
                f"({self.max_examples} examples, {self.max_bytes} bytes)"
            )
        now = time.time()
        ids: list[int] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for xb, yb in rows:
                    cursor = self._db.execute(
                        "INSERT INTO samples (created, holdout, nbytes, x, y) VALUES (?, 0, ?, ?, ?)",
                        (now, len(xb) + len(yb), xb, yb),
                    )
                    sample_id = int(cursor.lastrowid or 0)
                    if self._is_holdout(sample_id):
                        self._db.execute("UPDATE samples SET holdout = 1 WHERE id = ?", (sample_id,))
                    ids.append(sample_id)
                self._evict(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ids

    def _evict(self, now: float) -> int:
        evicted = 0
        if self.max_age_s is not None:
            evicted += self._db.execute(
                "DELETE FROM samples WHERE created < ?", (now - self.max_age_s,)
            ).rowcount
        count, nbytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM samples").fetchone()
        if count > self.max_examples or nbytes > self.max_bytes:
            drop: list[int] = []
            for sample_id, size in self._db.execute("SELECT id, nbytes FROM samples ORDER BY id").fetchall():
                if count <= self.max_examples and nbytes <= self.max_bytes:
                    break
                drop.append(int(sample_id))
                count -= 1
                nbytes -= int(size)
            for start in range(0, len(drop), 500):
                chunk = drop[start : start + 500]
                marks = ",".join("?" * len(chunk))
                self._db.execute(f"DELETE FROM samples WHERE id IN ({marks})", chunk)  # noqa: S608
            evicted += len(drop)
        if evicted:
            previous = int(self._meta("evicted") or 0)
            self._set_meta("evicted", str(previous + evicted))
        return evicted

    def take_evicted(self) -> int:
        """Examples evicted since the last call (the agent reports them as ``samples_evicted``)."""
        with self._lock:
            reported = int(self._meta("evicted_reported") or 0)
            total = int(self._meta("evicted") or 0)
            if total > reported:
                self._set_meta("evicted_reported", str(total))
            return total - reported

    def counts(self) -> SampleCounts:
        """How many examples there are, in each part."""
        with self._lock:
            total, holdout, nbytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(holdout), 0), COALESCE(SUM(nbytes), 0) FROM samples"
            ).fetchone()
            evicted = int(self._meta("evicted") or 0)
        return SampleCounts(
            examples=int(total),
            training=int(total) - int(holdout),
            holdout=int(holdout),
            evicted=evicted,
            nbytes=int(nbytes),
        )

    def arrays(self, *, holdout: bool) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
        """The examples of one part as ``(x, y)`` arrays in the order they came, or None if empty."""
        with self._lock:
            rows = self._db.execute(
                "SELECT x, y FROM samples WHERE holdout = ? ORDER BY id", (1 if holdout else 0,)
            ).fetchall()
        if not rows:
            return None
        xs = np.stack([_decode(r[0]) for r in rows])
        ys = np.stack([_decode(r[1]) for r in rows])
        return xs, ys

    def clear(self) -> None:
        """Forget every example (the holdout assignment of future ones stays fixed)."""
        with self._lock:
            self._db.execute("DELETE FROM samples")
