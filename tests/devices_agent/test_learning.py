"""The board's own data, its personal head and the model it serves (devices_agent.learning)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # noqa: E402, TID253 - these tests train: torch is required, never skipped

from devices_agent.codecs import decode_tensors
from devices_agent.data import load_digits_split
from devices_agent.family import FamilySpec
from devices_agent.learning import LocalData, ModelRuntime, NotEnoughData, Personaliser
from devices_agent.samples import SampleStore
from devices_agent.state import AgentState

DIGITS = FamilySpec(task="classification", input_shape=(64,), num_classes=10)


@pytest.fixture(scope="module")
def trained() -> tuple[Any, dict[str, np.ndarray]]:
    """A small digits MLP trained centrally, as the global model a board receives."""
    from devices_agent.program import make_bundle

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x, y, _, _ = load_digits_split(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    bundle = make_bundle(model, torch.zeros(2, 64))
    state, _ = decode_tensors(bundle.weights)
    return bundle, {k: np.asarray(v) for k, v in state.items()}


def _store(tmp_path: Path, **kwargs: Any) -> SampleStore:
    return SampleStore(tmp_path / "samples.sqlite3", **kwargs)


def test_the_store_is_bounded_by_count_bytes_and_age(tmp_path: Path) -> None:
    store = _store(tmp_path, max_examples=30, max_bytes=10_000_000, max_age_s=1000.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        store.add(rng.random((10, 64), dtype=np.float32), rng.integers(0, 10, 10))
    counts = store.counts()
    assert counts.examples == 30 and counts.evicted == 10 and store.take_evicted() == 10
    assert store.take_evicted() == 0  # reported once
    small = _store(tmp_path / "b", max_bytes=1500)
    small.add(rng.random((2, 64), dtype=np.float32), rng.integers(0, 10, 2))
    small.add(rng.random((2, 64), dtype=np.float32), rng.integers(0, 10, 2))
    assert small.counts().nbytes <= 1500 and small.counts().evicted >= 1
    with pytest.raises(ValueError, match="larger than the store"):
        small.add(rng.random((20, 64), dtype=np.float32), rng.integers(0, 10, 20))
    old = _store(tmp_path / "c", max_age_s=0.0)
    old.add(rng.random((3, 64), dtype=np.float32), rng.integers(0, 10, 3))
    old.add(rng.random((1, 64), dtype=np.float32), rng.integers(0, 10, 1))
    assert old.counts().examples <= 1


def test_local_data_joins_the_store_and_a_directory_of_npz_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    x, y, _, _ = load_digits_split(seed=0)
    store.add(x[:50], y[:50])
    folder = tmp_path / "labelled"
    folder.mkdir()
    np.savez(folder / "a.npz", x=x[50:150], y=y[50:150])
    np.savez(folder / "b.npz", x=x[150:200], y=y[150:200])
    (folder / "broken.npz").write_bytes(b"not a zip")
    data = LocalData(store, data_dir=folder, holdout_percent=20)
    train, hold = data.training_set(DIGITS), data.holdout_set(DIGITS)
    assert train is not None and hold is not None
    assert len(train[0]) + len(hold[0]) == 200 and 20 <= len(hold[0]) <= 60
    counts = data.counts()
    assert counts == {"local_examples": len(train[0]), "holdout_examples": len(hold[0])}
    # The split is by content: more files, and the old examples stay on their side.
    np.savez(folder / "c.npz", x=x[200:260], y=y[200:260])
    again = data.holdout_set(DIGITS)
    assert again is not None
    kept = {row.tobytes() for row in hold[0]}
    assert kept <= {row.tobytes() for row in again[0]}


def test_an_entry_point_feeds_batches_and_wrong_data_is_left_out(tmp_path: Path, monkeypatch: Any) -> None:
    module = tmp_path / "board_data.py"
    module.write_text(
        textwrap.dedent(
            """
            import numpy as np
            from devices_agent.data import load_digits_split

            def batches():
                x, y, _, _ = load_digits_split(seed=0)
                yield x[:40], y[:40]
                yield x[40:80], y[40:80]

            def wrong():
                return np.zeros((10, 3), np.float32), np.zeros(10, np.int64)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    good = LocalData(_store(tmp_path / "g"), entry_point="board_data:batches")
    train, hold = good.training_set(DIGITS), good.holdout_set(DIGITS)
    assert train is not None and hold is not None and len(train[0]) + len(hold[0]) == 80
    wrong = LocalData(_store(tmp_path / "w"), entry_point="board_data:wrong")
    assert wrong.training_set(DIGITS) is None  # shapes that do not fit the family never train
    missing = LocalData(_store(tmp_path / "m"), entry_point="no_such_module:f")
    assert missing.training_set(DIGITS) is None
    sys.modules.pop("board_data", None)


def _permuted_board(tmp_path: Path, n: int = 400) -> LocalData:
    """A board whose application names classes its own way: label k is (k + 1) mod 10."""
    store = _store(tmp_path)
    x, y, _, _ = load_digits_split(seed=0)
    store.add(x[:n], (y[:n] + 1) % 10)
    return LocalData(store, holdout_percent=25)


def test_a_personal_head_beats_the_global_one_where_the_board_differs(tmp_path: Path, trained: Any) -> None:
    bundle, state = trained
    recorded: list[tuple[str, float, int | None]] = []
    personaliser = Personaliser(
        state_dir=tmp_path, data=_permuted_board(tmp_path), record=lambda *s: recorded.append(s), epochs=30
    )
    assert personaliser.needs(3)
    result = personaliser.personalise(
        version_id=3, spec=DIGITS, program=bundle.program, global_state=state, head=bundle.head
    )
    assert result.personal_value > result.global_value + 0.3 and result.used and result.rebase == "reset"
    assert [n for n, _, _ in recorded] == ["global_accuracy", "personal_accuracy"]
    assert not personaliser.needs(3) and personaliser.overrides(3) is not None
    meta = json.loads(personaliser.meta_path.read_text())
    assert meta["used"] is True and meta["head"] == bundle.head
    # A new global version starts from the head that fits it.
    again = personaliser.personalise(
        version_id=4, spec=DIGITS, program=bundle.program, global_state=state, head=bundle.head
    )
    assert again.rebase == "kept"


def test_a_head_that_does_not_help_is_kept_but_not_served(tmp_path: Path, trained: Any) -> None:
    bundle, state = trained
    store = _store(tmp_path)
    x, y, _, _ = load_digits_split(seed=0)
    # The board's data looks like everyone's. Enough of it that the store's random split
    # always leaves a holdout (with 60 examples, 1 store in 30,000 held out fewer than 2).
    store.add(x[:300], y[:300])
    personaliser = Personaliser(state_dir=tmp_path, data=LocalData(store), epochs=1, lr=1e-6)
    result = personaliser.personalise(
        version_id=1, spec=DIGITS, program=bundle.program, global_state=state, head=bundle.head
    )
    assert not result.used and personaliser.overrides(1) is None


def test_too_little_data_waits(tmp_path: Path, trained: Any) -> None:
    bundle, state = trained
    store = _store(tmp_path)
    x, y, _, _ = load_digits_split(seed=0)
    store.add(x[:5], y[:5])
    personaliser = Personaliser(state_dir=tmp_path, data=LocalData(store))
    with pytest.raises(NotEnoughData, match="needs 20"):
        personaliser.personalise(
            version_id=1, spec=DIGITS, program=bundle.program, global_state=state, head=bundle.head
        )


def test_the_runtime_serves_the_personal_head_when_it_is_better(tmp_path: Path, trained: Any) -> None:
    bundle, state = trained
    agent_state = AgentState(tmp_path / "state")
    part = tmp_path / "model.onnx"
    part.write_bytes(bundle.onnx)
    agent_state.install(version_id=3, source=part, meta={"spec": DIGITS.to_dict(), "sha256": "x"})
    agent_state.set_current(3, previous_version_id=None)
    data = _permuted_board(tmp_path)
    personaliser = Personaliser(state_dir=agent_state.root, data=data, epochs=30)
    runtime = ModelRuntime(agent_state, personaliser=personaliser)
    hold = data.holdout_set(DIGITS)
    assert hold is not None
    first = runtime.active()
    assert first is not None and first.kind == "global"
    global_right = (first.run(hold[0]).argmax(axis=1) == hold[1]).mean()
    personaliser.personalise(
        version_id=3, spec=DIGITS, program=bundle.program, global_state=state, head=bundle.head
    )
    served = runtime.active()
    assert served is not None and served.kind == "personal"
    personal_right = (served.run(hold[0]).argmax(axis=1) == hold[1]).mean()
    assert personal_right > global_right + 0.3
