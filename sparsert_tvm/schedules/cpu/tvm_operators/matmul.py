"""Products of two activations: attention's Q·Kᵀ and P·V, and dense products left dense."""

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import reads_one_iterator_per_index, vector_lanes

TILE_ROWS = 4  # output rows per tile, fewer where the rows do not divide
# Vectors of sums per tile, in registers: 4 rows of 2 vectors, or 1 row of 8. With one row,
# wide tiles also read each row of B in long runs: a 768x768 product at N = 1 ran 650 us
# in tiles of 2 vectors.
TILE_ACCUMULATORS = 8


class ActivationMatmul(CPUScheduleRule):
    """``C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]`` (one reduction block of two
    operands, its iterators spatial then one reduction; ``i`` may be absent), optionally
    followed by an injective epilogue.

    Output tiles of up to 4 rows by 2 vectors (1 row by 8) are accumulated in a local buffer
    (registers, once the rows are unrolled) over the whole of ``k``, each step one row of B's
    vectors and a broadcast of A per row; the tiles of all batches and rows are shared out
    between threads, the epilogue applied as each tile is written. The sums run in ``k``
    order, as in TVM's unscheduled loop. Needs static ``i`` and ``j``; vectors are the widest
    power of two of lanes that divides ``j`` (8 of 16 for a 1000-class classifier, which
    ran unscheduled in 11-92 ms at N = 4-32 before), down to scalars."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or len(blocks) > 2 or not blocks[0].is_reduction():
            return None
        product, epilogue = blocks[0], blocks[1:]
        kinds = product.dom_kind()
        if not kinds.endswith("SR") or "R" in kinds[:-1] or len(sch.get(product.block_rv).reads) != 2:
            return None
        if epilogue and not epilogue[0].is_injective():
            return None
        if not reads_one_iterator_per_index(sch, product.block_rv):  # a convolution, through its window
            return None
        loops = sch.get_loops(product.block_rv)
        if not kinds.endswith("SSR"):  # a vector times a matrix: rows are a unit loop
            loops = [*loops[:-2], sch.add_unit_loop(loops[-2]), *loops[-2:]]
        *batch, rows, columns, k = loops
        row_count, column_count = get_extent(sch, rows), get_extent(sch, columns)
        if not isinstance(row_count, int) or not isinstance(column_count, int):
            return None
        lanes = vector_lanes(target, sch.get(product.block_rv).writes[0].source.dtype.bits)
        lanes = next(width for width in _halvings(lanes) if column_count % width == 0)
        tile_rows = next(rows for rows in _halvings(TILE_ROWS) if row_count % rows == 0)
        vectors = next(v for v in _halvings(TILE_ACCUMULATORS // tile_rows) if column_count % (lanes * v) == 0)
        tile_columns = lanes * vectors
        row_tiles, tile_row = sch.split(rows, [None, tile_rows])
        column_tiles, tile_column = sch.split(columns, [None, tile_columns])
        vector_tiles, vector = sch.split(tile_column, [None, lanes])
        sch.reorder(*batch, row_tiles, column_tiles, k, tile_row, vector_tiles, vector)
        tiles = sch.fuse(*batch, row_tiles, column_tiles)
        sums = sch.cache_write(product.block_rv, 0, "local")
        sch.reverse_compute_at(sums, tiles)
        if epilogue:
            sch.reverse_compute_inline(epilogue[0].block_rv)
        # Loop kinds first: once the reduction is decomposed, its update alone may not take them.
        if lanes > 1:
            *_, written = sch.get_loops(sums)
            sch.vectorize(vector)
            sch.vectorize(sch.split(written, [None, lanes])[1])
        sch.unroll(vector_tiles)
        sch.unroll(tile_row)
        sch.parallel(tiles)
        sch.decompose_reduction(product.block_rv, k)
        return sch


def _halvings(value: int) -> list[int]:
    """``value``, its half, its quarter, ... down to 1 (``value`` a power of two)."""
    return [value >> shift for shift in range(value.bit_length())]
