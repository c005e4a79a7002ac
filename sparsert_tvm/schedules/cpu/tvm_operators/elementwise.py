"""Operators of injective blocks only: activations, adds, casts, layout changes."""

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import PARALLEL_MIN_ELEMENTS, vector_lanes


class Elementwise(CPUScheduleRule):
    """Every block inlined into the one that writes the output, its loops fused into one,
    cut into vectors where the count is static and a multiple of the lanes, and shared out
    between threads where it is large."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or not all(block.is_injective() for block in blocks):
            return None
        blocks = try_inline(sch, blocks)
        if len(blocks) != 1:
            return None
        block = blocks[0].block_rv
        loops = sch.get_loops(block)
        if not loops:
            return None
        loop = sch.fuse(*loops)
        extent = get_extent(sch, loop)
        lanes = vector_lanes(target, sch.get(block).writes[0].source.dtype.bits)
        if isinstance(extent, int) and extent % lanes == 0 and lanes > 1:
            loop, vector = sch.split(loop, [None, lanes])
            sch.vectorize(vector)
        if not isinstance(extent, int) or extent >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(loop)
        return sch
