"""PTX of the data-driven (CSR) kernel: nonzeros read from arrays, one warp per row.

Unrolled code costs about 16 bytes of instructions per nonzero, streamed once per column
tile; at a few columns (fully connected layers at batch 1-8) that stream is the whole time.
Here the values and column indices are data (4-8 bytes per nonzero: f32 or f16 values,
u16 or u32 indices) in initialised ``.global`` arrays of the module itself, so the kernel
keeps the unrolled kernel's launch signature ``(x, [residual], y, ncols)`` and grid
``(ceil(columns / columns_per_block), row_groups, batch)``; only the structure (which row
each warp owns, where its nonzeros start, how many chunks it has) is fixed at compile time,
in a per-warp table (``.const`` where it is small).

With lanes over nonzeros (``csr_nonzero_lanes``) each lane takes every 32nd nonzero of
the warp's row and a warp reduction sums the lanes: for a few columns. With lanes over
columns (``csr_column_lanes``) each lane owns neighbouring columns and the warp walks its
row's nonzeros in order: for 16-128 columns that are neighbours in memory. Through an NCHW
convolution's window (``csr_window_lanes``) the lanes own output pixels and the walk goes
tap by tap: for images of a few pixels, whose unrolled code would serve only one warp.

float16 loads are converted to float32 and accumulated in float32 (unlike the unrolled
float16 kernels, which accumulate in float16); the result is rounded once, at the store.
"""

from __future__ import annotations

from ...errors import UnsupportedProblem
from ...problem import SpmmProblem
from ..base import require_dtype, require_nnz_at_most
from ..config import CudaCsrConfig
from .csr_column_lanes import ColumnLanes
from .csr_emitter import element_bytes
from .csr_layout import LANES, csr_layout, window_csr_layout, window_taps
from .csr_nonzero_lanes import NonzeroLanes
from .csr_window_lanes import WindowLanes
from .ptx_common import SUPPORTED_DTYPES, PtxKernel, param_types, ptx_header

_MAX_IMMEDIATE = 2**31 - 1
_MAX_U32 = 2**32 - 1


def check_csr(problem: SpmmProblem, config: CudaCsrConfig) -> None:
    """Raises ``UnsupportedProblem`` where the CSR kernel cannot compute ``problem``."""
    require_dtype(problem, SUPPORTED_DTYPES, "the CUDA generator")
    require_nnz_at_most(problem, config.max_layer_nnz, "the CSR kernel's cap", "its arrays are PTX text and cubin data")
    if problem.window is not None:
        _check_window(problem, config)
        return
    es = element_bytes(problem)
    xs, ys = problem.x_strides(), problem.y_strides()
    if problem.runtime_row_stride and not config.column_lanes:
        raise UnsupportedProblem(
            "with X transposed and a symbolic column count only the CSR kernel's column lanes "
            "read X (its row stride is known at run time only)"
        )
    # Products of a 32-bit index with these are 64-bit (mul.wide.u32), the column offsets
    # within a tile are immediates.
    if max(xs.k or 0, xs.n, ys.k, ys.n) * es > _MAX_U32 or (config.columns_per_block - 1) * xs.n * es > _MAX_IMMEDIATE:
        raise UnsupportedProblem("tensor too large for the CSR kernel's 32-bit strides")
    if problem.weight.nnz + (LANES - 1) * problem.M > _MAX_U32:
        raise UnsupportedProblem("too many nonzeros for the CSR kernel's 32-bit element indices")
    if config.column_lanes:
        _check_column_lanes(problem, config)


def _check_column_lanes(problem: SpmmProblem, config: CudaCsrConfig) -> None:
    es, xs, ys = element_bytes(problem), problem.x_strides(), problem.y_strides()
    if xs.n != 1:
        raise UnsupportedProblem(
            "CSR column lanes need X's columns to be neighbours in memory (NCHW, or X transposed)"
        )
    width, columns = config.columns_per_lane, problem.static_columns
    if width > 1 and (columns is None or columns % width):
        raise UnsupportedProblem(f"{width} columns per lane need a static column count divisible by {width}")
    # At run time the row offset is a 64-bit product (mul.wide.u32 of the row and its bytes).
    if (problem.K - 1) * (xs.k or 0) * es > _MAX_U32 or (width - 1) * ys.n * es > _MAX_IMMEDIATE:
        raise UnsupportedProblem("tensor too large for the CSR kernel's 32-bit row offsets")


def _check_window(problem: SpmmProblem, config: CudaCsrConfig) -> None:
    win, es = problem.window, element_bytes(problem)
    if not config.column_lanes:
        raise UnsupportedProblem("through a convolution's window the CSR kernel needs lanes over columns")
    if config.pipelined:
        raise UnsupportedProblem("pipelined trips are not built through a convolution's window")
    if win.channels_last:
        raise UnsupportedProblem(
            "CSR column lanes through a window need NCHW: in NHWC neighbouring pixels are a channel count apart"
        )
    # Image, channel and tap offsets are 32-bit (mul.wide.u32 and immediates).
    images = max(win.image_size, problem.M * problem.static_columns) * es
    if images > _MAX_U32 or (win.padding_offset + win.image_size) * es > _MAX_IMMEDIATE:
        raise UnsupportedProblem("images too large for the CSR kernel's 32-bit offsets")
    if win.channels // config.unroll >= 2**16:
        raise UnsupportedProblem("too many input channels for the CSR kernel's 16-bit trip counts per tap")
    if problem.weight.nnz + config.unroll * window_taps(problem) * problem.M * config.warps_per_row > _MAX_U32:
        raise UnsupportedProblem("too many nonzeros for the CSR kernel's 32-bit element indices")


def emit_csr_ptx(problem: SpmmProblem, config: CudaCsrConfig, name: str, arch: str) -> PtxKernel:
    check_csr(problem, config)
    if problem.window is not None:
        layout = window_csr_layout(problem, config.rows_per_block, config.warps_per_row, config.unroll, config.sort_rows)
        emitter = WindowLanes(problem, config, layout, name)
    else:
        chunk = config.unroll if config.column_lanes else LANES
        layout = csr_layout(problem, config.rows_per_block, config.sort_rows, chunk)
        emitter = (ColumnLanes if config.column_lanes else NonzeroLanes)(problem, config, layout, name)
    text = "\n".join(ptx_header(arch) + emitter.arrays() + emitter.entry()) + "\n"
    return PtxKernel(
        name=name,
        units=(text,),
        row_groups=len(layout.groups),
        threads=config.threads_per_block,
        columns_per_block=config.columns_per_block,
        param_types=param_types(problem),
        folds_batch=emitter.folds_batch,
    )
