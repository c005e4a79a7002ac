"""Small pruned ONNX models (an MLP, a residual bottleneck) for the demo and tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _prune(rng, shape, density) -> np.ndarray:
    dense = rng.standard_normal(shape).astype("float32") / np.sqrt(np.prod(shape[1:]))
    return (dense * (rng.random(shape) < density)).astype("float32")


def _model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "sparse", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def mlp(rng, features=(64, 128, 96, 10), density=0.1, batch="N") -> onnx.ModelProto:
    """Gemm(transB=1)+Relu, MatMul+Add+Relu, Gemm: the forms exporters emit for Linear."""
    f0, f1, f2, f3 = features
    init = [
        numpy_helper.from_array(_prune(rng, (f1, f0), density), "w1"),
        numpy_helper.from_array(rng.standard_normal(f1).astype("float32"), "b1"),
        numpy_helper.from_array(_prune(rng, (f1, f2), density).copy(), "w2"),
        numpy_helper.from_array(rng.standard_normal(f2).astype("float32"), "b2"),
        numpy_helper.from_array(_prune(rng, (f3, f2), density), "w3"),
        numpy_helper.from_array(rng.standard_normal(f3).astype("float32"), "b3"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["h2b"]),
        helper.make_node("Relu", ["h2b"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, f0])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, f3])]
    return _model(nodes, inputs, outputs, init)


def convnet(rng, channels=32, size=8, density=0.1, batch="N") -> onnx.ModelProto:
    """A residual bottleneck: 1x1 Conv+bias+Relu, padded 3x3 Conv+Relu, 1x1 Conv+bias,
    Add with the block input, Relu; then a 1x1 Conv without bias."""
    c, mid = channels, channels // 2
    init = [
        numpy_helper.from_array(_prune(rng, (mid, c, 1, 1), density), "w1"),
        numpy_helper.from_array(rng.standard_normal(mid).astype("float32"), "b1"),
        numpy_helper.from_array(_prune(rng, (mid, mid, 3, 3), density), "w2"),
        numpy_helper.from_array(_prune(rng, (c, mid, 1, 1), density), "w3"),
        numpy_helper.from_array(rng.standard_normal(c).astype("float32"), "b3"),
        numpy_helper.from_array(_prune(rng, (c, c, 1, 1), density), "w4"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c3", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["y"], kernel_shape=[1, 1]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, size, size])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, size, size])]
    return _model(nodes, inputs, outputs, init)

