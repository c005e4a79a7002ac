"""Default configs of the CPU kernels: unrolled up to a build-time cap, else the CSR kernel,
depthwise convolutions their own; vector lanes from the target's registers."""

from __future__ import annotations

import tvm_ffi
from tvm.target.codegen import target_has_features

from ..problem import SpmmProblem
from ..schedules.config import (
    CpuConfig,
    CpuCsrConfig,
    CpuDepthwiseConfig,
    CpuSpmmConfig,
)


def default_cpu_config(problem: SpmmProblem, target) -> CpuConfig:
    return cpu_config(problem, default_cpu_kernel(problem), target)


# The CPU's unrolled kernel builds in about half a millisecond per nonzero on 2 cores (0.4 ms
# for ResNet-50's dense stem, 0.75 ms for a 59k-nonzero 3x3 layer), so it is the default up
# to 16k nonzeros (8 s at most). Against the CSR kernel on the 2-core machine it ran
# ResNet-50's stem 2.2x, its 3x3 layers at 10% 1.8-2.2x and 1x1 layers of 13k nonzeros
# 1.1-1.4x faster (benchmarks/results/resnet50-conv-cpu-2core.md, small-conv-cpu-2core.md);
# beyond the cap it would still be faster, at build times of a minute or more per layer.
CPU_UNROLLED_MAX_NNZ = 16384


def default_cpu_kernel(problem: SpmmProblem) -> str:
    """The CPU kernel ``problem`` gets by default: depthwise convolutions their own, other
    weights by their nonzeros."""
    from ..schedules.cpu.depthwise_kernel import input_channels

    if input_channels(problem) is not None:
        return CpuDepthwiseConfig.KERNEL
    return CpuSpmmConfig.KERNEL if problem.weight.nnz <= CPU_UNROLLED_MAX_NNZ else CpuCsrConfig.KERNEL


def cpu_vector_lanes(problem: SpmmProblem, target, registers: int = 2) -> int:
    """Columns per tile of ``registers`` SIMD registers on ``target`` (fewer where the product
    has fewer columns)."""
    from ..schedules.cpu.tiles import lanes_within

    lanes = max(1, registers * _vector_bits(target) // 32)
    columns = problem.static_columns
    return lanes if columns is None else lanes_within(lanes, columns)


def cpu_vector_registers(target) -> int:
    """SIMD registers of ``target``'s CPU: 32 with AVX-512 and on AArch64, else 16."""
    wide = target.kind.name == "llvm" and "aarch64" in str(target.attrs.get("mtriple", ""))
    return 32 if wide or target_has_features("avx512f", target) else 16


# Average nonzeros per row from which the CSR kernel sums a row in two chains.
_LONG_ROW_NNZ = 16
# Bytes of a staged tile of X above which the CSR kernel takes fewer lanes (see cpu_config).
_STAGED_TILE_BYTES = 256 * 1024
# Parallel tasks per image the CSR kernel aims for, per core: enough that uneven tasks even out.
_TASKS_PER_CORE = 4


def cpu_config(problem: SpmmProblem, kernel: str, target) -> CpuConfig:
    """The default tiling of CPU kernel ``kernel`` ("unrolled", "csr" or "depthwise") on ``target``."""
    if kernel == CpuSpmmConfig.KERNEL:
        # One register per row's sums, and as many rows per chunk as leave four registers for
        # the taps and values: 28 rows of 16 lanes ran ResNet-50's stem 2.2 ms against 2.3-2.6
        # ms for 22-32 rows or 32 lanes on the 2-core AVX-512 machine.
        return CpuSpmmConfig(vector_lanes=cpu_vector_lanes(problem, target, 1),
                             rows_per_chunk=cpu_vector_registers(target) - 4)
    if kernel == CpuDepthwiseConfig.KERNEL:
        # One register per vector, and four output rows at a time where the taps' values leave
        # registers for them (on the 2-core machine 1.0-1.4x faster than one row at 3x3, 1.15x
        # slower at 5x5).
        return CpuDepthwiseConfig(vector_lanes=cpu_vector_lanes(problem, target, 1),
                                  output_rows=4 if problem.taps <= 9 else 1)
    # Two registers per row's sums: on the 2-core AVX-512 machine 32 lanes ran 1.0-4x faster
    # than 16 on six ResNet/MobileNet-like layers (a tile's fixed costs are shared by more
    # columns, and each row's FMA chains interleave two registers). TVM reports 512 bits for
    # every x86 CPU tried (haswell and znver3 too), so AVX2 machines get 32 lanes as well: on
    # 2 cores of a znver3 (AVX2) 16 and 32 lanes ran within noise of each other on seven
    # ResNet-50 1x1 and 3x3 layers (32 took 0.90-1.16x the time of 16, 2026-12-04).
    lanes = cpu_vector_lanes(problem, target)
    # Outside a window the kernel first stages X's tiles, K rows of ``lanes`` columns each,
    # which every row then reads at its nonzeros' rows: past about 256 KB a tile falls out of
    # the core's share of cache, and BERT's 768x3072 layer (a 384 KB tile at 32 lanes) ran
    # 1.3x faster at 16 on the 2-core machine (1,464 against 1,902 us at N = 128).
    while problem.window is None and lanes > cpu_vector_lanes(problem, target, 1) \
            and problem.K * lanes * 4 > _STAGED_TILE_BYTES:
        lanes //= 2
    # Two chains pay on long rows (an FC layer at N = 1: 1.4x faster on the 2-core machine),
    # but the rest of an odd row costs a loop of its own: ResNet-50's and MobileNet's 1x1
    # layers of 32-64 input channels (3-6 nonzeros per row at 10%) ran 1.2-1.4x slower.
    long_rows = problem.weight.nnz >= _LONG_ROW_NNZ * problem.M
    return CpuCsrConfig(vector_lanes=lanes, row_blocks=cpu_row_blocks(problem, lanes), chains=2 if long_rows else 1)


def cpu_row_blocks(problem: SpmmProblem, lanes: int) -> int:
    """Row blocks per tile of the CSR kernel: a few tasks per core over the image's tiles
    (one block where the tiles alone give that many, and every core where the column count
    is only known at run time)."""
    from ..schedules.base import default_jobs
    from ..schedules.cpu.tiles import static_tile_count

    tiles = static_tile_count(problem, lanes) or 1
    wanted = _TASKS_PER_CORE * default_jobs()
    return max(1, min(problem.M, -(-wanted // tiles)))


def _vector_bits(target) -> int:
    get_width = tvm_ffi.get_global_func("target.llvm_get_vector_width", allow_missing=True)
    try:
        return int(get_width(target)) if get_width else 128
    except Exception:  # noqa: BLE001 - unknown CPUs get SSE-sized vectors
        return 128
