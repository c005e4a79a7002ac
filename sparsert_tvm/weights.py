"""A constant weight seen as the sparse matrix ``A[M, K]`` that the kernels multiply by.

Rows of ``A`` are output features (or output channels), columns are input features (or
input channels). Everything a kernel generator needs to know about the weight is computed
here once: the CSR structure, per-row nonzero counts, density, finiteness and a content
digest used to name and cache kernels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse


@dataclass(frozen=True, eq=False)
class SparseMatrix:
    """An immutable dense ``[M, K]`` weight and its CSR view."""

    dense: np.ndarray

    @classmethod
    def from_dense(cls, array: np.ndarray) -> SparseMatrix:
        array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {array.shape}")
        frozen = np.ascontiguousarray(array).copy()
        frozen.setflags(write=False)
        return cls(frozen)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dense.shape

    @property
    def dtype(self) -> str:
        return str(self.dense.dtype)

    @cached_property
    def csr(self) -> scipy.sparse.csr_matrix:
        # Explicit zeros never reach the kernels: only true nonzeros are unrolled.
        matrix = scipy.sparse.csr_matrix(self.dense)
        matrix.eliminate_zeros()
        matrix.sort_indices()
        return matrix

    @property
    def nnz(self) -> int:
        return int(self.csr.nnz)

    @property
    def density(self) -> float:
        size = self.dense.size
        return self.nnz / size if size else 0.0

    @cached_property
    def row_nnz(self) -> np.ndarray:
        return np.diff(self.csr.indptr)

    def row(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Column indices and values of the nonzeros of row ``m``, in column order."""
        lo, hi = self.csr.indptr[m], self.csr.indptr[m + 1]
        return self.csr.indices[lo:hi], self.csr.data[lo:hi]

    @cached_property
    def is_finite(self) -> bool:
        return bool(np.isfinite(self.dense).all())

    @cached_property
    def digest(self) -> str:
        """Hash of dtype, shape and bytes: two weights share kernels only if this matches."""
        h = hashlib.sha256()
        h.update(f"{self.dtype}:{self.shape}".encode())
        h.update(self.dense.tobytes())
        return h.hexdigest()
