"""CPU (``llvm`` target) kernels: TIR built here, compiled by ``tvm.compile`` with the model."""

from __future__ import annotations

import time

from ...tuning import default_cpu_config
from ..base import BuiltKernel, SparseKernelRule
from ..config import CpuSpmmConfig
from .kernel import SUPPORTED_DTYPES, cpu_spmm_kernel


class CpuSpmmRule(SparseKernelRule):
    dtypes = SUPPORTED_DTYPES
    config_class = CpuSpmmConfig

    def is_target(self, target):
        return target.kind.name == "llvm"

    def default_config(self, problem, target):
        return default_cpu_config(problem, target)

    def build(self, problem, config: CpuSpmmConfig, target, name) -> BuiltKernel:
        start = time.perf_counter()
        func = cpu_spmm_kernel(problem, config, name)
        # The machine code is produced later by tvm.compile, together with the model;
        # its size is not known here.
        return BuiltKernel(func=func, problem=problem, params=config.as_dict(), compile_seconds=time.perf_counter() - start)
