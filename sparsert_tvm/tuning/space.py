"""The search space of the CUDA kernel's tiling, pruned and ranked before anything is timed.

Every combination of rows per block, threads, columns per thread, vector width and (where
images are computed apart) folding the batch into the columns that the generator accepts is scored with a rough model of the H100-class machine; the tuner only
compiles and times the best few. The model counts what the unrolled code makes the
machine do: instructions issued (FMAs plus one load per needed activation vector, shared
by the rows of a block), how many of them the busiest block issues in a row (the tail of
the launch), and how many warps can be resident to hide latency.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from functools import lru_cache

import numpy as np

from ..errors import UnsupportedProblem
from ..problem import SpmmProblem
from ..schedules.config import CudaSpmmConfig
from ..schedules.row_groups import group_rows
from . import default_cuda_config

ROWS_PER_BLOCK = (1, 2, 4, 8, 16)
THREADS = (32, 64, 128, 256)
COLUMNS_PER_THREAD = (1, 2)
VECTOR_WIDTHS = {"float32": (1, 2, 4), "float16": (1, 2, 4, 8)}
# Accumulator registers per thread beyond which ptxas starts spilling.
MAX_ACCUMULATORS = 64
# Instructions per nonzero (columns per thread x registers per vector): code size and
# ptxas time grow with it, and on the H100 more than 4 never paid (tuning-space-h100).
MAX_CODE_MULTIPLIER = 4
# Columns assumed for a symbolic column count.
SYMBOLIC_COLUMNS = 256


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the cost model needs to know about the GPU."""

    sms: int = 132
    warps_per_sm: int = 64
    registers_per_sm: int = 65536
    blocks_per_sm: int = 32


def candidates(problem: SpmmProblem, check, limit: int, machine: Machine = Machine()) -> list[CudaSpmmConfig]:
    """Up to ``limit`` configs, best estimate first; the untuned default is always among them.

    ``check(problem, config)`` raises ``UnsupportedProblem`` for configs the generator
    rejects.
    """
    default = default_cuda_config(problem)
    folds = (False, True) if problem.images_apart and problem.static_batch != 1 else (False,)
    scored = {}
    for rows, threads, cols, width, fold in itertools.product(
        ROWS_PER_BLOCK, THREADS, COLUMNS_PER_THREAD, VECTOR_WIDTHS[problem.dtype], folds
    ):
        config = dataclasses.replace(
            default, rows_per_block=rows, threads_per_block=threads, columns_per_thread=cols, vector_width=width,
            fold_batch=fold,
        )
        cost = estimated_cost(problem, config, machine)
        if cost is None:
            continue
        try:
            check(problem, config)
        except UnsupportedProblem:
            continue
        scored[config] = cost
    ranked = sorted(scored, key=scored.get)
    chosen = [default] + [c for c in ranked if c != default]
    return chosen[: max(1, limit)]


def estimated_cost(problem: SpmmProblem, config: CudaSpmmConfig, machine: Machine = Machine()) -> float | None:
    """A relative time estimate (cycles, roughly), or None for configs not worth trying."""
    lanes = _registers_per_vector(problem.dtype, config.vector_width)
    accumulators = config.rows_per_block * config.columns_per_thread * lanes
    if accumulators > MAX_ACCUMULATORS or config.columns_per_thread * lanes > MAX_CODE_MULTIPLIER:
        return None
    columns = problem.static_columns or SYMBOLIC_COLUMNS
    images = problem.static_batch or 1
    if config.fold_batch:
        columns, images = columns * images, 1
    per_block = config.threads_per_block * config.columns_per_thread * config.vector_width
    # Blocks of more than a warp only where at least half their columns exist.
    if config.threads_per_block > 32 and per_block > 2 * columns:
        return None
    tiles = math.ceil(columns / per_block)
    loads, fmas = _group_work(problem.weight, config.rows_per_block, config.balance_rows)
    per_thread = config.columns_per_thread * (loads + lanes * fmas)  # instructions of each group
    warps = config.threads_per_block // 32
    blocks = tiles * len(per_thread) * images
    issued = tiles * images * warps * float(per_thread.sum())
    registers = (accumulators + 2 * config.columns_per_thread * lanes + 24) * config.threads_per_block
    resident = min(
        machine.blocks_per_sm,
        machine.warps_per_sm // warps,
        max(1, machine.registers_per_sm // registers),
    )
    throughput = issued / (machine.sms * 2.0)  # about two warp instructions per SM and cycle
    slots = machine.sms * resident
    waves = math.ceil(blocks / slots)
    # Each wave lasts about as long as its slowest block's serial instruction stream; a
    # lone warp issues about one instruction every four cycles.
    tail = waves * float(per_thread.max()) * 4.0 / min(4, resident * warps)
    return max(throughput, tail)


def _registers_per_vector(dtype: str, width: int) -> int:
    return width // 2 if dtype == "float16" and width % 2 == 0 else width


@lru_cache(maxsize=256)
def _group_work(weight, rows_per_block: int, balance: bool):
    """Per row group: activation vectors loaded (distinct columns) and nonzeros.

    Cached by weight identity: the search scores many configs of the same weight.
    """
    groups = group_rows(weight.row_nnz, rows_per_block, balance)
    loads = np.empty(len(groups))
    nnz = np.empty(len(groups))
    for j, rows in enumerate(groups):
        columns = [weight.row(m)[0] for m in rows]
        loads[j] = len(np.unique(np.concatenate(columns)))
        nnz[j] = sum(len(c) for c in columns)
    return loads, nnz
