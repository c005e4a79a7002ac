"""Models imported through TVM's ONNX frontend: detection and equality with TVM's dense path."""

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from helpers import CPU_TARGET, Compiled, assert_close, sparse_matrix
from sparsert_tvm import models


def dense_reference(mod, target, arrays, device):
    vm = relax.VirtualMachine(tvm.compile(mod, target), device)
    return vm["main"](*[tvm.runtime.tensor(a, device) for a in arrays]).numpy()


def test_mlp_gemm_matmul_forms(target):
    rng = np.random.default_rng(0)
    mod = from_onnx(models.mlp(rng), keep_params_in_input=False)
    compiled = Compiled(mod, target, density_threshold=0.3)
    layers = compiled.report.layers
    assert [layer.decision for layer in layers] == ["sparse"] * 3, compiled.report.table()
    assert [layer.epilogue for layer in layers] == [["bias", "relu"], ["bias", "relu"], ["bias"]]
    assert [(layer.M, layer.K) for layer in layers] == [(128, 64), (96, 128), (10, 96)]
    for batch in (1, 7, 64):  # the ONNX batch dimension is symbolic
        x = rng.standard_normal((batch, 64)).astype("float32")
        assert_close(compiled(x), dense_reference(mod, target, [x], compiled.device))


def test_convnet_bias_residual_and_padded_3x3(target):
    rng = np.random.default_rng(1)
    mod = from_onnx(models.convnet(rng), keep_params_in_input=False)
    compiled = Compiled(mod, target, density_threshold=0.3)
    assert [layer.op for layer in compiled.report if layer.sparse] == ["conv2d 1x1 NCHW", "conv2d 3x3 NCHW"] + [
        "conv2d 1x1 NCHW"
    ] * 2
    epilogues = [layer.epilogue for layer in compiled.report]
    assert epilogues == [["bias", "relu"], ["relu"], ["bias", "residual", "relu"], []]
    for batch in (1, 3):
        x = rng.standard_normal((batch, 32, 8, 8)).astype("float32")
        assert_close(compiled(x), dense_reference(mod, target, [x], compiled.device))


@pytest.mark.parametrize("density, expected", [(0.05, "sparse"), (0.6, "dense")])
def test_threshold_on_imported_model(density, expected):
    rng = np.random.default_rng(2)
    mod = from_onnx(models.mlp(rng, density=density), keep_params_in_input=False)
    compiled = Compiled(mod, CPU_TARGET, density_threshold=0.3)
    assert {layer.decision for layer in compiled.report} == {expected}


def test_onnx_clip_is_fused_as_relu6(target):
    """TVM imports ONNX's Clip as ``call_tir`` of maximum / minimum PrimFuncs, its bounds as
    ``where(isnan(bound), ...)``: the pass reads them as the clip they are, and no
    elementwise pass of TVM's is left after the kernels."""
    import sparsert_tvm as sp

    rng = np.random.default_rng(3)
    model = models.mobilenet_v2(rng, width=0.5, depth=3, size=32, classes=10)
    mod = from_onnx(model, keep_params_in_input=False)
    compiled = Compiled(mod, target, density_threshold=1.0)
    clipped = [layer.epilogue for layer in compiled.report if "clip(-inf, 6)" in layer.epilogue]
    assert len(clipped) >= 6 and all(epilogue[-2:] == ["relu", "clip(-inf, 6)"] for epilogue in clipped)
    callees = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            callees.append(expr.args[0].name_hint)

    relax.analysis.post_order_visit(sp.SparsifyWeights(target, 1.0)(mod)["main"], visit)
    assert not [name for name in callees if name.startswith(("maximum", "minimum"))], callees
    x = models.random_input(model)
    assert_close(compiled(x), dense_reference(mod, target, [x], compiled.device))


def test_onnx_matmul_with_the_weight_on_the_left(target):
    """``Relu(MatMul(A, x) + b)`` with ``A`` a sparse initializer, as in a graph network's
    propagation (adjacency times node features) over a batch of graphs: rewritten, with its
    per-row bias and ReLU, and equal to TVM's dense build."""
    rng = np.random.default_rng(5)
    adjacency = sparse_matrix(rng, (30, 30), 0.1)
    bias = rng.standard_normal((30, 1)).astype("float32")
    nodes = [
        helper.make_node("MatMul", ["A", "x"], ["ax"]),
        helper.make_node("Add", ["ax", "b"], ["axb"]),
        helper.make_node("Relu", ["axb"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "gnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["G", 30, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["G", 30, 16])],
        [numpy_helper.from_array(adjacency, "A"), numpy_helper.from_array(bias, "b")],
    )
    mod = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), keep_params_in_input=False)
    compiled = Compiled(mod, target, density_threshold=0.3)
    (layer,) = compiled.report.layers
    assert (layer.decision, layer.op, layer.epilogue) == ("sparse", "matmul (weight on the left)", ["bias", "relu"])
    for graphs in (1, 3):
        x = rng.standard_normal((graphs, 30, 16)).astype("float32")
        assert_close(compiled(x), dense_reference(mod, target, [x], compiled.device))


def test_onnx_batch_normalization_is_folded_into_the_convolution(target):
    """``Relu(BatchNormalization(Conv(x, W)))``: TVM imports the norm as ``batch_norm`` with
    reads of its running statistics that nothing uses; the pass folds it into the
    convolution's weight and bias and leaves no norm behind."""
    rng = np.random.default_rng(6)
    weight = sparse_matrix(rng, (8, 36), 0.2).reshape(8, 4, 3, 3)
    stats = {name: values.astype("float32") for name, values in (
        ("gamma", rng.uniform(0.5, 2, 8)), ("beta", rng.standard_normal(8)),
        ("mean", rng.standard_normal(8)), ("var", rng.uniform(0.5, 2, 8)))}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", *stats], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [numpy_helper.from_array(weight, "W")] + [numpy_helper.from_array(v, k) for k, v in stats.items()],
    )
    mod = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), keep_params_in_input=False)
    compiled = Compiled(mod, target, density_threshold=0.3)
    (layer,) = compiled.report.layers
    assert (layer.decision, layer.epilogue) == ("sparse", ["batch_norm", "relu"]), layer.reason
    x = rng.standard_normal((2, 4, 6, 6)).astype("float32")
    assert_close(compiled(x), dense_reference(mod, target, [x], compiled.device))
