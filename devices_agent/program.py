"""Trainable programs: a model's architecture as data, loaded without pickle.

A model version carries three artifacts: its weights (safetensors, keyed by parameter
name), its ONNX graph for inference, and its *program*: the architecture as a
``torch.export`` graph, serialised as JSON (the ``models/model.json`` member of a
``torch.export.save`` archive). Any board with PyTorch can train the program without
any code of the model's author, and the server can check an upload without knowing the
architecture.

Why this format: the graph is plain JSON of ATen operators, it keeps the parameter
names of the author's ``nn.Module`` (``conv.weight``, ``fc1.bias``, …), takes a dynamic
batch dimension, and trains under autograd once loaded. The archive as a whole is never
loaded: ``torch.export.load`` unpickles, and its tensor loader falls back to
``torch.load(weights_only=False)``, which runs arbitrary code. Here only the JSON is
read, the tensors come from safetensors, and before torch sees the JSON it is checked
for everything that could run code during loading: guard code (compiled into Python on
``module()``), symbolic shape expressions (parsed by ``sympy.sympify``, which evaluates),
operator targets outside ATen (resolved by attribute lookup on ``torch``), custom and
script objects (unpickled). A program that uses any of them is refused with a reason.

:func:`make_bundle` turns an ``nn.Module`` and an example input into the three files of
an upload; :func:`load_program` rebuilds a trainable module from program and weights.
torch is imported only inside the functions that need it: :func:`inspect_program` is
pure JSON, so a board without torch (and the server's cheap checks) can use it.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "INPUT_DTYPES",
    "Bundle",
    "ProgramError",
    "ProgramInfo",
    "capture_program",
    "inspect_program",
    "load_program",
    "make_bundle",
    "program_json_from",
]

# Programs of small edge models are tens of kilobytes; the cap keeps a hostile upload
# from making the JSON parser hold gigabytes.
PROGRAM_MAX_BYTES = 32 * 1024 * 1024
INPUT_DTYPES = ("float32", "int64", "uint8")

# Operators a program may call: ATen and prims overloads, and tuple indexing. Anything
# else would be resolved by attribute lookup on the torch module at load time.
_TARGET = re.compile(r"^(torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem)$")
# Symbolic shape expressions are evaluated by sympy: allow only symbols, integers,
# arithmetic and the shape functions torch itself writes, never attributes or strings.
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_ +\-*/%(),<>=!]*$")
_EXPR_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPR_FUNCTIONS = frozenset(
    {
        "FloorDiv",
        "CeilDiv",
        "Mod",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "ModularIndexing",
        "Max",
        "Min",
        "Eq",
        "Ne",
        "Ge",
        "Gt",
        "Le",
        "Lt",
        "And",
        "Or",
        "Not",
        "True",
        "False",
    }
)
_SYMBOL = re.compile(r"^[su][0-9]+$")
# How torch writes a symbol: Symbol('s77', positive=True, integer=True).
_SYMBOL_CALL = re.compile(
    r"Symbol\('[su][0-9]+'(?:, (?:positive|integer|nonnegative|real)=(?:True|False))*\)"
)
# Argument kinds whose values torch would unpickle or resolve to Python objects.
_FORBIDDEN_KEYS = frozenset({"as_custom_obj", "custom_obj_values", "as_graph"})


class ProgramError(ValueError):
    """A program that cannot be loaded safely, or does not fit its weights or inputs."""

    def __init__(self, message: str, *, code: str = "invalid_program", details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details or {}


@dataclass(frozen=True)
class ProgramInfo:
    """What a program declares, read from its JSON without torch."""

    parameters: dict[str, tuple[int, ...]]  # trainable, in the program's order, with shapes
    buffers: dict[str, tuple[int, ...]]  # persistent state that is not trained (e.g. BatchNorm statistics)
    constants: dict[str, tuple[int, ...]]  # tensors lifted out of the code
    input_shape: tuple[int | None, ...]  # one example's shape; None for a symbolic dimension
    operators: tuple[str, ...]

    @property
    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the weights file must hold."""
        return {**self.parameters, **self.buffers, **self.constants}


def program_json_from(data: bytes) -> bytes:
    """The program's JSON from an upload: the JSON itself, or a ``torch.export.save`` archive.

    From an archive only the ``*/models/model.json`` member is read (zip reading runs no
    code); its pickled tensors and sample inputs are ignored.
    """
    if len(data) > PROGRAM_MAX_BYTES:
        raise ProgramError(f"the program is larger than {PROGRAM_MAX_BYTES} bytes", code="too_large")
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [n for n in archive.namelist() if n.endswith("models/model.json")]
                if len(members) != 1:
                    raise ProgramError(
                        "the archive holds no models/model.json (is it a torch.export archive?)"
                    )
                info = archive.getinfo(members[0])
                if info.file_size > PROGRAM_MAX_BYTES:
                    raise ProgramError("the program inside the archive is too large", code="too_large")
                return archive.read(members[0])
        except zipfile.BadZipFile as exc:
            raise ProgramError(f"the archive is not a valid zip file: {exc}") from None
    if data[:1] == b"\x80":
        raise ProgramError(
            "the program is a Python pickle, which is never loaded; upload the JSON of torch.export "
            "(devices_agent.program.make_bundle writes it)",
            code="pickle_rejected",
        )
    return data


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _check_expr(expr: str) -> None:
    expr = _SYMBOL_CALL.sub("s0", expr)
    if len(expr) > 500 or not _EXPR_CHARS.match(expr):
        raise ProgramError(
            f"a symbolic shape expression is not allowed: {expr[:80]!r}", code="unsafe_program"
        )
    for word in _EXPR_WORD.findall(expr):
        if word not in _EXPR_FUNCTIONS and not _SYMBOL.match(word):
            raise ProgramError(
                f"a symbolic shape expression names {word!r}, which is not allowed", code="unsafe_program"
            )


def _sizes(meta: Any) -> tuple[int | None, ...]:
    dims: list[int | None] = []
    for size in meta.get("sizes", []):
        if "as_int" in size:
            dims.append(int(size["as_int"]))
        else:
            dims.append(None)
    return tuple(dims)


def inspect_program(program_json: bytes) -> ProgramInfo:
    """Parse and check a program's JSON; what it declares, or :class:`ProgramError`.

    Pure JSON: no torch, nothing executed. Refuses guard code, unsafe shape expressions,
    operators outside ATen/prims, custom objects, subgraphs, and programs that do not
    take exactly one tensor and return exactly one tensor.
    """
    if len(program_json) > PROGRAM_MAX_BYTES:
        raise ProgramError(f"the program is larger than {PROGRAM_MAX_BYTES} bytes", code="too_large")
    try:
        doc = json.loads(program_json)
        graph_module = doc["graph_module"]
        graph = graph_module["graph"]
        signature = graph_module["signature"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ProgramError(f"not a torch.export program: {type(exc).__name__}: {exc}") from None
    if doc.get("guards_code"):
        raise ProgramError(
            "the program carries guard code, which torch compiles into Python when it loads; "
            "export without guards",
            code="unsafe_program",
        )
    operators: set[str] = set()
    for key, value in _walk(doc):
        if key in _FORBIDDEN_KEYS and value:
            raise ProgramError(
                f"the program holds {key}, which cannot be loaded without running code", code="unsafe_program"
            )
        if key == "expr_str" and isinstance(value, str):
            _check_expr(value)
    for name in doc.get("range_constraints", {}):
        _check_expr(str(name))
    for node in graph.get("nodes", []):
        target = str(node.get("target", ""))
        if not _TARGET.match(target):
            raise ProgramError(
                f"the program calls {target!r}; only ATen operators are allowed",
                code="unsafe_program",
                details={"operator": target},
            )
        operators.add(target)
    tensor_meta = graph.get("tensor_values", {})
    parameters: dict[str, tuple[int, ...]] = {}
    buffers: dict[str, tuple[int, ...]] = {}
    constants: dict[str, tuple[int, ...]] = {}
    user_inputs: list[str] = []

    def shape_of(arg_name: str) -> tuple[int, ...]:
        dims = _sizes(tensor_meta.get(arg_name, {}))
        if any(d is None for d in dims):
            raise ProgramError(f"state tensor {arg_name} has a symbolic shape")
        return tuple(int(d) for d in dims if d is not None)

    for spec in signature.get("input_specs", []):
        kind, body = next(iter(spec.items()))
        arg = body.get("arg", {})
        arg_name = arg.get("name") or arg.get("as_tensor", {}).get("name", "")
        if kind == "parameter":
            parameters[body["parameter_name"]] = shape_of(arg_name)
        elif kind == "buffer":
            buffers[body["buffer_name"]] = shape_of(arg_name)
        elif kind == "tensor_constant":
            constants[body["tensor_constant_name"]] = shape_of(arg_name)
        elif kind == "user_input":
            tensor = arg.get("as_tensor", {}).get("name")
            if tensor is None:
                raise ProgramError("every input of the program must be a tensor")
            user_inputs.append(tensor)
        else:
            raise ProgramError(f"the program has an input of kind {kind!r}, which is not supported")
    if len(user_inputs) != 1:
        raise ProgramError(f"the program must take one input tensor, it takes {len(user_inputs)}")
    outputs = [s for s in signature.get("output_specs", []) if "user_output" in s]
    if len(outputs) != 1:
        raise ProgramError(f"the program must return one tensor, it returns {len(outputs)} outputs")
    if not parameters:
        raise ProgramError("the program has no trainable parameters")
    input_dims = _sizes(tensor_meta.get(user_inputs[0], {}))
    return ProgramInfo(
        parameters=parameters,
        buffers=buffers,
        constants=constants,
        input_shape=input_dims[1:],
        operators=tuple(sorted(operators)),
    )


def check_state(info: ProgramInfo, state: Mapping[str, npt.ArrayLike]) -> None:
    """The weights must hold exactly the program's tensors, with its shapes (else ProgramError)."""
    expected = info.tensors
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = {
        name: {"program": list(expected[name]), "weights": list(np.shape(state[name]))}
        for name in expected
        if name in state and tuple(np.shape(state[name])) != expected[name]
    }
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:10]}")
        if unexpected:
            parts.append(f"not in the program {unexpected[:10]}")
        if wrong:
            first = next(iter(wrong))
            parts.append(
                f"{first} is {tuple(wrong[first]['weights'])} in the weights, "
                f"{tuple(wrong[first]['program'])} in the program"
            )
        raise ProgramError(
            "the weights do not match the program: " + "; ".join(parts),
            code="shape_mismatch",
            details={"missing": missing, "unexpected": unexpected, "shapes": wrong},
        )


def load_program(
    program_json: bytes,
    state: Mapping[str, npt.ArrayLike],
    *,
    input_shape: tuple[int, ...] | list[int],
    input_dtype: str = "float32",
) -> torch.nn.Module:
    """A trainable module from a program and its weights, without unpickling anything.

    Parameters become ``torch.nn.Parameter`` (trainable under autograd), buffers and
    constants plain tensors, all copied from ``state``. The module is the program's graph:
    ``module(x)`` takes a batch of ``input_shape`` examples, ``named_parameters()`` keeps
    the author's names. Raises :class:`ProgramError` when the program is unsafe, does not
    load, or does not fit the weights.
    """
    import torch
    import torch._export.serde.serialize as serde

    info = inspect_program(program_json)
    check_state(info, state)
    dtype = _torch_dtype(input_dtype)

    def tensor(name: str) -> torch.Tensor:
        array = np.asarray(state[name])
        return torch.from_numpy(np.array(array, copy=True))

    weights: dict[str, Any] = {}
    for name in info.parameters:
        weights[name] = torch.nn.Parameter(tensor(name).to(torch.float32))
    for name in info.buffers:
        weights[name] = tensor(name)
    constants = {name: tensor(name) for name in info.constants}
    example = torch.zeros((1, *[int(d) for d in input_shape]), dtype=dtype)
    # Objects, not bytes: given bytes, torch would unpickle them (see the module docstring).
    artifact = serde.SerializedArtifact(program_json, weights, constants, ((example,), {}))
    try:
        # torch's deserializer keeps its state in a module global: one at a time per process.
        with _DESERIALIZE:
            exported = serde.deserialize(artifact)
            module = exported.module()
    except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "does not load"
        raise ProgramError(f"the program does not load: {type(exc).__name__}: {exc}"[:2000]) from None
    for node in module.graph.nodes:
        if node.op == "call_function" and not _TARGET.match(_target_name(node.target)):
            raise ProgramError(f"the program calls {node.target!r}", code="unsafe_program")
    # The graph is fixed in the mode it was exported in (eval: dropout off, BatchNorm on
    # its running statistics); train()/eval() cannot switch it and are not called.
    return module


_DESERIALIZE = threading.Lock()


def _target_name(target: Any) -> str:
    import operator

    if target is operator.getitem:
        return "_operator.getitem"
    namespace = getattr(target, "namespace", None)  # an OpOverload: aten.linear.default
    op = getattr(target, "_opname", None)
    overload = getattr(target, "_overloadname", None)
    if all(isinstance(part, str) for part in (namespace, op, overload)):
        return f"torch.ops.{namespace}.{op}.{overload}"
    return repr(target)


def _torch_dtype(name: str) -> Any:
    import torch

    dtypes = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}
    if name not in dtypes:
        raise ProgramError(f"input dtype must be one of {INPUT_DTYPES}, got {name!r}")
    return dtypes[name]


def trainable_names(program_json: bytes) -> list[str]:
    """The names of the program's trainable parameters, in its order (deltas carry these)."""
    return list(inspect_program(program_json).parameters)


@dataclass
class Bundle:
    """The files of an upload: program (JSON), weights (safetensors) and ONNX, with the facts."""

    program: bytes
    weights: bytes
    onnx: bytes
    input_shape: list[int]
    input_dtype: str
    parameters: list[str]
    head: list[str]
    max_abs_diff: float
    files: dict[str, Path] = field(default_factory=dict)

    def upload_command(self, *, server: str = "$FLOTILLA", family: str = "<family>") -> str:
        """A curl command that registers the bundle as a new version of ``family``."""
        paths = self.files or {k: Path(f"{k}.bin") for k in ("program", "weights", "onnx")}
        return (
            f'curl -H "Authorization: Token $FLOTILLA_TOKEN" -F family={family} '
            f"-F program=@{paths['program']} -F weights=@{paths['weights']} -F onnx=@{paths['onnx']} "
            f"-F head={','.join(self.head)} {server}/api/v1/model-versions/"
        )


def capture_program(
    model: torch.nn.Module, example_input: torch.Tensor, *, max_batch: int = 4096
) -> tuple[bytes, dict[str, npt.NDArray[Any]]]:
    """The program (``torch.export`` of ``model`` in eval mode, dynamic batch) and its state.

    Needs torch alone: a board proves it can train a program without the ``onnx`` package,
    which only :func:`make_bundle`'s ONNX export uses.
    """
    import torch

    model = model.eval()
    example = example_input.detach()
    if example.dim() < 1 or example.shape[0] < 1:
        raise ProgramError("example_input must be a batch: shape (batch, ...)")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # noqa: BLE001
        raise ProgramError(
            f"torch.export could not capture the model with a dynamic batch dimension: {exc}"[:2000]
        ) from None
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    program = program_json_from(buffer.getvalue())
    info = inspect_program(program)
    state: dict[str, npt.NDArray[Any]] = {}
    for name, value in {**exported.state_dict, **exported.constants}.items():
        if isinstance(value, torch.Tensor):
            state[name] = value.detach().cpu().contiguous().numpy().copy()
    check_state(info, state)
    return program, state


def make_bundle(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    *,
    out_dir: str | Path | None = None,
    head: list[str] | None = None,
    opset: int = 17,
    max_batch: int = 4096,
) -> Bundle:
    """Turn ``model`` and an example input batch into the three files of an upload.

    The program is ``torch.export`` of ``model`` in eval mode with a dynamic batch
    dimension; the weights are its state (parameters, buffers, constants) as safetensors;
    the ONNX comes from the TorchScript exporter (opset ``opset``) without constant
    folding, so every parameter stays an initializer under its own name, which lets the
    server and the boards write new weights into the graph by name. ``head`` names the
    parameters of the last layer (for on-device personalisation; default: the last
    weight and bias). The three are checked against each other on the example input
    before anything is written. With ``out_dir``, writes ``program.json``,
    ``weights.safetensors``, ``model.onnx`` and ``bundle.json`` there.
    """
    import torch

    from devices_agent.codecs import encode_tensors

    model = model.eval()
    example = example_input.detach()
    program, state = capture_program(model, example, max_batch=max_batch)
    info = inspect_program(program)
    onnx_buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that keeps parameter names as initializer
        # names; its deprecation notice is not something the user can act on here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            onnx_buffer,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    onnx_bytes = onnx_buffer.getvalue()
    dtype = {torch.float32: "float32", torch.int64: "int64", torch.uint8: "uint8"}.get(example.dtype)
    if dtype is None:
        raise ProgramError(f"input dtype {example.dtype} is not supported; use one of {INPUT_DTYPES}")
    input_shape = [int(d) for d in example.shape[1:]]
    diff, _ = check_bundle(
        program=program, state=state, onnx=onnx_bytes, input_shape=input_shape, input_dtype=dtype
    )
    names = list(info.parameters)
    chosen = list(head) if head else default_head(names)
    unknown = [n for n in chosen if n not in info.parameters]
    if unknown:
        raise ProgramError(f"head names parameters the program does not have: {unknown}")
    weights = encode_tensors(state, metadata={"format": "flotilla-weights/1"})
    bundle = Bundle(
        program=program,
        weights=weights,
        onnx=onnx_bytes,
        input_shape=input_shape,
        input_dtype=dtype,
        parameters=names,
        head=chosen,
        max_abs_diff=diff,
    )
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for key, filename, data in (
            ("program", "program.json", program),
            ("weights", "weights.safetensors", weights),
            ("onnx", "model.onnx", onnx_bytes),
        ):
            (folder / filename).write_bytes(data)
            bundle.files[key] = folder / filename
        facts = {
            "input_shape": input_shape,
            "input_dtype": dtype,
            "parameters": names,
            "head": chosen,
            "max_abs_diff": diff,
        }
        (folder / "bundle.json").write_text(json.dumps(facts, indent=2) + "\n")
        bundle.files["facts"] = folder / "bundle.json"
    return bundle


def default_head(names: list[str]) -> list[str]:
    """The last layer: the last ``*.weight`` and its ``*.bias`` in the program's order."""
    weights = [n for n in names if n.endswith(".weight")]
    if not weights:
        return names[-1:]
    last = weights[-1]
    bias = last[: -len("weight")] + "bias"
    return [last, bias] if bias in names else [last]


def sample_inputs(
    input_shape: list[int] | tuple[int, ...], input_dtype: str, *, n: int = 16
) -> npt.NDArray[Any]:
    """A fixed batch of inputs for parity checks (seeded; standard normal, or small integers)."""
    rng = np.random.default_rng(0)
    shape = (n, *[int(d) for d in input_shape])
    if input_dtype == "float32":
        return rng.standard_normal(shape).astype(np.float32)
    high = 255 if input_dtype == "uint8" else 16
    return rng.integers(0, high, size=shape).astype(np.dtype(input_dtype))


def check_bundle(
    *,
    program: bytes,
    state: Mapping[str, npt.ArrayLike],
    onnx: bytes,
    input_shape: list[int] | tuple[int, ...],
    input_dtype: str = "float32",
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> tuple[float, int]:
    """Check that program, weights and ONNX agree; the largest output difference and outputs per example.

    The ONNX must hold every trainable parameter as an initializer of the same name and
    shape (new weights are written into it by name) and give the program's outputs on a
    fixed sample batch within ``atol + rtol * |program|``. Raises :class:`ProgramError`
    with the numbers otherwise.
    """
    import onnxruntime as ort
    import torch

    info = inspect_program(program)
    declared = tuple(d for d in info.input_shape)
    if len(declared) != len(input_shape) or any(
        d is not None and d != int(s) for d, s in zip(declared, input_shape, strict=False)
    ):
        raise ProgramError(
            f"the program takes examples of shape {list(declared)}, the family declares {list(input_shape)}",
            code="shape_mismatch",
        )
    initializers = onnx_initializer_shapes(onnx)
    missing = [n for n in info.parameters if n not in initializers]
    reshaped = [n for n in info.parameters if n in initializers and initializers[n] != info.parameters[n]]
    if missing or reshaped:
        raise ProgramError(
            "the ONNX graph must keep every trainable parameter as an initializer of the same name and shape "
            f"(export with do_constant_folding=False); missing {missing[:10]}, reshaped {reshaped[:10]}",
            code="onnx_mismatch",
            details={"missing": missing, "reshaped": reshaped},
        )
    module = load_program(program, state, input_shape=list(input_shape), input_dtype=input_dtype)
    x = sample_inputs(input_shape, input_dtype)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).detach().numpy().astype(np.float64)
    try:
        session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        got = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0], dtype=np.float64)
    except Exception as exc:  # noqa: BLE001
        raise ProgramError(
            f"the ONNX graph does not run on the sample inputs: {exc}"[:2000], code="onnx_mismatch"
        ) from None
    if got.shape != expected.shape:
        raise ProgramError(
            f"the ONNX graph returns shape {got.shape}, the program {expected.shape}",
            code="onnx_mismatch",
            details={"onnx_shape": list(got.shape), "program_shape": list(expected.shape)},
        )
    diff = np.abs(got - expected)
    worst = float(diff.max()) if diff.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(expected)):
        raise ProgramError(
            f"the ONNX graph and the program disagree on {len(x)} sample inputs: max |diff| {worst:.3g} "
            f"(allowed {atol:g} + {rtol:g} x |output|)",
            code="onnx_mismatch",
            details={"max_abs_diff": worst, "atol": atol, "rtol": rtol},
        )
    return worst, int(np.prod(expected.shape[1:], dtype=np.int64))


def onnx_initializer_shapes(onnx: bytes) -> dict[str, tuple[int, ...]]:
    """Name -> shape of an ONNX model's initializers, read with ONNX Runtime (no onnx package)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Read the graph as written: optimisation may fold or rename initializers.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ProgramError(f"the ONNX graph does not load: {exc}"[:2000], code="onnx_mismatch") from None
    return _initializers_from_proto(onnx)


def _initializers_from_proto(onnx: bytes) -> dict[str, tuple[int, ...]]:
    """Initializer names and shapes by reading the protobuf fields directly.

    ONNX Runtime does not list initializers, and the board has no ``onnx`` package, so
    this walks the wire format: ModelProto.graph (7) -> GraphProto.initializer (5) ->
    TensorProto.dims (1) and .name (8).
    """
    graph = _field(onnx, 7)
    if graph is None:
        raise ProgramError("the ONNX model has no graph", code="onnx_mismatch")
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in _fields(graph, 5):
        dims: list[int] = []
        name = ""
        for number, wire, value in _iter_fields(tensor):
            if number == 1 and wire == 0:
                dims.append(int(value))
            elif number == 1 and wire == 2:  # packed
                dims.extend(_varints(value))
            elif number == 8 and wire == 2:
                name = bytes(value).decode("utf-8", "replace")
        shapes[name] = tuple(dims)
    return shapes


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProgramError("the ONNX model is not valid protobuf", code="onnx_mismatch")


def _varints(data: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        out.append(value)
    return out


def _iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(view, pos)
            yield number, wire, value
        elif wire == 1:
            yield number, wire, view[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(view, pos)
            if pos + length > len(view):
                raise ProgramError("the ONNX model is truncated", code="onnx_mismatch")
            yield number, wire, view[pos : pos + length]
            pos += length
        elif wire == 5:
            yield number, wire, view[pos : pos + 4]
            pos += 4
        else:
            raise ProgramError("the ONNX model is not valid protobuf", code="onnx_mismatch")


def _fields(data: bytes | memoryview, number: int) -> list[memoryview]:
    return [value for n, wire, value in _iter_fields(data) if n == number and wire == 2]


def _field(data: bytes | memoryview, number: int) -> memoryview | None:
    found = _fields(data, number)
    return found[0] if found else None
