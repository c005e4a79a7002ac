"""The Relax rewrite: find sparse-weight operators, replace them with generated kernels."""

from .sparsify import CPU_MIN_GROUP_CHANNELS, DEFAULT_DENSITY_THRESHOLD, SMALL_CONVOLUTION_NNZ, SparsifyWeights

__all__ = ["CPU_MIN_GROUP_CHANNELS", "DEFAULT_DENSITY_THRESHOLD", "SMALL_CONVOLUTION_NNZ", "SparsifyWeights"]
