"""Transposed convolutions (decoders, GAN generators, vocoders' upsampling): rewritten as one
stride-1 convolution of their phase filters, against a direct numpy definition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

from conv_cases import finish
from helpers import CPU_TARGET, Compiled, assert_close, cuda_target, sparse_matrix
import sparsert_tvm as sp
from sparsert_tvm import SparsifyWeights, report_of
from sparsert_tvm.schedules.cuda import rule as cuda_rule
from sparsert_tvm.passes.candidates import find_candidates
from sparsert_tvm.problem import Layout
from sparsert_tvm.weights import one_pixel_rows, phase_filters
from test_conv import check  # of any case with module(), inputs(), reference() and dtype
from test_cuda_codegen import needs_ptxas


class Geometry(NamedTuple):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right: cropped from the output
    output_padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    size: tuple[int, int] = (5, 6)  # of the input


GEOMETRIES = {
    "4x4/2": Geometry((4, 4), (2, 2), (1, 1, 1, 1)),  # DCGAN's generator: exactly twice the size
    "3x3/2-output-padding": Geometry((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # twice the size, taps overlapping
    "2x2/2": Geometry((2, 2), (2, 2)),  # U-Net's up-convolution: one tap per phase
    "3x3/1": Geometry((3, 3), (1, 1), (1, 1, 1, 1)),  # no phases: a convolution of the flipped kernel
    "1x1/2": Geometry((1, 1), (2, 2), size=(4, 3)),  # three phases of four hold no tap
    "3x3/2-crop-beyond-window": Geometry((3, 3), (2, 2), (3, 2, 0, 1), size=(5, 4)),
    "5x3/3x2-dilated-2x1": Geometry((5, 3), (3, 2), (2, 0, 1, 1), (2, 1), (2, 1), size=(4, 5)),
    # One input pixel: a matmul whose rows are the output's elements (``one_pixel_rows``).
    "4x4/1-one-pixel": Geometry((4, 4), (1, 1), size=(1, 1)),  # DCGAN's projection of its latent vector
    "3x3/2-one-pixel-cropped-dilated": Geometry((3, 3), (2, 2), (1, 0, 0, 1), (1, 1), (2, 1), size=(1, 1)),
}


def landing_taps(case) -> int:
    """Nonzeros of the taps that land in the output (of one input pixel, some may be cropped)."""
    g = case.geometry
    if g.size != (1, 1):
        return np.count_nonzero(case.weight)
    inside = [[0 <= k * d - top < out for k in range(size)]
              for size, d, top, out in zip(g.kernel, g.dilation, g.padding[:2], case.out_size)]
    return np.count_nonzero(case.weight[:, :, inside[0], :][:, :, :, inside[1]])


@dataclass
class TransposedCase:
    """``act(conv2d_transpose(x, W) + bias [+ residual])`` with a sparse IOHW weight
    ``W[C, M / groups, kh, kw]``; ``batch`` None is symbolic."""

    weight: np.ndarray
    geometry: Geometry
    groups: int = 1
    layout: str = "NCHW"
    batch: int | None = None
    epilogue: tuple[str, ...] = ()
    bias: np.ndarray | None = None

    @property
    def M(self):  # noqa: N802
        return self.weight.shape[1] * self.groups

    @property
    def dtype(self):
        return str(self.weight.dtype)

    def x_shape(self, batch):
        (h, w), c = self.geometry.size, self.weight.shape[0]
        return (batch, c, h, w) if self.layout == "NCHW" else (batch, h, w, c)

    @property
    def out_size(self) -> tuple[int, int]:
        g = self.geometry
        return tuple(
            (size - 1) * s - before - after + d * (k - 1) + extra + 1
            for size, s, before, after, d, k, extra in zip(
                g.size, g.stride, g.padding[:2], g.padding[2:], g.dilation, g.kernel, g.output_padding
            )
        )

    def out_shape(self, batch):
        return (batch, self.M, *self.out_size) if self.layout == "NCHW" else (batch, *self.out_size, self.M)

    def module(self) -> tvm.IRModule:
        batch = tirx.Var("n", "int64") if self.batch is None else self.batch
        x = relax.Var("x", relax.TensorType(self.x_shape(batch), str(self.weight.dtype)))
        params = [x]
        if "residual" in self.epilogue:
            params.append(relax.Var("residual", relax.TensorType(self.out_shape(batch), str(self.weight.dtype))))
        g = self.geometry
        builder = relax.BlockBuilder()
        with builder.function("main", params):
            with builder.dataflow():
                value = builder.emit(relax.op.nn.conv2d_transpose(
                    x, relax.const(self.weight), strides=g.stride, padding=g.padding, output_padding=g.output_padding,
                    dilation=g.dilation, groups=self.groups, data_layout=self.layout,
                ))
                for op in self.epilogue:
                    if op == "bias":
                        shape = [1, self.M, 1, 1] if self.layout == "NCHW" else [self.M]
                        value = builder.emit(relax.op.add(value, relax.op.reshape(relax.const(self.bias), shape)))
                    elif op == "relu":
                        value = builder.emit(relax.op.nn.relu(value))
                    else:
                        value = builder.emit(relax.op.add(value, params[1]))
                out = builder.emit_output(value)
            builder.emit_func_output(out)
        return builder.get()

    def inputs(self, rng, batch):
        arrays = [rng.standard_normal(self.x_shape(batch)).astype(self.weight.dtype)]
        if "residual" in self.epilogue:
            arrays.append(rng.standard_normal(self.out_shape(batch)).astype(self.weight.dtype))
        return arrays

    def reference(self, arrays) -> np.ndarray:
        """The definition: input pixel ``(iy, ix)`` through tap ``(ky, kx)`` adds to output
        pixel ``(iy * sh + ky * dh, ix * sw + kx * dw)`` of the uncropped output, then the
        padding is cropped (float64)."""
        x = arrays[0].astype(np.float64)
        if self.layout == "NHWC":
            x = np.moveaxis(x, -1, 1)
        g = self.geometry
        (h, w), (sh, sw), (dh, dw), (kh, kw) = g.size, g.stride, g.dilation, g.kernel
        rows, cols = ((n - 1) * s + d * (k - 1) + 1 + e for n, s, d, k, e in
                      zip(g.size, g.stride, g.dilation, g.kernel, g.output_padding))
        groups, channels = self.groups, self.weight.shape[0]
        x = x.reshape(x.shape[0], groups, channels // groups, h, w)
        filters = self.weight.astype(np.float64).reshape(groups, channels // groups, -1, kh, kw)
        full = np.zeros((x.shape[0], groups, filters.shape[2], rows, cols))
        for ky in range(kh):
            for kx in range(kw):
                taps = np.einsum("bgchw,gcm->bgmhw", x, filters[..., ky, kx])
                full[..., ky * dh : ky * dh + (h - 1) * sh + 1 : sh, kx * dw : kx * dw + (w - 1) * sw + 1 : sw] += taps
        top, left = g.padding[:2]
        (oh, ow) = self.out_size
        out = full.reshape(x.shape[0], self.M, rows, cols)[:, :, top : top + oh, left : left + ow]
        return finish(out, self.epilogue, self.bias, self.layout, arrays)


def transposed(rng, name, layout="NCHW", density=0.3, channels=6, m=4, groups=1, **options) -> TransposedCase:
    geometry = GEOMETRIES[name]
    shape = (channels, m // groups, *geometry.kernel)
    weight = sparse_matrix(rng, (channels, int(np.prod(shape[1:]))), density).reshape(shape)
    bias = rng.standard_normal(m).astype("float32") if "bias" in options.get("epilogue", ()) else None
    return TransposedCase(weight, geometry, groups, layout, bias=bias, **options)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", GEOMETRIES)
def test_geometries(target, layout, name):
    """Every geometry, with a bias and ReLU (fused into the kernel, each channel's bias
    repeated over its phases or pixels) and a residual (left to TVM, after the phases are
    interleaved; fused where stride 1 or one input pixel needs none): equal to the
    definition, at a symbolic batch of 1 and 3."""
    case = transposed(np.random.default_rng(1), name, layout, epilogue=("bias", "relu", "residual"))
    (layer,) = check(case, target)
    in_place = case.geometry.stride == (1, 1) or case.geometry.size == (1, 1)
    assert layer.op.startswith("conv2d_transpose") and layer.epilogue == ["bias", "relu"] + ["residual"] * in_place
    kh, kw = case.geometry.kernel
    assert (layer.M, layer.K, layer.nnz) == (case.M, 6 * kh * kw, landing_taps(case))  # the model's


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_one_input_pixel_is_a_matmul(layout):
    """A transposed convolution of a one-pixel input reads its input as ``[N, channels]``
    and writes its output as ``[N, channels * pixels]``, the output's own order: no window
    and no interleave, and the weight's rows hold each tap once."""
    case = transposed(np.random.default_rng(11), "4x4/1-one-pixel", layout, epilogue=("bias",))
    (candidate,) = find_candidates("main", case.module()["main"])
    problem = candidate.problem
    assert candidate.reason is None and candidate.unshuffle is None and problem.window is None
    assert problem.layout is Layout.ROWS and (problem.M, problem.K) == (4 * 16, 6)
    assert candidate.weight.nnz == np.count_nonzero(case.weight)
    channel_of_row = np.repeat(np.arange(4), 16) if layout == "NCHW" else np.tile(np.arange(4), 16)
    assert (candidate.row_channels == channel_of_row).all()
    rows, _ = one_pixel_rows(case.weight, 1, (1, 1), (0, 0), (4, 4), layout == "NHWC")
    expected = np.moveaxis(case.weight, 0, -1)  # [M, kh, kw, C]: pixel (y, x) holds tap (y, x)
    assert_close(rows.reshape(4, 4, 4, 6) if layout == "NCHW" else rows.reshape(4, 4, 4, 6).transpose(2, 0, 1, 3),
                 expected)


def test_a_dense_one_pixel_projection_is_rewritten_on_cuda():
    """TVM's CUDA conv2d_transpose is slow: under the default threshold a dense transposed
    convolution is rewritten where the data-driven CSR kernel would run it (at most 8
    columns), left to TVM where the unrolled kernel would."""
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((64, 512, 4, 4)).astype("float32")
    decisions = {}
    for batch in (8, 16):
        case = TransposedCase(weight, GEOMETRIES["4x4/1-one-pixel"], batch=batch)
        (layer,) = report_of(SparsifyWeights(cuda_target(), dry_run=True)(case.module())).layers
        decisions[batch] = (layer.decision, layer.params.get("kernel"), layer.reason)
    assert decisions[8][:2] == ("sparse", "csr") and "a transposed convolution (any density)" in decisions[8][2]
    assert decisions[16][0] == "dense" and "above threshold" in decisions[16][2]


@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_densities(target, density):
    check(transposed(np.random.default_rng(2), "3x3/2-output-padding", density=density), target)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("groups, name", [
    (6, "4x4/2"), (6, "3x3/2-output-padding"), (2, "5x3/3x2-dilated-2x1"), (6, "3x3/2-one-pixel-cropped-dilated"),
])
def test_grouped_and_depthwise(target, layout, groups, name):
    """A depthwise transposed convolution's phase filters each read one input channel."""
    m = 6 if groups == 6 else 4
    (layer,) = check(transposed(np.random.default_rng(3), name, layout, m=m, groups=groups, epilogue=("bias",)), target)
    assert ("depthwise" if groups == 6 else f"groups={groups}") in layer.op


def test_the_report_and_the_threshold_see_the_models_weight():
    """A 3x3 stride-2 kernel becomes four phases of 2x2 taps, 16 for 9: the phase filters
    are 9/16 as dense as the weight. The threshold and the report see the model's weight."""
    case = transposed(np.random.default_rng(4), "3x3/2-output-padding", density=0.4)
    report = report_of(SparsifyWeights(CPU_TARGET, density_threshold=0.3)(case.module()))
    (layer,) = report.layers
    density = np.count_nonzero(case.weight) / case.weight.size
    assert density * 9 / 16 < 0.3 < density
    assert layer.decision == "dense" and f"density {density:.3f} above threshold 0.3" in layer.reason
    assert layer.op == "conv2d_transpose 3x3 /2 NCHW"
    assert (layer.M, layer.K, layer.nnz) == (4, 6 * 9, np.count_nonzero(case.weight))


def test_phase_filters_hold_each_tap_once():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4, 3, 5, 3)).astype("float32")  # IOHW, groups of 2 inputs
    filters, top = phase_filters(weight, groups=2, stride=(3, 2), dilation=(2, 1), crop=(4, 0))
    # Offsets (k * d - crop) // s: rows -2, -1, 0, 0, 1 (padded by 1, a window of 4); columns 0, 0, 1.
    assert filters.shape == (3 * 2 * 6, 2, 4, 2) and top == (1, 1)
    assert sorted(filters[filters != 0]) == sorted(weight.reshape(-1))


@pytest.mark.parametrize("name", ["4x4/2", "4x4/1-one-pixel"])
def test_batch_norm_after_a_transposed_convolution_is_folded(target, name):
    """A generator's ``conv_transpose -> batch_norm -> relu``: the norm's per-channel scale
    and shift are repeated over each channel's phases or pixels."""
    rng = np.random.default_rng(6)
    case = transposed(rng, name, epilogue=("bias",))
    m = case.M
    gamma, beta, mean = (rng.standard_normal(m).astype("float32") for _ in range(3))
    var = rng.uniform(0.5, 2, m).astype("float32")
    x = relax.Var("x", relax.TensorType(case.x_shape(2), "float32"))
    g = case.geometry
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            weight = relax.const(case.weight)
            y = builder.emit(relax.op.nn.conv2d_transpose(x, weight, strides=g.stride, padding=g.padding))
            y = builder.emit(relax.op.add(y, relax.const(case.bias.reshape(1, m, 1, 1))))
            stats = map(relax.const, (gamma, beta, mean, var))
            norm = builder.emit(relax.op.nn.batch_norm(y, *stats, axis=1, training=False))
            out = builder.emit_output(relax.op.nn.relu(builder.emit(relax.TupleGetItem(norm, 0))))
        builder.emit_func_output(out)
    compiled = Compiled(builder.get(), target)
    (layer,) = compiled.report.layers
    assert layer.decision == "sparse" and layer.epilogue == ["bias", "batch_norm", "relu"]
    (data,) = case.inputs(rng, 2)
    conv = case.reference([data])
    scale = (gamma / np.sqrt(var.astype(np.float64) + 1e-5))[None, :, None, None]
    assert_close(compiled(data), np.maximum((conv - mean[None, :, None, None]) * scale + beta[None, :, None, None], 0))


@pytest.mark.parametrize("layout, kernel, stride, padding, output_padding, groups", [
    ("NCW", 16, 8, (4, 4), 0, 1),  # HiFi-GAN's first upsampling
    ("NCW", 4, 2, (1, 2), 1, 2),
    ("NWC", 3, 2, (1, 1), 1, 6),  # depthwise
])
def test_conv1d_transpose(target, layout, kernel, stride, padding, output_padding, groups):
    """A 1-D transposed convolution is a 2-D one one row high."""
    rng = np.random.default_rng(7)
    channels, m, length = 6, 6 if groups == 6 else 4, 7
    w = sparse_matrix(rng, (channels, m // groups * kernel), 0.3).reshape(channels, m // groups, kernel)
    x_shape = (2, channels, length) if layout == "NCW" else (2, length, channels)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.conv1d_transpose(
                x, relax.const(w), strides=stride, padding=padding, output_padding=output_padding, groups=groups,
                data_layout=layout,
            ))
        builder.emit_func_output(out)
    compiled = Compiled(builder.get(), target)
    (layer,) = compiled.report.layers
    assert layer.decision == "sparse" and layer.op.startswith(f"conv1d_transpose {kernel} /{stride}")
    assert (layer.M, layer.K) == (m, channels // groups * kernel)
    data = rng.standard_normal(x_shape).astype("float32")
    # The same layer as a 2-D one of an image one row high.
    geometry = Geometry((1, kernel), (1, stride), (0, padding[0], 0, padding[1]), (0, output_padding), size=(1, length))
    as_2d = TransposedCase(w[:, :, None, :], geometry, groups, "NCHW" if layout == "NCW" else "NHWC")
    row = 2 if layout == "NCW" else 1
    expected = as_2d.reference([np.expand_dims(data, row)]).squeeze(row)
    assert_close(compiled(data), expected)


def test_a_declined_nhwc_layer_is_a_clear_error_not_tvms():
    """TVM cannot build an NHWC transposed convolution itself: one the pass declines is
    reported with its reason before ``tvm.compile`` fails in its VM code generator."""
    case = transposed(np.random.default_rng(10), "4x4/2", "NHWC", density=0.5)
    with pytest.raises(sp.UnbuildableByTvm, match=r"conv2d_transpose in NHWC.*density 0\.\d+ above threshold 0\.3"):
        sp.compile(case.module(), CPU_TARGET, 0.3)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_layer_tvm_cannot_build_is_rewritten_at_any_density(layout):
    """Under the default threshold an NHWC transposed convolution is rewritten however dense
    and large: TVM could not build it. An NCHW one goes by the other rules (on CUDA, this one
    is left to TVM: its default kernel is the unrolled one)."""
    case = transposed(np.random.default_rng(14), "4x4/2", layout, density=0.6, channels=64, m=64)
    assert np.count_nonzero(case.weight) > sp.SMALL_CONVOLUTION_NNZ
    (layer,) = report_of(SparsifyWeights(cuda_target(), dry_run=True)(case.module())).layers
    nhwc = layout == "NHWC"
    assert (layer.decision == "sparse") is nhwc, layer.reason
    assert ("a layer TVM cannot build (any density)" in layer.reason) is nhwc


def test_a_dynamic_spatial_size_stays_with_tvm():
    h = tirx.Var("h", "int64")
    x = relax.Var("x", relax.TensorType((1, 6, h, 5), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            weight = relax.const(np.ones((6, 4, 3, 3), "float32"))
            out = builder.emit_output(relax.op.nn.conv2d_transpose(x, weight, strides=2))
        builder.emit_func_output(out)
    (layer,) = report_of(SparsifyWeights(CPU_TARGET, density_threshold=1.0)(builder.get())).layers
    assert layer.decision == "dense" and "dynamic spatial size" in layer.reason


COLUMN_LANES = {"kernel": "csr", "lanes": "columns"}


@pytest.mark.gpu
@pytest.mark.parametrize("name, layout, kernel_config", [
    ("1x1/2", "NHWC", {"kernel": "unrolled"}),
    ("1x1/2", "NHWC", {"kernel": "csr"}),
    ("1x1/2", "NHWC", COLUMN_LANES),
    ("4x4/2", "NHWC", {"kernel": "unrolled"}),
    ("4x4/2", "NCHW", COLUMN_LANES),  # through a window the CSR kernel takes NCHW, in column lanes
    ("4x4/1-one-pixel", "NCHW", {"kernel": "csr"}),  # a matmul
    ("4x4/1-one-pixel", "NHWC", {"kernel": "unrolled"}),
    ("4x4/1-one-pixel", "NCHW", COLUMN_LANES),
], ids=str)
def test_cuda_kernels(gpu_target, name, layout, kernel_config):
    """Each CUDA kernel, including the column lanes over a transposed X, whose output for a
    symbolic batch comes flat (``[N, M]``) and is viewed as the phases before the interleave."""
    case = transposed(np.random.default_rng(8), name, layout, epilogue=("bias", "relu"))
    check(case, gpu_target, kernel_config=kernel_config)


@pytest.mark.gpu
@pytest.mark.parametrize("name, layout", [
    ("4x4/2", "NCHW"), ("3x3/2-output-padding", "NHWC"), ("4x4/1-one-pixel", "NCHW"),
])
def test_float16_on_the_gpu(gpu_target, name, layout):
    """float16 weights and activations, each layer with the kernel its defaults choose."""
    case = transposed(np.random.default_rng(13), name, layout, epilogue=("bias", "relu"))
    case.weight, case.bias = case.weight.astype("float16"), case.bias.astype("float16")
    (layer,) = check(case, gpu_target)
    assert layer.dtype == "float16"


@needs_ptxas
def test_a_flat_kernel_output_is_viewed_as_the_phases(monkeypatch):
    """Without a GPU: the rewritten function's types line up (the flat output reshaped to the
    phases, interleaved and cropped to the model's output)."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    case = transposed(np.random.default_rng(9), "1x1/2", "NHWC", epilogue=("bias",))
    mod = case.module()
    out = SparsifyWeights(cuda_target(), 1.0, kernel_config=COLUMN_LANES)(mod)
    (layer,) = report_of(out).layers
    assert layer.decision == "sparse" and layer.params["x_transposed"]
    relax.analysis.well_formed(out)  # raises where it is not
    assert tvm_ffi.structural_equal(out["main"].ret_ty, mod["main"].ret_ty)
