"""Finding the operators the pass can rewrite, and what each of them computes.

A candidate is a matmul (the constant on either side) or a 2-D or 1-D convolution, plain or
transposed (any kernel size, stride, padding, dilation and grouping), whose weight is a
constant, followed along the
dataflow (not the textual order) by the epilogue it can absorb: bias adds, an inference batch
norm (folded into the weight), one residual add and ReLU/ReLU6/clip (or maximum/minimum with
a constant, as TVM imports ONNX's Clip), as long as each intermediate value has no other user.
Operators that cannot be rewritten are still candidates, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, sym, tirx

from ..problem import BiasAdd, Clip, ConvWindow, FoldedBatchNorm, Layout, ResidualAdd, SpmmProblem
from ..weights import SparseMatrix, dilated_size, phase_filters, spread_dilated, ungrouped_filters
from .constants import constant_value
from .unshuffle import Unshuffle

_ESCAPES = None  # user entry for a value returned from the function
# A dilated kernel is spread (zeros between its taps) into a dense [M, K] array; beyond this
# many elements (128 MB of float32) the analysis would cost more memory than it is worth.
MAX_SPREAD_WEIGHTS = 1 << 25


@dataclass
class Candidate:
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
    parts: tuple = ()  # the siblings this candidate combines (``siblings``), if any

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``[M, K]`` of the weight as the model holds it (one group's inputs per row, the
        taps of a dilated kernel before the spread, one row per output channel of a
        transposed convolution)."""
        m, k = self.weight.shape
        held, analysed = self.taps
        return m // self.phases, k // self.groups // analysed * held

    @property
    def phases(self) -> int:
        """Rows of the analysed weight per output channel of the model."""
        return self.unshuffle.phase_count if self.unshuffle is not None else 1

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


class _Rejected(Exception):
    pass


def find_candidates(name: str, func: relax.Function, mod: tvm.IRModule | None = None) -> list[Candidate]:
    """The candidates of ``func``; ``mod``, where given, resolves the PrimFuncs it calls
    (frontends emit some epilogue ops as ``call_tir``)."""
    var2val = relax.analysis.get_var2val(func)
    users, block_of = _users_and_blocks(func)
    found = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                continue
            analyse = _ROOTS.get(value.op.name)
            if analyse is None:
                continue
            op = value.op.name.split(".")[-1]
            candidate = Candidate(function=name, root=binding.var, op=op, members=[binding.var])
            try:
                analyse(candidate, value, var2val)
                _absorb_epilogue(candidate, var2val, users, block_of, mod)
            except _Rejected as rejected:
                candidate.reason = str(rejected)
            found.append(candidate)
    _share_out_epilogues(found)
    return found


def _share_out_epilogues(found: list[Candidate]) -> None:
    """Two candidates can meet in one residual add: a bottleneck's last convolution and its
    projection shortcut. Only one kernel can compute it: the candidate whose root comes
    later keeps the add and what follows, since its residual (the other's output) is then
    ready; the other stops before it."""
    owner = set()
    for candidate in reversed(found):  # found in binding order: later roots first
        for i, member in enumerate(candidate.members[1:], start=1):
            if member in owner:
                _truncate_epilogue(candidate, i)
                break
        owner.update(candidate.members[1:])


def _truncate_epilogue(candidate: Candidate, members: int) -> None:
    """Keeps the first ``members`` bindings of ``candidate`` (its root and the epilogue ops
    that follow it directly; a folded batch norm is several bindings)."""
    candidate.members = candidate.members[:members]
    ops = sum(end < members for end in candidate.op_ends)
    candidate.op_ends = candidate.op_ends[:ops]
    epilogue = candidate.problem.epilogue[:ops]
    # A folded batch norm scaled the weight: it must stay (it reads only this layer's output,
    # so the add two layers meet in comes after it).
    assert not any(isinstance(op, FoldedBatchNorm) for op in candidate.problem.epilogue[ops:])
    if not any(isinstance(op, ResidualAdd) for op in epilogue):
        candidate.residual = None
    candidate.problem = dataclasses.replace(candidate.problem, epilogue=epilogue)


def _users_and_blocks(func):
    users: dict = {}
    block_of: dict = {}
    for index, block in enumerate(func.body.blocks):
        for binding in block.bindings:
            block_of[binding.var] = index
            for var in relax.analysis.free_vars(binding.value):
                users.setdefault(var, []).append(binding.var)
    for var in relax.analysis.free_vars(func.body.body):
        users.setdefault(var, []).append(_ESCAPES)
    return users, block_of


# -- roots ----------------------------------------------------------------------------


def _tensor_dims(expr, what: str):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise _Rejected(f"{what} has no known shape")
    return list(ty.shape.values), str(ty.dtype)


def _check_out_dtype(call, dtype: str):
    out_dtype = getattr(call.attrs, "out_dtype", None)
    if out_dtype is not None and str(out_dtype) not in ("", "void", dtype):
        raise _Rejected(f"out_dtype {out_dtype} differs from the input's {dtype}")


def _analyse_matmul(candidate: Candidate, call, var2val):
    lhs, rhs = call.args
    w = constant_value(rhs, var2val)
    if w is None:
        w = constant_value(lhs, var2val)
        if w is None:
            raise _Rejected("weight is not a constant")
        _analyse_left_matmul(candidate, call, w, rhs)
        return
    candidate.op = "matmul"
    if w.ndim != 2:
        raise _Rejected(f"{w.ndim}-D weight; only 2-D weights are rewritten")
    candidate.weight = SparseMatrix.from_dense(w.T)
    dims, dtype = _tensor_dims(lhs, "activation")
    _check_operands(candidate, dtype, dims[-1] if dims else None, call)
    _set_problem(candidate, Layout.ROWS, lhs, dims, dims[:-1] + [w.shape[1]], dtype)


def _analyse_left_matmul(candidate: Candidate, call, w: np.ndarray, x):
    """``W @ x``: each matrix of ``x`` (its last two axes, ``[K, N]``) is an image of an NCHW
    1x1 convolution whose ``N`` pixels are the product's columns, so the kernel sees ``x``
    as ``[images, K, N]`` (a view) and writes ``[images, M, N]``."""
    candidate.op = "matmul (weight on the left)"
    candidate.channel_axis = -2
    if w.ndim != 2:
        raise _Rejected(f"{w.ndim}-D weight; only 2-D weights are rewritten")
    candidate.weight = SparseMatrix.from_dense(w)
    dims, dtype = _tensor_dims(x, "activation")
    if len(dims) < 2:
        raise _Rejected("1-D right operand")
    _check_operands(candidate, dtype, dims[-2], call)
    if not isinstance(dims[-1], tirx.IntImm):
        raise _Rejected("dynamic column count with the weight on the left")
    images = tirx.IntImm("int64", 1)
    for d in dims[:-2]:
        images = images * d
    images = sym.Analyzer().simplify(images)
    _set_problem(candidate, Layout.CHANNELS, x, [images, dims[-2], dims[-1]], [images, w.shape[0], dims[-1]], dtype)


def _analyse_conv2d(candidate: Candidate, call, var2val):
    data, weight = call.args
    attrs = call.attrs
    w = _conv_weight(candidate, weight, attrs, "OIHW", var2val)
    stride, padding = tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding)
    dilation = tuple(int(d) for d in attrs.dilation)
    dims, dtype = _tensor_dims(data, "input")
    _analyse_conv(candidate, call, data, dims, dtype, w, str(attrs.data_layout), stride, dilation, padding)


def _analyse_conv1d(candidate: Candidate, call, var2val):
    """A 1-D convolution is a 2-D one of a kernel one row high over an image one row high:
    the kernels see its input ``[N, C, L]`` (``[N, L, C]``) as ``[N, C, 1, L]``
    (``[N, 1, L, C]``), a view."""
    w, layout, data, dims, dtype = _as_2d(candidate, call, "OIW", var2val)
    left, right = (int(p) for p in call.attrs.padding)
    stride, dilation = (1, int(call.attrs.strides[0])), (1, int(call.attrs.dilation[0]))
    _analyse_conv(candidate, call, data, dims, dtype, w, layout, stride, dilation, (0, left, 0, right), "conv1d")


def _as_2d(candidate: Candidate, call, kernel_layout: str, var2val):
    """A 1-D convolution's kernel (OIW or IOW) one row high, its layout and its input's
    dims as the 2-D ones the kernels see."""
    data, weight = call.args
    w = _conv_weight(candidate, weight, call.attrs, kernel_layout, var2val)[:, :, None, :]
    layout = {"NCW": "NCHW", "NWC": "NHWC"}.get(str(call.attrs.data_layout), str(call.attrs.data_layout))
    dims, dtype = _tensor_dims(data, "input")
    return w, layout, data, _one_row(dims, layout), dtype


def _one_row(dims: list, layout: str) -> list:
    """3-D dims of a 1-D convolution with the image's one row added: before the length (NCW)
    or the length and channels (NWC)."""
    if len(dims) != 3:
        return dims
    row = 2 if layout == "NCHW" else 1
    return dims[:row] + [tirx.IntImm("int64", 1)] + dims[row:]


def _analyse_conv2d_transpose(candidate: Candidate, call, var2val):
    data, weight = call.args
    attrs = call.attrs
    w = _conv_weight(candidate, weight, attrs, "IOHW", var2val)
    stride, dilation = tuple(int(s) for s in attrs.strides), tuple(int(d) for d in attrs.dilation)
    dims, dtype = _tensor_dims(data, "input")
    padding = tuple(int(p) for p in attrs.padding)
    _analyse_transposed(candidate, call, data, dims, dtype, w, str(attrs.data_layout), stride, dilation, padding)


def _analyse_conv1d_transpose(candidate: Candidate, call, var2val):
    w, layout, data, dims, dtype = _as_2d(candidate, call, "IOW", var2val)
    left, right = (int(p) for p in call.attrs.padding)
    stride, dilation = (1, int(call.attrs.strides[0])), (1, int(call.attrs.dilation[0]))
    _analyse_transposed(candidate, call, data, dims, dtype, w, layout, stride, dilation, (0, left, 0, right), "conv1d")


def _conv_weight(candidate: Candidate, weight, attrs, layout: str, var2val) -> np.ndarray:
    """The constant kernel in ``layout`` (OIHW, OIW, IOHW or IOW), or rejected."""
    kind = "conv2d" if len(layout) == 4 else "conv1d"
    candidate.op = f"{kind}{'_transpose' if layout.startswith('I') else ''} {attrs.data_layout}"
    w = constant_value(weight, var2val)
    if w is None:
        raise _Rejected("weight is not a constant")
    kernel_layout = str(attrs.kernel_layout)
    if sorted(kernel_layout) != sorted(layout):
        raise _Rejected(f"kernel layout {kernel_layout}")
    candidate.groups = int(attrs.groups)
    return np.transpose(w, [kernel_layout.index(axis) for axis in layout])


def _analyse_conv(candidate: Candidate, call, data, dims, dtype, w, layout, stride, dilation, padding, kind="conv2d"):
    """A convolution of kernel ``w`` (OIHW) over ``data``, seen as the 4-D ``dims`` in
    ``layout`` (NCHW or NHWC)."""
    groups = candidate.groups
    _name_conv(candidate, call, kind, w.shape[2:], stride, dilation, group_inputs=w.shape[1])
    if groups < 1 or w.shape[0] % groups:
        raise _Rejected(f"{w.shape[0]} output channels do not split into {groups} groups")
    w = _spread_kernel(candidate, ungrouped_filters(w, groups), kind, dilation)
    _conv_problem(candidate, call, data, dims, dtype, w, layout, stride, padding)


def _analyse_transposed(candidate: Candidate, call, data, dims, dtype, w, layout, stride, dilation, padding,
                        kind="conv2d"):
    """A transposed convolution of kernel ``w`` (IOHW) over ``data`` (4-D ``dims`` in
    ``layout``), padded by ``padding`` (top, left, bottom, right: rows and columns cropped
    from the full output), as one stride-1 convolution of ``phase_filters`` whose output
    channels ``unshuffle`` interleaves into the model's output."""
    groups = candidate.groups
    inputs, _, kh, kw = w.shape
    _name_conv(candidate, call, f"{kind}_transpose", (kh, kw), stride, dilation, group_inputs=inputs // max(groups, 1))
    if groups < 1 or inputs % groups:
        raise _Rejected(f"{inputs} input channels do not split into {groups} groups")
    if layout not in ("NCHW", "NHWC"):
        raise _Rejected(f"data layout {call.attrs.data_layout}")
    channels_last = layout == "NHWC"
    out_dims = _one_row(_tensor_dims(candidate.root, "output")[0], layout)
    spatial = (dims[1:3], out_dims[1:3]) if channels_last else (dims[2:], out_dims[2:])
    if not all(isinstance(d, tirx.IntImm) for d in spatial[0] + spatial[1]):
        raise _Rejected("transposed convolution of a dynamic spatial size")
    filters = phase_filters(w, groups, stride, dilation)
    ungrouped = ungrouped_filters(filters, groups)
    if ungrouped.size > MAX_SPREAD_WEIGHTS:
        raise _Rejected(f"its phase filters hold {ungrouped.size:,} weights, more than {MAX_SPREAD_WEIGHTS:,}")
    candidate.taps = (kh * kw, filters.shape[2] * filters.shape[3])
    candidate.weight = SparseMatrix.from_dense(ungrouped.reshape(ungrouped.shape[0], -1))
    # Per axis: the phase filters' window of T + 1 taps, padded by T on top, computes the full
    # output from row 0; where the model crops a whole number of strides, the window starts
    # that many rows later (less padding), and the rest is cropped from the interleaved rows.
    conv_padding, begin, computed = [0] * 4, [], []
    for axis, (taps, s, crop, size, out) in enumerate(zip(filters.shape[2:], stride, padding, spatial[0], spatial[1])):
        skipped = min(crop // s, taps - 1)
        rows = max(-(-(crop - skipped * s + int(out)) // s), int(size) - skipped)  # of the phase convolution
        conv_padding[axis], conv_padding[axis + 2] = taps - 1 - skipped, rows - int(size) + skipped
        begin.append(crop - skipped * s)
        computed.append(rows)
    unshuffle = Unshuffle(tuple(stride), tuple(begin), tuple(int(d) for d in spatial[1]), channels_last)
    if not unshuffle.is_identity(tuple(computed)):
        candidate.unshuffle = unshuffle
    _conv_problem(candidate, call, data, dims, dtype, ungrouped, layout, (1, 1), tuple(conv_padding))


def _name_conv(candidate: Candidate, call, kind: str, kernel, stride, dilation, group_inputs: int) -> None:
    """The report's name of a convolution, e.g. ``conv2d 3x3 /2 depthwise NCHW``."""
    groups = candidate.groups
    strided = "" if tuple(stride) == (1, 1) else f" /{_pair(kind, stride)}"
    dilated = "" if tuple(dilation) == (1, 1) else f" dilation {_pair(kind, dilation)}"
    grouping = "" if groups == 1 else " depthwise" if group_inputs == 1 else f" groups={groups}"
    size = _pair(kind, tuple(kernel), compact=False)
    candidate.op = f"{kind} {size}{strided}{dilated}{grouping} {call.attrs.data_layout}"


def _conv_problem(candidate: Candidate, call, data, dims, dtype, w, layout, stride, padding) -> None:
    """The problem of the stride ``stride`` convolution of the ungrouped kernel ``w`` (OIHW,
    the candidate's weight) over ``data``."""
    kh, kw = w.shape[2:]
    attrs = call.attrs
    if layout not in ("NCHW", "NHWC"):
        raise _Rejected(f"data layout {attrs.data_layout}")
    if str(attrs.out_layout) not in ("", str(attrs.data_layout)):
        raise _Rejected(f"output layout {attrs.out_layout} differs from the input's {attrs.data_layout}")
    channels_last = layout == "NHWC"
    channels = dims[3] if channels_last else dims[1]
    taps = tirx.IntImm("int64", int(channels) * kh * kw) if isinstance(channels, tirx.IntImm) else None
    _check_operands(candidate, dtype, taps, call)
    m = w.shape[0]
    rows = Layout.ROWS if channels_last else Layout.CHANNELS
    spatial = dims[1:3] if channels_last else dims[2:]
    candidate.channel_axis = -1 if channels_last else 1
    if (kh, kw) == (1, 1) and stride == (1, 1) and not any(padding):
        if not channels_last and not all(isinstance(d, tirx.IntImm) for d in spatial):
            raise _Rejected("NCHW input with a dynamic spatial size")
        y_dims = dims[:3] + [m] if channels_last else [dims[0], m] + dims[2:]
        _set_problem(candidate, rows, data, dims, y_dims, dtype)
        return
    if not all(isinstance(d, tirx.IntImm) for d in spatial):
        raise _Rejected(f"{kh}x{kw} convolution of a dynamic spatial size")
    window = ConvWindow(
        channels=w.shape[1],  # ungrouped
        kernel=(kh, kw),
        stride=stride,
        padding=padding,
        input_size=tuple(int(d) for d in spatial),
        channels_last=channels_last,
    )
    oh, ow = window.output_size
    if oh < 1 or ow < 1:
        raise _Rejected(f"empty output ({oh}x{ow})")
    y_dims = [dims[0], oh, ow, m] if channels_last else [dims[0], m, oh, ow]
    _set_problem(candidate, rows, data, dims, y_dims, dtype, window)


def _spread_kernel(candidate: Candidate, w: np.ndarray, kind: str, dilation) -> np.ndarray:
    """The ungrouped kernel ``w`` (OIHW) spread over its dilation, recorded as the candidate's
    weight; rejected where the spread kernel is too large (the weight as held still recorded,
    for the report)."""
    kh, kw = w.shape[2:]
    spread = dilated_size((kh, kw), dilation)
    weights = w.shape[0] * w.shape[1] * spread[0] * spread[1]
    too_large = spread != (kh, kw) and weights > MAX_SPREAD_WEIGHTS
    if spread != (kh, kw) and not too_large:
        candidate.taps = (kh * kw, spread[0] * spread[1])
        w = spread_dilated(w, dilation)
    candidate.weight = SparseMatrix.from_dense(w.reshape(w.shape[0], -1))
    if too_large:
        taps = _pair(kind, spread, compact=False)
        raise _Rejected(f"dilation {_pair(kind, dilation)} spreads the kernel over {taps} taps: {weights:,} weights, "
                        f"more than {MAX_SPREAD_WEIGHTS:,}")
    return w


def _pair(kind: str, pair: tuple[int, int], compact: bool = True) -> str:
    """A kernel's size, stride or dilation as the report names it: ``3`` (of a 1-D
    convolution), ``2`` (a square stride or dilation, where ``compact``) or ``5x3``."""
    return f"{pair[1]}" if kind.startswith("conv1d") or compact and pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _check_operands(candidate: Candidate, dtype: str, k_dim, call):
    weight = candidate.weight
    if weight.dtype != dtype:
        raise _Rejected(f"weight dtype {weight.dtype} differs from the input's {dtype}")
    _check_out_dtype(call, dtype)
    if isinstance(k_dim, tirx.IntImm) and int(k_dim) != weight.shape[1]:
        raise _Rejected(f"input has {int(k_dim)} features, weight expects {weight.shape[1]}")
    if not weight.is_finite:
        raise _Rejected("weight contains NaN or Inf; the dense path keeps IEEE semantics")


def _set_problem(candidate, layout, x, x_dims, y_dims, dtype, window=None):
    candidate.x = x
    candidate.problem = SpmmProblem(candidate.weight, layout, dtype, tuple(x_dims), tuple(y_dims), window=window)


def _decline(candidate: Candidate, call, var2val):
    """Operators with a weight that no kernel takes yet: listed in the report, with why."""
    if constant_value(call.args[1], var2val) is None:
        raise _Rejected("weight is not a constant")
    raise _Rejected(f"{candidate.op} is not rewritten (matmuls and 1-D and 2-D convolutions, plain or transposed, are)")


_ROOTS = {
    "relax.matmul": _analyse_matmul,
    "relax.nn.conv2d": _analyse_conv2d,
    "relax.nn.conv1d": _analyse_conv1d,
    "relax.nn.conv3d": _decline,
    "relax.nn.conv1d_transpose": _analyse_conv1d_transpose,
    "relax.nn.conv2d_transpose": _analyse_conv2d_transpose,
    "relax.nn.conv3d_transpose": _decline,
}


# -- epilogue -------------------------------------------------------------------------


def _absorb_epilogue(candidate: Candidate, var2val, users, block_of, mod=None):
    problem = candidate.problem
    out_type = candidate.root.ty
    ops = []
    current = candidate.root
    while True:
        user = _only_user(current, users)
        if user is None or block_of.get(user) != block_of[candidate.root]:
            break
        normalized = _folded_batch_norm(user, current, candidate, ops, var2val, users)
        if normalized:  # the norm's bindings, its output last
            candidate.members += normalized
            current = normalized[-1]
        else:
            if not _same_type(user.ty, out_type):
                break
            op = _epilogue_op(var2val[user], current, candidate, var2val, mod)
            if op is None:
                break
            ops.append(op)
            candidate.members.append(user)
            current = user
        candidate.op_ends.append(len(candidate.members) - 1)
    candidate.problem = dataclasses.replace(problem, weight=candidate.weight, epilogue=tuple(ops))


def _only_user(var, users):
    """The one binding that reads ``var``, or None (several, none, or the function's result)."""
    readers = users.get(var, [])
    return readers[0] if len(readers) == 1 and readers[0] is not _ESCAPES else None


_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")


def _folded_batch_norm(user, current, candidate: Candidate, ops: list, var2val, users) -> list:
    """Where ``user`` is an inference batch norm of ``current`` over the output's channels
    (as TVM imports ONNX's BatchNormalization and PyTorch's BatchNorm), and only bias adds
    came before it: folds it in and returns its bindings (the norm's tuple, unused reads of
    its statistics, its output last). Each channel's
    ``scale = gamma / sqrt(var + eps)`` multiplies that row of the weight and the biases
    before it, and ``beta - mean * scale`` is added as a bias is (``FoldedBatchNorm``); a
    weight's zeros stay zeros.
    Empty (nothing changed) where it does not apply."""
    call = var2val.get(user)
    if not isinstance(call, relax.Call) or not call.op.same_as(_BATCH_NORM) or not call.args[0].same_as(current):
        return []
    attrs = call.attrs
    if attrs.training or not all(isinstance(op, BiasAdd) for op in ops):
        return []
    reads = users.get(user, [])
    if _ESCAPES in reads or not all(isinstance(var2val.get(r), relax.TupleGetItem) for r in reads):
        return []
    outputs = [r for r in reads if var2val[r].index == 0]
    unused = [r for r in reads if var2val[r].index != 0 and not users.get(r)]
    if len(outputs) != 1 or len(outputs) + len(unused) != len(reads):
        return []
    if not _same_type(outputs[0].ty, candidate.root.ty):
        return []
    out = outputs[0]
    rank = len(out.ty.shape.values)
    problem = candidate.problem
    if int(attrs.axis) % rank != candidate.channel_axis % rank:
        return []
    gamma, beta, mean, variance = (constant_value(arg, var2val) for arg in call.args[1:])
    m = problem.M // candidate.phases
    if any(v is None or v.shape != (m,) for v in (gamma, beta, mean, variance)):
        return []
    with np.errstate(all="ignore"):
        deviation = np.sqrt(variance.astype(np.float64) + attrs.epsilon)
        scale = (gamma.astype(np.float64) if attrs.scale else 1.0) / deviation
        shift = (beta.astype(np.float64) if attrs.center else 0.0) - mean * scale
    scale, shift = np.repeat(scale, candidate.phases), np.repeat(shift, candidate.phases)  # per row of the weight
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        return []
    dense = candidate.weight.dense
    candidate.weight = SparseMatrix.from_dense((dense * scale[:, None]).astype(dense.dtype))
    ops[:] = [dataclasses.replace(op, values=tuple(float(v * s) for v, s in zip(op.values, scale))) for op in ops]
    ops.append(FoldedBatchNorm(tuple(float(v) for v in shift)))
    return [user, *unused, out]


def _same_type(a, b) -> bool:
    return (
        isinstance(a, relax.TensorType)
        and isinstance(b, relax.TensorType)
        and str(a.dtype) == str(b.dtype)
        and tvm_ffi.structural_equal(a.shape, b.shape)
    )


def _epilogue_op(value, current, candidate: Candidate, var2val, mod=None):
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    name, args = value.op.name, value.args
    if name == "relax.call_tir":
        name, args = _called_bound(value, mod)
    if name == "relax.nn.relu":
        return Clip(0.0, math.inf)
    if name == "relax.nn.relu6":
        return Clip(0.0, 6.0)
    if name == "relax.clip":
        return Clip(_prim_float(args[1]), _prim_float(args[2]))
    if name not in ("relax.add", "relax.maximum", "relax.minimum"):
        return None
    if args[0].same_as(current) == args[1].same_as(current):
        return None
    other = args[1] if args[0].same_as(current) else args[0]
    constant = constant_value(other, var2val)
    if name != "relax.add":
        return _bound(name, constant, candidate.problem)
    if constant is not None:
        return _bias(constant, candidate)
    # A transposed convolution's kernel writes its phases, not the model's output.
    if candidate.residual is None and candidate.unshuffle is None and _same_type(other.ty, candidate.root.ty):
        candidate.residual = other
        return ResidualAdd()
    return None


def _called_bound(call, mod) -> tuple[str | None, list]:
    """``("relax.maximum" | "relax.minimum", operands)`` for a ``call_tir`` of a PrimFunc that
    takes the elementwise maximum or minimum of a tensor and a 0-d one (TVM's ONNX frontend
    emits Clip so), the tensor's operand first; else ``(None, [])``."""
    callee = call.args[0]
    func = mod[callee] if mod is not None and isinstance(callee, tvm.ir.GlobalVar) and callee in mod else None
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3 or len(call.args) != 2:
        return None, []
    stores = _stores(func.body)
    kinds = {tirx.Max: "relax.maximum", tirx.Min: "relax.minimum"}
    if len(stores) != 1 or type(stores[0].value) not in kinds:
        return None, []
    store, params = stores[0], list(func.params)
    if not store.buffer.same_as(params[2]):
        return None, []

    def param_of(operand, scalar: bool) -> int | None:
        """Which input ``operand`` loads whole: a 0-d buffer, or at the stored indices."""
        source = getattr(operand, "source", None)
        if not isinstance(operand, tvm.ir.expr.TensorLoad) or scalar != (len(source.shape) == 0):
            return None
        if not scalar and not tvm_ffi.structural_equal(list(operand.indices), list(store.indices)):
            return None
        return next((i for i in (0, 1) if source.same_as(params[i])), None)

    inputs = list(call.args[1].fields)
    for tensor, scalar in ((store.value.a, store.value.b), (store.value.b, store.value.a)):
        order = (param_of(tensor, scalar=False), param_of(scalar, scalar=True))
        if sorted(i for i in order if i is not None) == [0, 1]:
            return kinds[type(store.value)], [inputs[order[0]], inputs[order[1]]]
    return None, []


def _stores(stmt) -> list:
    """The buffer stores of a nest of loops and blocks (none where it holds anything else)."""
    if isinstance(stmt, tirx.BufferStore):
        return [stmt]
    if isinstance(stmt, tirx.SeqStmt):
        return [store for child in stmt.seq for store in _stores(child)]
    child = getattr(stmt, "block", None) or getattr(stmt, "body", None)  # realize, block, loop
    return _stores(child) if isinstance(child, tirx.Stmt) and getattr(stmt, "init", None) is None else []


def _bound(name: str, constant: np.ndarray | None, problem: SpmmProblem) -> Clip | None:
    """``maximum`` / ``minimum`` with one finite constant (ONNX's Clip, as TVM imports it) as
    a clip's lower / upper bound."""
    if constant is None or str(constant.dtype) != problem.dtype or constant.size == 0:
        return None
    bound = float(constant.reshape(-1)[0])
    if not math.isfinite(bound) or np.any(constant != constant.reshape(-1)[0]):
        return None
    return Clip(bound, math.inf) if name == "relax.maximum" else Clip(-math.inf, bound)


def _prim_float(prim_value) -> float:
    value = prim_value.value
    return float(getattr(value, "value", value))


def _bias(constant: np.ndarray, candidate: Candidate) -> BiasAdd | None:
    """A constant added to the output is a bias if it varies only along the channels (of a
    transposed convolution, repeated for each channel's phases)."""
    problem = candidate.problem
    ndim = len(candidate.root.ty.shape.values)
    if str(constant.dtype) != problem.dtype or constant.ndim > ndim:
        return None
    shape = (1,) * (ndim - constant.ndim) + constant.shape
    channel_axis = candidate.channel_axis % ndim
    channels = problem.M // candidate.phases
    for axis, size in enumerate(shape):
        if size != 1 and not (axis == channel_axis and size == channels):
            return None
    values = np.repeat(np.broadcast_to(constant.reshape(-1), (channels,)), candidate.phases)
    return BiasAdd(tuple(float(v) for v in values))
