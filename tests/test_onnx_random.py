"""Random one-layer ONNX models through TVM's importer: whatever attributes and epilogue a
layer comes with, the pass rewrites it and the answer equals TVM's dense build."""

import numpy as np
import pytest
import tvm
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from helpers import CPU_TARGET, Compiled, assert_close, sparse_matrix


@st.composite
def layers(draw, kind: str, norm: bool):
    """(model, input) for a layer of ``kind`` (every one the pass must rewrite), a convolution
    followed by a BatchNormalization where ``norm``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    density = draw(st.sampled_from([0.0, 0.05, 0.2, 1.0]))
    initializers, nodes = [], []

    def constant(name, values):
        initializers.append(numpy_helper.from_array(np.asarray(values, dtype="float32"), name))
        return name

    k, m = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    if kind == "gemm":
        n, trans_a, trans_b = draw(st.integers(1, 5)), draw(st.booleans()), draw(st.booleans())
        x = rng.standard_normal((k, n) if trans_a else (n, k))
        inputs = ["x", constant("W", sparse_matrix(rng, (m, k), density).T if not trans_b else
                                sparse_matrix(rng, (m, k), density))]
        if draw(st.booleans()):
            inputs.append(constant("C", rng.standard_normal(draw(st.sampled_from([(m,), (1, m)])))))
        nodes.append(helper.make_node("Gemm", inputs, ["y0"], transA=int(trans_a), transB=int(trans_b),
                                      alpha=draw(st.sampled_from([1.0, 0.5])), beta=draw(st.sampled_from([1.0, 2.0]))))
    elif kind == "matmul":
        x = rng.standard_normal((*draw(st.sampled_from([(3,), (2, 3)])), k))
        nodes.append(helper.make_node("MatMul", ["x", constant("W", sparse_matrix(rng, (m, k), density).T)], ["y0"]))
    elif kind == "matmul_left":
        x = rng.standard_normal((*draw(st.sampled_from([(), (2,)])), k, draw(st.integers(1, 6))))
        nodes.append(helper.make_node("MatMul", [constant("W", sparse_matrix(rng, (m, k), density)), "x"], ["y0"]))
    elif kind.endswith("transpose"):
        spatial = 1 if kind == "conv1d_transpose" else 2
        groups = draw(st.sampled_from([1, 1, 2]))
        c, m = 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
        kernel = [draw(st.sampled_from([1, 2, 3, 4])) for _ in range(spatial)]
        stride, dilation = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 1, 2]))
        one_pixel = draw(st.booleans())  # a generator's projection of its latent vector: a matmul
        size = [1 if one_pixel else draw(st.integers(1, 6)) for _ in kernel]
        x = rng.standard_normal((draw(st.integers(1, 2)), c, *size))
        weight = sparse_matrix(rng, (c, m // groups * int(np.prod(kernel))), density).reshape(c, m // groups, *kernel)
        pads = [draw(st.integers(0, min(k - 1, 2))) for k in kernel * 2]
        output_padding = [draw(st.integers(0, stride - 1)) for _ in kernel]
        assume(all((n - 1) * stride - pads[i] - pads[i + spatial] + dilation * (k - 1) + extra + 1 > 0
                   for i, (n, k, extra) in enumerate(zip(x.shape[2:], kernel, output_padding))))  # a nonempty output
        inputs = ["x", constant("W", weight)] + ([constant("B", rng.standard_normal(m))] if draw(st.booleans()) else [])
        nodes.append(helper.make_node("ConvTranspose", inputs, ["y0"], kernel_shape=kernel, strides=[stride] * spatial,
                                      dilations=[dilation] * spatial, pads=pads, output_padding=output_padding,
                                      group=groups))
    else:
        spatial = 1 if kind == "conv1d" else 2
        groups = draw(st.sampled_from([1, 1, 2]))
        c, m = 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
        kernel = [draw(st.sampled_from([1, 2, 3])) for _ in range(spatial)]
        stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 1, 2]))
        size = [draw(st.integers(max(4, dilation * (k - 1) + 1), 9)) for k in kernel]  # no empty output
        x = rng.standard_normal((draw(st.integers(1, 2)), c, *size))
        weight = sparse_matrix(rng, (m, c // groups * int(np.prod(kernel))), density).reshape(m, c // groups, *kernel)
        pads = [draw(st.integers(0, 1)) for _ in range(2 * spatial)]
        inputs = ["x", constant("W", weight)] + ([constant("B", rng.standard_normal(m))] if draw(st.booleans()) else [])
        nodes.append(helper.make_node("Conv", inputs, ["y0"], kernel_shape=kernel, strides=[stride] * spatial,
                                      dilations=[dilation] * spatial, pads=pads, group=groups))
    current = "y0"
    # The BatchNormalization first (folded into the layer), then activations.
    epilogue = ["BatchNormalization"] * norm + draw(st.lists(st.sampled_from(["Relu", "Clip", "AddConst"]), max_size=2))
    for i, op in enumerate(epilogue):
        out = f"y{i + 1}"
        if op == "Clip":
            nodes.append(helper.make_node("Clip", [current, constant(f"lo{i}", -0.5), constant(f"hi{i}", 6.0)], [out]))
        elif op == "AddConst":
            nodes.append(helper.make_node("Add", [current, constant(f"a{i}", rng.standard_normal())], [out]))
        elif op == "BatchNormalization":
            stats = [constant(f"{name}{i}", values) for name, values in (
                ("g", rng.uniform(0.5, 2, m)), ("b", rng.standard_normal(m)),
                ("m", rng.standard_normal(m)), ("v", rng.uniform(0.5, 2, m)))]
            nodes.append(helper.make_node("BatchNormalization", [current, *stats], [out]))
        else:
            nodes.append(helper.make_node("Relu", [current], [out]))
        current = out
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x.astype("float32")


KINDS = [("gemm", False), ("matmul", False), ("matmul_left", False), ("conv", False), ("conv", True),
         ("conv1d", False), ("conv1d", True), ("conv_transpose", False), ("conv_transpose", True),
         ("conv1d_transpose", False)]


@pytest.mark.parametrize("kind, norm", KINDS, ids=[f"{kind}{'-norm' if norm else ''}" for kind, norm in KINDS])
@settings(max_examples=10)
@given(data=st.data())
def test_random_onnx_layers_are_rewritten_and_match_tvm(kind, norm, data):
    model, x = data.draw(layers(kind, norm))
    mod = from_onnx(model, keep_params_in_input=False)
    compiled = Compiled(mod, CPU_TARGET, density_threshold=1.0)
    (report,) = compiled.report.layers
    assert report.decision == "sparse", report.reason
    assert ("batch_norm" in report.epilogue) is norm
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(compiled(x), dense)
