"""Train or evaluate with the ort backend inside a torch-less board's environment.

Run by the tests (``tests/ort_helpers.py``) with that environment's Python, never
imported: ``python -P ort_child.py train|evaluate IN.npz ARCHIVE REQUEST.json OUT.npz``.
``IN.npz`` holds ``x``, ``y`` and the weights as ``w/<name>``; the request holds the
family spec, the training config and ``trainable``. ``OUT.npz`` holds the delta as
``d/<name>`` and the metrics as JSON in ``metrics``; a refusal exits 3 with its code and
message on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main() -> int:
    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.family import FamilySpec

    command, data_path, archive_path, request_path, out_path = sys.argv[1:6]
    assert "torch" not in sys.modules
    data = np.load(data_path)
    state = {k[2:]: data[k] for k in data.files if k.startswith("w/")}
    request = json.loads(Path(request_path).read_text())
    spec = FamilySpec.from_dict(request["spec"])
    archive = Path(archive_path).read_bytes()
    backend = get_backend("ort", cache_dir=Path(out_path).parent / "ort-cache")
    try:
        if command == "evaluate":
            metrics = backend.evaluate(program=archive, state=state, spec=spec, x=data["x"], y=data["y"])
            np.savez(out_path, metrics=json.dumps({k: v for k, v in metrics.items() if k != "confusion"}))
            return 0
        result = backend.train(
            program=archive,
            state=state,
            spec=spec,
            x=data["x"],
            y=data["y"],
            config=TrainConfig(**request["config"]),
            trainable=request.get("trainable"),
        )
    except ValueError as exc:
        print(json.dumps({"code": getattr(exc, "code", "value_error"), "message": str(exc)}), file=sys.stderr)
        return 3
    assert "torch" not in sys.modules
    arrays: dict[str, Any] = {f"d/{name}": value for name, value in result.delta.items()}
    np.savez(out_path, metrics=json.dumps(result.metrics), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
