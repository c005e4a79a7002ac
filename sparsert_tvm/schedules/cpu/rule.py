"""CPU (``llvm`` target) kernels, unrolled (``kernel``), data-driven (``csr_kernel``) or for
depthwise convolutions (``depthwise_kernel``): TIR written here and compiled here, each into
an LLVM module of its own that rides in the IRModule's ``external_mods`` and that Relax calls
with ``call_dps_packed`` (the data-driven kernels' arrays as constant arguments).

Compiled with the model instead, all kernels went through one LLVM module, lowered and then
turned into machine code one function after another when the module was first loaded (about
0.6 ms per nonzero on 2 cores: most of a whole model's build). Apart, a model's kernels are
lowered and turned into machine code side by side, one per core, during the pass; TVM
releases Python's lock while it does.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import tvm

from ...errors import UnsupportedProblem
from ...tuning import cpu_config, default_cpu_config
from ..base import (
    BuiltKernel,
    KernelJob,
    SparseKernelRule,
    default_jobs,
    require_dtype,
    require_nnz_at_most,
    unless_unsupported,
)
from ..config import CPU_CONFIGS, CpuConfig, CpuCsrConfig, CpuDepthwiseConfig, CpuSpmmConfig, config_from_dict
from .csr_kernel import cpu_csr_kernel
from .depthwise_kernel import cpu_depthwise_kernel, require_depthwise
from .kernel import SUPPORTED_DTYPES, cpu_spmm_kernel
from .lowering import KERNEL_LLVM_OPTIONS, register_pipeline, with_llvm_options


class CpuSpmmRule(SparseKernelRule):
    dtypes = SUPPORTED_DTYPES
    config_class = CpuSpmmConfig
    config_classes = (CpuSpmmConfig, CpuCsrConfig, CpuDepthwiseConfig)

    def is_target(self, target):
        return target.kind.name == "llvm"

    def check(self, problem, config):
        if isinstance(config, CpuCsrConfig):
            require_dtype(problem, self.dtypes, self.__class__.__name__)
            require_nnz_at_most(problem, config.max_layer_nnz, "the CSR kernel's cap", "its offsets are 32-bit")
        elif isinstance(config, CpuDepthwiseConfig):
            require_dtype(problem, self.dtypes, self.__class__.__name__)
            require_depthwise(problem)
        else:
            super().check(problem, config)

    def config_from_dict(self, fields):
        return config_from_dict(fields, CPU_CONFIGS, "CPU")

    def with_overrides(self, problem, config, overrides, target=None):
        # Overrides name their kernel ("kernel": "csr"); without it they are the unrolled one's.
        fields = dict(overrides)
        kernel = fields.pop("kernel", CpuSpmmConfig.KERNEL)
        if kernel not in CPU_CONFIGS:
            raise ValueError(f"unknown CPU kernel {kernel!r}; known: {sorted(CPU_CONFIGS)}")
        if config.KERNEL != kernel:
            config = cpu_config(problem, kernel, target or _host_cpu())  # that kernel's tiling for the CPU
        return dataclasses.replace(config, **fields)

    def default_config(self, problem, target):
        return default_cpu_config(problem, target)

    def build(self, problem, config: CpuConfig, target, name) -> BuiltKernel:
        return self._compile(self._write(KernelJob(problem, config, name)), target)

    def build_all(self, jobs, target):
        """The kernels' TIR is written one after another (TVM's IR builder keeps state), then
        lowered and compiled side by side."""
        written = [unless_unsupported(self._write, job) for job in jobs]

        def compile_one(kernel):
            return kernel if isinstance(kernel, UnsupportedProblem) else self._compile(kernel, target)

        with ThreadPoolExecutor(max_workers=default_jobs()) as pool:
            return list(pool.map(compile_one, written))

    @staticmethod
    def _write(job: KernelJob) -> tuple[KernelJob, tvm.tirx.PrimFunc, tuple, float]:
        start = time.perf_counter()
        name = _kernel_name(job.name)
        if isinstance(job.config, CpuCsrConfig):
            func, arrays = cpu_csr_kernel(job.problem, job.config, name)
            constants = (arrays.values, arrays.index)
        elif isinstance(job.config, CpuDepthwiseConfig):
            func, arrays = cpu_depthwise_kernel(job.problem, job.config, name)
            constants = (arrays.values, arrays.channels)
        else:
            func, constants = cpu_spmm_kernel(job.problem, job.config, name), ()
        return job, func, constants, time.perf_counter() - start

    @staticmethod
    def _compile(written, target) -> BuiltKernel:
        job, func, constants, seconds = written
        start = time.perf_counter()
        name = _kernel_name(job.name)
        target = with_llvm_options(tvm.target.Target(target), KERNEL_LLVM_OPTIONS)
        module = tvm.tirx.build(tvm.IRModule({name: func}), target=target, pipeline=register_pipeline())
        module.get_function(name)  # LLVM makes the machine code at the first lookup: here, side by side
        return BuiltKernel(
            func=None,
            extern=name,
            problem=job.problem,
            external_modules=[module],
            constants=constants,
            params=job.config.as_dict(),
            compile_seconds=seconds + time.perf_counter() - start,
        )


def _host_cpu():
    from ...build import host_cpu_target  # the package's entry points import the rules

    return host_cpu_target()


def _kernel_name(name: str) -> str:
    # The packed function's symbol; the layer's name stays free for a PrimFunc of the module.
    return f"{name}_kernel"
