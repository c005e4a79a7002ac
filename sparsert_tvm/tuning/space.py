"""The search space of the CUDA kernels' tiling, pruned and ranked before anything is timed.

Every combination of rows per block, threads, columns per thread, vector width and (where
images are computed apart) folding the batch into the columns that the generator accepts,
and of the CSR kernel's rows per block, columns per block, unrolling and warps per row, is
scored with a rough model of the H100-class machine in cycles; the tuner only compiles and
times the best few (through a convolution's window, always with the default's row-count
neighbours, which the model ranks poorly). For the unrolled code the model counts
instructions issued (FMAs plus one load per needed activation vector, shared by the rows of
a block), how many of them the busiest block issues in a row (the tail of the launch), how
many warps can be resident to hide latency, and the code itself streaming into the SMs
(once per column tile and image). For the CSR kernel: instructions per chunk of 32 nonzeros,
the bytes of its arrays (once per column tile and image) and the chain of dependent loads of
the longest row (shared by its warps); with lanes over columns, instructions per trip, the
activations' bytes through L1, and the longest row's trips (shared by its warps) each
waiting on an activation load.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from functools import lru_cache

import numpy as np

from ..errors import UnsupportedProblem
from ..problem import SpmmProblem
from ..schedules.config import CudaConfig, CudaCsrConfig, CudaSpmmConfig
from ..schedules.cuda.csr_layout import LANES, MAX_U16_COLUMNS
from ..schedules.row_groups import unrolled_row_groups
from .cuda_defaults import (
    column_vectors,
    default_column_lanes_config,
    default_cuda_config,
    folds_batch_by_default,
    register_caps,
    trimmed_threads,
    with_segment_budget,
)

ROWS_PER_BLOCK = (1, 2, 4, 8, 16)
# Not 512 or 1024: the cost model's fetch term expected their warps to share each
# instruction fetched, but on ResNet-50's batch-8 3x3 layers they ran 1.0-1.5x slower than
# 256 (benchmarks/results/threads-vary-h200.md), and they would crowd out better candidates.
THREADS = (32, 64, 128, 256)
COLUMNS_PER_THREAD = (1, 2)
# Slices per block (``split_k``) searched unless the caller asks for more: split kernels
# lost on every ResNet-50 3x3 layer timed on the H200 (benchmarks/results/split-k-h200.md),
# so the tuner only tries them where asked (``TuneOptions``).
SPLIT_K = (1,)
# Input channels staged in shared memory at a time (``stage_channels``) searched unless the
# caller asks for more: staging lost on every layer timed (staged-input-h200.md; 0: none).
STAGE_CHANNELS = (0,)
VECTOR_WIDTHS = {"float32": (1, 2, 4), "float16": (1, 2, 4, 8)}
# Accumulator registers per thread beyond which ptxas starts spilling.
MAX_ACCUMULATORS = 64
# Instructions per nonzero (columns per thread x registers per vector): code size and
# ptxas time grow with it, and on the H100 more than 4 never paid (tuning-space-h100).
MAX_CODE_MULTIPLIER = 4
# Columns assumed for a symbolic column count.
SYMBOLIC_COLUMNS = 256
# The CSR kernel's space (configs of equal cost keep this order: 4 rows first).
CSR_ROWS_PER_BLOCK = (4, 2, 8, 1)
CSR_COLUMNS_PER_BLOCK = (1, 2, 4, 8, 16)
CSR_UNROLL = (1, 2, 4)
# With lanes over columns: columns per block (1, 2 or 4 per lane) and nonzeros per trip.
CSR_COLUMN_LANE_TILES = (32, 64, 128)
CSR_COLUMN_UNROLL = (2, 4, 8)
# Warps sharing a row (either lanes).
CSR_WARPS_PER_ROW = (1, 2, 4)
# Through a window, column lanes are searched up to this many pixels (over the batch): on
# the H200 they lost 0.7-0.9x to the unrolled kernel at 196 and 2-7x at 392-25k
# (benchmarks/results/window-lanes-h200.md).
WINDOW_LANES_SEARCH_MAX_PIXELS = 256
# Bytes of machine code per instruction (sm_90).
INSTRUCTION_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the cost model needs to know about the GPU."""

    sms: int = 132
    warps_per_sm: int = 64
    registers_per_sm: int = 65536
    blocks_per_sm: int = 32
    # Unrolled code an SM takes in per cycle: on the H100, kernels of more than 500 KB of
    # code ran at a median 390 GB/s of cubin bytes times column tiles (160-1280 GB/s over
    # the 108 such cases of benchmarks/results/spmm-{paper-fp32,threshold}-h100.json), i.e.
    # 1.7 bytes per SM and cycle at 1.75 GHz.
    fetch_bytes_per_cycle: float = 1.7
    # Bytes per cycle from memory, the whole GPU (about 2.6 TB/s at 1.75 GHz).
    memory_bytes_per_cycle: float = 1500.0
    # Cycles of a global load that misses L1.
    load_latency: int = 500


def candidates(
    problem: SpmmProblem,
    check,
    limit: int,
    machine: Machine = Machine(),
    split_k: tuple[int, ...] = SPLIT_K,
    stage_channels: tuple[int, ...] = STAGE_CHANNELS,
) -> list[CudaConfig]:
    """Up to ``limit`` configs of both kernels, best estimate first; the untuned default is
    always among them. ``split_k``: the slices per block tried for the unrolled kernel.
    ``stage_channels``: through an NCHW window, the unrolled default also staging its input
    that many channels at a time, kept whatever the model thinks (it does not model them).

    ``check(problem, config)`` raises ``UnsupportedProblem`` for configs the generator
    rejects.
    """
    default = default_cuda_config(problem)
    unrolled = default_cuda_config(problem, CudaSpmmConfig.KERNEL)
    csr = default_cuda_config(problem, CudaCsrConfig.KERNEL)
    folds = (False, True) if folds_batch_by_default(problem) else (False,)  # only where folding changes anything
    space = [
        with_segment_budget(dataclasses.replace(
            unrolled, rows_per_block=rows, threads_per_block=_tile_threads(problem, threads, cols, width, fold, split),
            columns_per_thread=cols, vector_width=width, fold_batch=fold, **register_caps(rows),
            split_k=split, grid_split=1,
        ), problem)
        for rows, threads, cols, width, fold, split in itertools.product(
            ROWS_PER_BLOCK, THREADS, COLUMNS_PER_THREAD, VECTOR_WIDTHS[problem.dtype], folds, split_k
        )
        if threads % (32 * split) == 0
    ]
    space += [
        dataclasses.replace(csr, rows_per_block=rows, columns_per_block=cols, unroll=unroll, warps_per_row=warps)
        for rows, cols, unroll, warps in itertools.product(
            CSR_ROWS_PER_BLOCK, CSR_COLUMNS_PER_BLOCK, CSR_UNROLL, CSR_WARPS_PER_ROW
        )
    ]
    column_lanes = default_column_lanes_config(problem)
    space += [
        dataclasses.replace(
            column_lanes, rows_per_block=rows, columns_per_block=cols, unroll=unroll, warps_per_row=warps
        )
        for rows, cols, unroll, warps in itertools.product(
            CSR_ROWS_PER_BLOCK, CSR_COLUMN_LANE_TILES, CSR_COLUMN_UNROLL, CSR_WARPS_PER_ROW
        )
    ]
    neighbours = _row_neighbours(problem, default) + _grid_split_neighbours(default)
    neighbours += _staged(unrolled, stage_channels) + _sharing_columns(problem, default)
    space += neighbours
    scored = {}
    for config in space:
        cost = estimated_cost(problem, config, machine)
        if cost is None:
            continue
        try:
            check(problem, config)
        except UnsupportedProblem:
            continue
        scored[config] = cost
    ranked = sorted(scored, key=scored.get)
    neighbours = [c for c in neighbours if c in scored]
    chosen = [default] + neighbours + [c for c in ranked if c != default and c not in neighbours]
    return _with_both_kernels(chosen, max(1, limit), scored)


def _row_neighbours(problem: SpmmProblem, default: CudaConfig) -> list[CudaSpmmConfig]:
    """Through a window, the default with twice and half its rows per block, which every
    search keeps whatever the cost model thinks of them. On the H200 the fastest row count of
    ResNet-50's 3x3 layers was the default's or one of these on 29 of 30 layers timed
    (benchmarks/results/rows-vary-h200.md, block-shape-h200.md; stage 4 at stride 2 and
    batch 8: 8 rows against 4, 1.10x), while the model's favourite there was up to 3.8x
    slower than the fastest (it ranks the row counts of batch-1 layers poorly)."""
    if problem.window is None or not isinstance(default, CudaSpmmConfig):
        return []
    neighbours = []
    for rows in (2 * default.rows_per_block, default.rows_per_block // 2):
        if rows in ROWS_PER_BLOCK:
            changed = dataclasses.replace(default, rows_per_block=rows, **register_caps(rows))
            neighbours.append(with_segment_budget(changed, problem))
    return neighbours


def _grid_split_neighbours(default: CudaConfig) -> list[CudaSpmmConfig]:
    """A grid-split default with twice and half its shares, also kept whatever the model
    thinks: the model does not count the input each row group reads from L2, which is what
    the split is for."""
    if not isinstance(default, CudaSpmmConfig) or default.grid_split == 1:
        return []
    shares = (2 * default.grid_split, default.grid_split // 2)
    return [dataclasses.replace(default, grid_split=s) for s in shares if s in (1, 2, 4, 8)]


def _staged(unrolled: CudaSpmmConfig, stage_channels: tuple[int, ...]) -> list[CudaSpmmConfig]:
    """The unrolled default staging its input ``stage_channels`` channels at a time (the
    generator refuses what cannot be staged)."""
    return [unrolled.staged(c) for c in stage_channels if c != unrolled.stage_channels]


def _sharing_columns(problem: SpmmProblem, default: CudaConfig) -> list[CudaSpmmConfig]:
    """An unrolled default with its rows grouped to share columns, kept whatever the model
    thinks where that loads at least 5% fewer activations: not yet timed on a GPU, so the
    tuner's timing decides."""
    if not isinstance(default, CudaSpmmConfig) or not default.balance_rows or default.share_columns:
        return []
    rows = default.rows_per_block
    balanced_loads = _group_work(problem.weight, rows, True, False)[0].sum()
    if _group_work(problem.weight, rows, True, True)[0].sum() > 0.95 * balanced_loads:
        return []
    return [dataclasses.replace(default, share_columns=True)]


def _tile_threads(problem: SpmmProblem, threads: int, cols: int, width: int, fold: bool, split: int) -> int:
    """Through a window, the tiles' threads trimmed as the default's are (``trimmed_threads``);
    not for split blocks, whose slices need equal whole warps."""
    vectors, _ = column_vectors(problem, width, fold)
    if problem.window is None or vectors is None or split > 1:
        return threads
    return trimmed_threads(vectors, threads, cols)


def _with_both_kernels(chosen: list, limit: int, cost: dict) -> list:
    """The first ``limit`` of ``chosen``, where each kernel keeps at least a third of the
    places it has candidates for: the CSR kernel's model is not yet checked against a GPU,
    so neither kernel is ruled out by the model alone."""
    picked = chosen[:limit]
    for kernel in (CudaSpmmConfig.KERNEL, CudaCsrConfig.KERNEL):
        share = min(limit // 3, sum(c.KERNEL == kernel for c in chosen))
        extra = [c for c in chosen[limit:] if c.KERNEL == kernel][: share - sum(c.KERNEL == kernel for c in picked)]
        for config in extra:
            others = [i for i in range(1, len(picked)) if picked[i].KERNEL != kernel]
            if len(others) <= limit // 3:  # the other kernel keeps its share too
                break
            picked[others[-1]] = config
    return picked[:1] + sorted(picked[1:], key=lambda c: cost[c])


def estimated_cost(problem: SpmmProblem, config: CudaConfig, machine: Machine = Machine()) -> float | None:
    """A relative time estimate (cycles, roughly), or None for configs not worth trying."""
    if isinstance(config, CudaCsrConfig):
        return (_column_lanes_cost if config.column_lanes else _csr_cost)(problem, config, machine)
    lanes = _registers_per_vector(problem.dtype, config.vector_width)
    accumulators = config.rows_per_block * config.columns_per_thread * lanes
    if accumulators > MAX_ACCUMULATORS or config.columns_per_thread * lanes > MAX_CODE_MULTIPLIER:
        return None
    columns = problem.static_columns or SYMBOLIC_COLUMNS
    images = problem.static_batch or 1
    if config.fold_batch:
        columns, images = columns * images, 1
    split, shares = config.split_k, config.grid_split
    per_block = config.threads_per_block // split * config.columns_per_thread * config.vector_width
    # Blocks of more than a warp only where at least half their columns exist.
    if config.threads_per_block > 32 and per_block > 2 * columns:
        return None
    tiles = math.ceil(columns / per_block)
    loads, fmas = _group_work(problem.weight, config.rows_per_block, config.balance_rows, config.share_columns)
    instructions = config.columns_per_thread * (loads + lanes * fmas)  # of each group
    code = INSTRUCTION_BYTES * instructions
    # What each thread issues: its slice's (or grid share's) part, and storing, reloading
    # and adding the slices' (or shares') sums.
    per_thread = instructions / (split * shares) + (3 * accumulators if split > 1 else 0)
    per_thread += (shares + 1) * accumulators if shares > 1 else 0
    warps = config.threads_per_block // 32
    blocks = tiles * len(per_thread) * images * shares
    issued = tiles * images * shares * warps * float(per_thread.sum())
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
    # Each block streams its group's code once (all its slices' shares): all of it through
    # all the SMs, and the longest group's through one SM per wave.
    fetch = max(
        tiles * images * float(code.sum()) / (machine.sms * machine.fetch_bytes_per_cycle),
        math.ceil(blocks / machine.sms) * float(code.max()) / shares / machine.fetch_bytes_per_cycle,
    )
    return max(throughput, tail, fetch)


def _csr_cost(problem: SpmmProblem, config: CudaCsrConfig, machine: Machine) -> float | None:
    """Cycles of the CSR kernel: instructions, bytes of its arrays, the activations' L1
    wavefronts, and the longest row's chain of dependent loads (index, then activation, per
    trip of ``unroll`` chunks), which the row's warps share (and then meet at a barrier)."""
    columns = problem.static_columns or SYMBOLIC_COLUMNS
    cols, unroll, warps = config.columns_per_block, config.unroll, config.warps_per_row
    if cols > 1 and cols >= 2 * columns:  # a tile of mostly missing columns
        return None
    chunks = _row_chunks(problem.weight)
    longest = -(-int(chunks.max(initial=0)) // warps)  # chunks of the longest row's busiest warp
    if (unroll > 1 and unroll > longest) or (warps > 1 and warps > chunks.max(initial=0)):
        return None
    tiles, images = math.ceil(columns / cols), problem.static_batch or 1
    converts = 1 + cols if problem.dtype == "float16" else 0
    per_chunk = 4 + 2 * cols + converts + 3 / unroll  # value, index, address, loads and FMAs, loop
    padded_cols = 1 << (cols - 1).bit_length()
    per_warp = 40 + 4 * padded_cols + 2 * (5 - padded_cols.bit_length() + 1)  # slot, reduction, epilogue
    per_warp += 8 * (warps > 1)  # the partial sums through shared memory
    issued = tiles * images * (float(chunks.sum()) * per_chunk + problem.M * warps * per_warp)
    throughput = issued / (machine.sms * 2.0)
    element_bytes = (4 if problem.dtype == "float32" else 2) + (2 if problem.K <= MAX_U16_COLUMNS else 4)
    memory = tiles * images * float(chunks.sum()) * LANES * element_bytes / machine.memory_bytes_per_cycle
    # The lanes of a warp read different rows of X: every activation load is about one L1
    # wavefront per lane (an SM serves about one per cycle). On the H200 that put the
    # kernel at 26 us for BERT-large's 4096x1024 layer at N = 32 and 5%, where it took 36.5
    # (benchmarks/results/spmm-csr-h200.json).
    wavefronts = tiles * images * float(chunks.sum()) * LANES * cols / machine.sms
    trips = longest // unroll + longest % unroll
    registers = (padded_cols + unroll * (cols + 4) + 24) * config.threads_per_block
    block_warps = config.threads_per_block // 32
    resident = min(
        machine.blocks_per_sm,
        machine.warps_per_sm // block_warps,
        max(1, machine.registers_per_sm // registers),
    )
    blocks = math.ceil(problem.M / config.rows_per_block) * tiles * images
    waves = math.ceil(blocks / (machine.sms * resident))
    # The longest warp waits for its loads (the slot, each trip's index then activation,
    # the residual and the store) and issues its instructions.
    serial = (2 * trips + 3) * machine.load_latency
    serial += (longest * per_chunk + per_warp) * 4.0 / min(4, resident * block_warps)
    return max(throughput, memory, wavefronts, waves * serial)


def _column_lanes_cost(problem: SpmmProblem, config: CudaCsrConfig, machine: Machine) -> float | None:
    """Cycles of the CSR kernel with lanes over columns: instructions per trip, activations
    through L1 (every nonzero reads a run of ``columns_per_block`` of them per tile), and the
    longest row's trips, each waiting on its activation loads (about twice the latency of a
    load that misses L1, as measured on the H200), shared by the row's warps. Through a
    window the batch is folded into the columns, each tap's run is padded to whole trips, and
    each further warp of a row adds about one partly filled trip (its share starts inside a
    tap's run)."""
    columns, images = problem.static_columns or SYMBOLIC_COLUMNS, problem.static_batch or 1
    width, unroll, warps = config.columns_per_lane, config.unroll, config.warps_per_row
    if problem.window is not None:
        columns, images = columns * images, 1
        if columns > WINDOW_LANES_SEARCH_MAX_PIXELS:
            return None
        trips = _window_trips(problem.weight, problem.window.taps, unroll)
        trips = trips + (warps - 1) * (trips > 0)
    else:
        trips = -(-problem.weight.row_nnz // unroll)
    if width > 1 and config.columns_per_block >= 2 * columns:  # a tile of mostly missing columns
        return None
    if unroll > 2 and unroll > problem.weight.row_nnz.max(initial=0):
        return None
    tiles = math.ceil(columns / config.columns_per_block) * images
    es = 4 if problem.dtype == "float32" else 2
    per_trip = unroll * (3 + width * (2 if es == 2 else 1)) + unroll / 2 + 4  # move, address, loads, FMAs
    issued = tiles * (float(trips.sum()) * per_trip + problem.M * warps * 40)
    throughput = issued / (machine.sms * 2.0)
    l1 = tiles * float(trips.sum()) * unroll * config.columns_per_block * es / (machine.sms * 64.0)
    blocks = math.ceil(problem.M / config.rows_per_block) * tiles
    resident = min(machine.blocks_per_sm, machine.warps_per_sm // (config.rows_per_block * warps))
    waves = math.ceil(blocks / (machine.sms * max(1, resident)))
    chain = math.ceil(int(trips.max(initial=0)) / warps) * 2 * machine.load_latency
    return max(throughput, l1, waves * (chain + 3 * machine.load_latency))


@lru_cache(maxsize=256)
def _window_trips(weight, taps: int, unroll: int) -> np.ndarray:
    """Per row: trips of ``unroll`` nonzeros with each tap's run padded to whole trips."""
    per_tap = (weight.dense != 0).reshape(weight.shape[0], -1, taps).sum(axis=1)
    return (-(-per_tap // unroll)).sum(axis=1)


@lru_cache(maxsize=256)
def _row_chunks(weight) -> np.ndarray:
    return -(-weight.row_nnz // LANES)


def _registers_per_vector(dtype: str, width: int) -> int:
    return width // 2 if dtype == "float16" and width % 2 == 0 else width


@lru_cache(maxsize=256)
def _group_work(weight, rows_per_block: int, balance: bool, share_columns: bool):
    """Per row group: activation vectors loaded (distinct columns) and nonzeros.

    Cached by weight identity: the search scores many configs of the same weight.
    """
    groups = unrolled_row_groups(weight, rows_per_block, balance, share_columns)
    loads = np.empty(len(groups))
    nnz = np.empty(len(groups))
    for j, rows in enumerate(groups):
        columns = [weight.row(m)[0] for m in rows]
        loads[j] = len(np.unique(np.concatenate(columns)))
        nnz[j] = sum(len(c) for c in columns)
    return loads, nnz
