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
    k: int  # stride between rows of A's operand (input channels or features) ...
    n: int  # ... and between columns of the product


@dataclass(frozen=True)
class SpmmProblem:
    """``Y = epilogue(A @ X)`` for one constant weight ``A`` and one activation layout.

    ``x_shape`` and ``y_shape`` are the Relax tensor shapes (``tirx`` expressions, possibly
    symbolic). With ``x_transposed`` (ROWS layout, static N only), the kernel receives ``X``
    transposed to ``[K, N]`` instead, so that neighbouring columns are neighbours in memory.
    """

    weight: SparseMatrix
    layout: Layout
    dtype: str
    x_shape: tuple
    y_shape: tuple
    epilogue: tuple[EpilogueOp, ...] = field(default=())
    x_transposed: bool = False

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
    def has_residual(self) -> bool:
        return any(isinstance(op, ResidualAdd) for op in self.epilogue)

    @cached_property
    def columns(self):
        """Columns of the product per image: a ``tirx`` expression, maybe symbolic."""
        return sym.Analyzer().simplify(columns_and_batch(self.layout, self.x_shape)[0])

    @property
    def static_columns(self) -> int | None:
        value = self.columns
        return int(value) if isinstance(value, tirx.IntImm) else None

    @property
    def static_batch(self) -> int | None:
        value = columns_and_batch(self.layout, self.x_shape)[1]
        return int(value) if isinstance(value, tirx.IntImm) else None

    def x_strides(self) -> OperandStrides:
        if self.x_transposed:
            assert self.static_columns is not None, "a transposed X needs a static column count"
            return OperandStrides(batch=0, k=self.static_columns, n=1)
        return self._strides(self.K)

    def y_strides(self) -> OperandStrides:
        return self._strides(self.M)

    def _strides(self, channels: int) -> OperandStrides:
        if self.layout is Layout.ROWS:
            return OperandStrides(batch=0, k=1, n=channels)
        spatial = self.static_columns
        assert spatial is not None, "CHANNELS layout needs a static spatial size"
        return OperandStrides(batch=channels * spatial, k=spatial, n=1)

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The dense answer in numpy (float64 accumulation), for tests and benchmarks."""
        a = self.weight.dense.astype(np.float64)
        if self.layout is Layout.ROWS:
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


def columns_and_batch(layout: Layout, x_dims):
    """Columns of the product per image, and images, as expressions of ``x_dims``."""
    if layout is Layout.ROWS:
        spatial, batch = x_dims[:-1], tirx.IntImm("int64", 1)
    else:
        spatial, batch = x_dims[2:], x_dims[0]
    columns = tirx.IntImm("int64", 1)
    for d in spatial:
        columns = columns * d
    return columns, batch
