"""``benchmarks.aggregation_scaleout --quick --json`` runs end to end on real workers and
reports what it promises; the times are not checked, the result is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_scaleout_quick_json_reports_both_worker_counts_with_one_workers_result() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.aggregation_scaleout", "--quick", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 200 and report["params"] > 100_000
    cases = report["cases"]
    assert [c["workers"] for c in cases] == [1, 2]
    for case in cases:
        assert {"workers", "wall_s", "max_abs_diff", "aggregate_s", "speedup", "shards"} <= set(case)
        assert case["wall_s"] > 0
        assert case["max_abs_diff"] <= 1e-6
        assert case["shards"] == 200 // report["shard_size"]
        assert sum(case["shards_by_worker"]) == case["shards"]
