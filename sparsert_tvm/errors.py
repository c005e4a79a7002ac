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


@tvm_ffi.register_error
class UnbuildableByTvm(SparseRTError):
    """The pass left TVM an operator that TVM cannot build (an NHWC transposed convolution):
    raised before ``tvm.compile`` fails deep inside its VM code generator."""


@tvm_ffi.register_error
class WrongOutput(UnsupportedProblem):
    """A generated kernel's output differs from the dense reference (found while tuning):
    the candidate is dropped, and where it is the default, the layer stays dense."""


def last_line(error: BaseException) -> str:
    """The last line of an error's message (TVM's errors end with the one that says what
    failed, after a C++ backtrace), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
