"""CPU: an unrolled TIR kernel per weight, vectorised over the product's columns.

For each tile of ``vector_lanes`` columns, every row of ``A`` becomes one vector
expression over the tile's inputs, with the nonzero values as constants and the column
indices as fixed offsets. Without a window the tile of ``X`` is first staged into a small
buffer ``xt[k, lane]`` (transposed for the ROWS layout); through a convolution's window,
tiles are pieces of output rows read straight from a zero-padded copy of the image, in
NCHW order whatever the layout (``_RowTiles``). Sums are stored as vectors where the tile's
columns are neighbours in ``Y`` and the tiles are whole; else written to ``yt``, which a
scalar loop stores to ``Y`` with the bounds check of the last tile. Rows are unrolled in
chunks so that ``yt`` stays small, and cut into segments, one parallel loop (one LLVM
function) each, to bound compile time.

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
    dtype = problem.dtype
    x_dims, y_dims = operand_shapes(problem)
    columns, batch = kernel_columns_and_batch(problem, x_dims)
    window = problem.window
    tiling = (_ColumnTiles if window is None else _RowTiles)(problem, columns, config.vector_lanes)
    lanes = tiling.lanes
    segments = split_by_cost(list(range(problem.M)), problem.weight.row_nnz.tolist(), config.max_nnz_per_segment)
    # Epilogue ops up to the residual add run on whole vectors, the rest as each value is stored.
    split = next((i for i, op in enumerate(problem.epilogue) if isinstance(op, ResidualAdd)), len(problem.epilogue))
    vector_ops, store_ops = problem.epilogue[:split], problem.epilogue[split:]
    # Whole tiles of columns that are neighbours in Y (NCHW) are stored as vectors straight
    # from the sums: 2.5x faster than staging them in ``yt`` and storing one by one.
    direct = problem.y_strides().n == 1 and tiling.always_whole

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
                    source = tiling.prepare(x_flat, b)
                    for segment in segments:
                        with tiling.loop() as tile:
                            read = tiling.reader(source, b, tile)
                            yt = None if direct else _scratch(min(config.rows_per_chunk, len(segment)) * lanes, dtype)
                            for lo in range(0, len(segment), config.rows_per_chunk):
                                chunk = segment[lo : lo + config.rows_per_chunk]
                                if direct:
                                    _compute_and_store(problem, chunk, tiling, read, y_flat, r_flat, b, tile)
                                    continue
                                with T.vectorized(0, lanes) as lane:
                                    for i, m in enumerate(chunk):
                                        acc = _row_sum(problem, m, lambda k, lane=lane: read(tiling.tap_offset(k), lane))
                                        T.buffer_store(yt, _apply(vector_ops, acc, m, dtype), [i * lanes + lane])
                                _store_tile(problem, chunk, store_ops, yt, y_flat, r_flat, b, tiling, tile)
    return builder.get()


class _ColumnTiles:
    """Tiles of ``lanes`` consecutive columns of the product, each staged (transposed for
    the ROWS layout) into ``xt[k, lane]`` before its rows are computed."""

    def __init__(self, problem: SpmmProblem, columns, lanes: int):
        self.problem, self.columns, self.lanes = problem, columns, lanes
        self.always_whole = problem.static_columns is not None and problem.static_columns % lanes == 0

    def prepare(self, x_flat, b):
        """What the tiles read: ``X`` itself."""
        return x_flat

    def loop(self):
        tiles = tirx.ceildiv(self.columns, self.lanes)
        static_columns = self.problem.static_columns
        if static_columns is not None and static_columns <= self.lanes:
            return T.serial(0, tiles)  # a single tile (small static N) needs no thread pool
        return T.parallel(0, tiles)

    def reader(self, x_flat, b, tile):
        problem, lanes = self.problem, self.lanes
        xt = _scratch(problem.K * lanes, problem.dtype)
        with T.serial(0, problem.K) as k:
            with T.vectorized(0, lanes) as lane:
                T.buffer_store(xt, _x_element(problem, x_flat, b, k, tile * lanes + lane, self.columns), [k * lanes + lane])
        return lambda offset, lane: xt[offset + lane]

    def tap_offset(self, k: int) -> int:
        """Where column ``k`` of ``A``'s inputs starts, relative to what ``reader`` reads."""
        return k * self.lanes

    def packed(self, x_flat, b):
        """Every tile staged at once, ``xt[tile, k, lane]`` (shared by the tasks that compute
        a tile's rows), and ``reader(tile)`` of it. Staged in runs of a few rows of ``A``'s
        columns per task, so that even a single tile is staged by every core."""
        problem, lanes, tiles = self.problem, self.lanes, self.count()
        run = 64
        runs = -(-problem.K // run)
        xt = T.alloc_buffer((tiles * problem.K * lanes,), problem.dtype, scope="global")
        with T.parallel(0, tiles * runs) as task:
            tile, first = tirx.floordiv(task, runs), tirx.floormod(task, runs) * run
            with T.serial(0, tirx.min(run, problem.K - first)) as i:
                k = first + i
                with T.vectorized(0, lanes) as lane:
                    element = _x_element(problem, x_flat, b, k, tile * lanes + lane, self.columns)
                    T.buffer_store(xt, element, [(tile * problem.K + k) * lanes + lane])

        def reader(tile):
            base = tile * problem.K * lanes
            return lambda offset, lane: xt[base + offset + lane]

        return reader

    def count(self):
        return tirx.ceildiv(self.columns, self.lanes)

    def first(self, tile):
        """The tile's first column."""
        return tile * self.lanes

    def whole(self, tile):
        return (tile + 1) * self.lanes <= self.columns

    def valid(self, tile, lane):
        return tile * self.lanes + lane < self.columns


class _RowTiles:
    """Convolutions through a window: tiles of ``lanes`` neighbouring pixels of one output
    row, read straight from a copy of the image with its padding zeros written out (NCHW
    order: an NHWC image is transposed into it, so that each tap is one contiguous vector
    in both layouts).

    Tap ``(c, ky, kx)`` of a tile is then one contiguous vector at a fixed offset from the
    tile's origin: no per-lane index arithmetic, no bounds checks and no staging, so a
    depthwise layer costs its nine taps per pixel, not every channel's. With a column
    stride ``s`` the copy's rows are split into ``s`` phases (columns ``s q + p`` at ``p
    wq + q``) so that the taps stay contiguous (LLVM takes minutes over strided vectors).
    Rows are long enough for the last tile's lanes past the row's end, whose results are
    dropped."""

    def __init__(self, problem: SpmmProblem, columns, lanes: int):
        self.problem, window = problem, problem.window
        (self.h, self.w), (self.kh, self.kw), (self.sh, self.sw) = window.input_size, window.kernel, window.stride
        self.top, self.left = window.padding[0], window.padding[1]
        self.channels = window.channels
        self.oh, self.ow = window.output_size
        self.lanes = min(lanes, 1 << max(0, self.ow - 1).bit_length())  # no wider than a row
        self.tiles_per_row = -(-self.ow // self.lanes)
        self.hp = (self.oh - 1) * self.sh + self.kh  # padded rows and columns the taps read
        padded_width = (self.tiles_per_row * self.lanes - 1) * self.sw + self.kw
        self.wq = -(-padded_width // self.sw)  # columns per phase
        self.row = self.sw * self.wq
        self.always_whole = self.ow % self.lanes == 0
        self.offsets = []  # of each tap from a tile's origin
        for k in range(problem.K):
            c, ky, kx = window.tap(k)
            self.offsets.append((c * self.hp + ky) * self.row + kx % self.sw * self.wq + kx // self.sw)

    def prepare(self, x_flat, b):
        """The image, padded with zeros, as ``xp[c, hp, phase, wq]`` (an NHWC image is
        transposed on the way)."""
        problem, window, hp, row = self.problem, self.problem.window, self.hp, self.row
        rows = min(self.h, hp - self.top)
        xp = T.alloc_buffer((self.channels * hp * row,), problem.dtype, scope="global")
        image = b * problem.x_strides().batch
        with T.parallel(0, self.channels) as c:
            for py in [*range(self.top), *range(self.top + rows, hp)]:
                _fill(xp, (c * hp + py) * row, row, _zero(problem.dtype))
        # An NHWC row holds every channel: read it whole (from L1) before the next one.
        outer, inner = (rows, self.channels) if window.channels_last else (self.channels, rows)
        with T.parallel(0, outer) as i:
            with T.serial(0, inner) as j:
                iy, c = (i, j) if window.channels_last else (j, i)
                source = image + c * window.channel_stride + iy * window.row_stride
                self._copy_row(x_flat, xp, source, (c * hp + iy + self.top) * row)
        return xp

    def _copy_row(self, x_flat, xp, source, start):
        """Input row ``source`` into the copy's row ``start``, split into column phases with
        the padding columns zero."""
        sw, wq, pixel = self.sw, self.wq, self.problem.window.pixel_stride
        cols, zero = min(self.w, self.row - self.left), _zero(self.problem.dtype)
        for phase in range(sw):  # padded column sw * q + phase is image column sw * q + phase - left
            lo = min(wq, max(0, -(-(self.left - phase) // sw)))
            hi = min(wq, max(lo, -(-(self.left + cols - phase) // sw)))
            first = lo * sw + phase - self.left

            def element(i, first=first):
                return x_flat[source + (first + i * sw) * pixel]

            _fill(xp, start + phase * wq, lo, zero)
            _fill(xp, start + phase * wq + lo, hi - lo, element)
            _fill(xp, start + phase * wq + hi, wq - hi, zero)

    def loop(self):
        return T.parallel(0, self.oh * self.tiles_per_row)

    def reader(self, xp, b, tile):
        origin = self._row(tile) * self.sh * self.row + self._column(tile)
        return lambda offset, lane: xp[origin + offset + lane]

    def tap_offset(self, k: int) -> int:
        return self.offsets[k]

    def count(self):
        return self.oh * self.tiles_per_row

    def _row(self, tile):
        return tirx.floordiv(tile, self.tiles_per_row)

    def _column(self, tile):
        """The tile's first pixel within its output row."""
        return tirx.floormod(tile, self.tiles_per_row) * self.lanes

    def first(self, tile):
        return self._row(tile) * self.ow + self._column(tile)

    def whole(self, tile):
        return self._column(tile) + self.lanes <= self.ow

    def valid(self, tile, lane):
        return self._column(tile) + lane < self.ow


def _fill(buf, start, count: int, value, width: int = 16):
    """``buf[start + i] = value(i)`` (or a constant) for ``i < count``, in vectors of at
    most ``width``."""
    for lo in range(0, count, width):
        with T.vectorized(0, min(width, count - lo)) as i:
            T.buffer_store(buf, value(lo + i) if callable(value) else value, [start + lo + i])


def _store_tile(problem: SpmmProblem, rows, ops, yt, y_flat, r_flat, b, tiling, tile, bias=None):
    """``yt`` (the rows' sums) to ``Y``, the epilogue's ``ops`` applied: a vector per row
    for a whole tile whose columns are neighbours in Y, else one column at a time up to the
    last one."""
    ys, dtype, lanes = problem.y_strides(), problem.dtype, tiling.lanes
    first = tiling.first(tile)

    def store(lane):
        for i, m in enumerate(rows):
            offset = b * ys.batch + m * ys.k + (first + lane) * ys.n
            T.buffer_store(y_flat, _apply(ops, yt[i * lanes + lane], m, dtype, r_flat, offset, bias), [offset])

    def one_by_one():
        with T.serial(0, lanes) as lane:
            with T.If(tiling.valid(tile, lane)):
                with T.Then():
                    store(lane)

    if ys.n != 1:
        one_by_one()
        return
    with T.If(tiling.whole(tile)):
        with T.Then():
            with T.vectorized(0, lanes) as lane:
                store(lane)
        with T.Else():
            one_by_one()


def _compute_and_store(problem: SpmmProblem, rows, tiling, read, y_flat, r_flat, b, tile):
    """Each row's sums, epilogue and vector store in one vectorised loop (whole tiles, Y's
    columns contiguous)."""
    ys, first = problem.y_strides(), tiling.first(tile)
    with T.vectorized(0, tiling.lanes) as lane:
        for m in rows:
            offset = b * ys.batch + m * ys.k + first + lane
            acc = _row_sum(problem, m, lambda k: read(tiling.tap_offset(k), lane))
            T.buffer_store(y_flat, _apply(problem.epilogue, acc, m, problem.dtype, r_flat, offset), [offset])


def _x_element(problem: SpmmProblem, x_flat, b, k, n, columns):
    """``X`` at (image ``b``, column ``k`` of ``A``, column ``n``), zero past the last column."""
    xs = problem.x_strides()
    return tirx.if_then_else(n < columns, x_flat[b * xs.batch + k * xs.k + n * xs.n], _zero(problem.dtype))


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
        return _zero(dtype)
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _apply(ops, value, m, dtype: str, residual=None, offset=None, bias=None):
    """``value`` of row ``m`` through the epilogue ``ops``; ``bias(op, m)`` reads a bias add's
    value where ``m`` is not a Python int (by default it is a constant)."""
    for op in ops:
        if isinstance(op, BiasAdd):
            value = value + (tirx.const(op.values[m], dtype) if bias is None else bias(op, m))
        elif isinstance(op, ResidualAdd):
            value = value + residual[offset]
        elif isinstance(op, Clip):
            if math.isfinite(op.lo):
                value = tirx.max(value, tirx.const(op.lo, dtype))
            if math.isfinite(op.hi):
                value = tirx.min(value, tirx.const(op.hi, dtype))
    return value
