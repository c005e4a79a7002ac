"""What the rules share: the vector width, when a loop is worth threads, and what tells a
product or a norm from a convolution."""

from tvm import s_tir
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width
from tvm.tirx.analysis import undefined_vars

# Elements below which an operator stays on one thread: waking the thread pool costs about
# 10 us on the 2-core machine, about what one core takes to copy this many elements (a
# 98k-element transpose ran 12 us on one thread, 22 us on two).
PARALLEL_MIN_ELEMENTS = 1 << 17


def vector_lanes(target: Target, bits: int) -> int:
    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 1)


def reads_one_iterator_per_index(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether each index of each buffer the block reads depends on one of its iterators at
    most: true of products, softmax and norms; false of convolutions and pools, whose
    windows add an output and a reduction iterator (``h + ry``)."""
    stmt = sch.get(block)
    iterators = [iterator.var for iterator in stmt.iter_vars]

    def count(expr) -> int:
        return sum(any(var.same_as(iterator) for iterator in iterators) for var in undefined_vars(expr))

    return all(count(dim.min) <= 1 for region in stmt.reads for dim in region.region)
