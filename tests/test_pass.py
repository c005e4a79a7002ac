"""What SparsifyWeights rewrites, what it leaves alone and why, and its API contract."""

import json
import math

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

import sparsert_tvm as sp
from helpers import CPU_TARGET, KINDS, Compiled, assert_close, make_case, sparse_matrix
from conv_cases import make_conv
from sparsert_tvm.problem import Layout
from test_conv import check

RNG_SEED = 11


def ops_in(func) -> list[str]:
    """Names of the Relax ops and the kind of call_tir targets called in ``func``."""
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(func, visit)
    return names


def build(params, body_fn) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    with builder.function("main", params):
        with builder.dataflow():
            out = builder.emit_output(body_fn(builder))
        builder.emit_func_output(out)
    return builder.get()


def sparsify(mod, threshold=1.0, target=CPU_TARGET, **options):
    out = sp.SparsifyWeights(target, threshold, **options)(mod)
    return out, sp.report_of(out)


@pytest.mark.parametrize("kind", KINDS)
def test_rewrites_operator_and_epilogue_into_one_call(kind):
    rng = np.random.default_rng(RNG_SEED)
    shape = {"matmul": (None, 32), "matmul_t": (None, 32), "conv_nchw": (2, 32, 3, 3), "conv_nhwc": (2, 3, 3, 32)}
    case = make_case(rng, kind, 16, 32, 0.1, shape[kind], ("bias", "residual", "relu"))
    out, report = sparsify(case.module())
    # The CPU kernel comes compiled, in a module of its own that the call names.
    assert ops_in(out["main"]) == ["relax.call_dps_packed"]
    (layer,) = report.layers
    assert (layer.decision, layer.reason) == ("sparse", "rewritten")
    assert layer.epilogue == ["bias", "residual", "relu"]
    assert (layer.M, layer.K, layer.nnz) == (16, 32, np.count_nonzero(case.weight))
    (module,) = out.attrs["external_mods"]
    assert module.implements_function(f"{layer.kernel}_kernel")


def test_density_above_threshold_stays_dense():
    rng = np.random.default_rng(RNG_SEED)
    case = make_case(rng, "matmul_t", 16, 32, 0.5, (None, 32), ("relu",))
    mod = case.module()
    out, report = sparsify(mod, threshold=0.2)
    assert tvm_ffi.structural_equal(out["main"], mod["main"])
    (layer,) = report.layers
    assert layer.decision == "dense" and "above threshold 0.2" in layer.reason


@pytest.mark.parametrize("kind", ["matmul", "conv_nchw"])
def test_default_threshold_depends_on_the_layout(kind):
    """On CUDA; on the CPU too for matmuls (its convolutions: the next test)."""
    rng = np.random.default_rng(RNG_SEED)
    layout = Layout.CHANNELS if kind == "conv_nchw" else Layout.ROWS
    default = sp.DEFAULT_DENSITY_THRESHOLD[layout]
    shape = (4, 64) if kind == "matmul" else (1, 64, 2, 2)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    for density, decision in [(default * 0.7, "sparse"), (min(1.0, default * 1.5), "dense")]:
        case = make_case(rng, kind, 64, 64, density, shape)
        for target in (cuda, CPU_TARGET) if kind == "matmul" else (cuda,):
            report = sp.report_of(sp.SparsifyWeights(target, dry_run=True)(case.module()))
            assert report.layers[0].decision == decision, report.layers[0].reason


@pytest.mark.parametrize(("kind", "groups", "decision"), [
    ("conv_nchw", 1, "sparse"), ("conv_nhwc", 1, "sparse"),
    ("conv_nchw", 2, "sparse"),  # 16 input channels per group
    ("conv_nhwc", 8, "dense"),  # 4 per group, and the depthwise kernel takes NCHW only
])
def test_the_cpu_rewrites_convolutions_at_any_density(kind, groups, decision):
    """TVM's CPU pipeline leaves its convolutions unscheduled, so dense ones are ours too,
    but for narrow groups the depthwise kernel does not take."""
    rng = np.random.default_rng(RNG_SEED)
    layout = "NHWC" if kind == "conv_nhwc" else "NCHW"
    case = make_conv(rng, 32, 32, (3, 3), (5, 5), 1.0, groups=groups, layout=layout, epilogue=("bias", "relu"))
    _, report = sparsify(case.module(), threshold=None)
    (layer,) = report.layers
    assert layer.decision == decision, layer.reason
    if decision == "sparse":
        assert "as a convolution (any density)" in layer.reason
        (layer,) = check(case, CPU_TARGET, batches=(1,), density_threshold=None)
        assert layer.nnz == case.weight.size


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, "0.5", True, None.__class__])
def test_invalid_threshold_raises(bad):
    with pytest.raises(ValueError, match="density_threshold"):
        sp.SparsifyWeights(CPU_TARGET, bad)


def test_unknown_option_and_target_raise():
    with pytest.raises(TypeError, match="unknown option"):
        sp.SparsifyWeights(CPU_TARGET, 0.5, tile=3)
    with pytest.raises(ValueError, match="no sparse kernels"):
        sp.SparsifyWeights({"kind": "c"}, 0.5)
    with pytest.raises(ValueError, match="positive integer"):
        sp.CudaSpmmConfig(rows_per_block=0)
    with pytest.raises(TypeError, match="unknown kernel_config"):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config={"rows_per_block": 2})
    with pytest.raises(ValueError, match="vector_lanes"):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config={"vector_lanes": 0})
    with pytest.raises(TypeError, match="CpuSpmmConfig"):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config=sp.CudaSpmmConfig())


def _matmul_param_weight():
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 6), "float32"))
    return build([x, w], lambda b: relax.op.matmul(x, w)), "weight is not a constant"


def _constant_on_the_left_with_a_dynamic_column_count():
    x = relax.Var("x", relax.TensorType((8, tirx.Var("n", "int64")), "float32"))
    w = relax.const(np.eye(6, 8, dtype="float32"))
    return build([x], lambda b: relax.op.matmul(w, x)), "dynamic column count with the weight on the left"


def _constant_on_the_left_times_a_vector():
    x = relax.Var("x", relax.TensorType((8,), "float32"))
    w = relax.const(np.eye(6, 8, dtype="float32"))
    return build([x], lambda b: relax.op.matmul(w, x)), "1-D right operand"


def _conv(reason, weight_shape=(6, 8, 1, 1), x_shape=(1, 8, 5, 5), dtype="float32", **attrs):
    def make():
        x = relax.Var("x", relax.TensorType(x_shape, dtype))
        w = relax.const(np.ones(weight_shape, dtype))
        return build([x], lambda b: relax.op.nn.conv2d(x, w, **attrs)), reason

    return make


def _declined(op, x_shape, weight_shape, reason):
    def make():
        x = relax.Var("x", relax.TensorType(x_shape, "float32"))
        return build([x], lambda b: op(x, relax.const(np.ones(weight_shape, "float32")))), reason

    return make


def _batched_weight():
    x = relax.Var("x", relax.TensorType((2, 4, 8), "float32"))
    w = relax.const(np.ones((2, 8, 6), "float32"))
    return build([x], lambda b: relax.op.matmul(x, w)), "3-D weight"


def _nan_weight():
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = np.eye(8, 6, dtype="float32")
    w[3, 2] = np.nan
    return build([x], lambda b: relax.op.matmul(x, relax.const(w))), "NaN or Inf"


def _float16():
    x = relax.Var("x", relax.TensorType((4, 8), "float16"))
    return build([x], lambda b: relax.op.matmul(x, relax.const(np.eye(8, 6, dtype="float16")))), "float16"


def _dynamic_spatial():
    h = tirx.Var("h", "int64")
    x = relax.Var("x", relax.TensorType((1, 8, h, 4), "float32"))
    return build([x], lambda b: relax.op.nn.conv2d(x, relax.const(np.ones((6, 8, 1, 1), "float32")))), "dynamic spatial"


@pytest.mark.parametrize(
    "make",
    [
        _matmul_param_weight,
        _constant_on_the_left_with_a_dynamic_column_count,
        _constant_on_the_left_times_a_vector,
        _batched_weight,
        _nan_weight,
        _float16,
        _dynamic_spatial,
        # Spread over 2001x2001 taps, the kernel would hold 192M weights.
        _conv("dilation 1000 spreads the kernel over 2001x2001 taps", weight_shape=(6, 8, 3, 3),
              x_shape=(1, 8, 2000, 2000), dilation=1000),
        _declined(relax.op.nn.conv3d_transpose, (1, 8, 4, 5, 5), (8, 6, 3, 3, 3), "conv3d_transpose is not rewritten"),
        _declined(relax.op.nn.conv3d, (1, 8, 4, 5, 5), (6, 8, 3, 3, 3), "conv3d is not rewritten"),
        _conv("data layout NCHW4c", x_shape=(1, 2, 5, 5, 4), weight_shape=(6, 8, 1, 1), data_layout="NCHW4c"),
    ],
    ids=lambda make: make.__name__ if hasattr(make, "__name__") else "conv",
)
def test_unsupported_operators_stay_with_tvm_with_a_reason(make):
    mod, reason = make()
    out, report = sparsify(mod)
    assert tvm_ffi.structural_equal(out["main"], mod["main"])
    (layer,) = report.layers
    assert layer.decision == "dense"
    assert reason in layer.reason, layer.reason


def _weight_on_the_left(rng, x_shape, epilogue):
    """``relu?(W @ x + b [+ r])`` with ``W`` a sparse constant: a graph's adjacency times
    node features, or a 1x1 convolution written as a product."""
    m, k = 12, x_shape[-2]
    w = relax.const(sparse_matrix(rng, (m, k), 0.2, empty_rows=2))
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    params = [x]
    y_shape = (*x_shape[:-2], m, x_shape[-1])
    if "residual" in epilogue:
        params.append(relax.Var("r", relax.TensorType(y_shape, "float32")))

    def body(b):
        y = b.emit(relax.op.matmul(w, x))
        if "bias" in epilogue:  # one value per row of W, broadcast along the columns
            y = b.emit(relax.op.add(y, relax.const(rng.standard_normal((m, 1)).astype("float32"))))
        if "residual" in epilogue:
            y = b.emit(relax.op.add(y, params[1]))
        return relax.op.nn.relu(y) if "relu" in epilogue else y

    concrete = [[int(d) if isinstance(d, tirx.IntImm) else 3 for d in p.ty.shape.values] for p in params]
    return build(params, body), [rng.standard_normal(shape).astype("float32") for shape in concrete]


@pytest.mark.parametrize("x_shape, epilogue", [
    ((20, 7), ("bias", "relu")),  # one matrix: viewed as one image
    ((3, 20, 7), ("bias", "residual", "relu")),  # a batch of matrices: images of their own
    ((2, 3, 20, 7), ("residual",)),  # batch axes folded into one
    ((tirx.Var("b", "int64"), 20, 7), ("bias",)),  # a symbolic batch
])
def test_weight_on_the_left_is_rewritten_as_images_and_matches_tvm(target, x_shape, epilogue):
    rng = np.random.default_rng(RNG_SEED)
    mod, arrays = _weight_on_the_left(rng, x_shape, epilogue)
    compiled = Compiled(mod, target)
    (layer,) = compiled.report.layers
    assert layer.decision == "sparse", layer.reason
    assert (layer.op, layer.M, layer.K) == ("matmul (weight on the left)", 12, 20)
    # x, the residual and the output are viewed as [images, K or M, N] where they are not.
    reshapes = ops_in(sparsify(mod)[0]["main"]).count("relax.reshape")
    assert reshapes == (0 if len(x_shape) == 3 else 2 + ("residual" in epilogue))
    assert layer.epilogue == [{"bias": "bias", "residual": "residual", "relu": "relu"}[op] for op in epilogue]
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](*map(tvm.runtime.tensor, arrays))
    assert_close(compiled(*arrays), dense.numpy())


def test_a_bias_along_the_columns_is_not_a_bias_of_the_weight_on_the_left():
    """``W @ x + c`` with ``c`` varying along the columns (of x's N) stays TVM's add."""
    rng = np.random.default_rng(3)
    w = relax.const(sparse_matrix(rng, (12, 12), 0.2))
    x = relax.Var("x", relax.TensorType((12, 12), "float32"))
    c = relax.const(rng.standard_normal((1, 12)).astype("float32"))
    mod = build([x], lambda b: relax.op.add(b.emit(relax.op.matmul(w, x)), c))
    (layer,) = sparsify(mod)[1].layers
    assert layer.decision == "sparse" and layer.epilogue == []
    array = rng.standard_normal((12, 12)).astype("float32")
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(array)).numpy()
    assert_close(Compiled(mod, CPU_TARGET)(array), dense)


@pytest.mark.parametrize("x_shape, combined", [((16, 9), False), ((2, 16, 9), True)])
def test_weights_on_the_left_are_siblings_only_without_a_view(x_shape, combined):
    """Two weights times one input. A batch of [K, N] matrices is the kernels' own view,
    and one kernel computes both; a single [K, N] matrix is viewed as one image, and slices
    of one combined [1, M, N] output would not have the layers' [M, N] shapes."""
    rng = np.random.default_rng(4)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w1, w2 = (relax.const(sparse_matrix(rng, (m, 16), 0.2)) for m in (5, 7))
    mod = build([x], lambda b: relax.Tuple([b.emit(relax.op.matmul(w1, x)), b.emit(relax.op.matmul(w2, x))]))
    compiled = Compiled(mod, CPU_TARGET)
    layers = compiled.report.layers
    assert [layer.decision for layer in layers] == ["sparse"] * (1 if combined else 2)
    assert ("one kernel for 2 layers" in layers[0].reason) is combined
    array = rng.standard_normal(x_shape).astype("float32")
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(array))
    for ours, theirs in zip(compiled(array), dense):
        assert_close(ours, theirs.numpy())


@pytest.mark.parametrize("layout, kernel, stride, dilation, padding, groups, epilogue", [
    ("NCW", 1, 1, 1, (0, 0), 1, ("bias", "relu")),  # a pointwise layer: a product over the length
    ("NCW", 3, 1, 1, (1, 1), 1, ("bias", "residual", "relu")),
    ("NCW", 5, 2, 1, (2, 1), 1, ("bias",)),  # strided, padded unevenly
    ("NCW", 3, 1, 1, (1, 1), 12, ("bias", "relu")),  # depthwise
    ("NWC", 3, 1, 1, (1, 1), 1, ("bias", "relu")),
    ("NWC", 1, 1, 1, (0, 0), 1, ("residual",)),
    ("NCW", 2, 1, 4, (4, 0), 1, ("bias", "residual", "relu")),  # a WaveNet-style causal layer
    ("NWC", 3, 2, 3, (2, 3), 12, ("bias",)),  # dilated, strided and depthwise
])
def test_conv1d_is_rewritten_through_a_one_row_window(target, layout, kernel, stride, dilation, padding, groups,
                                                      epilogue):
    """A 1-D convolution (speech and sequence models) is a 2-D one over an image one row
    high: rewritten, its bias and epilogue fused, equal to TVM's dense build."""
    rng = np.random.default_rng(RNG_SEED)
    channels, length = 12, 17
    m = 12 if groups > 1 else 8
    x_shape = (2, channels, length) if layout == "NCW" else (2, length, channels)
    out_length = (length + sum(padding) - dilation * (kernel - 1) - 1) // stride + 1
    y_shape = (2, m, out_length) if layout == "NCW" else (2, out_length, m)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    params = [x] + ([relax.Var("r", relax.TensorType(y_shape, "float32"))] if "residual" in epilogue else [])
    w = sparse_matrix(rng, (m, channels // groups * kernel), 0.15).reshape(m, channels // groups, kernel)
    bias_shape = (1, m, 1) if layout == "NCW" else (m,)

    def body(b):
        y = b.emit(relax.op.nn.conv1d(x, relax.const(w), strides=stride, padding=padding, dilation=dilation,
                                      groups=groups, data_layout=layout))
        if "bias" in epilogue:
            y = b.emit(relax.op.add(y, relax.const(rng.standard_normal(bias_shape).astype("float32"))))
        if "residual" in epilogue:
            y = b.emit(relax.op.add(y, params[1]))
        return relax.op.nn.relu(y) if "relu" in epilogue else y

    mod = build(params, body)
    compiled = Compiled(mod, target)
    (layer,) = compiled.report.layers
    assert layer.decision == "sparse", layer.reason
    assert layer.op.startswith(f"conv1d {kernel}") and layer.epilogue == list(epilogue)
    assert (f"dilation {dilation}" in layer.op) == (dilation > 1)
    assert (layer.M, layer.K, layer.nnz) == (m, channels // groups * kernel, np.count_nonzero(w))  # as the model holds it
    arrays = [rng.standard_normal([int(d) for d in p.ty.shape.values]).astype("float32") for p in params]
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](*map(tvm.runtime.tensor, arrays))
    assert_close(compiled(*arrays), dense.numpy())


def _conv_then_batch_norm(rng, variant):
    """``conv (+bias) -> batch_norm -> relu`` in NCHW, or a variant the pass must not fold."""
    m, c = 8, 6
    x = relax.Var("x", relax.TensorType((2, c, m, m), "float32"))  # an output of m rows: axis 2 fits too
    params = [x]
    stats = [relax.const(v.astype("float32")) for v in (rng.uniform(0.5, 2, m), rng.standard_normal(m),
                                                        rng.standard_normal(m), rng.uniform(0.5, 2, m))]
    if variant == "after a residual":
        params.append(relax.Var("r", relax.TensorType((2, m, m, m), "float32")))

    def body(b):
        y = b.emit(relax.op.nn.conv2d(x, relax.const(sparse_matrix(rng, (m, c * 9), 0.3).reshape(m, c, 3, 3)),
                                      padding=1))
        if variant != "no bias":
            y = b.emit(relax.op.add(y, relax.const(rng.standard_normal((1, m, 1, 1)).astype("float32"))))
        if variant == "after a residual":
            y = b.emit(relax.op.add(y, params[1]))
        training, axis = variant == "training", 2 if variant == "other axis" else 1
        normed = b.emit(relax.op.nn.batch_norm(y, *stats, axis=axis, training=training))
        out = b.emit(relax.TupleGetItem(normed, 0))
        if variant == "statistics read":
            return relax.Tuple([b.emit(relax.op.nn.relu(out)), b.emit(relax.TupleGetItem(normed, 1))])
        return relax.op.nn.relu(out)

    return build(params, body), [rng.standard_normal([int(d) for d in p.ty.shape.values]).astype("float32")
                                 for p in params]


@pytest.mark.parametrize("variant, epilogue", [
    ("no bias", ["batch_norm", "relu"]),
    ("bias", ["bias", "batch_norm", "relu"]),  # the bias is scaled too
    ("after a residual", ["bias", "residual"]),  # the residual would need scaling: the norm stays TVM's
    ("training", ["bias"]),  # batch statistics: not a constant affine map
    ("other axis", ["bias"]),
    ("statistics read", ["bias"]),  # its other outputs are used
])
def test_inference_batch_norms_fold_into_the_layer_before_them(target, variant, epilogue):
    rng = np.random.default_rng(RNG_SEED)
    mod, arrays = _conv_then_batch_norm(rng, variant)
    compiled = Compiled(mod, target)
    (layer,) = compiled.report.layers
    assert layer.decision == "sparse" and layer.epilogue == epilogue, layer.reason
    norms = ops_in(sparsify(mod)[0]["main"]).count("relax.nn.batch_norm")
    assert norms == (0 if "batch_norm" in epilogue else 1)
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](*map(tvm.runtime.tensor, arrays))
    ours = compiled(*arrays)
    if variant == "statistics read":  # (output, the statistic)
        ours, dense = ours[0], dense[0]
    assert_close(ours, dense.numpy())


@pytest.mark.parametrize("op", [relax.op.multiply, relax.op.add, relax.op.subtract])
def test_weights_computed_from_constants_are_constants(op):
    """A weight held as an expression of constants (``weight_orig * weight_mask`` after
    PyTorch's pruning, a sum or difference of parts) is evaluated and rewritten; where an
    operand is not a constant, it is not."""
    rng = np.random.default_rng(12)
    first, second = (sparse_matrix(rng, (8, 6), 0.3) for _ in range(2))
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    mod = build([x], lambda b: relax.op.matmul(x, b.emit(op(relax.const(first), relax.const(second)))))
    out, report = sparsify(mod)
    (layer,) = report.layers
    expected = {relax.op.multiply: first * second, relax.op.add: first + second, relax.op.subtract: first - second}[op]
    assert layer.decision == "sparse" and layer.nnz == np.count_nonzero(expected)
    array = rng.standard_normal((4, 8)).astype("float32")
    assert_close(Compiled(mod, CPU_TARGET)(array), array @ expected)
    p = relax.Var("p", relax.TensorType((8, 6), "float32"))
    mod = build([x, p], lambda b: relax.op.matmul(x, b.emit(op(relax.const(first), p))))
    assert sparsify(mod)[1].layers[0].reason == "weight is not a constant"


def test_nan_weight_gives_the_dense_answer():
    mod, _ = _nan_weight()
    x = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    dense = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ours = Compiled(mod, CPU_TARGET)(x)
    np.testing.assert_array_equal(ours, dense)
    assert np.isnan(ours[:, 2]).all()


def test_epilogue_stops_at_a_value_with_two_users():
    rng = np.random.default_rng(RNG_SEED)
    weight = sparse_matrix(rng, (6, 8), 0.3)
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))

    def body(b):
        h = b.emit(relax.op.matmul(x, relax.const(weight.T.copy())))
        r = b.emit(relax.op.nn.relu(h))
        return relax.op.add(r, h)

    mod = build([x], body)
    out, report = sparsify(mod)
    assert report.layers[0].epilogue == []
    assert sorted(ops_in(out["main"])) == ["relax.add", "relax.call_dps_packed", "relax.nn.relu"]
    xv = rng.standard_normal((4, 8)).astype("float32")
    h = xv @ weight.T
    assert_close(Compiled(mod, CPU_TARGET)(xv), np.maximum(h, 0) + h)


def test_constant_that_is_not_a_channel_bias_is_not_fused():
    rng = np.random.default_rng(RNG_SEED)
    weight = sparse_matrix(rng, (6, 8), 0.3)
    offsets = rng.standard_normal((4, 6)).astype("float32")  # varies along the batch too
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    mod = build([x], lambda b: relax.op.add(b.emit(relax.op.matmul(x, relax.const(weight.T.copy()))), relax.const(offsets)))
    out, report = sparsify(mod)
    assert report.layers[0].epilogue == []
    assert "relax.add" in ops_in(out["main"])
    xv = rng.standard_normal((4, 8)).astype("float32")
    assert_close(Compiled(mod, CPU_TARGET)(xv), xv @ weight.T + offsets)


@pytest.mark.parametrize("bounds, fused", [
    ((0.0, 6.0), ["relu", "clip(-inf, 6)"]),  # ONNX's Clip as TVM imports it
    ((-1.5, np.inf), ["clip(-1.5, inf)"]),  # an infinite bound is not a clip: left to TVM
    ((np.float32([[-1, 0, 1, 2, 3, 4]]), None), []),  # a bound varying per channel: left to TVM
], ids=["relu6", "infinite", "per-channel"])
def test_maximum_and_minimum_with_a_constant_are_clips(target, bounds, fused):
    rng = np.random.default_rng(RNG_SEED)
    weight = sparse_matrix(rng, (6, 8), 0.3)
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    lo, hi = bounds

    def body(b):
        value = b.emit(relax.op.maximum(b.emit(relax.op.matmul(x, relax.const(weight.T.copy()))),
                                        relax.const(np.asarray(lo, "float32"))))
        return value if hi is None else relax.op.minimum(relax.const(np.float32(hi)), value)

    mod = build([x], body)
    _, report = sparsify(mod, target=target)
    assert report.layers[0].epilogue == fused
    xv = rng.standard_normal((4, 8)).astype("float32") * 4
    expected = np.maximum(xv @ weight.T, lo)
    assert_close(Compiled(mod, target)(xv), expected if hi is None else np.minimum(expected, hi))


def test_shared_weight_in_two_functions_and_report_accumulates():
    rng = np.random.default_rng(RNG_SEED)
    weight = relax.const(sparse_matrix(rng, (8, 6), 0.3))
    builder = relax.BlockBuilder()
    for name in ("first", "second"):
        x = relax.Var("x", relax.TensorType((3, 8), "float32"))
        with builder.function(name, [x]):
            with builder.dataflow():
                out = builder.emit_output(relax.op.matmul(x, weight))
            builder.emit_func_output(out)
    out, report = sparsify(builder.get())
    assert [layer.function for layer in report] == ["first", "second"]
    assert all(layer.sparse for layer in report)
    again, report_again = sparsify(out)
    assert len(report_again) == 2  # nothing new to rewrite; earlier entries kept
    assert tvm_ffi.structural_equal(again["first"], out["first"])


def test_kernel_layouts_are_normalised():
    """An NHWC convolution with an OHWI kernel is the same product as with HWIO."""
    rng = np.random.default_rng(RNG_SEED)
    a = sparse_matrix(rng, (6, 8), 0.3)
    x = relax.Var("x", relax.TensorType((2, 3, 3, 8), "float32"))
    w = relax.const(np.ascontiguousarray(a[:, None, None, :]))  # OHWI
    mod = build([x], lambda b: relax.op.nn.conv2d(x, w, data_layout="NHWC", kernel_layout="OHWI"))
    _, report = sparsify(mod)
    assert report.layers[0].sparse
    xv = rng.standard_normal((2, 3, 3, 8)).astype("float32")
    assert_close(Compiled(mod, CPU_TARGET)(xv), xv @ a.T)


def test_report_table_lists_every_candidate():
    rng = np.random.default_rng(RNG_SEED)
    case = make_case(rng, "conv_nchw", 16, 32, 0.1, (None, 32, 4, 4), ("bias", "relu"))
    _, report = sparsify(case.module())
    text = report.table()
    assert "conv2d 1x1 NCHW" in text and "bias+relu" in text and "sparse" in text
    assert sp.SparsityReport.from_json(report.to_json()) == report
    # The pass's wall time building kernels, next to the layers' own (overlapping) times.
    (layer,) = report.layers
    assert 0 < report.build_s and 0 < layer.compile_s
    assert f"kernels built in {report.build_s:.1f}s ({layer.compile_s:.1f}s summed over layers" in report.summary()
    older = sp.SparsityReport.from_json(json.dumps(json.loads(report.to_json())["layers"]))  # before build_s
    assert older.layers == report.layers and "s kernel generation" in older.summary()
    collected = sp.SparsityReport()
    sp.compile(case.module(), CPU_TARGET, report=collected)
    assert collected.layers[0].kernel and collected.build_s > 0  # what the CLI prints


def test_two_operators_meeting_in_one_residual_add_are_both_rewritten(target):
    # A bottleneck's last 1x1 convolution and its projection shortcut: relu(conv_a(h) + bias_a
    # + conv_b(x) + bias_b). Both may fuse the add; one kernel must, the other stops before it.
    rng = np.random.default_rng(RNG_SEED)
    w_a, w_b = (sparse_matrix(rng, (16, 8), 0.3).reshape(16, 8, 1, 1) for _ in range(2))
    bias_a, bias_b = (rng.standard_normal((1, 16, 1, 1)).astype("float32") for _ in range(2))
    h = relax.Var("h", relax.TensorType((2, 8, 3, 3), "float32"))
    x = relax.Var("x", relax.TensorType((2, 8, 3, 3), "float32"))

    def body(bb):
        a = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(h, relax.const(w_a))), relax.const(bias_a)))
        b = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(x, relax.const(w_b))), relax.const(bias_b)))
        return relax.op.nn.relu(bb.emit(relax.op.add(a, b)))

    mod = build([h, x], body)
    out, report = sparsify(mod, target=target)
    # CPU kernels come compiled (call_dps_packed), CUDA ones as launch wrappers (call_tir).
    call = "relax.call_dps_packed" if target.kind.name == "llvm" else "relax.call_tir"
    assert ops_in(out["main"]) == [call, call]
    assert [layer.decision for layer in report.layers] == ["sparse", "sparse"]
    assert sorted(layer.epilogue for layer in report.layers) == [["bias"], ["bias", "residual", "relu"]]
    arrays = [rng.standard_normal((2, 8, 3, 3)).astype("float32") for _ in range(2)]
    a = np.einsum("mc,ncyx->nmyx", w_a[:, :, 0, 0], arrays[0]) + bias_a
    b = np.einsum("mc,ncyx->nmyx", w_b[:, :, 0, 0], arrays[1]) + bias_b
    assert_close(Compiled(mod, target)(*arrays), np.maximum(a + b, 0))


@pytest.mark.parametrize("columns", [5, 32])  # on CUDA, 32 columns read a transposed input
def test_siblings_reading_one_input_become_one_kernel(target, columns):
    """Query, key and value projections of one input (biases of their own) become one kernel
    whose output each slices; a sibling with a ReLU, one above the threshold and one whose
    input differs stay apart. Two 1x1 NCHW convolutions of one image combine along channels."""
    rng = np.random.default_rng(RNG_SEED)
    x = relax.Var("x", relax.TensorType((columns, 24), "float32"))
    image = relax.Var("image", relax.TensorType((2, 24, 3, 5), "float32"))
    weights = [sparse_matrix(rng, (m, 24), 0.2) for m in (16, 8, 16, 16, 16)]
    weights.append(sparse_matrix(rng, (16, 24), 0.9))  # above the threshold
    biases = [rng.standard_normal(w.shape[0]).astype("float32") for w in weights]
    filters = [sparse_matrix(rng, (m, 24), 0.2) for m in (8, 12)]
    channel_biases = [rng.standard_normal((1, m, 1, 1)).astype("float32") for m in (8, 12)]

    def linear(bb, i, relu=False, data=None):
        product = bb.emit(relax.op.matmul(x if data is None else data, relax.const(weights[i].T)))
        out = bb.emit(relax.op.add(product, relax.const(biases[i])))
        return bb.emit(relax.op.nn.relu(out)) if relu else out

    def body(bb):
        q, k, v = linear(bb, 0), linear(bb, 1), linear(bb, 2)
        relu, dense = linear(bb, 3, relu=True), linear(bb, 5)
        other = linear(bb, 4, data=bb.emit(relax.op.negative(x)))
        convs = [bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(image, relax.const(f.reshape(*f.shape, 1, 1)))),
                                      relax.const(b))) for f, b in zip(filters, channel_biases)]
        return relax.Tuple([q, k, v, relu, dense, other, *convs])

    mod = build([x, image], body)
    _, report = sparsify(mod, threshold=0.5, target=target)
    layers = [(layer.decision, layer.M, "+" in layer.name) for layer in report.layers]
    # q+k+v, the ReLU one, the dense one, the one of another input, the two convolutions.
    assert layers == [("sparse", 40, True), ("sparse", 16, False), ("dense", 16, False), ("sparse", 16, False),
                      ("sparse", 20, True)], report.table()
    first = report.layers[0]
    assert first.name == "lv1+lv3+lv5" and "one kernel for 3 layers reading one input" in first.reason
    _, apart = sparsify(mod, threshold=0.5, target=target, combine_siblings=False)
    assert [layer.M for layer in apart.layers] == [16, 8, 16, 16, 16, 16, 8, 12]
    arrays = [rng.standard_normal(shape).astype("float32") for shape in ((columns, 24), (2, 24, 3, 5))]
    expected = [arrays[0] @ w.T + b for w, b in zip(weights, biases)]
    expected[3] = np.maximum(expected[3], 0)
    expected[4] = -arrays[0] @ weights[4].T + biases[4]
    expected = expected[:3] + [expected[3], expected[5], expected[4]]
    expected += [np.einsum("mc,ncyx->nmyx", f, arrays[1]) + b for f, b in zip(filters, channel_biases)]
    for actual, wanted in zip(Compiled(mod, target, 0.5)(*arrays), expected, strict=True):
        assert_close(actual, wanted)


def test_siblings_in_two_dataflow_blocks_stay_apart():
    """A dataflow block's values do not outlive it: layers of one input in two blocks are
    two kernels, each in its block."""
    rng = np.random.default_rng(RNG_SEED)
    x = relax.Var("x", relax.TensorType((4, 16), "float32"))
    weights = [sparse_matrix(rng, (8, 16), 0.3) for _ in range(2)]
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        outputs = []
        for weight in weights:
            with builder.dataflow():
                outputs.append(builder.emit_output(relax.op.matmul(x, relax.const(weight.T.copy()))))
            outputs.append(builder.emit(relax.op.negative(outputs[-1])))  # a plain block between
        builder.emit_func_output(relax.Tuple(outputs))
    mod = builder.get()
    assert len(mod["main"].body.blocks) == 4
    _, report = sparsify(mod)
    assert [layer.decision for layer in report.layers] == ["sparse", "sparse"]
    data = rng.standard_normal((4, 16)).astype("float32")
    actual = Compiled(mod, CPU_TARGET)(data)
    for i, weight in enumerate(weights):
        assert_close(actual[2 * i], data @ weight.T)
        assert_close(actual[2 * i + 1], -(data @ weight.T))


def test_cpu_builds_fuse_unless_the_module_calls_packed_functions():
    from sparsert_tvm.build import relax_pipeline

    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    plain = build([x], lambda bb: relax.op.nn.relu(x))
    assert relax_pipeline(plain, CPU_TARGET) != "default"  # TVM's fusing CPU pipeline
    packed = build([x], lambda bb: relax.call_pure_packed("test.identity", x, ty_args=x.ty))
    assert relax_pipeline(packed, CPU_TARGET) == "default"
    assert relax_pipeline(plain, tvm.target.Target("cuda")) == "default"


def test_cpu_kernels_are_built_without_the_llvm_passes_unrolled_code_does_not_need(monkeypatch):
    from sparsert_tvm.build import KERNEL_LLVM_OPTIONS, with_llvm_options

    user_target = tvm.target.Target({"kind": "llvm", "cl-opt": ["-unroll-threshold=10"]})
    target = with_llvm_options(user_target, KERNEL_LLVM_OPTIONS)
    assert list(target.attrs["cl-opt"]) == ["-unroll-threshold=10", *KERNEL_LLVM_OPTIONS]
    kernels_for, model_for = [], []
    tir_build, tvm_compile = tvm.tirx.build, tvm.compile

    def recording_build(mod, target, **kwargs):
        kernels_for.append(target)
        return tir_build(mod, target, **kwargs)

    def recording_compile(mod, target, **kwargs):
        model_for.append(target)
        return tvm_compile(mod, target, **kwargs)

    monkeypatch.setattr(tvm.tirx, "build", recording_build)
    monkeypatch.setattr(tvm, "compile", recording_compile)
    rng = np.random.default_rng(RNG_SEED)
    case = make_case(rng, "matmul", 8, 16, 0.3, (None, 16))
    x = rng.standard_normal((3, 16)).astype("float32")
    assert_close(Compiled(case.module(), CPU_TARGET, 1.0)(x), case.reference([x]))
    # The kernel, built by the pass, with the options; the rest of the model as the user asked.
    assert list(kernels_for[0].attrs["cl-opt"]) == list(KERNEL_LLVM_OPTIONS)
    assert [list(t.attrs.get("cl-opt", [])) for t in model_for] == [[]]


def test_a_cpu_model_whose_kernels_took_every_operator_runs_as_built(tmp_path):
    """With no TIR left for TVM, the executable's only other module is an empty C one: it runs
    as built (no export that would generate the kernels' machine code again), and still exports."""
    rng = np.random.default_rng(RNG_SEED)
    case = make_case(rng, "matmul", 16, 32, 0.2, (5, 32), ("bias", "relu"))  # static: no shape functions either
    executable = sp.compile(case.module(), CPU_TARGET, 1.0)
    assert "c" in [m.kind for m in executable.mod.imports]
    assert executable.jit() is executable.mod
    x = rng.standard_normal((5, 32)).astype("float32")
    assert_close(relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy(), case.reference([x]))
    path = str(tmp_path / "model.so")
    executable.export_library(path)
    loaded = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    assert_close(loaded["main"](tvm.runtime.tensor(x)).numpy(), case.reference([x]))
