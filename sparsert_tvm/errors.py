"""Exceptions raised by sparsert_tvm.

They are registered with TVM's FFI so that they keep their type when raised inside a pass
that TVM's pass infrastructure (C++) calls.
"""

import tvm_ffi


@tvm_ffi.register_error
class SparseRTError(RuntimeError):
    """Base class of the errors sparsert_tvm raises on purpose."""


@tvm_ffi.register_error
class UnsupportedProblem(SparseRTError):
    """A kernel generator cannot handle this operator; it stays on TVM's dense path.

    The message is the reason shown in the report.
    """


@tvm_ffi.register_error
class ToolchainError(SparseRTError):
    """A compiler tool the CUDA path needs (ptxas, nvlink) is missing or failed."""


@tvm_ffi.register_error
class RuntimeUnavailable(SparseRTError):
    """The machine lacks a runtime the target needs (e.g. TVM's CUDA runtime)."""
