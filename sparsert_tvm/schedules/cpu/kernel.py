"""CPU: an unrolled TIR kernel per weight, vectorised over the product's columns.

For each tile of ``vector_lanes`` columns (``tiles``), every row of ``A`` becomes one vector
expression over the tile's inputs, with the nonzero values as constants and the column
indices as fixed offsets. Sums are stored as vectors where the tile's
columns are neighbours in ``Y`` and the tiles are whole; else written to ``yt``, which a
scalar loop stores to ``Y`` with the bounds check of the last tile. Rows are unrolled in
chunks so that ``yt`` stays small, and cut into segments, one parallel loop (one LLVM
function) each, to bound compile time.

All rows share a single vectorised loop per chunk: TVM's lowering passes are linear in the
size of such a body but quadratic in the number of separate loops.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...problem import SpmmProblem
from ..base import kernel_columns_and_batch, operand_shapes, require_dtype
from ..config import CpuSpmmConfig
from ..row_groups import split_by_cost
from .tiles import (
    apply_epilogue,
    declare_kernel,
    flat_view,
    scratch,
    split_epilogue,
    store_tile,
    tiling_for,
    whole,
    zero,
)

SUPPORTED_DTYPES = ("float32",)


def cpu_spmm_kernel(problem: SpmmProblem, config: CpuSpmmConfig, name: str) -> tirx.PrimFunc:
    require_dtype(problem, SUPPORTED_DTYPES, "the CPU generator")
    dtype = problem.dtype
    x_dims, y_dims = operand_shapes(problem)
    columns, batch = kernel_columns_and_batch(problem, x_dims)
    tiling = tiling_for(problem, columns, config.vector_lanes)
    lanes = tiling.lanes
    segments = split_by_cost(list(range(problem.M)), problem.weight.row_nnz.tolist(), config.max_nnz_per_segment)
    # Epilogue ops up to the residual add run on whole vectors, the rest as each value is stored.
    vector_ops, store_ops = split_epilogue(problem)
    # Whole tiles of columns that are neighbours in Y (NCHW) are stored as vectors straight
    # from the sums: 2.5x faster than staging them in ``yt`` and storing one by one.
    direct = problem.y_strides().n == 1 and tiling.always_whole

    with IRBuilder() as builder:
        with T.prim_func():
            x, residual, _, y = declare_kernel(name, problem, x_dims, y_dims)
            with T.sblock("root"):
                T.reads(*[whole(b) for b in (x, residual) if b is not None])
                T.writes(whole(y))
                x_flat = flat_view(x)
                y_flat = flat_view(y)
                r_flat = flat_view(residual) if residual is not None else None
                with T.serial(0, batch) as b:
                    source = tiling.prepare(x_flat, b)
                    for segment in segments:
                        with tiling.loop() as tile:
                            read = _taps(tiling, tiling.reader(source, b, tile))
                            yt = None if direct else scratch(min(config.rows_per_chunk, len(segment)) * lanes, dtype)
                            for lo in range(0, len(segment), config.rows_per_chunk):
                                chunk = segment[lo : lo + config.rows_per_chunk]
                                if direct:
                                    _compute_and_store(problem, chunk, tiling, read, y_flat, r_flat, b, tile)
                                    continue
                                with T.vectorized(0, lanes) as lane:
                                    for i, m in enumerate(chunk):
                                        acc = _row_sum(problem, m, lambda k, lane=lane: read(k, lane))
                                        acc = apply_epilogue(vector_ops, acc, m, dtype)
                                        T.buffer_store(yt, acc, [i * lanes + lane])
                                store_tile(problem, chunk, store_ops, yt, y_flat, r_flat, b, tiling, tile)
    return builder.get()


def _compute_and_store(problem: SpmmProblem, rows, tiling, read, y_flat, r_flat, b, tile):
    """Each row's sums, epilogue and vector store in one vectorised loop (whole tiles, Y's
    columns contiguous)."""
    ys, first = problem.y_strides(), tiling.first(tile)
    with T.vectorized(0, tiling.lanes) as lane:
        for m in rows:
            offset = b * ys.batch + m * ys.k + first + lane
            acc = _row_sum(problem, m, lambda k: read(k, lane))
            T.buffer_store(y_flat, apply_epilogue(problem.epilogue, acc, m, problem.dtype, r_flat, offset), [offset])


def _taps(tiling, read):
    """``read`` by column of ``A``: the unrolled code knows each nonzero's offset."""
    return lambda k, lane: read(tiling.tap_offset(k), lane)


def _row_sum(problem: SpmmProblem, m: int, read, chains: int = 4):
    """Sum of ``value * read(k)`` over row ``m``: a few independent chains of fused
    multiply-adds (instruction-level parallelism), added at the end."""
    indices, values = problem.weight.row(m)
    dtype = problem.dtype
    partial = [None] * chains
    for j, (k, v) in enumerate(zip(indices, values)):
        x = read(int(k))
        c = tirx.const(float(v), dtype)
        acc = partial[j % chains]
        partial[j % chains] = x * c if acc is None else tirx.call_llvm_pure_intrin(dtype, "llvm.fmuladd", x, c, acc)
    terms = [p for p in partial if p is not None]
    if not terms:
        return zero(dtype)
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


