"""Finding the operators the pass can rewrite, and what each of them computes.

A candidate is a matmul (the constant on either side, analysed here) or a 2-D or 1-D
convolution, plain or transposed (``convolutions``), whose weight is a constant, followed
along the dataflow (not the textual order) by the epilogue it can absorb: bias adds, an
inference batch norm (folded into the weight), one residual add and ReLU/ReLU6/clip (or
maximum/minimum with a constant, as TVM imports ONNX's Clip), as long as each intermediate
value has no other user. Operators that cannot be rewritten are still candidates, with the
reason.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, sym, tirx

from ..problem import BiasAdd, Clip, FoldedBatchNorm, Layout, ResidualAdd, SpmmProblem
from ..weights import SparseMatrix
from .analysis import Candidate, Rejected, check_operands, set_problem, tensor_dims
from .constants import constant_value
from .convolutions import analyse_conv1d, analyse_conv1d_transpose, analyse_conv2d, analyse_conv2d_transpose

_ESCAPES = None  # user entry for a value returned from the function


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
            except Rejected as rejected:
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


def _analyse_matmul(candidate: Candidate, call, var2val):
    lhs, rhs = call.args
    w = constant_value(rhs, var2val)
    if w is None:
        w = constant_value(lhs, var2val)
        if w is None:
            raise Rejected("weight is not a constant")
        _analyse_left_matmul(candidate, call, w, rhs)
        return
    candidate.op = "matmul"
    if w.ndim != 2:
        raise Rejected(f"{w.ndim}-D weight; only 2-D weights are rewritten")
    candidate.weight = SparseMatrix.from_dense(w.T)
    dims, dtype = tensor_dims(lhs, "activation")
    check_operands(candidate, dtype, dims[-1] if dims else None, call)
    set_problem(candidate, Layout.ROWS, lhs, dims, dims[:-1] + [w.shape[1]], dtype)


def _analyse_left_matmul(candidate: Candidate, call, w: np.ndarray, x):
    """``W @ x``: each matrix of ``x`` (its last two axes, ``[K, N]``) is an image of an NCHW
    1x1 convolution whose ``N`` pixels are the product's columns, so the kernel sees ``x``
    as ``[images, K, N]`` (a view) and writes ``[images, M, N]``."""
    candidate.op = "matmul (weight on the left)"
    candidate.channel_axis = -2
    if w.ndim != 2:
        raise Rejected(f"{w.ndim}-D weight; only 2-D weights are rewritten")
    candidate.weight = SparseMatrix.from_dense(w)
    dims, dtype = tensor_dims(x, "activation")
    if len(dims) < 2:
        raise Rejected("1-D right operand")
    check_operands(candidate, dtype, dims[-2], call)
    if not isinstance(dims[-1], tirx.IntImm):
        raise Rejected("dynamic column count with the weight on the left")
    images = tirx.IntImm("int64", 1)
    for d in dims[:-2]:
        images = images * d
    images = sym.Analyzer().simplify(images)
    set_problem(candidate, Layout.CHANNELS, x, [images, dims[-2], dims[-1]], [images, w.shape[0], dims[-1]], dtype)


def _decline(candidate: Candidate, call, var2val):
    """Operators with a weight that no kernel takes yet: listed in the report, with why."""
    if constant_value(call.args[1], var2val) is None:
        raise Rejected("weight is not a constant")
    raise Rejected(f"{candidate.op} is not rewritten (matmuls and 1-D and 2-D convolutions, plain or transposed, are)")


_ROOTS = {
    "relax.matmul": _analyse_matmul,
    "relax.nn.conv2d": analyse_conv2d,
    "relax.nn.conv1d": analyse_conv1d,
    "relax.nn.conv3d": _decline,
    "relax.nn.conv1d_transpose": analyse_conv1d_transpose,
    "relax.nn.conv2d_transpose": analyse_conv2d_transpose,
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
    if int(attrs.axis) % rank != candidate.channel_axis % rank:
        return []
    gamma, beta, mean, variance = (constant_value(arg, var2val) for arg in call.args[1:])
    m = candidate.channels
    if any(v is None or v.shape != (m,) for v in (gamma, beta, mean, variance)):
        return []
    with np.errstate(all="ignore"):
        deviation = np.sqrt(variance.astype(np.float64) + attrs.epsilon)
        scale = (gamma.astype(np.float64) if attrs.scale else 1.0) / deviation
        shift = (beta.astype(np.float64) if attrs.center else 0.0) - mean * scale
    scale, shift = candidate.per_row(scale), candidate.per_row(shift)
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
    """A constant added to the output is a bias if it varies only along the channels (each
    channel's value repeated over its rows of the weight: see ``Candidate.row_channels``)."""
    problem = candidate.problem
    ndim = len(candidate.root.ty.shape.values)
    if str(constant.dtype) != problem.dtype or constant.ndim > ndim:
        return None
    shape = (1,) * (ndim - constant.ndim) + constant.shape
    channel_axis = candidate.channel_axis % ndim
    channels = candidate.channels
    for axis, size in enumerate(shape):
        if size != 1 and not (axis == channel_axis and size == channels):
            return None
    values = candidate.per_row(np.broadcast_to(constant.reshape(-1), (channels,)))
    return BiasAdd(tuple(float(v) for v in values))
