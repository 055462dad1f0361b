from __future__ import annotations

import subprocess
import sys

MODULES = [
    "devices_agent.data",
    "devices_agent.program",
    "models_registry.ml.onnx_weights",
    "models_registry.ml.optimise",
    "models_registry.ml.evaluate",
    "models_registry.ml.recommend",
    "benchmarks.model_report",
]


def test_importing_the_ml_core_loads_neither_torch_nor_onnx_nor_django() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "heavy = [m for m in ('torch', 'onnx', 'sklearn', 'django') if m in sys.modules]\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
