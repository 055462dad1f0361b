"""The metrics outbox: stable batch ids across restarts, acknowledgement, bounded size."""

from __future__ import annotations

from pathlib import Path

from devices_agent.outbox import Outbox


def test_batch_id_survives_a_restart_until_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    for i in range(5):
        box.add("latency_ms", float(i), version_id=3)
    first = box.next_batch(max_samples=3)
    assert first is not None and len(first.samples) == 3
    assert [s["value"] for s in first.samples] == [0.0, 1.0, 2.0]
    assert first.samples[0]["version_id"] == 3
    box.close()  # the agent dies before it hears the server's answer

    box = Outbox(path)
    again = box.next_batch(max_samples=3)
    assert again is not None
    assert again.batch_id == first.batch_id and again.samples == first.samples
    assert box.ack(first.batch_id) == 3
    rest = box.next_batch(max_samples=3)
    assert rest is not None and rest.batch_id != first.batch_id
    assert [s["value"] for s in rest.samples] == [3.0, 4.0]
    box.ack(rest.batch_id)
    assert box.next_batch() is None and box.pending() == 0
    box.close()


def test_samples_added_after_forming_do_not_join_the_open_batch(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    box.add("confidence", 0.5)
    batch = box.next_batch()
    assert batch is not None
    box.add("confidence", 0.9)
    assert box.next_batch() == batch
    box.ack(batch.batch_id)
    nxt = box.next_batch()
    assert nxt is not None and [s["value"] for s in nxt.samples] == [0.9]
    box.close()


def test_full_outbox_drops_oldest_unbatched_and_reports_the_count(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_samples=10)
    box.add_many([("latency_ms", float(i), f"2026-01-01T00:00:{i:02d}+00:00", None) for i in range(25)])
    assert box.pending() == 10
    assert box.counter("dropped") == 15
    batch = box.next_batch(max_samples=100)
    assert batch is not None
    values = [s["value"] for s in batch.samples if s["name"] == "latency_ms"]
    assert values == [float(i) for i in range(15, 25)]  # the newest ten survive
    dropped = [s for s in batch.samples if s["name"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["value"] == 15.0
    assert box.counter("dropped") == 0  # reported once, in the batch that carries it
    box.close()


def test_full_outbox_drops_whole_open_batches_never_part_of_one(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_samples=6)
    box.add_many([("ram_mb", float(i), "2026-01-01T00:00:00+00:00", None) for i in range(4)])
    old = box.next_batch(max_samples=4)
    assert old is not None
    # Three more fit (7 > 6): the oldest rows are the open batch, dropped whole.
    box.add_many([("ram_mb", float(10 + i), "2026-01-01T00:00:01+00:00", None) for i in range(3)])
    assert box.pending() == 3 and box.counter("dropped") == 4
    nxt = box.next_batch(max_samples=100)
    assert nxt is not None and nxt.batch_id != old.batch_id
    assert [s["value"] for s in nxt.samples if s["name"] == "ram_mb"] == [10.0, 11.0, 12.0]
    assert [s["value"] for s in nxt.samples if s["name"] == "dropped"] == [4.0]
    box.close()


def test_batches_respect_the_wire_limit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    box.add_many([("correct", 1.0, "2026-01-01T00:00:00+00:00", None)] * 2500)
    sizes = []
    while (batch := box.next_batch(max_samples=5000)) is not None:
        sizes.append(len(batch.samples))
        box.ack(batch.batch_id)
    assert sizes == [1000, 1000, 500]
    box.close()
