"""Convolutions built in Relax for the tests, with an independent numpy reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from helpers import sparse_matrix


@dataclass
class ConvCase:
    """``act(conv2d(x, W) + bias [+ residual])`` with a sparse ``W[M, C / groups, kh, kw]``.

    NCHW data takes an OIHW kernel (PyTorch, ONNX); NHWC data an HWIO kernel (TFLite after
    import) unless ``kernel_layout`` says otherwise. ``batch`` None is symbolic.
    """

    weight: np.ndarray  # [M, C, kh, kw]
    size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    layout: str = "NCHW"
    batch: int | None = 1
    epilogue: tuple[str, ...] = ()
    bias: np.ndarray | None = None
    kernel_layout: str | None = None
    groups: int = 1
    dilation: tuple[int, int] = (1, 1)

    @property
    def M(self):  # noqa: N802
        return self.weight.shape[0]

    @property
    def channels(self):
        return self.weight.shape[1] * self.groups

    @property
    def dtype(self):
        return str(self.weight.dtype)

    def x_shape(self, batch):
        h, w = self.size
        return (batch, self.channels, h, w) if self.layout == "NCHW" else (batch, h, w, self.channels)

    @property
    def reach(self) -> tuple[int, int]:
        """Rows and columns of the input one output pixel's window spans (with the dilation)."""
        (kh, kw), (dh, dw) = self.weight.shape[2:], self.dilation
        return dh * (kh - 1) + 1, dw * (kw - 1) + 1

    def out_shape(self, batch):
        (h, w), (kh, kw), (sh, sw) = self.size, self.reach, self.stride
        top, left, bottom, right = self.padding
        oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
        return (batch, self.M, oh, ow) if self.layout == "NCHW" else (batch, oh, ow, self.M)

    def module(self) -> tvm.IRModule:
        batch = tirx.Var("n", "int64") if self.batch is None else self.batch
        x = relax.Var("x", relax.TensorType(self.x_shape(batch), self.dtype))
        params = [x]
        if "residual" in self.epilogue:
            params.append(relax.Var("residual", relax.TensorType(self.out_shape(batch), self.dtype)))
        kernel_layout = self.kernel_layout or ("OIHW" if self.layout == "NCHW" else "HWIO")
        weight = np.ascontiguousarray(np.transpose(self.weight, ["OIHW".index(a) for a in kernel_layout]))
        builder = relax.BlockBuilder()
        with builder.function("main", params):
            with builder.dataflow():
                value = builder.emit(
                    relax.op.nn.conv2d(
                        x, relax.const(weight), strides=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups, data_layout=self.layout,
                        kernel_layout=kernel_layout,
                    )
                )
                for op in self.epilogue:
                    value = builder.emit(self._epilogue(op, value, params))
                out = builder.emit_output(value)
            builder.emit_func_output(out)
        return builder.get()

    def _epilogue(self, op, value, params):
        if op == "bias":
            shape = [1, self.M, 1, 1] if self.layout == "NCHW" else [self.M]
            return relax.op.add(value, relax.op.reshape(relax.const(self.bias), shape))
        if op == "relu":
            return relax.op.nn.relu(value)
        if op == "relu6":
            return relax.op.nn.relu6(value)
        if op == "residual":
            return relax.op.add(value, params[1])
        raise ValueError(op)

    def inputs(self, rng, batch):
        arrays = [rng.standard_normal(self.x_shape(batch)).astype(self.dtype)]
        if "residual" in self.epilogue:
            arrays.append(rng.standard_normal(self.out_shape(batch)).astype(self.dtype))
        return arrays

    def reference(self, arrays) -> np.ndarray:
        """im2col with numpy's sliding windows (every dilation-th element of each), then one
        product (float64)."""
        x = arrays[0].astype(np.float64)
        if self.layout == "NHWC":
            x = np.moveaxis(x, -1, 1)
        top, left, bottom, right = self.padding
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        kh, kw = self.weight.shape[2:]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        windows = np.lib.stride_tricks.sliding_window_view(x, self.reach, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        g = self.groups
        windows = windows.reshape(windows.shape[0], g, -1, *windows.shape[2:])
        filters = self.weight.astype(np.float64).reshape(g, self.M // g, -1, kh, kw)
        out = np.einsum("bgcyxij,gmcij->bgmyx", windows, filters).reshape(x.shape[0], self.M, *windows.shape[3:5])
        return finish(out, self.epilogue, self.bias, self.layout, arrays)


def finish(out: np.ndarray, epilogue, bias, layout: str, arrays) -> np.ndarray:
    """A reference convolution's NCHW sums through the bias, into ``layout``, then through
    the rest of ``epilogue`` (a residual is ``arrays[1]``)."""
    if "bias" in epilogue:
        out = out + bias.astype(np.float64)[None, :, None, None]
    if layout == "NHWC":
        out = np.moveaxis(out, 1, -1)
    for op in epilogue:
        if op == "relu":
            out = np.maximum(out, 0)
        elif op == "relu6":
            out = np.clip(out, 0, 6)
        elif op == "residual":
            out = out + arrays[1]
    return out


def make_conv(rng, m, c, kernel, size, density, dtype="float32", groups=1, **options) -> ConvCase:
    """``c`` input channels, split into ``groups``."""
    shape = (m, c // groups, *kernel)
    weight = sparse_matrix(rng, (m, int(np.prod(shape[1:]))), density, dtype=dtype).reshape(shape)
    bias = rng.standard_normal(m).astype(dtype) if "bias" in options.get("epilogue", ()) else None
    return ConvCase(weight, size, bias=bias, groups=groups, **options)
