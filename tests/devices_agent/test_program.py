"""Trainable programs: made from a user's nn.Module, loaded back without pickle, hostile ones refused."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # noqa: E402, TID253 - these tests train: torch is required, never skipped

from devices_agent.codecs import decode_tensors
from devices_agent.program import (
    ProgramError,
    check_bundle,
    inspect_program,
    load_program,
    make_bundle,
    onnx_initializer_shapes,
    program_json_from,
)


class ConvNet(torch.nn.Module):
    """A model the agent has never seen: 1-D conv with BatchNorm, two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 8, 5, padding=2)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc1 = torch.nn.Linear(8 * 32, 16)
        self.fc2 = torch.nn.Linear(16, 6)

    def forward(self, x: Any) -> Any:
        x = torch.max_pool1d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@pytest.fixture(scope="module")
def made() -> Any:
    torch.manual_seed(0)
    model = ConvNet()
    # Running statistics that are not the defaults, so losing them would show.
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    return model, make_bundle(model, torch.randn(4, 3, 64))


def test_a_bundle_keeps_names_shapes_buffers_and_a_dynamic_batch(made: Any) -> None:
    model, bundle = made
    info = inspect_program(bundle.program)
    assert list(info.parameters) == [n for n, _ in model.named_parameters()]
    assert info.parameters["conv.weight"] == (8, 3, 5)
    assert set(info.buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert info.input_shape == (3, 64)
    assert bundle.head == ["fc2.weight", "fc2.bias"] and bundle.max_abs_diff < 1e-4
    # Every trainable parameter is an initializer of the ONNX graph under its own name.
    shapes = onnx_initializer_shapes(bundle.onnx)
    assert all(shapes[n] == s for n, s in info.parameters.items())
    state, _ = decode_tensors(bundle.weights)
    module = load_program(bundle.program, state, input_shape=[3, 64])
    for batch in (1, 7, 33):
        x = torch.randn(batch, 3, 64)
        with torch.no_grad():
            assert torch.allclose(module(x), model.eval()(x), atol=1e-5)
    restored = dict(module.named_buffers())
    assert torch.equal(restored["bn.running_mean"], model.bn.running_mean)


def test_the_loaded_program_trains_under_autograd(made: Any) -> None:
    _, bundle = made
    state, _ = decode_tensors(bundle.weights)
    module = load_program(bundle.program, state, input_shape=[3, 64])
    params = dict(module.named_parameters())
    assert set(params) == set(inspect_program(bundle.program).parameters)
    loss = torch.nn.functional.cross_entropy(module(torch.randn(5, 3, 64)), torch.tensor([0, 1, 2, 3, 4]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())


def _tampered(program: bytes, change: Any) -> bytes:
    doc = json.loads(program)
    change(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.__setitem__("guards_code", ["__import__('os').system('touch /tmp/x')"]), "guard code"),
        (lambda d: d["range_constraints"].__setitem__("__import__('os')", {"min_val": 1}), "not allowed"),
        (lambda d: d["graph_module"]["graph"]["nodes"][0].__setitem__("target", "torch.load"), "ATen"),
        (lambda d: d["graph_module"]["graph"]["nodes"][0].__setitem__("target", "#custom.op"), "ATen"),
        (lambda d: d["graph_module"]["graph"].__setitem__("custom_obj_values", {"x": {}}), "running code"),
    ],
)
def test_programs_that_could_run_code_are_refused(made: Any, change: Any, needle: str) -> None:
    _, bundle = made
    hostile = _tampered(bundle.program, change)
    with pytest.raises(ProgramError) as caught:
        inspect_program(hostile)
    assert caught.value.code == "unsafe_program" and needle in caught.value.message
    state, _ = decode_tensors(bundle.weights)
    with pytest.raises(ProgramError):
        load_program(hostile, state, input_shape=[3, 64])


def test_pickles_are_never_read(made: Any) -> None:
    with pytest.raises(ProgramError) as plain:
        program_json_from(pickle.dumps({"not": "a program"}))
    assert plain.value.code == "pickle_rejected"
    # A torch.export archive whose JSON is missing: only pickled members, nothing is loaded.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(object))
    with pytest.raises(ProgramError, match="no models/model.json"):
        program_json_from(buffer.getvalue())
    # A real archive gives its JSON, the rest ignored.
    model, bundle = made
    exported = torch.export.export(model.eval(), (torch.randn(2, 3, 64),))
    saved = io.BytesIO()
    torch.export.save(exported, saved)
    assert json.loads(program_json_from(saved.getvalue()))["graph_module"]


def test_weights_that_do_not_fit_the_program_are_named(made: Any) -> None:
    _, bundle = made
    state, _ = decode_tensors(bundle.weights)
    wrong = dict(state)
    wrong["fc2.weight"] = np.zeros((7, 16), np.float32)
    del wrong["fc1.bias"]
    wrong["extra"] = np.zeros(3, np.float32)
    with pytest.raises(ProgramError) as caught:
        load_program(bundle.program, wrong, input_shape=[3, 64])
    err = caught.value
    assert err.code == "shape_mismatch"
    assert err.details["missing"] == ["fc1.bias"] and err.details["unexpected"] == ["extra"]
    assert err.details["shapes"]["fc2.weight"] == {"program": [6, 16], "weights": [7, 16]}


def test_an_onnx_graph_that_disagrees_with_the_program_is_refused_with_the_numbers(made: Any) -> None:
    _, bundle = made
    state, _ = decode_tensors(bundle.weights)
    other = dict(state)
    other["fc2.bias"] = state["fc2.bias"] + 1.0
    with pytest.raises(ProgramError) as caught:
        check_bundle(program=bundle.program, state=other, onnx=bundle.onnx, input_shape=[3, 64])
    assert caught.value.code == "onnx_mismatch" and caught.value.details["max_abs_diff"] > 0.5
    # A graph exported with constant folding loses the parameter names.
    model, _ = made
    folded = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 3, 64),),
        folded,
        dynamo=False,
        opset_version=17,
        do_constant_folding=True,
    )
    with pytest.raises(ProgramError) as unnamed:
        check_bundle(program=bundle.program, state=state, onnx=folded.getvalue(), input_shape=[3, 64])
    assert unnamed.value.code == "onnx_mismatch" and "conv.weight" in unnamed.value.message


_USER_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(3, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()
        )
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(self.body(x))
"""


def test_bundle_command_turns_a_users_model_file_into_an_upload(tmp_path: Path, capsys: Any) -> None:
    import json

    from devices_agent.__main__ import main
    from devices_agent.codecs import decode_tensors
    from devices_agent.program import check_bundle

    (tmp_path / "net.py").write_text(_USER_MODEL)
    out = tmp_path / "bundle"
    code = main(
        ["bundle", "--model", f"{tmp_path / 'net.py'}:Net", "--input-shape", "3,64", "--out", str(out)]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shape"] == [3, 64] and report["head"] == ["fc.weight", "fc.bias"]
    assert "api/v1/model-versions/" in report["upload"]
    diff, outputs = check_bundle(
        program=(out / "program.json").read_bytes(),
        state=decode_tensors((out / "weights.safetensors").read_bytes())[0],
        onnx=(out / "model.onnx").read_bytes(),
        input_shape=[3, 64],
    )
    assert outputs == 6 and diff < 1e-4


def test_bundle_command_explains_a_bad_model_reference(tmp_path: Path, capsys: Any) -> None:
    from devices_agent.__main__ import main

    (tmp_path / "net.py").write_text(_USER_MODEL)
    assert main(["bundle", "--model", "no-colon", "--input-shape", "3", "--out", str(tmp_path)]) == 1
    assert "FILE.py:NAME" in capsys.readouterr().err
    assert (
        main(["bundle", "--model", f"{tmp_path / 'net.py'}:Missing", "--input-shape", "3,64", "--out", "x"])
        == 1
    )
    assert "no 'Missing'" in capsys.readouterr().err
    # A shape the model cannot take is torch.export's error, not a traceback.
    assert (
        main(["bundle", "--model", f"{tmp_path / 'net.py'}:Net", "--input-shape", "5,64", "--out", "x"]) == 1
    )
    assert "flotilla-agent bundle:" in capsys.readouterr().err
