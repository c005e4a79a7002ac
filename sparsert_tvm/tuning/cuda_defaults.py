"""Default configs of the CUDA kernels: which kernel a layer gets (unrolled, or the CSR
kernel with lanes over nonzeros, columns or a window's pixels) and its tiling, from the
problem's shape and nonzeros. Each rule says what it was measured on."""

from __future__ import annotations

import dataclasses

from ..problem import Layout, SpmmProblem
from ..schedules.config import CudaConfig, CudaCsrConfig, CudaSpmmConfig

# Blocks needed to give every SM of a large GPU (132 on an H100) a couple of blocks.
_TARGET_BLOCKS = 264
# Threads that keep an H100 busy (about 768 per SM) where each has a long serial stream.
_TARGET_THREADS = 100_000


def default_vector_width(problem: SpmmProblem) -> int:
    """float16 pairs neighbouring columns (``f16x2``) where they are adjacent and even.

    Not through a convolution's window: there each pixel's taps are loaded one by one and
    packed, which costs more instructions than the paired FMAs save (ResNet-50's 3x3 layers
    at batch 1 ran 1.0-2.2x slower than the fp32 kernel on the H100)."""
    if problem.dtype != "float16" or problem.window is not None:
        return 1
    columns = problem.static_columns
    return 2 if problem.x_strides().n == 1 and columns is not None and columns % 2 == 0 else 1


def folds_batch_by_default(problem: SpmmProblem) -> bool:
    """Several (or a symbolic number of) images are folded into one range of columns.

    Unfolded, at batch 8 on the H100, ResNet-50's 3x3 layers took 4-8x their batch-1 time
    (stage 4, 7x7 pixels: 7.6x) while cuDNN took 2.5x: each image of 49 pixels got a block of
    its own, a third of its lanes idle, and the blocks running the same row group's code were
    hundreds apart in the launch. Folded, on the H200, stage 2 at batch 8 ran 1.4x faster and
    stage 1 3% slower (benchmarks/results/fold-vary-h200.md)."""
    return problem.images_apart and problem.static_batch != 1


# The CSR kernel is the default for fully connected layers with at most this many columns
# and at least this many nonzeros. On the H200 (benchmarks/results/spmm-csr-h200.json,
# BERT/GPT-2 layers of 29k-236k nonzeros at 5% and 10%) it beat the unrolled kernel on
# every layer at N <= 8, by 1.4x at 29k nonzeros and 4-6x from 118k (2.5-7.8 us against
# 3.5-18 us: the unrolled time is its code streaming in, flat in N), and lost to it on
# every layer at N = 32 (1.3-2x), where each warp's rows read N activations per nonzero.
# Below 29k nonzeros it is not measured.
CSR_DEFAULT_MAX_COLUMNS = 8
CSR_DEFAULT_MIN_NNZ = 25_000


def prefers_csr(problem: SpmmProblem) -> bool:
    columns = problem.static_columns
    return (
        problem.layout is Layout.ROWS
        and problem.window is None
        and columns is not None
        and columns <= CSR_DEFAULT_MAX_COLUMNS
        and problem.weight.nnz >= CSR_DEFAULT_MIN_NNZ
    )


# The CSR kernel with lanes over columns is the default from 16 to 128 columns where X's
# columns are neighbours in memory (a transposed X, or NCHW at batch 1) and the weight has
# at least this many nonzeros. On the H200 (benchmarks/results/csr-column-lanes-h200.md:
# 29 BERT, DeepBench and ResNet-50 1x1 layers of 52k-1.7M nonzeros at 10%) its defaults
# below ran 1.2-3.2x faster than the unrolled kernel at 16-64 columns (the unrolled code
# streams in once per column tile: a flat 18-34 us on BERT-large's layers) and 0.98-1.7x at
# 128; at 196 columns it lost (0.7-1.0x), at 512 it lost 1.1-1.5x.
CSR_COLUMN_LANES_COLUMNS = (16, 128)
CSR_COLUMN_LANES_MIN_NNZ = 50_000
# Warps (of one column per lane) a column-lane launch aims at: each warp's row is a chain
# of dependent loads, so short of this rows are split among up to 4 warps.
_COLUMN_LANE_WARPS = 4096
# The same for lanes over nonzeros, where a warp's row is a chain of one trip per ``unroll``
# chunks of 32 (benchmarks/results/nonzero-warps-h100.md).
_NONZERO_LANE_WARPS = 6144
# Longest rows, in chunks of 32 nonzeros, for which lanes over nonzeros take tiles of 2
# columns with 2 warps a row rather than tiles of 4 (``default_csr_config``).
_PAIR_TILE_CHUNKS = range(6, 13)


def prefers_column_lanes(problem: SpmmProblem) -> bool:
    """Also the default for a transposed X of symbolic N (``runtime_row_stride``), whose
    alternative is the unrolled kernel on X as it is (a warp's loads 32 rows apart). On the
    H100, whole modules (the transpose included) at N = 1-512: on BERT-base's 3072x768 layer
    at 10% (236k nonzeros) column lanes ran 1.4-5.3x faster at every N, on its 768x768 layer
    (59k) 2.5x and 4.9x faster at N = 128 and 512 but 0.55-0.96x as fast at N = 1-32, where
    the unrolled kernel took 7.2-12.6 us (benchmarks/results/symbolic-n-h100.md)."""
    if problem.window is not None or problem.weight.nnz < CSR_COLUMN_LANES_MIN_NNZ:
        return False
    if problem.runtime_row_stride:
        return True
    columns, lo_hi = problem.static_columns, CSR_COLUMN_LANES_COLUMNS
    neighbours = problem.x_transposed or (problem.layout is Layout.CHANNELS and problem.static_batch == 1)
    return neighbours and columns is not None and lo_hi[0] <= columns <= lo_hi[1]


# Through a convolution's window, the CSR kernel's column lanes are the default for NCHW
# layers of at most this many pixels (over the whole batch) and at least this many nonzeros.
# On the H200 (benchmarks/results/window-lanes-h200.md) they ran ResNet-50's stage-4 3x3
# layers (7x7 pixels, 118k-236k nonzeros) at batch 1 1.2-1.6x faster than the unrolled
# kernel, whose code streams in once per 32 pixels there; at 196 pixels (stage 3) they lost
# 0.7-0.9x, at batch 8 2-7x.
WINDOW_LANES_MAX_PIXELS = 64
WINDOW_LANES_MIN_NNZ = 100_000


def prefers_window_lanes(problem: SpmmProblem) -> bool:
    window, batch = problem.window, problem.static_batch
    return (
        window is not None
        and not window.channels_last
        and batch is not None
        and problem.static_columns * batch <= WINDOW_LANES_MAX_PIXELS
        and problem.weight.nnz >= WINDOW_LANES_MIN_NNZ
    )


def default_cuda_config(problem: SpmmProblem, kernel: str | None = None, lanes: str | None = None) -> CudaConfig:
    """The untuned config of ``kernel`` ("unrolled" or "csr", whose ``lanes`` default to
    "nonzeros"), or by default of the kernel the heuristics prefer for ``problem``
    (``prefers_column_lanes``, ``prefers_window_lanes``, ``prefers_csr``)."""
    if kernel is None:
        if prefers_column_lanes(problem) or prefers_window_lanes(problem):
            kernel, lanes = CudaCsrConfig.KERNEL, "columns"
        else:
            kernel = CudaCsrConfig.KERNEL if prefers_csr(problem) else CudaSpmmConfig.KERNEL
    if kernel == CudaCsrConfig.KERNEL:
        return default_column_lanes_config(problem) if lanes == "columns" else default_csr_config(problem)
    if kernel != CudaSpmmConfig.KERNEL:
        raise ValueError(f"unknown CUDA kernel {kernel!r}")
    return default_unrolled_config(problem)


def default_column_lanes_config(problem: SpmmProblem) -> CudaCsrConfig:
    """Lanes of as many columns (1, 2 or 4) as fill a tile without a mostly empty one, eight
    nonzeros per trip (faster than four on 29 of 30 layers measured), and up to 4 warps per
    row while the launch has fewer than about 4096 warps per column a lane owns: on the
    H200 this picked the fastest of the warp counts timed, or one within 5%, on every
    layer measured (csr-column-lanes-h200.md). Through a window, at most 2 warps per row:
    each pads its share of every tap to whole trips, and on ResNet-50's stage-4 3x3 layers
    at batch 1, 4 warps ran 8-26% slower than 2 (window-lanes-h200.md)."""
    columns = problem.static_columns or 32
    most_warps = 4
    if problem.window is not None:  # the batch folded in; a lane's columns are 32 apart
        columns *= problem.static_batch or 1
        width = next(w for w in (4, 2, 1) if 32 * w <= max(32, columns))
        tiles, most_warps = -(-columns // (32 * width)), 2
    else:
        width = next(w for w in (4, 2, 1) if 32 * w <= max(32, columns) and columns % w == 0)
        tiles = -(-columns // (32 * width)) * (problem.static_batch or 1)
    warps = next(
        w for w in (4, 2, 1) if w <= most_warps and (w == 1 or problem.M * tiles * w <= _COLUMN_LANE_WARPS * width)
    )
    rows = _rows_filling_the_machine(problem, 4, tiles)
    return CudaCsrConfig(
        rows_per_block=rows, columns_per_block=32 * width, unroll=8, lanes="columns", warps_per_row=warps
    )


def default_csr_config(problem: SpmmProblem) -> CudaCsrConfig:
    """Lanes over nonzeros: more warps where the launch has few, up to about
    ``_NONZERO_LANE_WARPS``. First column tiles of 4 (each lane loads 4 activations per
    nonzero instead of up to 16; each tile reads the arrays again), then up to 4 warps
    sharing a row, no more than its chunks. Otherwise one tile of up to 16 columns, 4 for a
    symbolic count. Chunks in flight per trip as many as the longest row gives a warp (up to
    4: its chain of loads is the launch's tail); four rows per block, fewer where the grid
    would not give every SM a couple of blocks.

    On the H100 (benchmarks/results/nonzero-warps-h100.md), BERT's and GPT-2's FC layers at
    N = 1 and 8 ran up to 1.5x faster with the warps than with one warp a row (at N = 1 the
    fastest of 1-8 warps was within 4% of the rule's pick on all 10 layers timed), and at
    N = 8 tiles of 4 columns ran up to 1.3x faster than one tile of 8. Rows of 6-12 chunks
    (``_PAIR_TILE_CHUNKS``) take tiles of 2 instead where two warps a row still fit the
    budget: BERT-base's and GPT-2's 768x3072 layers at N = 8, 0.05 and 0.1, ran 1.15-1.24x
    faster in float32 (1.01-1.09x in float16) than with tiles of 4 and 4 warps in the same
    run. The 768x768 layer's rows of 6-9 chunks (0.2-0.3) ran 0.94-0.97x as fast with them,
    its shorter rows (0.05-0.1) 0.91-1.03x, and rows of 20-29 chunks (768x3072 at 0.2-0.3)
    0.85-0.99x (n8-tiles-h100.md)."""
    columns, images = problem.static_columns, problem.static_batch or 1
    longest = -(-int(problem.weight.row_nnz.max(initial=0)) // 32)
    tile = 4 if columns is None else min(16, columns)
    if columns is not None and columns > 4 and problem.M * -(-columns // 4) * images <= _NONZERO_LANE_WARPS:
        pairs = problem.M * -(-columns // 2) * images * 2
        tile = 2 if longest in _PAIR_TILE_CHUNKS and pairs <= _NONZERO_LANE_WARPS else 4
    tiles = -(-(columns or tile) // tile) * images
    warps = next(w for w in (4, 2, 1) if w == 1 or (w <= longest and problem.M * tiles * w <= _NONZERO_LANE_WARPS))
    per_warp = -(-longest // warps)
    unroll = 4 if per_warp >= 4 else 2 if per_warp >= 2 else 1
    rows = _rows_filling_the_machine(problem, 4, tiles)
    return CudaCsrConfig(rows_per_block=rows, columns_per_block=tile, unroll=unroll, warps_per_row=warps)


def default_unrolled_config(problem: SpmmProblem) -> CudaSpmmConfig:
    return with_segment_budget(_unrolled_tiling(problem), problem)


# Instructions per segment for each accumulator a thread holds, and the most per segment.
SEGMENT_INSTRUCTIONS_PER_ACCUMULATOR = 4096
MAX_SEGMENT_INSTRUCTIONS = 65536
# The most per segment where a thread does scalar half arithmetic (float16, one column per
# register). ptxas pairs such a kernel's rows into HFMA2s itself (a PRMT for most FMAs), and
# that takes far longer than linear in the function's size: MobileNet v2's 1280x320 1x1 layer
# at batch 8 (16 rows per block, 41k nonzeros) took 95.5 s to assemble as one function and
# 2.8 s as four on 2 cores, against 7.3 s in float32 (segments-fp16-2core.md); the four ran
# 0.95x as fast on the H200 (6.65 against 6.33 us, segments-fp16-h200.json).
SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS = 16384


def with_segment_budget(config: CudaSpmmConfig, problem: SpmmProblem) -> CudaSpmmConfig:
    """``config`` with segments sized for its tiling. Segments are functions of the call
    ABI and run slower than inline code: on the H200, before their registers were capped
    higher (``segment_registers``), 4k-instruction segments made ResNet-50's 3x3 layers at
    8-16 rows per block 1.7-2x slower than one function, and 1-4 rows 0-16%
    (benchmarks/results/segments-vary-h200.json); with the cap they were within 0-13%
    (segments-inline-h200.md). A thread's accumulators still buy its segments room. Grid
    splits keep the whole budget although a launch row runs one share of its group: on
    ResNet-50's stride-2 3x3 layers, the budget divided by the shares cut the whole model's
    sparse build at batch 1 from 36 to 27 s but ran the layers at batch 1 up to 1.3x slower
    (0.99x in geometric mean over the 20 layers at 90%, benchmarks/results/grid-split-h200.md)."""
    from ..schedules.cuda.unrolled_checks import (
        ElementType,  # here: the CUDA rule imports this module
    )

    accumulators = config.rows_per_block * config.columns_per_thread
    scalar_half = ElementType(problem.dtype, config.vector_width).arith == "f16"
    most = SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS if scalar_half else MAX_SEGMENT_INSTRUCTIONS
    budget = min(most, SEGMENT_INSTRUCTIONS_PER_ACCUMULATOR * accumulators)
    return dataclasses.replace(config, max_instructions_per_segment=budget)


def column_vectors(problem: SpmmProblem, width: int, fold: bool) -> tuple[int | None, int]:
    """Vectors of ``width`` columns in one launch row (None where the columns are
    symbolic), and the launch rows: one per image, or one for every image's columns with
    the batch folded."""
    columns, images = problem.static_columns, problem.static_batch or 1
    if fold and columns is not None:
        columns, images = columns * images, 1
    return (None if columns is None else -(-columns // width)), images


def _unrolled_tiling(problem: SpmmProblem) -> CudaSpmmConfig:
    width = default_vector_width(problem)
    fold = folds_batch_by_default(problem)
    vectors, images = column_vectors(problem, width, fold)
    if problem.window is not None:
        return _window_config(problem, vectors, images, width, fold)
    # No more threads than columns need; up to 64 columns, one-warp blocks: on the H100 the
    # tuner picked them for 7x7 layers (49 columns) and they ran 1.2x faster than 64-thread
    # blocks there (benchmarks/results/spmm-paper-*-h100.json).
    if vectors is None:
        threads = 128
    else:
        threads = 32 if vectors <= 64 else min(128, -(-vectors // 32) * 32)
    column_tiles = 1 if vectors is None else -(-vectors // threads)
    # Every row group reads all of X again (from L2): as many rows per block as the grid
    # allows while it still gives every SM a couple of blocks.
    rows = _rows_filling_the_machine(problem, _most_unrolled_rows(problem), column_tiles * images)
    return CudaSpmmConfig(
        rows_per_block=rows, threads_per_block=threads, vector_width=width, fold_batch=fold,
        **register_caps(rows),
    )


def _most_unrolled_rows(problem: SpmmProblem) -> int:
    """32 rows per block for float32 1x1 convolutions (NCHW) of more than 16 output
    channels, 16 otherwise. At batch 8 on the H100 almost none of their activation loads hit
    in L1 and L2 ran at 74% of its throughput (Nsight Compute, fc-n512-tiles-h100.md);
    twice the rows share each load. Where the grid still gives 264 blocks at 32 rows, that
    ran 18 of 21 such layers at density 0.1 1.02-1.34x faster and three 0.99-1.00x as fast
    (1.13x in geometric mean; with a cold L2 1.085x at 0.1 and 1.044x at 0.05, one layer
    0.88x: rows32-1x1-b8-h100.md). Where it did not (7x7 images, few output channels) 32
    rows lost up to 2.6x. FC layers at N = 512 gained nothing (0.98x and 1.01x,
    fc-n512-tiles-h100.md); float16 is not measured."""
    one_by_one = problem.layout is Layout.CHANNELS and problem.window is None
    return 32 if one_by_one and problem.dtype == "float32" and problem.M > 16 else 16


def _rows_filling_the_machine(problem: SpmmProblem, most: int, blocks_per_row_group: int) -> int:
    """Up to ``most`` rows per block, halved while the grid has fewer than ``_TARGET_BLOCKS``."""
    rows = most
    while rows > 1 and -(-problem.M // rows) * blocks_per_row_group < _TARGET_BLOCKS:
        rows //= 2
    return rows


def _window_config(problem: SpmmProblem, vectors: int, images: int, width: int, fold: bool) -> CudaSpmmConfig:
    """Convolutions through a window have 9-49x the nonzeros per row of a 1x1 layer, so a
    thread's serial work grows fast with its rows: blocks of up to 256 threads and as few
    rows as keep about 100k threads busy. On ResNet-50's 3x3 layers at batch 1 this ran
    1.4x and 2.1x faster than the 1x1 rule on the H100 (``benchmarks/tuning_space.py --family
    conv --grid``; that run's JSON was not kept), and 1, 2 or 4 rows were still the fastest
    on the H200. With the batch folded into the columns too: as microbenchmarks, twice the
    rows (about 50k threads) ran ResNet-50's stride-1 3x3 layers at batch 8 up to 1.2x faster
    (rows-vary-h200.md), but in the whole model, where each kernel's code comes cold from
    device memory, they made it 1.10x slower (benchmarks/results/in-model-rows-h200.md)."""
    threads = 32 if vectors <= 64 else 256 if vectors > 128 else 128
    column_tiles = -(-vectors // threads)
    rows, shares = 16, 1
    if _reads_more_than_it_writes(problem):
        rows = 32 if fold else 16
        blocks = -(-problem.M // rows) * column_tiles * images
        shares = next(s for s in (1, 2, 4, 8) if s == 8 or blocks * s >= _GRID_SPLIT_TARGET_BLOCKS)
    else:
        while rows > 1 and -(-problem.M // rows) * column_tiles * images * threads < _TARGET_THREADS:
            rows //= 2
    return CudaSpmmConfig(
        rows_per_block=rows, threads_per_block=trimmed_threads(vectors, threads), vector_width=width,
        fold_batch=fold, grid_split=shares, **register_caps(rows),
        padding_from_zeros=_reads_padding_from_zeros(problem, vectors),
    )


# Input pixels per output pixel from which a window layer's blocks get 16 or 32 rows and the
# grid is split (``CudaSpmmConfig.grid_split``): stride 2 reads four.
GRID_SPLIT_MIN_INPUT_RATIO = 3
# Density above which a window layer keeps the 100k-thread rule. On the H200 the dense stems
# ran faster with it than with the split's tiling: ResNet-50's 7x7 at batch 1 8.4 against
# 11.3 us, at batch 8 40.3 against 45.0; MobileNet v1's 3x3 at batch 1 2.4 against 4.4
# (benchmarks/results/stem-grid-rule-h200.json).
GRID_SPLIT_MAX_DENSITY = 0.5
# Blocks the fewest shares of a grid split must give: about one per SM. More shares cost
# more partial sums for the last block of each tile to add up.
_GRID_SPLIT_TARGET_BLOCKS = 128


def _reads_more_than_it_writes(problem: SpmmProblem) -> bool:
    """Every row group reads its tiles' whole input from L2, and at stride 2 that is four
    pixels per output pixel: the input traffic, not the FMAs, limits such layers. Blocks of
    more rows read it once for more rows (16, or 32 with the batch folded, where a row
    group's code serves many tiles), and a grid split into shares of the kernel rows keeps
    the grid of so few groups about one block per SM. On the H200 this ran ResNet-50's
    stride-2 3x3 layers at 90% 1.0-1.9x faster than the 100k-thread rule's 1-16 rows
    (benchmarks/results/grid-split-h200.md). Needs a static batch, a kernel of more than one
    tap and rows that share input (not depthwise); float32 only until float16 splits have
    run on a GPU. Not for weights that pruning left dense (stems): they do dozens of FMAs
    per input value read, and their FMAs, not their input, limit them. Not at batch 1: there
    the whole ResNet-50 ran 1.02x faster without it (390.6 against 398.0 us, its sparse
    build 18 s against 40), at batch 8 1.006x slower (benchmarks/results/in-model-rows-h200.md)."""
    window = problem.window
    if window is None or problem.static_batch in (None, 1) or problem.static_columns is None:
        return False
    if problem.weight.nnz > GRID_SPLIT_MAX_DENSITY * problem.M * problem.K:
        return False
    if problem.dtype != "float32":  # float16 grid splits have run in the emulator only
        return False
    (h, w), (oh, ow) = window.input_size, window.output_size
    # 1x1 stride-2 layers (ResNet's downsampling shortcuts) were not timed with it.
    return window.taps > 1 and h * w >= GRID_SPLIT_MIN_INPUT_RATIO * oh * ow and _rows_share_columns(problem)


def _rows_share_columns(problem: SpmmProblem) -> bool:
    """Whether some column of the weight has nonzeros in more than one row."""
    weight = problem.weight
    return weight.nnz > int((weight.dense != 0).any(axis=0).sum())


def _reads_padding_from_zeros(problem: SpmmProblem, vectors: int) -> bool:
    """Images of up to 64 pixels, each its own one-warp tiles, read their padding from a
    zero array: their code is streamed once per 32 pixels, and the instruction fetch is
    their limit (Nsight Compute: 24 of every 30 cycles between a warp's instructions on
    ResNet-50's stage-4 3x3 layer at batch 1), so 25% less code ran it 1.27x faster on the
    H200. Larger images, whose code serves more pixels, ran 0.74-1.06x as fast with it
    (0.89x in geometric mean over 9 layers, benchmarks/results/padding-zeros-h200.md); the
    tuner times the other way."""
    from ..schedules.cuda.unrolled_checks import (
        padding_from_zeros_fits,  # here: the CUDA rule imports this module
    )

    return vectors <= 64 and padding_from_zeros_fits(problem, 1)


def trimmed_threads(vectors: int, threads: int, columns_per_thread: int = 1) -> int:
    """The fewest whole warps that cover the columns in as many tiles as ``threads`` needs.

    Threads past the last column exit at once, so the warps that work hardly change; what
    changes is that a row group's blocks get equal shares instead of full tiles and one
    nearly empty. That ran ResNet-50's 3x3 layers at batch 8 up to 1.19x faster on the H200
    (1568 pixels: 7 tiles of 224 threads, not 256; 392 pixels: 2 of 224) and changed batch 1
    by 0-5% (benchmarks/results/trimmed-tiles-h200.md); why was not profiled."""
    tiles = -(-vectors // (threads * columns_per_thread))
    return min(threads, -(-vectors // (tiles * columns_per_thread * 32)) * 32)


_SIXTEEN_ROW_REGISTERS = 64
_THIRTY_TWO_ROW_REGISTERS = 96


def default_registers(rows_per_block: int) -> int:
    """The entry's register cap (0: ptxas's choice). Unrolled kernels of 16 rows per block
    get 64: uncapped, ptxas kept ResNet-50's stage-1 3x3 layer at batch 8 to 32 registers
    and its loads just ahead of their FMAs, 1.7x slower on the H200
    (benchmarks/results/registers-vary-h200.md); on 20 ResNet-50 and MobileNet 1x1 layers of
    16 rows the cap gained 1.08x in geometric mean (up to 2x, and lost up to 14% on two:
    registers-spmm-h200.md). With 1-8 rows it changed nothing beyond noise or lost, so they
    keep ptxas's choice; the tuner times the other cap (``TuneOptions.registers``). 32 rows
    (grid-split layers) get 96: 32 accumulators and as much room for loads in flight."""
    if rows_per_block >= 32:
        return _THIRTY_TWO_ROW_REGISTERS
    return _SIXTEEN_ROW_REGISTERS if rows_per_block >= 16 else 0


def register_caps(rows_per_block: int) -> dict[str, int]:
    """The entry's and the segments' register caps of a tiling of that many rows, as
    ``CudaSpmmConfig`` fields. The segments get at least the entry's: segments of 32 rows at
    64 registers spilled about 1.6 KB each (ptxas -v)."""
    registers = default_registers(rows_per_block)
    return {"registers": registers, "segment_registers": max(CudaSpmmConfig.segment_registers, registers)}
