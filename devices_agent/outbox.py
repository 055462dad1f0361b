"""The metrics outbox: a local SQLite queue, so nothing measured is lost while offline.

Samples are written here first (WAL mode: a writer never blocks the flusher for long),
then sent in batches. A batch's id is chosen when the batch is *formed* and stored with
its samples, so after a lost response (the server stored the batch, the agent never heard)
the retry sends the same id and the server stores the batch once. Samples are deleted only
after the server acknowledged their batch; a restart resends the open batch unchanged.

Size policy: at most ``max_samples`` rows. When new samples would exceed it, the oldest
samples are dropped (the newest data is the most useful to rollout gates and dashboards).
The oldest rows may belong to a formed, unacknowledged batch; such a batch is dropped
whole, so a batch id is never re-sent with different contents (this may drop up to one
batch more than strictly needed). Every dropped sample is counted, and the count is
reported as one ``dropped`` sample in the next newly formed batch.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from devices_agent.wire import MAX_METRIC_SAMPLES_PER_BATCH, MetricSample

__all__ = ["Outbox", "PendingBatch", "utc_now_iso"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    ts TEXT NOT NULL,
    version_id INTEGER,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS samples_batch ON samples (batch_id, id);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    formed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def utc_now_iso() -> str:
    """Now, as ISO 8601 with the UTC zone."""
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class PendingBatch:
    """A formed batch waiting for the server's acknowledgement."""

    batch_id: str
    samples: list[MetricSample]


class Outbox:
    """A bounded SQLite queue of metric samples with stable batch ids."""

    def __init__(self, path: Path | str, *, max_samples: int = 100_000) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.path = Path(path)
        self.max_samples = max_samples
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so forming a
        # batch and trimming are each one atomic step.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _count(self) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()
        return int(row[0])

    def add(self, name: str, value: float, *, ts: str | None = None, version_id: int | None = None) -> None:
        """Queue one sample."""
        self.add_many([(name, value, ts or utc_now_iso(), version_id)])

    def add_many(self, samples: Iterable[tuple[str, float, str, int | None]]) -> None:
        """Queue ``(name, value, ts, version_id)`` samples in one transaction, then enforce the bound."""
        rows = [(n, float(v), t, vid) for n, v, t, vid in samples]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO samples (name, value, ts, version_id) VALUES (?, ?, ?, ?)", rows
                )
                self._trim()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _trim(self) -> None:
        excess = self._count() - self.max_samples
        dropped = 0
        while excess > 0:
            oldest = self._db.execute("SELECT batch_id FROM samples ORDER BY id LIMIT 1").fetchone()
            if oldest is None:
                break
            if oldest[0] is not None:
                # The oldest rows sit in an open batch: drop it whole, so a batch id is
                # never re-sent with different contents.
                removed = self._db.execute("DELETE FROM samples WHERE batch_id = ?", (oldest[0],)).rowcount
                self._db.execute("DELETE FROM batches WHERE batch_id = ?", (oldest[0],))
            else:
                removed = self._db.execute(
                    "DELETE FROM samples WHERE id IN "
                    "(SELECT id FROM samples WHERE batch_id IS NULL ORDER BY id LIMIT ?)",
                    (excess,),
                ).rowcount
            dropped += removed
            excess -= removed
        self._bump("dropped", dropped)

    def _bump(self, name: str, by: int) -> None:
        if by:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    def counter(self, name: str) -> int:
        """A counter's value (``dropped``: samples dropped since they were last reported)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            return int(row[0]) if row else 0

    def pending(self) -> int:
        """Samples not yet acknowledged."""
        with self._lock:
            return self._count()

    def next_batch(self, *, max_samples: int = MAX_METRIC_SAMPLES_PER_BATCH) -> PendingBatch | None:
        """The oldest open batch (same id and samples as before), or a newly formed one.

        Returns None when nothing is queued. The dropped counter is folded into a new
        batch as one ``dropped`` sample, in the same transaction that resets it.
        """
        limit = max(1, min(max_samples, MAX_METRIC_SAMPLES_PER_BATCH))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT batch_id FROM batches ORDER BY formed_at, batch_id LIMIT 1"
                ).fetchone()
                if row is not None:
                    batch_id = str(row[0])
                else:
                    batch_id = uuid.uuid4().hex
                    dropped_row = self._db.execute(
                        "SELECT value FROM counters WHERE name = 'dropped'"
                    ).fetchone()
                    dropped = int(dropped_row[0]) if dropped_row else 0
                    # The dropped sample takes one slot so the batch stays within the limit.
                    take = limit - 1 if dropped else limit
                    assigned = self._db.execute(
                        "UPDATE samples SET batch_id = ? WHERE id IN "
                        "(SELECT id FROM samples WHERE batch_id IS NULL ORDER BY id LIMIT ?)",
                        (batch_id, take),
                    ).rowcount
                    if dropped:
                        self._db.execute(
                            "INSERT INTO samples (name, value, ts, version_id, batch_id) "
                            "VALUES (?, ?, ?, NULL, ?)",
                            ("dropped", float(dropped), utc_now_iso(), batch_id),
                        )
                        self._db.execute("UPDATE counters SET value = 0 WHERE name = 'dropped'")
                    elif assigned == 0:
                        self._db.execute("COMMIT")
                        return None
                    self._db.execute(
                        "INSERT INTO batches (batch_id, formed_at) VALUES (?, ?)", (batch_id, utc_now_iso())
                    )
                rows = self._db.execute(
                    "SELECT name, value, ts, version_id FROM samples WHERE batch_id = ? ORDER BY id",
                    (batch_id,),
                ).fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        samples: list[MetricSample] = []
        for name, value, ts, version_id in rows:
            sample: MetricSample = {"name": str(name), "value": float(value), "ts": str(ts)}
            if version_id is not None:
                sample["version_id"] = int(version_id)
            samples.append(sample)
        return PendingBatch(batch_id=batch_id, samples=samples)

    def ack(self, batch_id: str) -> int:
        """Delete an acknowledged batch; returns how many samples it held."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = self._db.execute("DELETE FROM samples WHERE batch_id = ?", (batch_id,)).rowcount
                self._db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(removed)


class BufferedRecorder:
    """Metric samples held in memory and written to the outbox in batches.

    The local API records two samples per prediction; one outbox transaction each would
    cost more than the prediction. Samples are written when ``max_pending`` are waiting
    or ``max_age_s`` passed since the oldest, and at every :meth:`flush` (the agent
    flushes before it sends metrics and when it stops). A crash can lose what was still
    buffered: at most ``max_age_s`` of samples.
    """

    def __init__(self, outbox: Outbox, *, max_pending: int = 256, max_age_s: float = 1.0) -> None:
        self.outbox = outbox
        self.max_pending = max_pending
        self.max_age_s = max_age_s
        self._pending: list[tuple[str, float, str, int | None]] = []
        self._since = 0.0
        self._lock = threading.Lock()

    def add(self, name: str, value: float, version_id: int | None) -> None:
        """Queue one sample, stamped now."""
        import time

        now = time.monotonic()
        with self._lock:
            if not self._pending:
                self._since = now
            self._pending.append((name, float(value), utc_now_iso(), version_id))
            due = len(self._pending) >= self.max_pending or now - self._since >= self.max_age_s
        if due:
            self.flush()

    def flush(self) -> int:
        """Write every waiting sample to the outbox; returns how many."""
        with self._lock:
            rows, self._pending = self._pending, []
        if rows:
            self.outbox.add_many(rows)
        return len(rows)
