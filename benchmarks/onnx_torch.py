"""Runs an ONNX model with PyTorch, node by node, so that PyTorch (cuDNN, cuBLAS) runs exactly
the model TVM compiles, with the same weights.

    module = OnnxModule(onnx_model).to("cuda").half()    # float weights only: shapes stay integers
    y = module(x)

Each ONNX node becomes the ``torch.nn.functional`` call a hand-written PyTorch model would
make (Conv is ``F.conv2d``, Gemm is ``addmm``, ...): eager PyTorch, no fusion across nodes,
intermediates freed after their last use. Float tensors among the initializers become buffers
(moved and cast with the module); scalars and integer tensors (Reshape's shapes) stay Python
values, so that ``forward`` never reads the device and can be captured in a CUDA graph. Only
the ops and attributes the networks of ``sparsert_tvm.models`` use are covered; anything else
raises ``NotImplementedError`` when the module is built.
"""

from __future__ import annotations

import math
import operator

import onnx
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from onnx import helper, numpy_helper

MIN_OPSET = 13  # Softmax over one axis, Clip's bounds as inputs, Reshape's shape as an input


def _symmetric(pads, op: str) -> tuple[int, ...]:
    """Torch pads both ends of an axis alike; ONNX lists all begins, then all ends."""
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):
        raise NotImplementedError(f"{op} with asymmetric pads {list(pads)}")
    return tuple(pads[:half])


def _two_d(kernel_shape, op: str):
    if kernel_shape is not None and len(kernel_shape) != 2:
        raise NotImplementedError(f"{op} over {len(kernel_shape)} spatial dimensions (2 only)")


# Each op maps the node's attributes (keyword arguments; an attribute it does not take is a
# TypeError, reported as not implemented) to a function of the node's inputs.
def _conv(*, kernel_shape=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    _two_d(kernel_shape, "Conv")
    padding = _symmetric(pads, "Conv")
    return lambda x, w, b=None: F.conv2d(x, w, b, tuple(strides), padding, tuple(dilations), group)


def _conv_transpose(*, kernel_shape=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
                    output_padding=(0, 0)):
    _two_d(kernel_shape, "ConvTranspose")
    padding = _symmetric(pads, "ConvTranspose")
    return lambda x, w, b=None: F.conv_transpose2d(x, w, b, tuple(strides), padding, tuple(output_padding), group,
                                                   tuple(dilations))


def _max_pool(*, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=0):
    _two_d(kernel_shape, "MaxPool")
    padding = _symmetric(pads, "MaxPool")
    return lambda x: F.max_pool2d(x, tuple(kernel_shape), tuple(strides), padding, tuple(dilations), bool(ceil_mode))


def _gemm(*, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803 - ONNX's attribute names
    def gemm(a, b, c=None):
        a, b = a.t() if transA else a, b.t() if transB else b
        return alpha * (a @ b) if c is None else torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return gemm


def _flatten(*, axis=1):
    return lambda x: x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(*, allowzero=0):
    if allowzero:
        raise NotImplementedError("Reshape with allowzero=1")
    # A 0 copies the input's dimension (ONNX), a -1 is inferred (both).
    return lambda x, shape: x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _transpose(*, perm=None):
    return lambda x: x.permute(perm if perm is not None else tuple(reversed(range(x.ndim))))


def _layer_norm(*, axis=-1, epsilon=1e-5, stash_type=1):
    if stash_type != 1:
        raise NotImplementedError("LayerNormalization with stash_type other than float32")
    return lambda x, scale, bias=None: F.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "GlobalAveragePool": lambda: lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": lambda: torch.matmul,
    "Add": lambda: operator.add,  # operators, not torch.add: either operand may be a Python scalar
    "Mul": lambda: operator.mul,
    "Div": lambda: operator.truediv,
    "Relu": lambda: F.relu,
    "Clip": lambda: lambda x, low=None, high=None: torch.clamp(x, low, high),
    "Erf": lambda: torch.erf,
    "Tanh": lambda: torch.tanh,
    "Softmax": lambda axis=-1: lambda x: F.softmax(x, axis),
    "LayerNormalization": _layer_norm,
    "Reshape": _reshape,
    "Transpose": _transpose,
}


class OnnxModule(torch.nn.Module):
    """``forward(*inputs)`` computes the ONNX graph's outputs (one tensor, or a tuple)."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < MIN_OPSET:
            raise NotImplementedError(f"ONNX opset {opset} (from {MIN_OPSET} on)")
        graph = model.graph
        self.constants: dict[str, object] = {}  # host values: scalars and integer tensors
        self.buffer_names: dict[str, str] = {}  # ONNX initializer -> buffer (ONNX names may hold dots)
        for initializer in graph.initializer:
            array = numpy_helper.to_array(initializer)
            if array.dtype.kind == "f" and array.ndim > 0:
                self.buffer_names[initializer.name] = f"weight{len(self.buffer_names)}"
                self.register_buffer(self.buffer_names[initializer.name], torch.from_numpy(array.copy()))
            else:
                self.constants[initializer.name] = array.item() if array.ndim == 0 else array.tolist()
        known = set(self.constants) | set(self.buffer_names)
        self.input_names = [i.name for i in graph.input if i.name not in known]
        self.output_names = [o.name for o in graph.output]
        self.steps = [(_function(node), list(node.input), node.output[0]) for node in graph.node]
        self.releases = _last_uses(graph, keep=set(self.output_names) | known)

    def forward(self, *inputs):
        values = dict(zip(self.input_names, inputs, strict=True))
        for (function, names, output), release in zip(self.steps, self.releases):
            values[output] = function(*(self._value(name, values) for name in names))
            for name in release:
                del values[name]
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def _value(self, name: str, values: dict):
        if name in values:
            return values[name]
        if name in self.buffer_names:
            return getattr(self, self.buffer_names[name])
        if name in self.constants:
            return self.constants[name]
        if name == "":  # an optional input left out
            return None
        raise KeyError(f"no value named {name!r}")


def _function(node: onnx.NodeProto):
    label = f"{node.op_type} node {node.name or node.output[0]!r}"
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        raise NotImplementedError(f"{label}: op {node.domain or 'ai.onnx'}.{node.op_type} is not covered")
    if len([name for name in node.output if name]) != 1:
        raise NotImplementedError(f"{label}: only the first output is computed")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    try:
        return OPS[node.op_type](**attributes)
    except TypeError as error:
        raise NotImplementedError(f"{label}: attributes {sorted(attributes)} not covered ({error})") from None
    except NotImplementedError as error:
        raise NotImplementedError(f"{label}: {error}") from None


def _last_uses(graph: onnx.GraphProto, keep: set[str]) -> list[list[str]]:
    """Per node, the values it is the last reader of, so that ``forward`` frees them as a
    PyTorch module's locals would be freed (graph outputs and weights are kept)."""
    last = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last[name] = index
    releases = [[] for _ in graph.node]
    for name, index in last.items():
        if name and name not in keep:
            releases[index].append(name)
    return releases
