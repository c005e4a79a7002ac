"""Products of two activations: attention's Q·Kᵀ and P·V, and dense products left dense."""

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import reads_one_iterator_per_index, vector_lanes

TILE_ROWS = 4  # output rows per tile: their sums, with the vectors below, stay in registers
TILE_VECTORS = 2  # vectors of output columns per tile


class ActivationMatmul(CPUScheduleRule):
    """``C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]`` (one reduction block, its
    iterators spatial then one reduction), optionally followed by an injective epilogue.

    Output tiles of up to 4 rows by 2 vectors are accumulated in a local buffer (registers,
    once the rows are unrolled) over the whole of ``k``, each step one row of B's vectors
    and a broadcast of A per row; the tiles of all batches and rows are shared out between
    threads, the epilogue applied as each tile is written. The sums run in ``k`` order, as
    in TVM's unscheduled loop. Needs static ``i`` and ``j``, ``j`` a multiple of the lanes."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or len(blocks) > 2 or not blocks[0].is_reduction():
            return None
        product, epilogue = blocks[0], blocks[1:]
        if product.dom_kind()[-3:] != "SSR" or "R" in product.dom_kind()[:-1]:
            return None
        if epilogue and not epilogue[0].is_injective():
            return None
        if not reads_one_iterator_per_index(sch, product.block_rv):  # a convolution, through its window
            return None
        *batch, rows, columns, k = sch.get_loops(product.block_rv)
        row_count, column_count = get_extent(sch, rows), get_extent(sch, columns)
        lanes = vector_lanes(target, sch.get(product.block_rv).writes[0].source.dtype.bits)
        if not isinstance(row_count, int) or not isinstance(column_count, int) or column_count % lanes:
            return None
        tile_rows = next(r for r in (TILE_ROWS, 2, 1) if row_count % r == 0)
        tile_columns = lanes * (TILE_VECTORS if column_count % (lanes * TILE_VECTORS) == 0 else 1)
        row_tiles, tile_row = sch.split(rows, [None, tile_rows])
        column_tiles, tile_column = sch.split(columns, [None, tile_columns])
        vector_tiles, vector = sch.split(tile_column, [None, lanes])
        sch.reorder(*batch, row_tiles, column_tiles, k, tile_row, vector_tiles, vector)
        tiles = sch.fuse(*batch, row_tiles, column_tiles)
        sums = sch.cache_write(product.block_rv, 0, "local")
        sch.reverse_compute_at(sums, tiles)
        if epilogue:
            sch.reverse_compute_inline(epilogue[0].block_rv)
        *_, written = sch.get_loops(sums)
        _, written_vector = sch.split(written, [None, lanes])
        # Loop kinds first: once the reduction is decomposed, its update alone may not take them.
        for loop in (vector, written_vector):
            sch.vectorize(loop)
        sch.unroll(vector_tiles)
        sch.unroll(tile_row)
        sch.parallel(tiles)
        sch.decompose_reduction(product.block_rv, k)
        return sch
