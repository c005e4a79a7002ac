"""CPU: a data-driven (CSR) kernel: the nonzeros' values and input offsets are arrays that
a loop walks, so its code is the same few instructions whatever the weight.

Tiles of columns are those of the unrolled kernel (``tiles.ColumnTiles``, ``RowTiles``):
each row of a tile is one vector accumulator (``vector_lanes`` columns) updated once per
nonzero of the row, ``acc += value * X[offset : offset + lanes]``, with ``offset`` the
nonzero's column of ``A`` as a position in the tile's input. Rows are shared out in
``row_blocks`` blocks of about equal nonzeros, each a task of the parallel loop beside the
tiles, so that a product of one tile (a matrix-vector product) still uses every core.

The kernel takes two arrays besides its operands, which the pass passes as Relax
constants: ``values`` (the nonzeros, then each bias add's values) and ``index`` (int32:
row starts, block bounds, then each nonzero's offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...errors import UnsupportedProblem
from ...problem import SpmmProblem
from ..base import kernel_columns_and_batch, operand_shapes, require_dtype
from ..config import CpuCsrConfig
from .kernel import SUPPORTED_DTYPES
from .tiles import (
    apply_epilogue,
    bias_reader,
    fma,
    kernel_body,
    split_epilogue,
    store_tile,
    tiling_for,
    values_and_biases,
)


@dataclass(frozen=True)
class CsrArrays:
    """The constant arrays a CSR kernel reads, and where each part of them starts."""

    values: np.ndarray  # float: nonzeros, then the bias adds' values
    index: np.ndarray  # int32: row starts (M + 1), block bounds (blocks + 1), offsets (nnz)
    bias_starts: tuple[int, ...]  # in ``values``, one per bias add of the epilogue
    block_bounds: int  # in ``index``
    offsets: int  # in ``index``


def csr_arrays(problem: SpmmProblem, tap_offset, blocks: int) -> CsrArrays:
    """The arrays of ``problem``'s weight for tiles whose column ``k`` of ``A`` is at
    ``tap_offset(k)``, its rows in ``blocks`` blocks. Raises ``UnsupportedProblem`` where an
    offset does not fit in 32 bits."""
    indptr, columns, nonzeros = problem.weight.csr
    # Blocks of consecutive rows of about equal cost (a row costs its nonzeros and a store).
    cost = np.cumsum(problem.weight.row_nnz + 1)
    bounds = np.searchsorted(cost, np.arange(blocks + 1) * (cost[-1] if len(cost) else 0) / blocks, side="right")
    bounds[0], bounds[-1] = 0, problem.M
    offsets = np.array([tap_offset(k) for k in range(problem.K)], dtype=np.int64)[columns]
    values, bias_starts = values_and_biases(problem, nonzeros)
    index = np.concatenate([indptr, bounds, offsets, [0]])
    if index.max(initial=0) >= 2**31:
        raise UnsupportedProblem("the CSR kernel's offsets into its input would not fit in 32 bits")
    return CsrArrays(values, index.astype(np.int32), bias_starts, problem.M + 1, problem.M + 1 + blocks + 1)


def cpu_csr_kernel(problem: SpmmProblem, config: CpuCsrConfig, name: str) -> tuple[tirx.PrimFunc, CsrArrays]:
    require_dtype(problem, SUPPORTED_DTYPES, "the CPU generator")
    dtype = problem.dtype
    x_dims, y_dims = operand_shapes(problem)
    columns, batch = kernel_columns_and_batch(problem, x_dims)
    tiling = tiling_for(problem, columns, config.vector_lanes)
    arrays = csr_arrays(problem, tiling.tap_offset, config.row_blocks)

    with IRBuilder() as builder:
        with T.prim_func():
            constants = [("values", arrays.values.shape, dtype), ("index", arrays.index.shape, "int32")]
            with kernel_body(name, problem, x_dims, y_dims, constants) as (x_flat, r_flat, (values, index), y_flat):
                rows = _Rows(problem, config, tiling, arrays, values, index, y_flat, r_flat)
                with T.serial(0, batch) as b:
                    reader = tiling.tile_reader(x_flat, b)
                    blocks = config.row_blocks
                    with T.parallel(0, tiling.count() * blocks) as task:
                        tile, block = tirx.floordiv(task, blocks), tirx.floormod(task, blocks)
                        rows.emit(b, tile, block, reader(tile))
    return builder.get(), arrays


class _Rows:
    """One task: a block of rows of one tile, each summed over its nonzeros and stored."""

    # Rows whose sums are kept before a ROWS output stores them (see ``_store_transposed``).
    CHUNK = 64

    def __init__(self, problem: SpmmProblem, config: CpuCsrConfig, tiling, arrays: CsrArrays, values, index,
                 y_flat, r_flat):
        self.problem, self.config, self.tiling, self.arrays = problem, config, tiling, arrays
        self.values, self.index, self.y_flat, self.r_flat = values, index, y_flat, r_flat
        self.vector_ops, self.store_ops = split_epilogue(problem)
        self.bias = bias_reader(problem, values, arrays.bias_starts)

    def emit(self, b, tile, block, read):
        lanes, dtype, index = self.tiling.lanes, self.problem.dtype, self.index
        acc = T.alloc_buffer((self.config.chains * lanes,), dtype, scope="local")
        first, last = index[self.arrays.block_bounds + block], index[self.arrays.block_bounds + block + 1]
        if self.problem.y_strides().n == 1:
            # A tile's columns are neighbours in Y: each row is stored as it is summed.
            with T.serial(first, last) as m:
                self._sum_row(m, read, acc, acc)
                store_tile(self.problem, [m], self.store_ops, acc, self.y_flat, self.r_flat, b, self.tiling, tile,
                            self.bias)
            return
        # ROWS: a row's columns are ``M`` apart in Y. Chunks of rows are summed first and
        # then stored column by column, so that each column's stores are one contiguous run.
        yt = T.alloc_buffer((self.CHUNK * lanes,), dtype, scope="local")
        with T.serial(0, tirx.ceildiv(last - first, self.CHUNK)) as chunk:
            lo = first + chunk * self.CHUNK
            hi = tirx.min(lo + self.CHUNK, last)
            with T.serial(lo, hi) as m:
                self._sum_row(m, read, acc, yt, (m - lo) * lanes)
            self._store_transposed(b, tile, yt, lo, hi)

    def _sum_row(self, m, read, acc, out, at=0):
        """Row ``m``'s sums, its vector epilogue applied, into ``out[at : at + lanes]``:
        ``chains`` independent chains of FMAs (to hide their latency), then the rest."""
        lanes, dtype, chains, index = self.tiling.lanes, self.problem.dtype, self.config.chains, self.index
        with T.vectorized(0, chains * lanes) as lane:
            T.buffer_store(acc, tirx.const(0, dtype), [lane])
        start, end = index[m], index[m + 1]
        rounds = tirx.floordiv(end - start, chains)
        with T.serial(0, rounds) as r:
            for chain in range(chains):
                self._accumulate(start + r * chains + chain, chain, read, acc)
        with T.serial(start + rounds * chains, end) as nz:
            self._accumulate(nz, 0, read, acc)
        with T.vectorized(0, lanes) as lane:
            total = acc[lane]
            for chain in range(1, chains):
                total = total + acc[chain * lanes + lane]
            T.buffer_store(out, apply_epilogue(self.vector_ops, total, m, dtype, bias=self.bias), [at + lane])

    def _accumulate(self, nz, chain, read, acc):
        lanes = self.tiling.lanes
        value, offset = self.values[nz], self.index[self.arrays.offsets + nz]
        with T.vectorized(0, lanes) as lane:
            slot = chain * lanes + lane
            term = fma(read(offset, lane), value, acc[slot], self.problem.dtype)
            T.buffer_store(acc, term, [slot])

    def _store_transposed(self, b, tile, yt, lo, hi):
        problem, lanes, ys = self.problem, self.tiling.lanes, self.problem.y_strides()
        first = self.tiling.first(tile)
        with T.serial(0, lanes) as lane:
            with T.If(self.tiling.valid(tile, lane)):
                with T.Then():
                    with T.serial(lo, hi) as m:
                        offset = b * ys.batch + m * ys.k + (first + lane) * ys.n
                        value = yt[(m - lo) * lanes + lane]
                        value = apply_epilogue(self.store_ops, value, m, problem.dtype, self.r_flat, offset, self.bias)
                        T.buffer_store(self.y_flat, value, [offset])
