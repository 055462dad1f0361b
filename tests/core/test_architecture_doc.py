"""docs/architecture.md stays the picture of the system: its event table is the event list."""

from __future__ import annotations

import re
from pathlib import Path

from core.events import EVENT_TYPES

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _event_rows() -> dict[str, tuple[bool, tuple[str, ...]]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z_]+\.[a-z_]+`", cells[0]) and cells[1] in ("yes", "no"):
            keys = tuple(re.findall(r"`([a-z_]+)`", cells[2]))
            rows[cells[0].strip("`")] = (cells[1] == "yes", keys)
    return rows


def test_the_documented_events_are_the_event_list() -> None:
    rows = _event_rows()
    assert set(rows) == set(EVENT_TYPES), "docs/architecture.md's event table differs from EVENT_TYPES"
    for name, event_type in EVENT_TYPES.items():
        public, keys = rows[name]
        assert public == event_type.public, name
        assert keys == event_type.payload, name


def test_the_documented_contracts_are_the_import_linter_contracts() -> None:
    import tomllib

    config = tomllib.loads((DOC.parents[1] / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    text = DOC.read_text()
    assert " > ".join(layers) in text
    shared = next(
        c for c in contracts if c["type"] == "forbidden" and c["forbidden_modules"] == ["devices_agent"]
    )
    allowed = {
        i.split("devices_agent.")[1].split(".")[0] for i in shared["ignore_imports"] if i.startswith("** -> ")
    }
    for module in allowed:
        assert f"`{module}`" in text, f"the shared module devices_agent.{module} is not documented"
