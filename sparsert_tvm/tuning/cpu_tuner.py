"""Tuning on the CPU: the same search as on CUDA (``tuner.Tuner``), over the CPU kernels.

Each layer's candidates are its default config, the other kernel (the data-driven one, or
the unrolled one up to ``TuneOptions.cpu_unrolled_max_nnz`` nonzeros, past the default's
cap of 16k where its build takes a minute or more but it ran ResNet-50's 3x3 layers 1.8x
faster on 2 cores) and a few tilings of the data-driven kernel. They are built and timed on
this host, their outputs first checked against numpy's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
import tvm_ffi

from ..problem import SpmmProblem
from ..schedules.base import BuiltKernel
from ..schedules.config import CpuConfig, CpuCsrConfig, CpuDepthwiseConfig, CpuSpmmConfig
from . import cpu_config, default_cpu_config
from .measure import random_arrays
from .tuner import Runner, Timer, TuneOptions, Tuner


class CpuTuner(Tuner):
    """Chooses configs for the CPU rule: database first, then timing on this host."""

    @staticmethod
    def target_id(target) -> str:
        # The tuned speed depends on the machine's cores and vectors, which the target's
        # name (llvm -mcpu=...) tells and TVM's threads do not change between builds.
        return str(tvm.target.Target(target))

    @staticmethod
    def timing(options: TuneOptions) -> str:
        return "cold" if options.timer is None else getattr(options.timer, "l2", "custom")

    def candidates(self, problem: SpmmProblem, options: TuneOptions) -> list[CpuConfig]:
        return cpu_candidates(problem, self.target, options)[: options.max_candidates]

    def prepare(self, problem, configs, name, options) -> None:
        """Nothing is built ahead: LLVM builds one candidate at a time, each on every core."""

    @staticmethod
    def timer(options: TuneOptions) -> Timer:
        return options.timer or (lambda built, target: time_on_cpu(built, options.symbolic_size))

    @staticmethod
    def runner(options: TuneOptions) -> Runner:
        return options.runner or run_on_cpu

    @staticmethod
    def variants(problem, best, segmented, options) -> list:
        return []


def cpu_candidates(problem: SpmmProblem, target, options: TuneOptions) -> list[CpuConfig]:
    """The default first, then the data-driven kernel (its default tiling, with 4 chains and
    with half its lanes), then the unrolled kernel where the layer has at most
    ``options.cpu_unrolled_max_nnz`` nonzeros; depthwise layers: their kernel with 1, 2 and
    4 output rows at a time."""
    default = default_cpu_config(problem, target)
    if isinstance(default, CpuDepthwiseConfig):
        configs = [default] + [dataclasses.replace(default, output_rows=rows) for rows in (1, 2, 4)]
    else:
        csr = cpu_config(problem, CpuCsrConfig.KERNEL, target)
        configs = [default, csr, dataclasses.replace(csr, chains=4)]
        if csr.vector_lanes > 8:
            configs.append(dataclasses.replace(csr, vector_lanes=csr.vector_lanes // 2))
        if problem.weight.nnz <= options.cpu_unrolled_max_nnz:
            configs.append(cpu_config(problem, CpuSpmmConfig.KERNEL, target))
    return list(dict.fromkeys(configs))  # the default once, in its place


def _arguments(built: BuiltKernel, arrays: list[np.ndarray]) -> list:
    """The kernel's arguments: X (and the residual), its constant arrays, then Y."""
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    return tensors[:-1] + [tvm.runtime.tensor(c) for c in built.constants] + tensors[-1:]


def run_on_cpu(built: BuiltKernel, target, arrays: list[np.ndarray]) -> np.ndarray:
    """``built``'s output for ``arrays`` (its operands, the output last), run once."""
    args = _arguments(built, arrays)
    built.external_modules[0][built.extern](*args)
    return args[-1].numpy()


# Bytes written before each timed call: more than the last-level cache a core shares
# (32 MB on an EPYC's core complex).
CACHE_SCRUB_BYTES = 64 << 20
_BEFORE_CPU_CALL = "sparsert.before_cpu_call"


def time_on_cpu(built: BuiltKernel, symbolic_size: int = 1, calls: int = 20) -> float:
    """Microseconds of one call that finds its input in cache but its code and constants in
    memory, as in a whole model, where every kernel's code and weights come back from
    memory: the median of ``calls``, each after writing ``CACHE_SCRUB_BYTES`` and reading the
    input."""
    module = built.external_modules[0]
    args = _arguments(built, random_arrays(built.problem, symbolic_size))
    module[built.extern](*args)
    scrub = np.zeros(CACHE_SCRUB_BYTES // 8)

    def before_call(*_):
        np.add(scrub, 1.0, out=scrub)
        args[0].numpy()  # reads the input back into cache

    tvm_ffi.register_global_func(_BEFORE_CPU_CALL, before_call, override=True)
    try:
        evaluator = module.time_evaluator(built.extern, tvm.cpu(), number=1, repeat=calls, f_preproc=_BEFORE_CPU_CALL)
        return float(np.median(evaluator(*args).results)) * 1e6
    finally:
        tvm_ffi.remove_global_func(_BEFORE_CPU_CALL)
