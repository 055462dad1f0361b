"""New weights written into an existing ONNX graph, by parameter name.

A version's ONNX graph keeps every trainable parameter as an initializer under the
program's parameter name (uploads are checked for it). So the graph of a version made by
changing weights only — a federated round, unstructured pruning, a personal head — is the
parent's graph with those initializers replaced: no export, no torch, and exactly the
operators the parent was checked with.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["onnx_with_weights"]


def onnx_with_weights(onnx_bytes: bytes, weights: Mapping[str, npt.ArrayLike]) -> bytes:
    """``onnx_bytes`` with the initializers named in ``weights`` replaced (same shapes and dtype).

    Raises ``ValueError`` naming what does not fit: a name the graph has no initializer
    for, or a shape or dtype other than the initializer's.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(onnx_bytes)
    by_name = {init.name: init for init in model.graph.initializer}
    missing = sorted(set(weights) - set(by_name))
    if missing:
        raise ValueError(f"the ONNX graph has no initializers named {missing[:10]}")
    for name, value in weights.items():
        old = by_name[name]
        array = np.asarray(value)
        current = numpy_helper.to_array(old)
        if array.shape != current.shape:
            raise ValueError(f"{name}: shape {array.shape} does not fit the graph's {current.shape}")
        replacement = numpy_helper.from_array(array.astype(current.dtype, copy=False), name=name)
        old.CopyFrom(replacement)
    return bytes(model.SerializeToString())
