"""What the CPU kernels share: how tiles of the product's columns read their inputs, and how
a tile's sums go through the epilogue into ``Y``.

Without a window the tile of ``X`` is staged into a small buffer ``xt[k, lane]`` (transposed
for the ROWS layout); through a convolution's window, tiles are pieces of output rows read
straight from a zero-padded copy of the image, in NCHW order whatever the layout. Either way
``reader`` gives ``read(offset, lane)``, where ``tap_offset(k)`` is the offset of column ``k``
of ``A``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from ...problem import BiasAdd, Clip, ResidualAdd, SpmmProblem
from ..base import KERNEL_ATTR, OPAQUE_PATTERN, UNSIMPLIFIED_ATTR

# Staging buffers larger than this go to the heap (TVM's workspace) instead of the stack.
_STACK_BYTES = 128 * 1024


class ColumnTiles:
    """Tiles of ``lanes`` consecutive columns of the product, each staged (transposed for
    the ROWS layout) into ``xt[k, lane]`` before its rows are computed; or, where the
    product is a single tile whose columns are neighbours in ``X`` (a small image, N = 1),
    read where they are (``in_place``): staging would only copy them."""

    def __init__(self, problem: SpmmProblem, columns, lanes: int):
        self.problem, self.columns, self.lanes = problem, columns, lanes
        self.always_whole = problem.static_columns is not None and problem.static_columns % lanes == 0
        self.x_strides = problem.x_strides()
        self.in_place = problem.static_columns == lanes and (lanes == 1 or self.x_strides.n == 1)
        # Between neighbouring columns of A's inputs in what ``reader`` reads.
        self.k_stride = self.x_strides.k if self.in_place else lanes

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
        if self.in_place:
            xs = self.x_strides
            return lambda offset, lane: x_flat[b * xs.batch + offset + lane * xs.n]
        xt = scratch(problem.K * lanes, problem.dtype)
        self._stage(x_flat, b, tile, 0, problem.K, xt, lambda k, lane: k * lanes + lane)
        return lambda offset, lane: xt[offset + lane]

    def _stage(self, x_flat, b, tile, first, count, xt, index):
        """Columns ``first .. first + count`` of ``A``'s inputs for ``tile`` into
        ``xt[index(k, lane)]``: whole tiles as contiguous vectors, the last partial one
        with its columns past the end zero (a bounds check in every vector made LLVM gather
        whole tiles lane by lane, 4x slower on a 16-channel 1x1 layer)."""

        def copy(checked):
            with T.serial(0, count) as i:
                k = first + i
                with T.vectorized(0, self.lanes) as lane:
                    element = _x_element(self.problem, x_flat, b, k, tile * self.lanes + lane, self.columns, checked)
                    T.buffer_store(xt, element, [index(k, lane)])

        if self.always_whole:
            copy(checked=False)
            return
        with T.If(self.whole(tile)):
            with T.Then():
                copy(checked=False)
            with T.Else():
                copy(checked=True)

    def tap_offset(self, k: int) -> int:
        """Where column ``k`` of ``A``'s inputs starts, relative to what ``reader`` reads."""
        return k * self.k_stride

    def tile_reader(self, x_flat, b):
        """Every tile staged at once, ``xt[tile, k, lane]`` (shared by the tasks that compute
        a tile's rows), and ``reader(tile)`` of it (of ``X`` itself, ``in_place``). Staged in
        runs of a few rows of ``A``'s columns per task, so that even a single tile is staged
        by every core."""
        if self.in_place:
            return lambda tile: self.reader(x_flat, b, tile)
        problem, lanes, tiles = self.problem, self.lanes, self.count()
        run = 64
        runs = -(-problem.K // run)
        xt = T.alloc_buffer((tiles * problem.K * lanes,), problem.dtype, scope="global")
        with T.parallel(0, tiles * runs) as task:
            tile, first = tirx.floordiv(task, runs), tirx.floormod(task, runs) * run
            self._stage(x_flat, b, tile, first, tirx.min(run, problem.K - first), xt,
                        lambda k, lane: (tile * problem.K + k) * lanes + lane)

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


class RowTiles:
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
        self.lanes = lanes_within(lanes, self.ow)
        self.tiles_per_row = -(-self.ow // self.lanes)
        self.hp = (self.oh - 1) * self.sh + self.kh  # padded rows and columns the taps read
        padded_width = (self.tiles_per_row * self.lanes - 1) * self.sw + self.kw
        self.wq = -(-padded_width // self.sw)  # columns per phase
        self.row = self.sw * self.wq
        self.always_whole = self.ow % self.lanes == 0
        self.offsets = []  # of each tap from a tile's origin
        for k in range(problem.K):
            c, ky, kx = window.tap(k)
            self.offsets.append(c * self.plane_size + self.plane_offset(ky, kx))

    def prepare(self, x_flat, b):
        """The image, padded with zeros, as ``xp[c, hp, phase, wq]`` (an NHWC image is
        transposed on the way)."""
        problem, window, hp, row = self.problem, self.problem.window, self.hp, self.row
        xp = T.alloc_buffer((self.channels * self.plane_size,), problem.dtype, scope="global")
        image = b * problem.x_strides().batch
        if not window.channels_last:
            with T.parallel(0, self.channels) as c:
                self.fill_plane(x_flat, image, c, xp, c * self.plane_size)
            return xp
        with T.parallel(0, self.channels) as c:
            self._fill_padding_rows(xp, c * self.plane_size)
        # An NHWC row holds every channel: read it whole (from L1) before the next one.
        with T.parallel(0, self._image_rows) as iy:
            with T.serial(0, self.channels) as c:
                source = image + c * window.channel_stride + iy * window.row_stride
                self._copy_row(x_flat, xp, source, (c * hp + iy + self.top) * row)
        return xp

    @property
    def plane_size(self) -> int:
        """Elements of one channel's padded copy."""
        return self.hp * self.row

    def plane_offset(self, ky: int, kx: int) -> int:
        """Where tap ``(ky, kx)`` of an output pixel reads, from the pixel's origin within a
        channel's padded copy (its column phase, then its column within the phase)."""
        return ky * self.row + kx % self.sw * self.wq + kx // self.sw

    @property
    def _image_rows(self) -> int:
        """Rows of the image that the taps read."""
        return min(self.h, self.hp - self.top)

    def fill_plane(self, x_flat, image, c, xp, start):
        """Channel ``c`` of the image at ``image`` in ``x_flat``, padded, into ``xp[start :
        start + plane_size]``."""
        window = self.problem.window
        self._fill_padding_rows(xp, start)
        with T.serial(0, self._image_rows) as iy:
            source = image + c * window.channel_stride + iy * window.row_stride
            self._copy_row(x_flat, xp, source, start + (iy + self.top) * self.row)

    def _fill_padding_rows(self, xp, start):
        for py in [*range(self.top), *range(self.top + self._image_rows, self.hp)]:
            _fill(xp, start + py * self.row, self.row, zero(self.problem.dtype))

    def _copy_row(self, x_flat, xp, source, start):
        """Input row ``source`` into the copy's row ``start``, split into column phases with
        the padding columns zero."""
        sw, wq, pixel = self.sw, self.wq, self.problem.window.pixel_stride
        cols, pad = min(self.w, self.row - self.left), zero(self.problem.dtype)
        for phase in range(sw):  # padded column sw * q + phase is image column sw * q + phase - left
            lo = min(wq, max(0, -(-(self.left - phase) // sw)))
            hi = min(wq, max(lo, -(-(self.left + cols - phase) // sw)))
            first = lo * sw + phase - self.left

            _fill(xp, start + phase * wq, lo, pad)
            _gather(xp, start + phase * wq + lo, hi - lo, x_flat, source + first * pixel, sw * pixel)
            _fill(xp, start + phase * wq + hi, wq - hi, pad)

    def loop(self):
        return T.parallel(0, self.oh * self.tiles_per_row)

    def tile_reader(self, x_flat, b):
        """``reader(tile)`` of the padded copy, which every tile shares."""
        xp = self.prepare(x_flat, b)
        return lambda tile: self.reader(xp, b, tile)

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


def fma(a, b, c, dtype: str):
    """``a * b + c``, fused (LLVM's ``fmuladd``)."""
    return tirx.call_llvm_pure_intrin(dtype, "llvm.fmuladd", a, b, c)


def _fill(buf, start, count: int, value, width: int = 16):
    """``buf[start + i] = value(i)`` (or a constant) for ``i < count``, in vectors of at
    most ``width``."""
    for lo in range(0, count, width):
        with T.vectorized(0, min(width, count - lo)) as i:
            T.buffer_store(buf, value(lo + i) if callable(value) else value, [start + lo + i])


# Strides up to this gather from one contiguous load (a strided vector load is one scalar load per lane).
_SHUFFLE_MAX_STRIDE = 4


def _gather(buf, start, count: int, source_buf, source, stride: int, width: int = 16):
    """``buf[start + i] = source_buf[source + i * stride]`` for ``i < count``, in vectors of
    at most ``width``; small strides (a strided convolution's column phases) as a contiguous
    load of the span, shuffled."""
    if stride == 1 or stride > _SHUFFLE_MAX_STRIDE:
        _fill(buf, start, count, lambda i: source_buf[source + i * stride], width)
        return
    for lo in range(0, count, width):
        lanes = min(width, count - lo)
        first = source + lo * stride
        if lanes == 1:
            T.buffer_store(buf, source_buf[first], [start + lo])
            continue
        span = tirx.BufferLoad(source_buf, [_ramp(first, (lanes - 1) * stride + 1)])
        picked = tirx.Shuffle([span], [tirx.IntImm("int32", lane * stride) for lane in range(lanes)])
        T.buffer_store(buf, picked, [_ramp(start + lo, lanes)])


def _ramp(base, lanes: int):
    base = tirx.convert(base)
    return tirx.Ramp(base, tirx.const(1, str(base.ty)), lanes)


def store_tile(problem: SpmmProblem, rows, ops, yt, y_flat, r_flat, b, tiling, tile, bias=None):
    """``yt`` (the rows' sums) to ``Y``, the epilogue's ``ops`` applied: a vector per row
    for a whole tile whose columns are neighbours in Y, else one column at a time up to the
    last one."""
    ys, dtype, lanes = problem.y_strides(), problem.dtype, tiling.lanes
    first = tiling.first(tile)

    def store(lane):
        for i, m in enumerate(rows):
            offset = b * ys.batch + m * ys.k + (first + lane) * ys.n
            T.buffer_store(y_flat, apply_epilogue(ops, yt[i * lanes + lane], m, dtype, r_flat, offset, bias), [offset])

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


def _x_element(problem: SpmmProblem, x_flat, b, k, n, columns, checked: bool = True):
    """``X`` at (image ``b``, column ``k`` of ``A``, column ``n``); ``checked``, zero past the
    last column."""
    xs = problem.x_strides()
    element = x_flat[b * xs.batch + k * xs.k + n * xs.n]
    return tirx.if_then_else(n < columns, element, zero(problem.dtype)) if checked else element


def whole(buf):
    return buf[tuple(slice(0, d) for d in buf.shape)]


def flat_view(buf):
    size = tirx.IntImm("int64", 1)
    for d in buf.shape:
        size = size * d
    return T.decl_buffer((size,), buf.dtype, data=buf.data)


def scratch(elements: int, dtype: str):
    scope = "local" if elements * 4 <= _STACK_BYTES else "global"
    return T.alloc_buffer((elements,), dtype, scope=scope)


def zero(dtype):
    return tirx.const(0, dtype)


def apply_epilogue(ops, value, m, dtype: str, residual=None, offset=None, bias=None):
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


def split_epilogue(problem: SpmmProblem):
    """The epilogue's ops up to the residual add, which run on whole vectors of sums, and
    the rest, which run as each value is stored (they read the residual)."""
    split = next((i for i, op in enumerate(problem.epilogue) if isinstance(op, ResidualAdd)), len(problem.epilogue))
    return problem.epilogue[:split], problem.epilogue[split:]


def lanes_within(lanes: int, width: int) -> int:
    """``lanes``, but no wider than ``width`` columns (rounded up to a power of two): one
    tile of a matrix-vector product is one column wide, one of a 7x7 image's rows 8."""
    return min(lanes, 1 << max(0, width - 1).bit_length())


def static_tile_count(problem: SpmmProblem, lanes: int) -> int | None:
    """Tiles per image of ``lanes`` columns, where the column count is known before run time."""
    if problem.window is not None:
        rows, width = problem.window.output_size
        return rows * -(-width // lanes_within(lanes, width))
    columns = problem.static_columns
    return None if columns is None else -(-columns // lanes)


def tiling_for(problem: SpmmProblem, columns, lanes: int):
    return (ColumnTiles if problem.window is None else RowTiles)(problem, columns, lanes)


@contextmanager
def kernel_body(name: str, problem: SpmmProblem, x_dims, y_dims, arrays=(), simplify: bool = True):
    """Inside ``T.prim_func()``: names the kernel, declares its buffers in the order Relax
    passes them (``x``, the residual where the epilogue adds one, ``arrays`` as ``(name,
    shape, dtype)`` each, ``y``) and opens its root block. Yields ``(x, residual or None,
    [arrays], y)``, ``x``, the residual and ``y`` as flat views. Without ``simplify`` the
    kernel is lowered without TIR's simplifier."""
    T.func_name(name)
    attrs = {"tirx.noalias": True, "op_pattern": OPAQUE_PATTERN, KERNEL_ATTR: True}
    T.func_attr(attrs if simplify else attrs | {UNSIMPLIFIED_ATTR: True})
    dtype = problem.dtype
    x = T.match_buffer(T.arg("x", T.handle()), x_dims, dtype)
    residual = T.match_buffer(T.arg("residual", T.handle()), y_dims, dtype) if problem.has_residual else None
    buffers = [T.match_buffer(T.arg(label, T.handle()), shape, kind) for label, shape, kind in arrays]
    y = T.match_buffer(T.arg("y", T.handle()), y_dims, dtype)
    with T.sblock("root"):
        T.reads(*[whole(b) for b in (x, residual, *buffers) if b is not None])
        T.writes(whole(y))
        yield flat_view(x), flat_view(residual) if residual is not None else None, buffers, flat_view(y)


def values_and_biases(problem: SpmmProblem, weights: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """A data-driven kernel's ``values`` array: ``weights``, then each bias add's values (and a
    spare zero, so that the array is never empty); and where each bias add's values start."""
    biases = [np.asarray(op.values, problem.dtype) for op in problem.epilogue if isinstance(op, BiasAdd)]
    values = np.concatenate([np.asarray(weights, problem.dtype).ravel(), *biases, np.zeros(1, problem.dtype)])
    starts = np.cumsum([weights.size] + [len(b) for b in biases])[:-1]
    return values, tuple(int(start) for start in starts)


def bias_reader(problem: SpmmProblem, values, starts):
    """``bias(op, m)`` for ``apply_epilogue``: row ``m``'s value of bias add ``op``, read from
    the ``values`` buffer where the bias adds' values start at ``starts``."""
    start = {id(op): first for op, first in zip((op for op in problem.epilogue if isinstance(op, BiasAdd)), starts)}
    return lambda op, m: values[start[id(op)] + m]
