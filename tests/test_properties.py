"""Property-based tests: random weights, epilogues, layouts and batches, sparse == dense.

Examples are drawn deterministically (the ``ci`` profile in conftest.py), so a failure
reproduces; a failure found becomes an ``@example`` on the test, kept for good.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tvm
from tvm import relax

import sparsert_tvm as sp
from helpers import CPU_TARGET, KINDS, Case, Compiled, assert_close, pruned_matrix
from sparsert_tvm.problem import Layout

EPILOGUE_OPS = ("bias", "relu", "relu6", "clip", "residual")


@st.composite
def cases(draw):
    """A rewritable operator: form, weight (shape, density, row distribution, empty rows and
    columns), epilogue, and an activation shape with a static or symbolic batch."""
    kind = draw(st.sampled_from(KINDS))
    m, k = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    density = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        weight = pruned_matrix(rng, (m, k), density)
    else:
        weight = ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")
    if draw(st.booleans()):
        weight[: draw(st.integers(0, m))] = 0  # leading empty rows
    if draw(st.booleans()):
        weight[:, draw(st.integers(0, k - 1))] = 0  # an empty column
    epilogue = tuple(draw(st.lists(st.sampled_from(EPILOGUE_OPS), max_size=3, unique=True)))
    batch = None if draw(st.booleans()) else draw(st.integers(1, 5))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    x_shape = {
        "matmul": (batch, k),
        "matmul_t": (batch, draw(st.integers(1, 3)), k),
        "conv_nchw": (batch, k, *spatial),
        "conv_nhwc": (batch, *spatial, k),
    }[kind]
    bias = rng.standard_normal(m).astype("float32")
    return Case(kind, weight, x_shape, epilogue, bias), seed


def check_case(case_and_seed, target):
    case, seed = case_and_seed
    compiled = Compiled(case.module(), target, density_threshold=1.0)
    assert [layer.decision for layer in compiled.report] == ["sparse"], compiled.report.table()
    rng = np.random.default_rng(seed)
    for batch in (1, 3) if None in case.x_shape else (None,):
        arrays = case.inputs(rng, batch)
        assert_close(compiled(*arrays), case.reference(arrays))


@given(cases())
def test_sparse_equals_dense_on_cpu(case_and_seed):
    check_case(case_and_seed, CPU_TARGET)


@pytest.mark.gpu
@settings(max_examples=40)
@given(case_and_seed=cases())
def test_sparse_equals_dense_on_gpu(gpu_target, case_and_seed):
    check_case(case_and_seed, gpu_target)


@st.composite
def convolutions(draw):
    """Any 2-D convolution, supported or not: kernel size, stride, padding, groups, dtype."""
    dtype = draw(st.sampled_from(["float32", "float32", "float16"]))
    groups = draw(st.sampled_from([1, 1, 2]))
    channels_in, channels_out = 4 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    seed = draw(st.integers(0, 2**16))
    threshold = draw(st.sampled_from([None, 0.5, 1.0]))
    return dtype, groups, channels_in, channels_out, kernel, strides, padding, seed, threshold


@given(convolutions())
@settings(max_examples=30)
def test_any_convolution_matches_tvm_dense(params):
    """Rewritten or not, the compiled model computes what TVM's dense build computes."""
    dtype, groups, c_in, c_out, kernel, strides, padding, seed, threshold = params
    rng = np.random.default_rng(seed)
    weight = ((rng.random((c_out, c_in // groups, *kernel)) < 0.3) * rng.standard_normal((c_out, c_in // groups, *kernel)))
    x = relax.Var("x", relax.TensorType((2, c_in, 5, 6), dtype))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = relax.op.nn.conv2d(x, relax.const(weight.astype(dtype), dtype), strides=strides, padding=padding, groups=groups)
            out = builder.emit_output(relax.op.nn.relu(builder.emit(conv)))
        builder.emit_func_output(out)
    mod = builder.get()
    arrays = [rng.standard_normal((2, c_in, 5, 6)).astype(dtype)]
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(arrays[0])).numpy()
    compiled = Compiled(mod, CPU_TARGET, density_threshold=threshold)
    limit = sp.DEFAULT_DENSITY_THRESHOLD[Layout.CHANNELS] if threshold is None else threshold
    supported = dtype == "float32"  # any kernel size, stride, padding and grouping
    # Under the default the CPU takes convolutions at any density, but narrow groups that are
    # not depthwise (each filter reading one channel, for the depthwise kernel).
    reads_one_channel = (np.count_nonzero(np.abs(weight).sum(axis=(2, 3)), axis=1) <= 1).all()
    any_density = threshold is None and (groups == 1 or c_in // groups >= sp.CPU_MIN_GROUP_CHANNELS or reads_one_channel)
    rewritten = supported and (any_density or np.count_nonzero(weight) / weight.size <= limit)
    assert [layer.sparse for layer in compiled.report] == [rewritten]
    tolerance = 1e-2 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(compiled(*arrays), dense, rtol=tolerance, atol=tolerance * max(1.0, float(np.abs(dense).max())))


SIBLING_EPILOGUES = ((), ("bias",), ("bias", "relu"))


@st.composite
def siblings(draw):
    """2-4 matmuls of one input (2-D or 3-D, static or symbolic rows), each with a weight of
    its own (1-16 outputs, any density) and one of a few epilogues."""
    k, count = draw(st.integers(1, 24)), draw(st.integers(2, 4))
    outputs = [draw(st.integers(1, 16)) for _ in range(count)]
    densities = [draw(st.floats(0.0, 1.0)) for _ in range(count)]
    epilogues = [draw(st.sampled_from(SIBLING_EPILOGUES)) for _ in range(count)]
    batch = None if draw(st.booleans()) else draw(st.integers(1, 40))
    x_shape = (batch, k) if draw(st.booleans()) else (2, batch, k)
    return k, outputs, densities, epilogues, x_shape, draw(st.integers(0, 2**16))


def check_siblings(params, target):
    """Each output equals numpy's; one kernel per epilogue (siblings differing in bias values
    only are one)."""
    k, outputs, densities, epilogues, x_shape, seed = params
    rng = np.random.default_rng(seed)
    weights = [((rng.random((m, k)) < d) * rng.standard_normal((m, k))).astype("float32")
               for m, d in zip(outputs, densities)]
    biases = [rng.standard_normal(m).astype("float32") for m in outputs]
    dims = [tvm.tirx.Var("n", "int64") if d is None else d for d in x_shape]
    x = relax.Var("x", relax.TensorType(dims, "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            results = []
            for weight, bias, epilogue in zip(weights, biases, epilogues):
                out = builder.emit(relax.op.matmul(x, relax.const(weight.T.copy())))
                if "bias" in epilogue:
                    out = builder.emit(relax.op.add(out, relax.const(bias)))
                if "relu" in epilogue:
                    out = builder.emit(relax.op.nn.relu(out))
                results.append(out)
            out = builder.emit_output(relax.Tuple(results))
        builder.emit_func_output(out)
    compiled = Compiled(builder.get(), target, density_threshold=1.0)
    assert len(compiled.report.sparse_layers) == len(set(epilogues)), compiled.report.table()
    for rows in (1, 7) if None in x_shape else (None,):
        shape = [rows if d is None else d for d in x_shape]
        data = rng.standard_normal(shape).astype("float32")
        for actual, weight, bias, epilogue in zip(compiled(data), weights, biases, epilogues, strict=True):
            expected = data.astype(np.float64) @ weight.T.astype(np.float64) + (bias if "bias" in epilogue else 0)
            assert_close(actual, np.maximum(expected, 0) if "relu" in epilogue else expected)


@given(siblings())
@settings(max_examples=25)
def test_siblings_equal_their_layers_apart_on_cpu(params):
    check_siblings(params, CPU_TARGET)


@pytest.mark.gpu
@settings(max_examples=25)
@given(params=siblings())
def test_siblings_equal_their_layers_apart_on_gpu(gpu_target, params):
    check_siblings(params, gpu_target)
