"""Kernel generation per target: one rule per kind of target behind ``SparseKernelRule``."""

from __future__ import annotations

from .base import BuiltKernel, SparseKernelRule
from .config import CpuCsrConfig, CpuDepthwiseConfig, CpuSpmmConfig, CudaCsrConfig, CudaSpmmConfig, KernelConfig
from .cpu.rule import CpuSpmmRule
from .cuda.rule import CudaSpmmRule

RULES: tuple[SparseKernelRule, ...] = (CudaSpmmRule(), CpuSpmmRule())


def rule_for(target) -> SparseKernelRule | None:
    """The rule generating kernels for ``target``, or None if no rule handles it."""
    return next((rule for rule in RULES if rule.is_target(target)), None)


__all__ = [
    "RULES",
    "BuiltKernel",
    "CpuCsrConfig",
    "CpuDepthwiseConfig",
    "CpuSpmmConfig",
    "CudaCsrConfig",
    "CudaSpmmConfig",
    "KernelConfig",
    "SparseKernelRule",
    "rule_for",
]
