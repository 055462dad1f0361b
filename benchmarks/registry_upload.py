"""Registry upload cost: what validating and signing an artifact adds to storing it.

An upload arrives as a file Django spooled to disk. The registry hashes it in place,
checks it (safetensors: the header with offsets against the file size, then every
tensor's finiteness, memory-mapped one tensor at a time; ONNX: parse, checker, ONNX
Runtime load; a whole bundle: both, plus the program read without pickle, loaded with
the weights and run against the ONNX graph on sample inputs), signs the digest and
copies it into the store. The baseline, measured in the same run, is the least any
store must do: hash the uploaded files and copy them. A naive validator that also loads
the whole safetensors file into memory is shown for comparison.

    python -m benchmarks.registry_upload [--quick] [--json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def _configure_django(tmp: Path) -> None:
    # Only settings the registry's validation and signing read; no database is needed.
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            ARTIFACT_SIGNING_KEY=base64.b64encode(bytes(range(32))).decode(),
            ARTIFACT_SIGNING_KEY_FILE=tmp / "unused.pem",
            MODEL_UPLOAD_MAX_BYTES=1 << 34,
            INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "rest_framework"],
            USE_TZ=True,
        )
        django.setup()


def _weights_file(megabytes: int) -> bytes:
    from devices_agent.codecs import encode_tensors

    rng = np.random.default_rng(0)
    per_tensor = 1 << 18  # 1 MiB of float32 per tensor, like the layers of a mid-sized model
    tensors = {
        f"layer{i}.weight": rng.standard_normal(per_tensor, dtype=np.float32) for i in range(megabytes)
    }
    return encode_tensors(tensors)


def _interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, timed round-robin.

    On a shared machine speed drifts; running every contender once per round keeps a slow
    moment from landing on one of them only.
    """
    for fn in fns.values():
        fn()  # warm-up: page cache, imports, lazy initialisation
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(statistics.median(values)) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller files, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    sizes = [1, 8] if args.quick else [1, 16, 64]
    repeats = 5 if args.quick else 15

    with tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp_name:
        tmp = Path(tmp_name)
        _configure_django(tmp)
        from safetensors.numpy import load as st_load

        from devices_agent.family import FamilySpec
        from models_registry.signing import sign_digest
        from models_registry.validation import spool, validate_onnx, validate_program, validate_safetensors

        rows: list[dict[str, Any]] = []
        target = tmp / "stored.bin"

        upload = tmp / "upload.bin"

        class OnDiskUpload:
            """What Django hands a view for an upload it spooled to a temporary file."""

            def temporary_file_path(self) -> str:
                return str(upload)

        def baseline(data: bytes) -> None:
            # Hash the uploaded file and copy it into the store: the least any store does.
            digest = hashlib.sha256()
            with upload.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            shutil.copyfile(upload, target)

        def registry_path(data: bytes, kind: str) -> None:
            with spool(OnDiskUpload(), field=kind, max_bytes=1 << 34) as spooled:
                if kind == "weights":
                    validate_safetensors(spooled.path, size=spooled.size)
                else:
                    validate_onnx(spooled.path, input_shape=[64])
                sign_digest(spooled.sha256)
                shutil.copyfile(spooled.path, target)

        def naive(data: bytes) -> None:
            baseline(data)
            st_load(upload.read_bytes())

        for megabytes in sizes:
            data = _weights_file(megabytes)
            upload.write_bytes(data)
            times = _interleaved_ms(
                {
                    "baseline": partial(baseline, data),
                    "registry": partial(registry_path, data, "weights"),
                    "full": partial(naive, data),
                },
                repeats,
            )
            base, ours, full = times["baseline"], times["registry"], times["full"]
            rows.append(
                {
                    "artifact": f"safetensors {megabytes} MiB",
                    "bytes": len(data),
                    "baseline_ms": base,
                    "registry_ms": ours,
                    "ratio": ours / base,
                    "full_load_ms": full,
                    "full_load_ratio": full / base,
                }
            )

        from config.demo.nets import bundle

        made = bundle("mlp")
        onnx = made.onnx
        upload.write_bytes(onnx)
        times = _interleaved_ms(
            {"baseline": partial(baseline, onnx), "registry": partial(registry_path, onnx, "onnx")},
            repeats * 3,
        )
        base, ours = times["baseline"], times["registry"]
        rows.append(
            {
                "artifact": "onnx digits MLP",
                "bytes": len(onnx),
                "baseline_ms": base,
                "registry_ms": ours,
                "ratio": ours / base,
                "full_load_ms": None,
                "full_load_ratio": None,
            }
        )

        spec = FamilySpec(task="classification", input_shape=(64,), num_classes=10)
        files = {"program": made.program, "weights": made.weights, "onnx": made.onnx}
        paths = {kind: tmp / f"bundle-{kind}.bin" for kind in files}
        for kind, data in files.items():
            paths[kind].write_bytes(data)

        def bundle_baseline() -> None:
            for path in paths.values():
                hashlib.sha256(path.read_bytes()).hexdigest()
                shutil.copyfile(path, target)

        def bundle_registry() -> None:
            with (
                spool(paths["weights"].read_bytes(), field="weights", max_bytes=1 << 34) as weights,
                spool(paths["onnx"].read_bytes(), field="onnx", max_bytes=1 << 34) as graph,
                spool(paths["program"].read_bytes(), field="program", max_bytes=1 << 34) as program,
            ):
                validate_safetensors(weights.path, size=weights.size)
                validate_onnx(graph.path, input_shape=[64])
                validate_program(
                    program.path, weights=weights.path, onnx=graph.path, spec=spec, head=made.head
                )
                for spooled in (weights, graph, program):
                    sign_digest(spooled.sha256)
                    shutil.copyfile(spooled.path, target)

        times = _interleaved_ms({"baseline": bundle_baseline, "registry": bundle_registry}, repeats)
        base, ours = times["baseline"], times["registry"]
        rows.append(
            {
                "artifact": "bundle digits MLP",
                "bytes": sum(len(data) for data in files.values()),
                "baseline_ms": base,
                "registry_ms": ours,
                "ratio": ours / base,
                "full_load_ms": None,
                "full_load_ratio": None,
            }
        )

    print("Registry upload path (hash + validate + sign + store) vs hash + store baseline")
    print(f"median of {repeats} runs (ONNX: {repeats * 3}); ratio = registry / baseline")
    print("bundle: program + weights + ONNX, with the program run against the graph on sample inputs")
    header = (
        f"{'artifact':<22} {'bytes':>11} {'baseline ms':>12} {'registry ms':>12} {'ratio':>7} "
        f"{'full-load ms':>13} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        full_ms = "-" if row["full_load_ms"] is None else f"{row['full_load_ms']:.2f}"
        full_ratio = "-" if row["full_load_ratio"] is None else f"{row['full_load_ratio']:.2f}"
        print(
            f"{row['artifact']:<22} {row['bytes']:>11} {row['baseline_ms']:>12.2f} "
            f"{row['registry_ms']:>12.2f} {row['ratio']:>7.2f} {full_ms:>13} {full_ratio:>7}"
        )
    if args.json:
        print(json.dumps({"benchmark": "registry_upload", "quick": args.quick, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
