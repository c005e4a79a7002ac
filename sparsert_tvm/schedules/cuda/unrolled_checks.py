"""Which tilings of the unrolled kernel a problem can take, and the memory they need:
vector widths, the padding's zero array, and the partial sums of a split (a block's shared
memory for ``split_k``, a module array for ``grid_split``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import UnsupportedProblem
from ...problem import SpmmProblem
from ..config import CudaSpmmConfig
from .row_span import RowSpan
from .staged_input import StagedInput

_MAX_VECTOR_REGISTERS = 4  # ld/st .v4 of 32-bit registers
# Static shared memory a block may declare.
_MAX_SHARED_BYTES = 48 * 1024
# Device memory a kernel's zero array may take (``padding_from_zeros``): VGG-16's first
# 3x3 layers (64 channels of 224x224) need 12.8 MB.
_MAX_ZEROS_BYTES = 16 * 1024 * 1024
# Device memory the partial sums of a grid split may take: S times the output.
_MAX_SUMS_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ElementType:
    """How a vector of ``width`` neighbouring columns sits in registers.

    float32: one register per column, FMAs take the weight as an immediate. float16: with an
    even width, two columns per 32-bit register and paired ``f16x2`` arithmetic; with width
    1, one 16-bit register. PTX has no f16 immediates, so the weight is moved into ``%w``
    first (ptxas folds the move into the FMA's immediate operand).
    """

    dtype: str
    width: int

    @property
    def element_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def columns_per_register(self) -> int:
        return 2 if self.dtype == "float16" and self.width % 2 == 0 else 1

    @property
    def registers(self) -> int:
        return self.width // self.columns_per_register

    @property
    def register_bytes(self) -> int:
        return 2 if self.reg == "b16" else 4

    @property
    def reg(self) -> str:  # register and memory type
        return {1: "b16", 2: "b32"}[self.columns_per_register] if self.dtype == "float16" else "f32"

    @property
    def arith(self) -> str:
        return "f32" if self.dtype == "float32" else ("f16x2" if self.columns_per_register == 2 else "f16")

    def constant(self, value: float) -> tuple[tuple[str, ...], str]:
        """Instructions putting ``value`` in every lane, and the operand naming it."""
        return self.constants(np.array([value]))[0]

    def constants(self, values: np.ndarray) -> list[tuple[tuple[str, ...], str]]:
        """``constant`` of each of ``values``, their bits taken in one conversion."""
        if self.dtype == "float32":
            return [((), f"0f{bits:08X}") for bits in values.astype(np.float32).view(np.uint32).tolist()]
        halves = values.astype(np.float16).view(np.uint16).tolist()
        if self.columns_per_register == 2:
            return [((f"mov.b32 %w, 0x{bits << 16 | bits:08X};",), "%w") for bits in halves]
        return [((f"mov.b16 %w, 0x{bits:04X};",), "%w") for bits in halves]


def check_vectorization(problem: SpmmProblem, config: CudaSpmmConfig) -> None:
    """Raises ``UnsupportedProblem`` if ``config.vector_width`` or ``config.fold_batch``
    cannot be used for ``problem``."""
    if config.fold_batch and not problem.images_apart:
        raise UnsupportedProblem("fold_batch: this layout has no batch dimension of its own (its rows are the columns)")
    width = config.vector_width
    if width == 1:
        return
    element = ElementType(problem.dtype, width)
    if element.registers > _MAX_VECTOR_REGISTERS:
        raise UnsupportedProblem(f"vector_width {width} exceeds one 128-bit load of {problem.dtype}")
    if problem.window is not None:
        # A vector's pixels must share an output row (their windows are then neighbours).
        if problem.window.output_size[1] % width:
            raise UnsupportedProblem(f"vector_width {width} needs an output width divisible by it")
        return
    if problem.x_strides().n != 1:
        raise UnsupportedProblem("vector loads need neighbouring columns of X adjacent in memory")
    columns = problem.static_columns
    if columns is None or columns % width:
        raise UnsupportedProblem(f"vector_width {width} needs a static column count divisible by it")


def check_padding(problem: SpmmProblem, config: CudaSpmmConfig) -> None:
    """Raises ``UnsupportedProblem`` if ``config.padding_from_zeros`` cannot be used."""
    if not config.padding_from_zeros:
        return
    if problem.window is None:
        raise UnsupportedProblem("padding_from_zeros: only a convolution's window reads padding")
    size = zeros_bytes(problem, config.vector_width)
    if size > _MAX_ZEROS_BYTES:
        raise UnsupportedProblem(f"padding_from_zeros: {size} bytes of zeros exceed {_MAX_ZEROS_BYTES}")


def check_staging(problem: SpmmProblem, config: CudaSpmmConfig) -> None:
    """Raises ``UnsupportedProblem`` if ``config.stage_channels`` cannot be used."""
    if config.stage_channels:
        StagedInput.of(problem, config)


def padding_from_zeros_fits(problem: SpmmProblem, vector_width: int) -> bool:
    """Whether the zero array of a window kernel with vectors of ``vector_width`` pixels
    stays within the device memory allowed for it."""
    return zeros_bytes(problem, vector_width) <= _MAX_ZEROS_BYTES


def zeros_bytes(problem: SpmmProblem, vector_width: int) -> int:
    """The zero array's size: the reach of a load's immediate offset past its chunk's start
    in channel 0 (later channels, and the rest of the chunk), rounded up to 16 bytes."""
    window, span = problem.window, RowSpan.of(problem.window, vector_width)
    reach = (window.channels - 1) * window.channel_stride + span.chunk * window.pixel_stride
    return -(-reach * ElementType(problem.dtype, 1).element_bytes // 16) * 16


def check_split(problem: SpmmProblem, config: CudaSpmmConfig) -> None:
    """Raises ``UnsupportedProblem`` if the partial sums of ``config.split_k`` slices do not
    fit in a block's static shared memory, or those of ``config.grid_split`` shares cannot be
    sized (a symbolic column count or batch) or exceed ``_MAX_SUMS_BYTES``."""
    size = partials_bytes(problem, config)
    if config.split_k > 1 and size > _MAX_SHARED_BYTES:
        raise UnsupportedProblem(
            f"split_k {config.split_k}: partial sums of {size} bytes exceed "
            f"{_MAX_SHARED_BYTES} bytes of shared memory (fewer rows per block or threads)"
        )
    if config.grid_split == 1:
        return
    if problem.static_columns is None or problem.static_batch is None:
        raise UnsupportedProblem("grid_split: the partial sums are sized for a static column count and batch")
    size = sums_bytes(problem, config)
    if size > _MAX_SUMS_BYTES:
        raise UnsupportedProblem(
            f"grid_split {config.grid_split}: partial sums of {size} bytes exceed {_MAX_SUMS_BYTES}"
        )


def launch_tiles(problem: SpmmProblem, config: CudaSpmmConfig) -> int:
    """Blocks of one launch row (column tiles, times images where each has its own)."""
    columns, images = problem.static_columns, problem.static_batch
    if config.fold_batch:
        columns, images = columns * images, 1
    per_block = config.threads_per_block * config.columns_per_thread * config.vector_width
    return -(-columns // per_block) * images


def sums_bytes(problem: SpmmProblem, config: CudaSpmmConfig) -> int:
    """The grid split's partial sums: every block's accumulators, for each of its launch rows."""
    element = ElementType(problem.dtype, config.vector_width)
    groups = -(-problem.M // config.rows_per_block)
    per_block = accumulators_of(config, element) * config.threads_per_block * element.register_bytes
    return launch_tiles(problem, config) * groups * config.grid_split * per_block


def partials_bytes(problem: SpmmProblem, config: CudaSpmmConfig) -> int:
    """Shared memory for the partial sums of every slice (in one function, the first slice
    keeps its own in registers)."""
    element = ElementType(problem.dtype, config.vector_width)
    slice_threads = config.threads_per_block // config.split_k
    return config.split_k * accumulators_of(config, element) * slice_threads * element.register_bytes


def accumulators_of(config: CudaSpmmConfig, element: ElementType) -> int:
    """Accumulator registers of a thread: one per row of its group and owned register."""
    return config.rows_per_block * config.columns_per_thread * element.registers
