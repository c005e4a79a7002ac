"""The Relax rewrite: find sparse-weight operators, replace them with generated kernels."""

from .sparsify import DEFAULT_DENSITY_THRESHOLD, SMALL_CONVOLUTION_NNZ, SparsifyWeights

__all__ = ["DEFAULT_DENSITY_THRESHOLD", "SMALL_CONVOLUTION_NNZ", "SparsifyWeights"]
