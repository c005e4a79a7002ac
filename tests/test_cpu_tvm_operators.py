"""The schedules ``sparsert_tvm.compile`` gives the operators it leaves to TVM on the CPU:
products of two activations, reductions, elementwise operators, against numpy, and which
rule takes which operator."""

import math

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import sparsert_tvm as sp
from helpers import CPU_TARGET
from sparsert_tvm.build import cpu_operator_passes
from sparsert_tvm.schedules.cpu.tvm_operators import ActivationMatmul, AxisReduction, Elementwise, schedule_rules

erf = np.vectorize(math.erf)


def onnx_module(nodes, inputs: dict, output_shape, constants=()):
    """A graph of ``nodes`` with inputs ``{name: shape}`` (a str dimension is symbolic)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(value, "float32"), name) for name, value in constants])
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), keep_params_in_input=False)


def run(mod, *arrays) -> np.ndarray:
    vm = relax.VirtualMachine(sp.compile(mod, CPU_TARGET), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in arrays)).numpy()


def lowered(mod) -> tvm.IRModule:
    """``mod`` as the CPU pipeline has it before scheduling: fused PrimFuncs."""
    with CPU_TARGET:
        return tvm.transform.Sequential(cpu_operator_passes(CPU_TARGET))(mod)


def rule_taking(func) -> str | None:
    for rule in schedule_rules():
        if rule.apply(func, CPU_TARGET, False) is not None:
            return type(rule).__name__
    return None


def assert_near(actual, expected, tolerance=1e-5):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize(("a_shape", "b_shape", "taken"), [
    ((12, 128, 64), (12, 64, 128), True),  # attention's Q·Kᵀ: 4x2-vector tiles
    ((2, 3, 5, 7), (2, 3, 7, 48), True),  # rows not a multiple of 4, columns of 3 vectors
    ((6, 33), (33, 16), True),  # no batch, one vector
    ((4, 33), (33, 20), True),  # columns not a multiple of the lanes: vectors of 4
    ((3, 7), (7, 9), True),  # odd columns: scalars
    ((33,), (33, 1000), True),  # a vector times a matrix (no row loop), a classifier's 1000 columns
    (("n", 8, 32), ("n", 32, 32), True),  # a symbolic batch
    ((4, 8), (8, "m"), False),  # symbolic columns: left as TVM lowers it
])
def test_products_of_two_activations(a_shape, b_shape, taken):
    rng = np.random.default_rng(0)
    sizes = {"n": 3, "m": 24}
    a_static = [sizes.get(d, d) for d in a_shape]
    b_static = [sizes.get(d, d) for d in b_shape]
    out_shape = [*a_shape[:-1], b_shape[-1]]
    mod = onnx_module([helper.make_node("MatMul", ["a", "b"], ["p"]), helper.make_node("Mul", ["p", "s"], ["y"])],
                      {"a": a_shape, "b": b_shape}, out_shape, [("s", 0.125)])
    a, b = rng.standard_normal(a_static).astype("float32"), rng.standard_normal(b_static).astype("float32")
    assert_near(run(mod, a, b), (a.astype(np.float64) @ b) * 0.125)
    funcs = [f for f in lowered(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(ActivationMatmul().apply(func, CPU_TARGET, False) is not None for func in funcs) == taken


@pytest.mark.parametrize("shape", [(3, 5, 7), (128, 3072), ("n", 17)])
def test_elementwise_operators_with_fast_math(shape):
    """GELU's erf, exp, tanh and sigmoid, fused into one operator: within a few ulps of
    float64 (the approximations of ``FastMathTransform``), at counts that are and are not
    multiples of the lanes, and symbolic."""
    rng = np.random.default_rng(1)
    static = [5 if d == "n" else d for d in shape]
    nodes = [helper.make_node("Div", ["x", "root2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Exp", ["n"], ["x1"]),
             helper.make_node("Add", ["e", "t"], ["et"]), helper.make_node("Add", ["s", "x1"], ["sx"]),
             helper.make_node("Add", ["et", "sx"], ["y"])]
    mod = onnx_module(nodes, {"x": shape}, shape, [("root2", math.sqrt(2))])
    x = (rng.standard_normal(static) * 3).astype("float32")
    x64 = x.astype(np.float64)
    expected = erf(x64 / math.sqrt(2)) + np.tanh(x64) + 1 / (1 + np.exp(-x64)) + np.exp(-x64)
    assert_near(run(mod, x), expected, 1e-6)
    funcs = [f for f in lowered(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [rule_taking(f) for f in funcs] == ["Elementwise"]
    (text,) = [f.script() for f in funcs]  # approximations, and the sigmoid's exp is one of them
    assert "T.erf" not in text and "T.sigmoid" not in text and "T.exp" not in text and "T.tanh" not in text


def test_a_transpose_and_a_broadcast_add():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Add", ["t", "b"], ["y"])]
    bias = rng.standard_normal(9).astype("float32")
    mod = onnx_module(nodes, {"x": (4, 9, 33)}, (4, 33, 9), [("b", bias)])
    x = rng.standard_normal((4, 9, 33)).astype("float32")
    np.testing.assert_array_equal(run(mod, x), x.transpose(0, 2, 1) + bias)
    assert Elementwise().apply(next(f for f in lowered(mod).functions.values()), CPU_TARGET, False) is not None


@pytest.mark.parametrize("shape", [(2, 12, 64), (3, 16, 768), (2, "n", 128), (4, 20)], ids=str)
def test_row_reductions_sum_in_vector_wide_partial_results(shape):
    """Softmax then a layer norm, rows of 20 to 768 (partial results where a row holds two
    vectors or more, one chain below), static or symbolic rows."""
    rng = np.random.default_rng(4)
    width = shape[-1]
    gamma, beta = rng.standard_normal(width).astype("float32"), rng.standard_normal(width).astype("float32")
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    mod = onnx_module(nodes, {"x": shape}, shape, [("gamma", gamma), ("beta", beta)])
    x = (rng.standard_normal([5 if d == "n" else d for d in shape]) * 4).astype("float32")
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    s = e / e.sum(-1, keepdims=True)
    normed = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    assert_near(run(mod, x), normed * gamma + beta, 1e-4)
    scheduled = [AxisReduction().apply(f, CPU_TARGET, False) for f in lowered(mod).functions.values()
                 if isinstance(f, tvm.tirx.PrimFunc)]
    assert all(sch is not None for sch in scheduled)
    partial_results = [sch.mod.script().count("_rf = T.sblock_alloc_buffer") for sch in scheduled]
    assert partial_results == ([2, 2] if width >= 32 else [0, 0])  # softmax's max and sum, the norm's two sums


def test_a_mean_over_two_axes_is_one_reduction_of_its_rows():
    """A global average pool (a sum over H and W, then a divide) is taken whole, its sum not
    split: partial results are for a reduction over one axis."""
    rng = np.random.default_rng(5)
    mod = onnx_module([helper.make_node("GlobalAveragePool", ["x"], ["y"])], {"x": (2, 24, 7, 7)}, (2, 24, 1, 1))
    x = rng.standard_normal((2, 24, 7, 7)).astype("float32")
    assert_near(run(mod, x), x.mean(axis=(2, 3), keepdims=True))
    (func,) = [f for f in lowered(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert rule_taking(func) == "AxisReduction"


def test_softmax_and_layer_norm_are_axis_reductions():
    rng = np.random.default_rng(3)
    gamma, beta = rng.standard_normal(64).astype("float32"), rng.standard_normal(64).astype("float32")
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    mod = onnx_module(nodes, {"x": (2, 12, 64)}, (2, 12, 64), [("gamma", gamma), ("beta", beta)])
    x = (rng.standard_normal((2, 12, 64)) * 4).astype("float32")
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    s = e / e.sum(-1, keepdims=True)
    normed = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    assert_near(run(mod, x), normed * gamma + beta, 1e-4)  # a layer norm of values ~1/64 apart amplifies rounding
    funcs = [f for f in lowered(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sorted(rule_taking(f) for f in funcs) == ["AxisReduction", "AxisReduction"]


def test_plain_tvm_compile_is_left_exact():
    """Only ``sparsert_tvm.compile`` schedules and approximates: ``tvm.compile`` of the
    same module keeps libm's erf (bit for bit the unscheduled result)."""
    nodes = [helper.make_node("Erf", ["x"], ["y"])]
    mod = onnx_module(nodes, {"x": (64,)}, (64,))
    x = np.linspace(-3, 3, 64, dtype="float32")
    plain = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ours = run(mod, x)
    assert not np.array_equal(plain, ours)  # the approximation differs in the last bits somewhere
    assert_near(ours, plain, 1e-6)


def convolution_and_pool(layout: str, groups: int):
    """A convolution of ``groups`` groups (weights dense: the pass leaves it to TVM), its
    bias and ReLU, then a 3x3 max pool."""
    rng = np.random.default_rng(5)
    channels, size = 16, 12
    nhwc = layout == "NHWC"
    x = relax.Var("x", relax.TensorType((1, size, size, channels) if nhwc else (1, channels, size, size), "float32"))
    weight = rng.standard_normal((3, 3, channels // groups, channels) if nhwc else (channels, channels // groups, 3, 3))
    bias = rng.standard_normal((1, 1, 1, channels) if nhwc else (1, channels, 1, 1))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.conv2d(x, relax.const(weight.astype("float32")), padding=1, groups=groups,
                                                data_layout=layout, kernel_layout="HWIO" if nhwc else "OIHW"))
            y = builder.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias.astype("float32")))))
            y = builder.emit_output(relax.op.nn.max_pool2d(y, 3, padding=1, layout=layout))
        builder.emit_func_output(y)
    return builder.get(), [int(d) for d in x.ty.shape]


@pytest.mark.parametrize(("layout", "groups"), [("NHWC", 16), ("NHWC", 1), ("NCHW", 4)])
def test_convolutions_and_pools_left_to_tvm_keep_tvms_lowering(layout, groups):
    """No rule takes a reduction through a window: dlight's reduction rule recomputed the
    padding under the output loop (an NHWC depthwise layer ran 8.6x slower)."""
    mod, shape = convolution_and_pool(layout, groups)
    x = np.random.default_rng(6).standard_normal(shape).astype("float32")
    funcs = [f for f in lowered(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 2 and [rule_taking(f) for f in funcs] == [None, None]
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert_near(run(mod, x), dense)  # (the dense NHWC convolution is the pass's, at any density)
