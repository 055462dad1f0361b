"""Build ONNX Runtime training artifacts for a version's ONNX graph: a standalone script.

Runs in the pinned builder environment (``models_registry.ml.ort_env``: the training
build of ONNX Runtime and the onnx release its artifact generator works with), never in
the server's own environment, and imports nothing of the project: the server calls it
as a subprocess and reads one JSON line from its standard output.

    python ort_builder.py build --onnx model.onnx --out DIR --task classification \\
        --trainable fc1.weight,fc1.bias,... --input-shape 64 --outputs 10

``build`` writes the graphs and checkpoint of :mod:`devices_agent.ort_artifacts` into
``DIR`` and prints ``{"ok": true, "manifest": {...}}``, or ``{"ok": false, "code": ...,
"reason": ..., "op": ..., "node": ...}`` when the graph cannot be trained with ORT:

- ``opset_unsupported``: the graph's IR version or opset is newer than the runtime trains;
- ``not_initializers``: a trainable parameter is not an initializer of the graph;
- ``no_gradient``: an operator has no gradient (or one that fails when run); ``op`` and
  ``node`` name it.

Every attempt (generating the graphs, then training steps with batches of 3, 2 and 1
examples and evaluation steps, for each optimizer) runs in a child process: some gradient gaps
do not raise but crash the process (AveragePool's gradient divides by zero with a
variable batch). When the whole graph fails and the error does not name the operator,
the builder probes sub-graphs (each node with its ancestors, squared-mean loss) and
bisects to the first node that fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "flotilla-ort-training/1"
MAX_IR_VERSION = 10
MAX_OPSET = 21
LOSSES = {"classification": "cross_entropy", "regression": "mse"}
ATTEMPT_TIMEOUT_S = 300


def _training_package() -> None:
    """Import ``onnxruntime.training``'s subpackages without its ``__init__`` (which imports torch)."""
    if "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime.training")
    if spec is None:
        raise ImportError("onnxruntime is not a training build")
    sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)


def _versions() -> dict[str, str]:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("onnxruntime-training-cpu", "onnx", "numpy")}


# --------------------------------------------------------------------------- generation


def _generate(model: Any, *, trainable: list[str], loss: Any, out: Path, optimizer: str) -> None:
    from onnxruntime.training import artifacts

    out.mkdir(parents=True, exist_ok=True)
    kinds = {"sgd": artifacts.OptimType.SGD, "adam": artifacts.OptimType.AdamW}
    artifacts.generate_artifacts(
        model,
        requires_grad=trainable,
        loss=loss,
        optimizer=kinds[optimizer],
        artifact_directory=str(out),
        additional_output_names=[o.name for o in model.graph.output] if loss is not None else None,
    )


def _torch_adam(path: Path) -> None:
    """Make the AdamW graph compute PyTorch's Adam: its formula (adam_mode 0), eps 1e-8, no decay."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    wanted = {
        "adam_mode": 0,
        "epsilon": 1e-8,
        "weight_decay": 0.0,
        "correct_bias": 1,
        "alpha": 0.9,
        "beta": 0.999,
    }
    for node in model.graph.node:
        if node.op_type != "AdamWOptimizer":
            continue
        kept = [a for a in node.attribute if a.name not in wanted]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in wanted.items())
    onnx.save(model, str(path))


def _loss_block(task: str) -> Any:
    from onnxruntime.training import artifacts

    return artifacts.LossType.CrossEntropyLoss if task == "classification" else artifacts.LossType.MSELoss


def _attempt(args: argparse.Namespace) -> int:
    """Child: generate the full artifacts into --out and train a few steps with each optimizer."""
    import onnx

    _training_package()
    model = onnx.load(args.onnx)
    trainable = [n for n in args.trainable.split(",") if n]
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        _generate(model, trainable=trainable, loss=_loss_block(args.task), out=out, optimizer="sgd")
        os.replace(out / "optimizer_model.onnx", out / "optimizer_sgd.onnx")
        _generate(
            model, trainable=trainable, loss=_loss_block(args.task), out=Path(scratch), optimizer="adam"
        )
        shutil.copyfile(Path(scratch) / "optimizer_model.onnx", out / "optimizer_adam.onnx")
    _torch_adam(out / "optimizer_adam.onnx")
    shape = [int(d) for d in args.input_shape.split(",") if d]
    for optimizer in ("sgd", "adam"):
        _smoke(
            out, optimizer=optimizer, task=args.task, shape=shape, outputs=int(args.outputs), dtype=args.dtype
        )
    return 0


def _smoke(out: Path, *, optimizer: str, task: str, shape: list[int], outputs: int, dtype: str) -> None:
    from onnxruntime.training import api

    rng = np.random.default_rng(0)
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"))
    opt = api.Optimizer(str(out / f"optimizer_{optimizer}.onnx"), module)
    # Varying batch sizes, down to one (an epoch's last batch can be that small).
    for batch in (3, 2, 1):
        x = _inputs(rng, batch, shape, dtype)
        labels = (
            rng.integers(0, outputs, size=batch).astype(np.int64)
            if task == "classification"
            else rng.standard_normal((batch, outputs)).astype(np.float32)
        )
        module.train()
        loss, _ = module(x, labels)
        if not np.isfinite(loss):
            raise ValueError(f"the training step gives a non-finite loss ({loss})")
        opt.step()
        module.lazy_reset_grad()
        module.eval()
        module(x, labels)


def _inputs(rng: Any, batch: int, shape: list[int], dtype: str) -> Any:
    if dtype == "float32":
        return rng.standard_normal((batch, *shape)).astype(np.float32)
    return rng.integers(0, 16, size=(batch, *shape)).astype(np.dtype(dtype))


# --------------------------------------------------------------------------- probing


def _squared_mean() -> Any:
    """A loss for sub-graphs: the mean of the squared output (needs no target)."""
    from onnxruntime.training import onnxblock

    class SquaredMean(onnxblock.Block):
        def build(self, name: str) -> Any:
            return onnxblock.blocks.ReduceMean(keepdims=False)(onnxblock.blocks.Pow(2.0)(name))

    return SquaredMean()


def _sub_model(model: Any, index: int) -> tuple[Any, list[str]] | None:
    """Node ``index`` with its ancestors as a model whose output is the node's first output;
    its trainable (float) initializers. None when nothing in it is trainable or float."""
    from onnx import TensorProto, helper

    nodes = list(model.graph.node)
    values = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    target = nodes[index].output[0]
    info = values.get(target)
    if info is None or info.type.tensor_type.elem_type != TensorProto.FLOAT:
        return None
    need = {target}
    kept = []
    for node in reversed(nodes[: index + 1]):
        if any(o in need for o in node.output):
            kept.append(node)
            need.update(node.input)
    kept.reverse()
    initializers = [i for i in model.graph.initializer if i.name in need]
    trainable = [i.name for i in initializers if i.data_type == TensorProto.FLOAT]
    if not trainable:
        return None
    graph = helper.make_graph(kept, "probe", list(model.graph.input), [info], initializers)
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return probe, trainable


def _probe(args: argparse.Namespace) -> int:
    """Child: generate and run node --node's sub-graph (exit 3: nothing to probe there)."""
    import onnx

    _training_package()
    from onnxruntime.training import api

    model = onnx.shape_inference.infer_shapes(onnx.load(args.onnx))
    made = _sub_model(model, int(args.node))
    if made is None:
        return 3
    probe, trainable = made
    out = Path(args.out)
    _generate(probe, trainable=trainable, loss=_squared_mean(), out=out, optimizer="sgd")
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state)
    opt = api.Optimizer(str(out / "optimizer_model.onnx"), module)
    shape = [int(d) for d in args.input_shape.split(",") if d]
    rng = np.random.default_rng(0)
    for batch in (3, 2):
        module(_inputs(rng, batch, shape, args.dtype))
        opt.step()
        module.lazy_reset_grad()
    return 0


def _child(command: list[str]) -> tuple[int, str]:
    """Run this script as a child; its exit code (negative: the signal) and the tail of its errors."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", __file__, *command],
            capture_output=True,
            text=True,
            timeout=ATTEMPT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [line for line in done.stderr.splitlines() if line.strip() and "[I:onnxruntime" not in line]
    return done.returncode, "\n".join(lines[-20:])


def _describe(code: int, errors: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name}"
    last = [line for line in errors.splitlines() if "Error" in line or "error" in line]
    return (last[-1] if last else errors.splitlines()[-1] if errors else "failed").strip()[:1500]


_NAMED = (
    # The gradient graph builder knows no gradient for the operator.
    re.compile(r"gradient builder has not been registered: (?P<op>\w+) for node (?P<node>\S+)"),
    # The gradient exists as a node but the runtime has no kernel for it.
    re.compile(r"implementation for (?P<op>\w+?)Grad\(\d+\) node with name '(?P<node>[^']*)'"),
)


def _named_op(errors: str) -> tuple[str, str] | None:
    for pattern in _NAMED:
        found = pattern.search(errors)
        if found:
            node = found.group("node")
            return found.group("op"), node.split("_Grad/")[0] if "_Grad/" in node else node
    return None


def _locate(model_path: str, model: Any, args: argparse.Namespace, scratch: Path) -> tuple[str, str] | None:
    """The first node whose sub-graph fails to train (bisection over the nodes in order)."""
    nodes = list(model.graph.node)
    results: dict[int, bool | None] = {}

    def fails(index: int) -> bool | None:
        if index not in results:
            code, _ = _child(
                [
                    "probe",
                    "--onnx",
                    model_path,
                    "--node",
                    str(index),
                    "--out",
                    str(scratch / f"probe{index}"),
                    "--input-shape",
                    args.input_shape,
                    "--dtype",
                    args.dtype,
                ]
            )
            results[index] = None if code == 3 else code != 0
        return results[index]

    candidates = [i for i in range(len(nodes)) if _sub_model(model, i) is not None]
    lo, hi = 0, len(candidates) - 1
    if hi < 0 or not fails(candidates[hi]):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    node = nodes[candidates[lo]]
    return node.op_type, node.name or node.output[0]


def _build(args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    model = onnx.load(args.onnx)
    opsets = {o.domain or "ai.onnx": int(o.version) for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    if model.ir_version > MAX_IR_VERSION or opset > MAX_OPSET:
        return {
            "ok": False,
            "code": "opset_unsupported",
            "reason": (
                f"the graph is IR {model.ir_version}, opset {opset}; ONNX Runtime's training trains at most "
                f"IR {MAX_IR_VERSION} and opset {MAX_OPSET} (export with opset <= {MAX_OPSET})"
            ),
        }
    trainable = [n for n in args.trainable.split(",") if n]
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    missing = [n for n in trainable if n not in floats]
    if missing or not trainable:
        return {
            "ok": False,
            "code": "not_initializers",
            "reason": f"trainable parameters that are not float initializers of the graph: {missing[:10]}",
        }
    out = Path(args.out)
    code, errors = _child(
        [
            "attempt",
            "--onnx",
            args.onnx,
            "--out",
            str(out),
            "--task",
            args.task,
            "--trainable",
            args.trainable,
            "--input-shape",
            args.input_shape,
            "--outputs",
            str(args.outputs),
            "--dtype",
            args.dtype,
        ]
    )
    if code == 0:
        training = onnx.load(str(out / "training_model.onnx"))
        inputs = [i.name for i in training.graph.input]
        manifest = {
            "format": FORMAT,
            "loss": LOSSES[args.task],
            "trainable": trainable,
            "input": inputs[0],
            "labels": inputs[1],
            "outputs": [o.name for o in training.graph.output][:2],
            "optimizers": {"sgd": "optimizer_sgd.onnx", "adam": "optimizer_adam.onnx"},
            "opset": opset,
            "builder": _versions(),
        }
        for name in ("optimizer_model.onnx",):
            (out / name).unlink(missing_ok=True)
        return {"ok": True, "manifest": manifest}
    reason = _describe(code, errors)
    located = _named_op(errors)
    if located is None:
        with tempfile.TemporaryDirectory() as scratch:
            inferred = Path(scratch) / "inferred.onnx"
            full = onnx.shape_inference.infer_shapes(model)
            onnx.save(full, str(inferred))
            located = _locate(str(inferred), full, args, Path(scratch))
    result: dict[str, Any] = {"ok": False, "code": "no_gradient", "reason": reason, "detail": errors[-2000:]}
    if located is not None:
        result["op"], result["node"] = located
        result["reason"] = (
            f"operator {located[0]} (node {located[1]}) has no usable gradient in ONNX Runtime's training"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "attempt", "probe"):
        command = sub.add_parser(name)
        command.add_argument("--onnx", required=True)
        command.add_argument("--out", required=True)
        command.add_argument("--input-shape", required=True)
        command.add_argument("--dtype", default="float32")
        if name != "probe":
            command.add_argument("--task", choices=sorted(LOSSES), required=True)
            command.add_argument("--trainable", required=True)
            command.add_argument("--outputs", type=int, required=True)
        else:
            command.add_argument("--node", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "attempt":
        return _attempt(args)
    if args.command == "probe":
        return _probe(args)
    print(json.dumps(_build(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
