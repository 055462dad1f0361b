"""How often A/A experiments are called significant: per-sample versus per-device analysis.

    python -m benchmarks.ab_validity [--quick] [--json] [--experiments N] [--seed S]

Each row is one synthetic fleet (`fleet.rollouts.simulation`): devices with their own
accuracy (spread `device_sd` around 0.85), reporting at log-normal rates (`rate_sigma`),
split at random into two arms that run equally good versions, evaluated at 30 looks as
samples accumulate. Every experiment called significant is a false positive; alpha is
0.05. Columns, for the per-sample analysis (every inference independent: what the
experiments ran before) and the per-device one (each device one vote, with the
service's minimums: 20 samples per device, 5 devices per arm):

* ``msprt``: the always-valid test, stopped at the first significant look;
* ``fixed, every look``: a fixed-horizon test (two-proportion z per sample, Welch's t per
  device) checked at every look, which is not valid under peeking;
* ``fixed, last look``: the same test once, at the end.

The last row is an A/B fleet (every device 8 points better in the treatment): the
per-device column there is power, not a false-positive rate.

With ``--json`` the last line is one JSON object ``{"alpha", "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

from fleet.rollouts.simulation import SimulatedFleet, simulate_experiments

CASES: list[tuple[str, SimulatedFleet]] = [
    ("40 devices", SimulatedFleet()),
    ("20 devices, wider spread", SimulatedFleet(devices=20, device_sd=0.12, min_devices_per_arm=3)),
    ("100 devices", SimulatedFleet(devices=100)),
    ("80 devices, very unequal rates", SimulatedFleet(devices=80, rate_sigma=2.0, samples_per_look=30)),
    ("40 devices, nearly alike", SimulatedFleet(device_sd=0.02)),
    ("A/B: +8 points, 100 devices", SimulatedFleet(devices=100, effect=0.08)),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 experiments per fleet")
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    parser.add_argument("--experiments", type=int, default=None, help="experiments per fleet (200)")
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args(argv)
    experiments = args.experiments or (100 if args.quick else 200)

    rows: list[dict[str, Any]] = []
    columns = f"{'msprt':>10} {'fixed, every':>12} {'fixed, last':>11}"
    header = f"{'fleet':34} {'per sample':^35}   {'per device':^35}\n{'':34} {columns}   {columns}"
    sd = (0.05 * 0.95 / experiments) ** 0.5
    print(f"{experiments} experiments x 30 looks per fleet, alpha 0.05 (binomial sd {sd:.3f})")
    print(header)
    for name, fleet in CASES:
        started = time.perf_counter()
        result = simulate_experiments(replace(fleet, experiments=experiments), seed=args.seed)
        row = {
            "fleet": name,
            "effect": fleet.effect,
            **result.as_dict(),
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(
            f"{name:34} {result.per_sample_msprt:10.3f} {result.per_sample_fixed_every_look:12.3f} "
            f"{result.per_sample_fixed_last_look:11.3f}   {result.per_device_msprt:10.3f} "
            f"{result.per_device_fixed_every_look:12.3f} {result.per_device_fixed_last_look:11.3f}"
        )
    if args.json:
        print(json.dumps({"alpha": 0.05, "rows": rows}))


if __name__ == "__main__":
    main()
