"""CPU: an unrolled TIR kernel per weight, vectorised over the product's columns.

For each tile of ``vector_lanes`` columns, the tile of ``X`` is staged (transposed for the
ROWS layout; for a convolution's window, gathered from the input with zeros in the padding)
into a small buffer ``xt[k, lane]``; every row of ``A`` then becomes one
vector expression over that buffer, with the nonzero values as constants and the column
indices as fixed offsets, stored as a vector where the tile's columns are neighbours in
``Y`` and the tiles are whole; else written to ``yt``, which a scalar loop stores to ``Y``
with the bounds check of the last tile. Rows are unrolled in chunks so that ``yt`` stays small, and
cut into segments, one parallel loop (one LLVM function) each, to bound compile time.

All rows share a single vectorised loop per chunk: TVM's lowering passes are linear in the
size of such a body but quadratic in the number of separate loops.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...problem import BiasAdd, Clip, ResidualAdd, SpmmProblem
from ..base import KERNEL_ATTR, OPAQUE_PATTERN, kernel_columns_and_batch, operand_shapes, require_dtype
from ..config import CpuSpmmConfig
from ..row_groups import split_by_cost

SUPPORTED_DTYPES = ("float32",)
# Staging buffers larger than this go to the heap (TVM's workspace) instead of the stack.
_STACK_BYTES = 128 * 1024


def cpu_spmm_kernel(problem: SpmmProblem, config: CpuSpmmConfig, name: str) -> tirx.PrimFunc:
    require_dtype(problem, SUPPORTED_DTYPES, "the CPU generator")
    dtype, lanes = problem.dtype, config.vector_lanes
    x_dims, y_dims = operand_shapes(problem)
    columns, batch = kernel_columns_and_batch(problem, x_dims)
    ys = problem.y_strides()
    segments = split_by_cost(list(range(problem.M)), problem.weight.row_nnz.tolist(), config.max_nnz_per_segment)
    # Epilogue ops up to the residual add run on whole vectors, the rest as each value is stored.
    split = next((i for i, op in enumerate(problem.epilogue) if isinstance(op, ResidualAdd)), len(problem.epilogue))
    vector_ops, store_ops = problem.epilogue[:split], problem.epilogue[split:]
    # Whole tiles of columns that are neighbours in Y (NCHW) are stored as vectors straight
    # from the sums: 2.5x faster than staging them in ``yt`` and storing one by one.
    direct = ys.n == 1 and problem.static_columns is not None and problem.static_columns % lanes == 0

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE_PATTERN, KERNEL_ATTR: True})
            x = T.match_buffer(T.arg("x", T.handle()), x_dims, dtype)
            residual = T.match_buffer(T.arg("residual", T.handle()), y_dims, dtype) if problem.has_residual else None
            y = T.match_buffer(T.arg("y", T.handle()), y_dims, dtype)
            with T.sblock("root"):
                T.reads(*[_whole(b) for b in (x, residual) if b is not None])
                T.writes(_whole(y))
                x_flat = _flat_view(x)
                y_flat = _flat_view(y)
                r_flat = _flat_view(residual) if residual is not None else None
                with T.serial(0, batch) as b:
                    for segment in segments:
                        with _tile_loop(columns, lanes, problem.static_columns) as tile:
                            xt = _scratch(problem.K * lanes, dtype)
                            yt = None if direct else _scratch(min(config.rows_per_chunk, len(segment)) * lanes, dtype)
                            with T.serial(0, problem.K) as k:
                                with T.vectorized(0, lanes) as lane:
                                    n = tile * lanes + lane
                                    value = _x_element(problem, x_flat, b, k, n, columns)
                                    T.buffer_store(xt, value, [k * lanes + lane])
                            for lo in range(0, len(segment), config.rows_per_chunk):
                                chunk = segment[lo : lo + config.rows_per_chunk]
                                if direct:
                                    _compute_and_store(problem, chunk, xt, y_flat, r_flat, b, tile, lanes)
                                    continue
                                with T.vectorized(0, lanes) as lane:
                                    for i, m in enumerate(chunk):
                                        acc = _row_sum(problem, m, xt, lane, lanes)
                                        T.buffer_store(yt, _apply(vector_ops, acc, m, dtype), [i * lanes + lane])
                                _store_tile(problem, chunk, store_ops, yt, y_flat, r_flat, b, tile, lanes, columns)
    return builder.get()


def _store_tile(problem: SpmmProblem, rows, ops, yt, y_flat, r_flat, b, tile, lanes: int, columns):
    """``yt`` (the rows' sums) to ``Y``, the epilogue's ``ops`` applied: a vector per row
    for a whole tile whose columns are neighbours in Y, else one column at a time up to the
    last one."""
    ys, dtype = problem.y_strides(), problem.dtype

    def store(lane, n):
        for i, m in enumerate(rows):
            offset = b * ys.batch + m * ys.k + n * ys.n
            T.buffer_store(y_flat, _apply(ops, yt[i * lanes + lane], m, dtype, r_flat, offset), [offset])

    def one_by_one():
        with T.serial(0, lanes) as lane:
            with T.If(tile * lanes + lane < columns):
                with T.Then():
                    store(lane, tile * lanes + lane)

    if ys.n != 1:
        one_by_one()
        return
    with T.If((tile + 1) * lanes <= columns):
        with T.Then():
            with T.vectorized(0, lanes) as lane:
                store(lane, tile * lanes + lane)
        with T.Else():
            one_by_one()


def _compute_and_store(problem: SpmmProblem, rows, xt, y_flat, r_flat, b, tile, lanes: int):
    """Each row's sums, epilogue and vector store in one vectorised loop (whole tiles, Y's
    columns contiguous)."""
    ys = problem.y_strides()
    with T.vectorized(0, lanes) as lane:
        for m in rows:
            offset = b * ys.batch + m * ys.k + tile * lanes + lane
            value = _apply(problem.epilogue, _row_sum(problem, m, xt, lane, lanes), m, problem.dtype, r_flat, offset)
            T.buffer_store(y_flat, value, [offset])


def _x_element(problem: SpmmProblem, x_flat, b, k, n, columns):
    """``X`` at (image ``b``, column ``k`` of ``A``, column ``n``), zero past the last column
    and, through a convolution's window, in the padding."""
    xs, inside = problem.x_strides(), n < columns
    window = problem.window
    if window is None:
        index = b * xs.batch + k * xs.k + n * xs.n
    else:
        (h, w), (kh, kw), (sh, sw) = window.input_size, window.kernel, window.stride
        channel, ky, kx = tirx.floordiv(k, kh * kw), tirx.floormod(tirx.floordiv(k, kw), kh), tirx.floormod(k, kw)
        ow = window.output_size[1]
        iy = tirx.floordiv(n, ow) * sh + ky - window.padding[0]
        ix = tirx.floormod(n, ow) * sw + kx - window.padding[1]
        inside = tirx.all(inside, iy >= 0, iy < h, ix >= 0, ix < w)
        index = b * xs.batch + channel * window.channel_stride + iy * window.row_stride + ix * window.pixel_stride
    return tirx.if_then_else(inside, x_flat[index], _zero(problem.dtype))


def _tile_loop(columns, lanes: int, static_columns: int | None):
    """Tiles of columns run in parallel; a single tile (small static N) needs no thread pool."""
    tiles = tirx.ceildiv(columns, lanes)
    if static_columns is not None and static_columns <= lanes:
        return T.serial(0, tiles)
    return T.parallel(0, tiles)


def _whole(buf):
    return buf[tuple(slice(0, d) for d in buf.shape)]


def _flat_view(buf):
    size = tirx.IntImm("int64", 1)
    for d in buf.shape:
        size = size * d
    return T.decl_buffer((size,), buf.dtype, data=buf.data)


def _scratch(elements: int, dtype: str):
    scope = "local" if elements * 4 <= _STACK_BYTES else "global"
    return T.alloc_buffer((elements,), dtype, scope=scope)


def _zero(dtype):
    return tirx.const(0, dtype)


def _row_sum(problem: SpmmProblem, m: int, xt, lane, lanes: int, chains: int = 4):
    """Sum of ``value * xt[k, lane]`` over row ``m``: a few independent chains of fused
    multiply-adds (instruction-level parallelism), added at the end."""
    indices, values = problem.weight.row(m)
    dtype = problem.dtype
    partial = [None] * chains
    for j, (k, v) in enumerate(zip(indices, values)):
        x = xt[int(k) * lanes + lane]
        c = tirx.const(float(v), dtype)
        acc = partial[j % chains]
        partial[j % chains] = x * c if acc is None else tirx.call_llvm_pure_intrin(dtype, "llvm.fmuladd", x, c, acc)
    terms = [p for p in partial if p is not None]
    if not terms:
        return _zero(dtype)
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _apply(ops, value, m: int, dtype: str, residual=None, offset=None):
    for op in ops:
        if isinstance(op, BiasAdd):
            value = value + tirx.const(op.values[m], dtype)
        elif isinstance(op, ResidualAdd):
            value = value + residual[offset]
        elif isinstance(op, Clip):
            if math.isfinite(op.lo):
                value = tirx.max(value, tirx.const(op.lo, dtype))
            if math.isfinite(op.hi):
                value = tirx.min(value, tirx.const(op.hi, dtype))
    return value
