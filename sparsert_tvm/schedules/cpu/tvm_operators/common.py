"""What the rules share: the vector width and when a loop is worth threads."""

from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

# Elements below which an operator stays on one thread: waking the thread pool costs a few
# microseconds, about what one core takes for this many elements.
PARALLEL_MIN_ELEMENTS = 16384


def vector_lanes(target: Target, bits: int) -> int:
    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 1)
