"""What a candidate is, and the checks every kind of root shares (``candidates`` finds them,
``convolutions`` analyses the convolutions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax, tirx

from ..problem import SpmmProblem
from ..weights import SparseMatrix
from .unshuffle import Unshuffle


@dataclass
class Candidate:
    """An operator with a constant weight and the epilogue after it: what the pass would
    replace (``members``), what a kernel for it computes (``problem``), or why none can."""

    function: str
    root: relax.Var  # binding of the matmul / convolution
    op: str
    members: list = field(default_factory=list)  # root and absorbed epilogue bindings, in order
    op_ends: list = field(default_factory=list)  # per epilogue op, the index of its last member
    channel_axis: int = -1  # the axis of the output, as Relax holds it, along the weight's rows
    x: relax.Expr | None = None
    residual: relax.Expr | None = None
    weight: SparseMatrix | None = None
    problem: SpmmProblem | None = None
    reason: str | None = None  # why it cannot be rewritten, if it cannot
    groups: int = 1  # of a grouped convolution, whose weight is held block-diagonal
    # Taps of the model's kernel and of the one the kernels run, where they differ: a dilated
    # kernel spread, a transposed convolution's phase filters.
    taps: tuple[int, int] = (1, 1)
    unshuffle: Unshuffle | None = None  # of a transposed convolution: its output from the kernel's
    # The model's output channel of each row of the analysed weight, where a channel has
    # several: a transposed convolution's phases, or the pixels of one over a single pixel.
    row_channels: np.ndarray | None = None
    parts: tuple = ()  # the siblings this candidate combines (``siblings``), if any

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``[M, K]`` of the weight as the model holds it (one group's inputs per row, the
        taps of a dilated kernel before the spread, one row per output channel of a
        transposed convolution)."""
        m, k = self.weight.shape
        held, analysed = self.taps
        return self.channels, k // self.groups // analysed * held

    @property
    def channels(self) -> int:
        """Output channels of the model's layer."""
        rows = self.weight.shape[0]
        return rows if self.row_channels is None else int(self.row_channels.max(initial=-1)) + 1

    def per_row(self, values: np.ndarray) -> np.ndarray:
        """Per-channel ``values`` (an epilogue's) for each row of the analysed weight."""
        return values if self.row_channels is None else values[self.row_channels]

    @property
    def density(self) -> float:
        """Nonzeros over the weights the model holds (a grouped weight's zeros outside its
        groups do not count)."""
        m, k = self.weight_shape
        return self.weight.nnz / (m * k) if m * k else 0.0

    @property
    def tail(self) -> relax.Var:
        """The binding whose value the rewritten call replaces (of siblings: the first's)."""
        return self.parts[0].tail if self.parts else self.members[-1]

    @property
    def name(self) -> str:
        return "+".join(part.tail.name for part in self.parts) if self.parts else self.tail.name


class Rejected(Exception):
    """Why a candidate cannot be rewritten (its message is the report's reason)."""


def tensor_dims(expr, what: str):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise Rejected(f"{what} has no known shape")
    return list(ty.shape.values), str(ty.dtype)


def _check_out_dtype(call, dtype: str):
    out_dtype = getattr(call.attrs, "out_dtype", None)
    if out_dtype is not None and str(out_dtype) not in ("", "void", dtype):
        raise Rejected(f"out_dtype {out_dtype} differs from the input's {dtype}")


def check_operands(candidate: Candidate, dtype: str, k_dim, call):
    weight = candidate.weight
    if weight.dtype != dtype:
        raise Rejected(f"weight dtype {weight.dtype} differs from the input's {dtype}")
    _check_out_dtype(call, dtype)
    if isinstance(k_dim, tirx.IntImm) and int(k_dim) != weight.shape[1]:
        raise Rejected(f"input has {int(k_dim)} features, weight expects {weight.shape[1]}")
    if not weight.is_finite:
        raise Rejected("weight contains NaN or Inf; the dense path keeps IEEE semantics")


def set_problem(candidate, layout, x, x_dims, y_dims, dtype, window=None):
    candidate.x = x
    candidate.problem = SpmmProblem(candidate.weight, layout, dtype, tuple(x_dims), tuple(y_dims), window=window)
