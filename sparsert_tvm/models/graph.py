"""A small ONNX graph builder for the networks built in code (random weights, folded batch
norm: every convolution carries a bias)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Appends nodes and initializers; names are generated, values are drawn from ``rng``."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}{self._count}"

    def constant(self, array: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str | None = None, **attrs) -> str:
        out = self.name(stem or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def he(self, shape, fan_in: int, gain: float = 1.0) -> np.ndarray:
        """He-initialised weights (ReLU networks keep their activations' scale), times ``gain``."""
        return (self.rng.standard_normal(shape) * gain * math.sqrt(2.0 / fan_in)).astype("float32")

    def bias(self, n: int) -> str:
        return self.constant((self.rng.standard_normal(n) * 0.1).astype("float32"), "b")

    # -- layers ----------------------------------------------------------------------
    def conv(self, x, cin, cout, kernel=1, stride=1, groups=1, act="relu", gain=1.0) -> str:
        weight = self.he((cout, cin // groups, kernel, kernel), cin // groups * kernel * kernel, gain)
        pad = kernel // 2
        out = self.node(
            "Conv", [x, self.constant(weight, "w"), self.bias(cout)], "conv",
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, group=groups,
        )
        return self.activation(out, act)

    def conv_transpose(self, x, cin, cout, kernel=4, stride=2, pad=1, act="relu") -> str:
        """A transposed convolution (upsampling by ``stride``), weight ``[cin, cout, k, k]``."""
        weight = self.he((cin, cout, kernel, kernel), cin * kernel * kernel // (stride * stride))
        out = self.node(
            "ConvTranspose", [x, self.constant(weight, "w"), self.bias(cout)], "deconv",
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
        )
        return self.activation(out, act)

    def activation(self, x, act):
        if act == "relu":
            return self.node("Relu", [x])
        if act == "tanh":
            return self.node("Tanh", [x])
        if act == "relu6":
            return self.node("Clip", [x, self.constant(np.float32(0)), self.constant(np.float32(6))], "relu6")
        assert act is None, act
        return x

    def linear(self, x, fin, fout, act=None, gain=1.0) -> str:
        """``x @ W + b`` with ``W[fin, fout]`` (MatMul then Add, as exporters write Linear)."""
        weight = self.he((fin, fout), fin, gain)
        out = self.node("Add", [self.node("MatMul", [x, self.constant(weight, "w")]), self.bias(fout)])
        return self.activation(out, act)

    def classifier(self, x, channels, classes) -> str:
        pooled = self.node("GlobalAveragePool", [x], "pool")
        flat = self.node("Flatten", [pooled], "flat")
        weight = self.he((classes, channels), channels)
        return self.node("Gemm", [flat, self.constant(weight, "w"), self.bias(classes)], "logits", transB=1)

    def model(self, x_shape, output: str, out_shape, name: str, extra_outputs=()) -> onnx.ModelProto:
        """The model of the nodes so far; ``extra_outputs`` are intermediate values that become
        outputs too, after ``output`` (their shapes come from ONNX's shape inference)."""
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(out_shape))],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        if extra_outputs:
            inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
            model.graph.output.extend(inferred[extra] for extra in extra_outputs)
        onnx.checker.check_model(model)
        return model
