"""Operators of injective blocks only: activations, adds, casts, layout changes."""

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm_ffi import get_global_func

from .common import PARALLEL_MIN_ELEMENTS, vector_lanes

has_if_then_else = get_global_func("s_tir.schedule.HasIfThenElse")


class Elementwise(CPUScheduleRule):
    """Every block inlined into the one that writes the output; its innermost loop cut into
    vectors where its count is static and a multiple of the lanes (else left to LLVM), the
    loops around it fused and shared out between threads where the operator is large.

    Fusing the innermost loop too would make one vector straddle rows: through the index
    arithmetic of rows whose length is not a multiple of the lanes (56 pixels, say) LLVM
    then loads and stores lane by lane, and a SiLU of a 256x56x56 map ran 1.7x slower than
    unscheduled."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or not all(block.is_injective() for block in blocks):
            return None
        blocks = try_inline(sch, blocks)
        if len(blocks) != 1 or has_if_then_else(sch.get(blocks[0].block_rv)):
            return None  # concatenations and pads: vectors would read every side of each select
        block = blocks[0].block_rv
        *outer, inner = sch.get_loops(block) or [None]
        if inner is None:
            return None
        extents = [get_extent(sch, loop) for loop in (*outer, inner)]
        lanes = vector_lanes(target, sch.get(block).writes[0].source.dtype.bits)
        if isinstance(extents[-1], int) and extents[-1] % lanes == 0 and lanes > 1:
            inner, vector = sch.split(inner, [None, lanes])
            sch.vectorize(vector)
            outer = outer or [inner]  # a single loop: its vectors are what the threads share
        static = all(isinstance(extent, int) for extent in extents)
        if outer and (not static or math.prod(extents) >= PARALLEL_MIN_ELEMENTS):
            sch.parallel(sch.fuse(*outer))
        return sch
