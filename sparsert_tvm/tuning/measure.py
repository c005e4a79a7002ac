"""Timing one generated kernel on the device, with TVM's runtime only.

The kernel's launch wrapper is built on its own, given random operands of the problem's
shapes (symbolic dimensions take ``symbolic_size``), and timed with TVM's time evaluator.
``time_cold`` (the tuner's default) times single launches, each after overwriting the L2
and reading the input back: in a whole model a kernel's code and weights come from device
memory (a model's kernels hold far more code than the L2), and there tilings rank
differently than when one kernel is replayed with its code in L2 (on the H200,
benchmarks/results/cold-l2-h200.md). ``time_warm`` times many back-to-back launches between
two device synchronisations, best of several repeats. Both include the host's launch cost
(a few microseconds), which hides differences between kernels faster than that;
benchmarks/ times with CUDA graphs instead and can pass its own timer to the tuner.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import sym, tirx

from ..problem import SpmmProblem
from ..schedules.base import BuiltKernel, operand_shapes


def static_shape(dims, symbolic_size: int) -> tuple[int, ...]:
    """``dims`` with every symbolic variable set to ``symbolic_size``."""
    analyzer = sym.Analyzer()
    out = []
    for d in dims:
        if not isinstance(d, tirx.IntImm):
            for var in tirx.analysis.undefined_vars(d):
                analyzer.bind(var, symbolic_size)
        out.append(int(analyzer.simplify(d)))
    return tuple(out)


def random_arrays(problem: SpmmProblem, symbolic_size: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Random inputs and a zeroed output for the launch wrapper of a kernel of ``problem``
    (X as the kernel reads it, the residual if any, Y)."""
    x_dims, y_dims = operand_shapes(problem)
    x_shape, y_shape = static_shape(x_dims, symbolic_size), static_shape(y_dims, symbolic_size)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(x_shape).astype(problem.dtype)]
    if problem.has_residual:
        arrays.append(rng.standard_normal(y_shape).astype(problem.dtype))
    arrays.append(np.zeros(y_shape, problem.dtype))
    return arrays


def operands(built: BuiltKernel, device, symbolic_size: int = 1, seed: int = 0) -> list:
    """``random_arrays`` on ``device``."""
    return [tvm.runtime.tensor(a, device) for a in random_arrays(built.problem, symbolic_size, seed)]


def run_on_device(built: BuiltKernel, target, arrays: list[np.ndarray]) -> np.ndarray:
    """``built``'s output for ``arrays`` (its operands, the output last), launched once."""
    device = tvm.cuda(0)
    lib, name = build_launcher(built, target)
    tensors = [tvm.runtime.tensor(a, device) for a in arrays]
    lib[name](*tensors)
    return tensors[-1].numpy()


Runner = Callable[[BuiltKernel, object, list], np.ndarray]

# A candidate whose output is further than this from numpy's, relative to the output's
# scale, is wrong. Correct kernels differ by their order of accumulation: float32 by about
# 1e-6, float16 (accumulated in float16) by up to about 1e-2 on ResNet-50's layers.
OUTPUT_TOLERANCE = {"float32": 1e-3, "float16": 1e-1}


class OutputCheck:
    """Random operands of one problem and numpy's float64 answer for them, computed once for
    all the candidate kernels of a layer."""

    def __init__(self, problem: SpmmProblem, symbolic_size: int = 1):
        self.arrays = random_arrays(problem, symbolic_size, seed=1)
        x = self.arrays[0]
        # The kernel reads X^T; the reference takes X (as [N, K] where the kernel writes [N, M]).
        if problem.x_transposed:
            x = x.T if problem.runtime_row_stride else x.T.reshape(static_shape(problem.x_shape, symbolic_size))
        residual = self.arrays[1] if problem.has_residual else None
        self.expected = problem.reference(x, residual).astype(np.float64)

    def error(self, built: BuiltKernel, target, run: Runner) -> float:
        """``relative_error`` of ``built``'s output on the operands (``run``) against numpy's
        (NaN or infinite where the output is not finite)."""
        return relative_error(run(built, target, self.arrays).astype(np.float64), self.expected)


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, relative to the output's scale (at least 1)."""
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))) if expected.size else 0.0


def build_launcher(built: BuiltKernel, target):
    """The wrapper compiled into a runtime module, the kernel's cubin imported into it: once
    per target, kept on ``built`` (the tuner's output check and its timer share it)."""
    key = str(target)
    if key not in built.launchers:
        built.launchers[key] = _compile_launcher(built, target)
    return built.launchers[key]


def _compile_launcher(built: BuiltKernel, target):
    name = built.func.attrs["global_symbol"]
    lib = tvm.tirx.build(tvm.IRModule({name: built.func}), target=target)
    for module in built.external_modules:
        lib.import_module(module)
    return lib, name


def time_warm(built: BuiltKernel, target, symbolic_size: int = 1, min_ms: int = 20) -> float:
    """Microseconds per launch, its code and data in L2: the best of five repeats of about
    ``min_ms`` of back-to-back launches each."""
    device = tvm.cuda(0)
    lib, name = build_launcher(built, target)
    args = operands(built, device, symbolic_size)
    evaluator = lib.time_evaluator(name, device, number=20, repeat=5, min_repeat_ms=int(min_ms))  # TVM takes an int
    return float(min(evaluator(*args).results)) * 1e6


time_warm.l2 = "warm"  # what the tuner records as the timing of its candidates


# Bytes copied before each cold launch: more than twice the L2 of an H100 (50 MB) or H200 (60 MB).
L2_SCRUB_BYTES = 128 << 20
_BEFORE_COLD_LAUNCH = "sparsert.before_cold_launch"


def time_cold(built: BuiltKernel, target, symbolic_size: int = 1, launches: int = 30) -> float:
    """Microseconds of one launch that finds its input in L2 but its code, and all else, in
    device memory: the median of ``launches``, each timed alone after a device copy of
    ``L2_SCRUB_BYTES`` and one of the input (which reads it back into L2)."""
    device = tvm.cuda(0)
    lib, name = build_launcher(built, target)
    args = operands(built, device, symbolic_size)
    scrub = [tvm.runtime.empty((L2_SCRUB_BYTES // 4,), "int32", device) for _ in range(2)]
    input_copy = tvm.runtime.empty(args[0].shape, args[0].dtype, device)

    def before_launch(*_):  # TVM's evaluator calls it before each repeat, then synchronises
        scrub[1].copyfrom(scrub[0])
        input_copy.copyfrom(args[0])

    tvm_ffi.register_global_func(_BEFORE_COLD_LAUNCH, before_launch, override=True)
    try:
        evaluator = lib.time_evaluator(name, device, number=1, repeat=launches, f_preproc=_BEFORE_COLD_LAUNCH)
        return float(np.median(evaluator(*args).results)) * 1e6
    finally:  # lets the scrub buffers go
        tvm_ffi.remove_global_func(_BEFORE_COLD_LAUNCH)


time_cold.l2 = "cold"
