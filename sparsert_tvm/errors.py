"""Exceptions raised by sparsert_tvm."""


class SparseRTError(RuntimeError):
    """Base class of the errors sparsert_tvm raises on purpose."""


class UnsupportedProblem(SparseRTError):
    """A kernel generator cannot handle this operator; it stays on TVM's dense path.

    The message is the reason shown in the report.
    """


class ToolchainError(SparseRTError):
    """A compiler tool the CUDA path needs (ptxas, nvlink) is missing or failed."""


class RuntimeUnavailable(SparseRTError):
    """The machine lacks a runtime the target needs (e.g. TVM's CUDA runtime)."""
