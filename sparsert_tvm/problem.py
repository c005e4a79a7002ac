"""What a sparse kernel computes, independent of how it is tiled or which target runs it.

Every rewritten operator is ``Y = epilogue(A @ X)`` with ``A[M, K]`` the constant sparse
weight. The activations come in one of two memory layouts:

* ``Layout.ROWS``: ``X[..., K]`` and ``Y[..., M]`` row-major (matmul, dense layers, NHWC
  1x1 convolutions). The ``N`` columns of the product are the rows of ``X``.
* ``Layout.CHANNELS``: ``X[B, K, H, W]`` and ``Y[B, M, H, W]`` (NCHW 1x1 convolutions). The
  columns are the ``S = H * W`` spatial positions of each image; the batch is a third
  launch dimension.

In both, the element ``(b, k, n)`` of ``X`` lives at ``b * batch_stride + k * k_stride +
n * n_stride``; ``OperandStrides`` gives those strides for ``X`` and for ``Y``.

A convolution with a larger kernel, a stride or padding has a ``ConvWindow``: ``A``'s
columns are the taps ``(input channel, ky, kx)``, the product's columns the output pixels
of one image, and ``X`` is the convolution's input itself, read through the window (no
im2col buffer). Its ``Y`` is laid out as above, one image per launch row.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from tvm import sym, tirx

from .weights import SparseMatrix


class Layout(enum.Enum):
    ROWS = "rows"
    CHANNELS = "channels"


@dataclass(frozen=True)
class BiasAdd:
    """Adds ``values[m]`` to every element of output row ``m``."""

    values: tuple[float, ...]

    def describe(self) -> str:
        return "bias"


@dataclass(frozen=True)
class FoldedBatchNorm(BiasAdd):
    """An inference batch norm folded into the layer: its scale multiplied the weight's rows
    (and the biases before it), and ``values`` is its shift, added as a bias is."""

    def describe(self) -> str:
        return "batch_norm"


@dataclass(frozen=True)
class ResidualAdd:
    """Adds a tensor of the output's shape, passed to the kernel as an extra input."""

    def describe(self) -> str:
        return "residual"


@dataclass(frozen=True)
class Clip:
    """``min(max(v, lo), hi)``; ReLU is ``Clip(0, inf)`` and ReLU6 is ``Clip(0, 6)``."""

    lo: float = -math.inf
    hi: float = math.inf

    def describe(self) -> str:
        if self.lo == 0 and self.hi == math.inf:
            return "relu"
        if self.lo == 0 and self.hi == 6:
            return "relu6"
        return f"clip({self.lo:g}, {self.hi:g})"


EpilogueOp = BiasAdd | ResidualAdd | Clip


@dataclass(frozen=True)
class OperandStrides:
    batch: int
    # Stride between rows of A's operand (input channels or features); None where it is
    # only known at run time: X transposed with a symbolic column count (``runtime_row_stride``) ...
    k: int | None
    n: int  # ... and between columns of the product


@dataclass(frozen=True)
class ConvWindow:
    """Which input element each (tap, output pixel) of a convolution reads.

    Tap ``k`` of ``A`` is ``(channel, ky, kx)`` in OIHW order. Output pixel ``(oy, ox)``
    reads the input at row ``oy * stride_h + ky - pad_top`` and column ``ox * stride_w + kx
    - pad_left``, or a padding zero where that is outside the image. In element offsets
    within an image, that is ``origin(oy, ox) + tap_offset(k)``: the sum of a part fixed per
    pixel and a part fixed per tap, which the kernels turn into a base address and an
    immediate.
    """

    channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    input_size: tuple[int, int]
    channels_last: bool  # NHWC rather than NCHW

    @cached_property  # the PTX emitter asks for it per load
    def output_size(self) -> tuple[int, int]:
        (h, w), (kh, kw), (sh, sw) = self.input_size, self.kernel, self.stride
        top, left, bottom, right = self.padding
        return (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1

    @cached_property
    def pixel_stride(self) -> int:
        return self.channels if self.channels_last else 1

    @cached_property
    def row_stride(self) -> int:
        return self.input_size[1] * self.pixel_stride

    @cached_property
    def channel_stride(self) -> int:
        return 1 if self.channels_last else self.input_size[0] * self.input_size[1]

    @property
    def image_size(self) -> int:
        return self.channels * self.input_size[0] * self.input_size[1]

    @property
    def taps(self) -> int:
        """Taps per input channel: the kernel's area."""
        return self.kernel[0] * self.kernel[1]

    def tap(self, k: int) -> tuple[int, int, int]:
        kh, kw = self.kernel
        return k // (kh * kw), k // kw % kh, k % kw

    def tap_offset(self, k: int) -> int:
        channel, ky, kx = self.tap(k)
        return channel * self.channel_stride + ky * self.row_stride + kx * self.pixel_stride

    @property
    def padding_offset(self) -> int:
        """How far (in elements) the window of pixel (0, 0) starts before the image."""
        return self.padding[0] * self.row_stride + self.padding[1] * self.pixel_stride

    def row_in_image(self, ky: int) -> bool:
        """Whether kernel row ``ky`` reads inside the image for every output row."""
        return _always_inside(ky, self.padding[0], self.stride[0], self.output_size[0], self.input_size[0])

    def column_in_image(self, kx: int) -> bool:
        return _always_inside(kx, self.padding[1], self.stride[1], self.output_size[1], self.input_size[1])


def _always_inside(tap: int, pad: int, stride: int, outputs: int, size: int) -> bool:
    return tap - pad >= 0 and (outputs - 1) * stride + tap - pad <= size - 1


@dataclass(frozen=True)
class SpmmProblem:
    """``Y = epilogue(A @ X)`` for one constant weight ``A`` and one activation layout.

    ``x_shape`` and ``y_shape`` are the Relax tensor shapes (``tirx`` expressions, possibly
    symbolic). With ``x_transposed`` (ROWS layout), the kernel receives ``X`` transposed to
    ``[K, N]`` instead, so that neighbouring columns are neighbours in memory; with a
    symbolic N it also writes ``Y`` as ``[N, M]`` (``runtime_row_stride``).
    With a ``window`` (a KxK, strided or padded convolution; CHANNELS for NCHW, ROWS for
    NHWC), ``X`` is the convolution's input and the batch is always the launch's third
    dimension.
    """

    weight: SparseMatrix
    layout: Layout
    dtype: str
    x_shape: tuple
    y_shape: tuple
    epilogue: tuple[EpilogueOp, ...] = field(default=())
    x_transposed: bool = False
    window: ConvWindow | None = None

    def __post_init__(self):
        for name in ("x_shape", "y_shape"):
            dims = tuple(tirx.IntImm("int64", d) if isinstance(d, int) else d for d in getattr(self, name))
            object.__setattr__(self, name, dims)

    @property
    def M(self) -> int:  # noqa: N802 - the paper's names
        return self.weight.shape[0]

    @property
    def K(self) -> int:  # noqa: N802
        return self.weight.shape[1]

    @property
    def taps(self) -> int:
        """Columns of ``A`` per input channel: the window's taps, 1 for a plain product."""
        return self.window.taps if self.window is not None else 1

    @property
    def images_apart(self) -> bool:
        """Whether each image has columns of its own (NCHW, or any convolution through a
        window) rather than all rows of X being columns of one product."""
        return self.layout is Layout.CHANNELS or self.window is not None

    @property
    def has_residual(self) -> bool:
        return any(isinstance(op, ResidualAdd) for op in self.epilogue)

    @cached_property
    def columns(self):
        """Columns of the product per image: a ``tirx`` expression, maybe symbolic."""
        return sym.Analyzer().simplify(columns_and_batch(self, self.x_shape)[0])

    @property
    def static_columns(self) -> int | None:
        value = self.columns
        return int(value) if isinstance(value, tirx.IntImm) else None

    @property
    def static_batch(self) -> int | None:
        value = columns_and_batch(self, self.x_shape)[1]
        return int(value) if isinstance(value, tirx.IntImm) else None

    def x_strides(self) -> OperandStrides:
        """Strides of X; a windowed X has only a batch stride (columns are not linear)."""
        if self.window is not None:
            return OperandStrides(batch=self.window.image_size, k=0, n=0)
        if self.x_transposed:
            return OperandStrides(batch=0, k=self.static_columns, n=1)
        return self._strides(self.K)

    @property
    def runtime_row_stride(self) -> bool:
        """Whether X's rows are a run-time count apart: X transposed with a symbolic column
        count (only the CSR kernel's column lanes read it so, ``schedules.cuda.csr_column_lanes``)."""
        return self.x_transposed and self.static_columns is None

    def y_strides(self) -> OperandStrides:
        return self._strides(self.M)

    def _strides(self, channels: int) -> OperandStrides:
        if self.layout is Layout.ROWS:
            # Without a window, every image's rows are columns of one launch.
            batch = 0 if self.window is None else channels * self.static_columns
            return OperandStrides(batch=batch, k=1, n=channels)
        spatial = self.static_columns
        assert spatial is not None, "CHANNELS layout needs a static spatial size"
        return OperandStrides(batch=channels * spatial, k=spatial, n=1)

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The dense answer in numpy (float64 accumulation), for tests and benchmarks."""
        a = self.weight.dense.astype(np.float64)
        if self.window is not None:
            acc = _convolve(self.window, a, x.astype(np.float64))
            channel_axis = -1 if self.window.channels_last else 1
        elif self.layout is Layout.ROWS:
            acc = x.astype(np.float64) @ a.T
            channel_axis = -1
        else:
            acc = np.einsum("mk,bk...->bm...", a, x.astype(np.float64))
            channel_axis = 1
        for op in self.epilogue:
            if isinstance(op, BiasAdd):
                shape = [1] * acc.ndim
                shape[channel_axis] = self.M
                acc = acc + np.asarray(op.values, np.float64).reshape(shape)
            elif isinstance(op, ResidualAdd):
                acc = acc + residual.astype(np.float64)
            else:
                acc = np.clip(acc, op.lo, op.hi)
        return acc.astype(self.dtype)


def _convolve(window: ConvWindow, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The convolution in float64, one shifted window at a time."""
    if window.channels_last:
        x = np.moveaxis(x, -1, 1)
    top, left, bottom, right = window.padding
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (oh, ow) = window.kernel, window.stride, window.output_size
    filters = a.reshape(a.shape[0], window.channels, kh, kw)
    out = np.zeros((x.shape[0], a.shape[0], oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            shifted = padded[:, :, ky : ky + sh * (oh - 1) + 1 : sh, kx : kx + sw * (ow - 1) + 1 : sw]
            out += np.einsum("mc,bchw->bmhw", filters[:, :, ky, kx], shifted)
    return np.moveaxis(out, 1, -1) if window.channels_last else out


def columns_and_batch(problem: SpmmProblem, x_dims):
    """Columns of the product per image, and images, as expressions of ``x_dims``."""
    if problem.window is not None:
        oh, ow = problem.window.output_size
        return tirx.IntImm("int64", oh * ow), x_dims[0]
    if problem.layout is Layout.ROWS:
        spatial, batch = x_dims[:-1], tirx.IntImm("int64", 1)
    else:
        spatial, batch = x_dims[2:], x_dims[0]
    columns = tirx.IntImm("int64", 1)
    for d in spatial:
        columns = columns * d
    return columns, batch
