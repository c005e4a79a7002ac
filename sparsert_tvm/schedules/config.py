"""How a sparse kernel is tiled: the free choices, kept apart from the code that emits it.

A config says nothing about the weight or the layout (that is ``SpmmProblem``); the same
config can be applied to any problem, and the tuner searches over configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


# The register file of one SM, which one block's threads must fit in.
REGISTERS_PER_BLOCK = 65536


class _NamedKernelConfig:
    """``as_dict()`` names the kernel, so that a tuning record or a ``kernel_config`` dict
    says which config class to rebuild (``config_from_dict``)."""

    KERNEL: ClassVar[str]

    def as_dict(self) -> dict:
        return {"kernel": self.KERNEL} | dataclasses.asdict(self)


def config_from_dict(fields: dict, configs: dict[str, type], target: str):
    """The config of ``configs`` that ``as_dict()`` wrote; a dict without ``"kernel"`` is the
    unrolled kernel's. Raises TypeError on unknown fields and ValueError on an unknown kernel
    or bad values."""
    fields = dict(fields)
    kernel = fields.pop("kernel", "unrolled")
    if kernel not in configs:
        raise ValueError(f"unknown {target} kernel {kernel!r}; known: {sorted(configs)}")
    return configs[kernel](**fields)


class _CudaKernelConfig(_NamedKernelConfig):
    def assembler_options(self) -> dict:
        """Keyword arguments of ``cuda.assemble.assemble`` for this config's kernels."""
        return {"opt_level": self.ptxas_opt_level}

    def _check_opt_level(self):
        if not 0 <= self.ptxas_opt_level <= 3:
            raise ValueError("ptxas_opt_level must be in 0..3")


@dataclass(frozen=True)
class CudaSpmmConfig(_CudaKernelConfig):
    """Tiling of the unrolled CUDA kernel.

    A thread block owns ``rows_per_block`` rows of ``A`` (one register accumulator per row
    and column) and ``threads_per_block * columns_per_thread`` columns of the product; each
    thread owns ``columns_per_thread`` columns, ``threads_per_block`` apart so that
    neighbouring threads touch neighbouring columns. With ``vector_width`` > 1 each owned
    "column" is a vector of that many neighbouring columns, loaded and stored with one
    vector instruction (float16 pairs them in ``f16x2`` registers); it needs columns that
    are adjacent in memory and a column count divisible by the width.
    """

    KERNEL: ClassVar[str] = "unrolled"

    rows_per_block: int = 4
    threads_per_block: int = 128
    columns_per_thread: int = 1
    vector_width: int = 1
    # Where images are computed apart (NCHW, convolutions through a window), their columns
    # form one range that blocks tile across image borders, instead of each image being a
    # row of the grid: small images (7x7, 14x14) then fill whole blocks, and the blocks of
    # a row group, which run the same code, are neighbours in the launch.
    fold_batch: bool = False
    # Rows are packed into blocks of similar nonzero counts (heaviest blocks launch first)
    # instead of consecutive runs of rows.
    balance_rows: bool = True
    # Rows are grouped to share nonzero columns (``row_groups.group_rows_sharing_columns``):
    # each group loads an activation once for all its rows that use it, so such groups load
    # fewer (5-21% over the paper suites' defaults, median by family; 2-9% fewer
    # instructions: benchmarks/results/shared-columns-2core.md), for groups whose work is
    # less even. Needs ``balance_rows`` (its cap on a group's work is the balanced
    # grouping's). Not yet timed on a GPU: opt-in, and the tuner times it beside the default.
    share_columns: bool = False
    # The unrolled code is cut into functions of about this many instructions (FMAs and
    # loads), assembled separately and in parallel, then linked: ptxas time grows faster
    # than linearly with function size. On 2 cores 4k was best or near it on 3x3, 1x1 and FC
    # layers: ResNet-50's 512x512 3x3 layer at 10% built in 27 s instead of 80 s at 16k, for
    # 2% more machine code (benchmarks/results/segments-2core.md). But segments run slower
    # than inline code the more accumulators a thread holds: the tuner's configs scale it
    # with them (``tuning.with_segment_budget``).
    max_instructions_per_segment: int = 4096
    # Registers a segment may use (ptxas -func-maxrregcount). Without a cap, ptxas keeps a
    # separately assembled function to the ABI's scratch registers (about 15), so each load
    # is issued just before its FMA and the kernel waits on every one: on the H200 that made
    # segmented kernels up to 2x slower than the same code in one function (ResNet-50's 3x3
    # layers at batch 1). With room for its loads in flight a segment is scheduled like
    # inline code; the kernel takes the largest of its functions' register counts.
    segment_registers: int = 64
    # Registers a thread of the entry function gets (its .maxnreg; 0: ptxas's choice). ptxas
    # schedules to the cap: left to itself it kept ResNet-50's stage-1 3x3 kernel at batch 8
    # (16 rows per block, a grid of 0.4 waves) to 32 registers, issuing each load about 20
    # instructions before its FMAs; at 64 it hoisted them about 65 ahead and the kernel ran
    # 1.7x faster on the H200 (benchmarks/results/registers-vary-h200.md).
    registers: int = 0
    # The block's threads form this many slices (split-K) that own the same columns; each
    # computes the group's rows over its share of the group's nonzero columns (whole kernel
    # rows through a window), and the first slice adds the others' partial sums from shared
    # memory before the epilogue. It cuts a thread's serial chain of loads and FMAs and
    # multiplies the blocks (each of fewer columns) for grids too small to hide load latency;
    # every block still streams its group's code. On ResNet-50's 3x3 layers it lost
    # everywhere (0.73x at 2, 0.45x at 4 on the H200): those kernels wait on instruction
    # fetch, not on latency (benchmarks/results/split-k-h200.md). In the tuner's space only
    # where ``TuneOptions.split_k`` asks.
    split_k: int = 1
    # The group's nonzero columns are cut into this many shares (as ``split_k`` cuts them),
    # each computed by a block of its own: a launch row per (row group, share). The blocks
    # of one tile leave their partial sums in a module array; the last of them to finish
    # (a count per tile and group, taken atomically) adds them up in share order, so that
    # results do not depend on which finished last, and runs the epilogue. Where a layer
    # reads much more input than it writes (stride 2: four input pixels per output pixel),
    # every row group streams the whole input from L2, so more rows per block cut that
    # traffic, and the split keeps the grid of fewer row groups full. Needs a static column
    # count and batch (the array is sized for the grid); launches of one kernel must not
    # overlap (the Relax VM runs them in order on one stream).
    grid_split: int = 1
    # Through an NCHW window: the block copies the band of input rows its tile reads into
    # shared memory, this many input channels at a time (0: loads read global memory), and
    # the code loads from there without padding predicates (``cuda.staged_input``). Correct
    # on the H200, but 1.5-4.6x slower than the default on every ResNet-50 3x3 layer timed:
    # the shared-memory queue fills, one load per tap (staged-input-h200.md). Opt-in: the
    # tuner tries it only where asked (``TuneOptions.stage_channels``).
    stage_channels: int = 0
    # Through a convolution's window, a load that may fall into the padding reads, for the
    # threads whose tap is outside the image, a zero-filled array of the module instead
    # (its base register is switched once per thread): no predicate and no zeroing move per
    # load. Predicated, those moves are about a quarter of a 3x3 kernel's instructions.
    # The array costs device memory (about one image of input for NCHW), not code. The
    # default only for images of up to 64 pixels (``tuning.cuda_defaults._window_config``).
    padding_from_zeros: bool = False
    # ptxas optimisation level (0-3).
    ptxas_opt_level: int = 3
    # Larger weights stay dense: about 70 s of ptxas on 2 cores and 30 MB of code at the cap.
    max_layer_nnz: int = 1_000_000

    def __post_init__(self):
        _check_positive(self, "rows_per_block", "threads_per_block", "columns_per_thread", "vector_width")
        _check_positive(self, "max_instructions_per_segment", "max_layer_nnz")
        if self.threads_per_block > 1024 or self.threads_per_block % 32:
            raise ValueError("threads_per_block must be a multiple of 32 and at most 1024")
        if self.vector_width not in (1, 2, 4, 8):
            raise ValueError("vector_width must be 1, 2, 4 or 8")
        if self.split_k not in (1, 2, 4, 8) or self.threads_per_block % (32 * self.split_k):
            raise ValueError("split_k must be 1, 2, 4 or 8 and leave whole warps of threads_per_block to each slice")
        if self.grid_split not in (1, 2, 4, 8) or (self.grid_split > 1 and self.split_k > 1):
            raise ValueError("grid_split must be 1, 2, 4 or 8, and 1 with split_k")
        if self.share_columns and not self.balance_rows:
            raise ValueError("share_columns refines the balanced grouping: it needs balance_rows")
        if self.stage_channels < 0:
            raise ValueError("stage_channels must be 0 (no staging) or positive")
        if not 24 <= self.segment_registers <= 255:
            raise ValueError("segment_registers must be in 24..255")
        if self.registers and not 24 <= self.registers <= 255:
            raise ValueError("registers must be 0 or in 24..255")
        if self.registers * self.threads_per_block > REGISTERS_PER_BLOCK:
            raise ValueError(f"{self.threads_per_block} threads of {self.registers} registers do not fit in one SM")
        self._check_opt_level()

    def assembler_options(self) -> dict:
        return super().assembler_options() | {"function_registers": self.segment_registers}

    def staged(self, channels: int) -> CudaSpmmConfig:
        """This tiling staging its input ``channels`` at a time, its padding then read from
        the band (which holds the padding's zeros itself), not from the zero array."""
        return dataclasses.replace(self, stage_channels=channels, padding_from_zeros=False)


@dataclass(frozen=True)
class CudaCsrConfig(_CudaKernelConfig):
    """Tiling of the data-driven (CSR) CUDA kernel, for layers where unrolling does not pay.

    The nonzeros' values and column indices are read from arrays in the module instead of
    being instructions. A warp owns one row of ``A``, a block ``rows_per_block`` rows (of
    similar lengths, heaviest first, with ``sort_rows``) and ``columns_per_block``
    neighbouring columns of the product. What the warp's 32 lanes share out is ``lanes``:

    * ``"nonzeros"``: each lane takes every 32nd nonzero of the row and keeps one
      accumulator per column (up to 16); a warp reduction sums the lanes. ``unroll`` chunks
      of 32 nonzeros are loaded per loop trip, so that several loads are in flight at once.
      For a few columns: a matrix-vector product keeps every lane busy. ``warps_per_row``
      warps share a row's chunks (chunk ``t`` to warp ``t % warps_per_row``) and add up
      through shared memory after their reductions.
    * ``"columns"``: each lane owns ``columns_per_block / 32`` neighbouring columns (32, 64
      or 128 per block) and the warp walks the row's nonzeros in order, every lane reading
      the same (value, offset) pair and then its own columns of that row of X, ``unroll``
      nonzeros per trip. Each warp load of X is one contiguous run; it needs X's columns to
      be neighbours in memory (NCHW, or a transposed X). ``warps_per_row`` warps share a
      row (trip ``t`` to warp ``t % warps_per_row``) and add up through shared memory: a
      long row is a long chain of dependent loads for one warp. Through an NCHW
      convolution's window, a lane's columns are output pixels 32 apart, the batch is folded
      into the pixels, and a row's warps take contiguous shares of it (``csr_window_lanes``).
    """

    KERNEL: ClassVar[str] = "csr"
    LANES: ClassVar[tuple[str, ...]] = ("nonzeros", "columns")

    rows_per_block: int = 4
    columns_per_block: int = 1
    unroll: int = 2
    sort_rows: bool = True
    lanes: str = "nonzeros"
    warps_per_row: int = 1
    # With column lanes (not through a window): each trip loads the next trip's activations
    # before its own FMAs, so that a warp has two trips' loads in flight (twice the
    # activation registers; the pairs are read two trips ahead).
    pipelined: bool = False
    ptxas_opt_level: int = 3
    # The arrays cost about 6 bytes per nonzero in the cubin and 20 in the PTX text (8 and
    # 24 with column lanes: a float32 value and a 32-bit offset each).
    max_layer_nnz: int = 4_000_000

    def __post_init__(self):
        _check_positive(self, "rows_per_block", "columns_per_block", "unroll", "max_layer_nnz")
        if self.rows_per_block > 32:
            raise ValueError("rows_per_block must be at most 32 (one warp per row, 1024 threads)")
        if self.lanes not in self.LANES:
            raise ValueError(f"lanes must be one of {self.LANES}, got {self.lanes!r}")
        if self.column_lanes and self.columns_per_block not in (32, 64, 128):
            raise ValueError("with column lanes columns_per_block must be 32, 64 or 128 (1, 2 or 4 per lane)")
        if not self.column_lanes and self.columns_per_block > 16:
            raise ValueError("columns_per_block must be at most 16 (one accumulator per column and lane)")
        if self.warps_per_row not in (1, 2, 4, 8):
            raise ValueError("warps_per_row must be 1, 2, 4 or 8")
        if self.rows_per_block * self.warps_per_row > 32:
            raise ValueError("rows_per_block * warps_per_row must be at most 32 (1024 threads)")
        if self.unroll not in (1, 2, 4, 8):
            raise ValueError("unroll must be 1, 2, 4 or 8")
        if self.pipelined and not self.column_lanes:
            raise ValueError("pipelined trips need lanes over columns")
        self._check_opt_level()

    @property
    def threads_per_block(self) -> int:
        return 32 * self.rows_per_block * self.warps_per_row

    @property
    def column_lanes(self) -> bool:
        return self.lanes == "columns"

    @property
    def columns_per_lane(self) -> int:
        """Neighbouring columns each lane owns with column lanes (one vector load)."""
        return self.columns_per_block // 32 if self.column_lanes else 1


CudaConfig = CudaSpmmConfig | CudaCsrConfig
CUDA_CONFIGS: dict[str, type] = {c.KERNEL: c for c in (CudaSpmmConfig, CudaCsrConfig)}


def cuda_config_from_dict(fields: dict) -> CudaConfig:
    """The config that ``as_dict()`` wrote; a dict without ``"kernel"`` is the unrolled one
    (tuning records from before the CSR kernel), and a CSR one with column lanes but no tile
    has the narrowest. Raises TypeError on unknown fields and ValueError on an unknown
    kernel or bad values."""
    fields = dict(fields)
    if fields.get("kernel") == CudaCsrConfig.KERNEL and fields.get("lanes") == "columns":
        fields.setdefault("columns_per_block", 32)
    return config_from_dict(fields, CUDA_CONFIGS, "CUDA")


@dataclass(frozen=True)
class CpuSpmmConfig(_NamedKernelConfig):
    """Tiling of the unrolled CPU kernel.

    The product's columns are processed ``vector_lanes`` at a time (one SIMD vector per
    accumulator; through an NCHW window, no more than an output row holds). Consecutive
    rows of ``A`` holding at most ``max_nnz_per_segment`` nonzeros form a segment, a
    parallel loop of its own (LLVM's code generation is super-linear in function size);
    within a segment, rows are unrolled in chunks of ``rows_per_chunk``, whose sums are
    kept in registers while the chunk's columns of ``A`` are read one after another (the
    default leaves four of the CPU's vector registers for the rest).
    """

    KERNEL: ClassVar[str] = "unrolled"

    vector_lanes: int = 16
    rows_per_chunk: int = 28
    max_nnz_per_segment: int = 16384
    # Larger weights stay dense: LLVM takes minutes beyond this (measured in the README).
    max_layer_nnz: int = 250_000

    def __post_init__(self):
        _check_positive(self, "vector_lanes", "rows_per_chunk", "max_nnz_per_segment", "max_layer_nnz")


@dataclass(frozen=True)
class CpuCsrConfig(_NamedKernelConfig):
    """Tiling of the data-driven (CSR) CPU kernel: the nonzeros' values and input offsets
    are arrays the kernel walks, so its code, and its compile time, do not grow with the
    weight.

    Tiles of ``vector_lanes`` columns as in the unrolled kernel; each tile's rows are shared
    out in ``row_blocks`` tasks of about equal nonzeros (so that a product of a single tile,
    a matrix-vector product, still uses every core), and each row's nonzeros are summed in
    ``chains`` independent chains of fused multiply-adds (to hide their latency).
    """

    KERNEL: ClassVar[str] = "csr"

    vector_lanes: int = 32
    row_blocks: int = 1
    chains: int = 2
    # Arrays, not code: bounded only by 32-bit offsets.
    max_layer_nnz: int = 100_000_000

    def __post_init__(self):
        _check_positive(self, "vector_lanes", "row_blocks", "chains", "max_layer_nnz")


@dataclass(frozen=True)
class CpuDepthwiseConfig(_NamedKernelConfig):
    """Tiling of the CPU's depthwise kernel (NCHW convolutions whose filters each read one
    input channel): a task per output channel and image, each output row computed in
    vectors of ``vector_lanes`` pixels (fewer where the row is narrower)."""

    KERNEL: ClassVar[str] = "depthwise"

    vector_lanes: int = 16
    output_rows: int = 4
    # Arrays, not code; bounded by the filters' size (every channel holds every used tap).
    max_layer_nnz: int = 100_000_000

    def __post_init__(self):
        _check_positive(self, "vector_lanes", "output_rows", "max_layer_nnz")


CpuConfig = CpuSpmmConfig | CpuCsrConfig | CpuDepthwiseConfig
CPU_CONFIGS: dict[str, type] = {c.KERNEL: c for c in (CpuSpmmConfig, CpuCsrConfig, CpuDepthwiseConfig)}


KernelConfig = CudaSpmmConfig | CudaCsrConfig | CpuConfig


def _check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
