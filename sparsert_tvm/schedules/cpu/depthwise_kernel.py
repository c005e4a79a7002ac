"""CPU: depthwise convolutions (NCHW), where each output channel reads one input channel.

The product kernels tile the output by pixels and sweep every channel for each tile, which
a depthwise layer repays badly: each row of ``A`` reads a different plane of the image, so
a tile touches every plane (TVM's untuned build ran 56x56 layers 1.7x faster). Here a task
is one output channel of one image instead: its input channel is copied, padded, into a
buffer that stays in L1, and each output row is a few vectors of ``vector_lanes`` pixels,
each the sum of the taps' shifted vectors of that buffer.

The taps are those nonzero in some filter; each channel's values for them (zero where that
filter has none) are an array the kernel reads, with the bias adds' values, so the code
is the same few instructions whatever the weight: it is a dense kernel over the used taps.
The last vector of a row is moved back to end at the row's end (overlapping the one before),
so that every store is a whole vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...errors import UnsupportedProblem
from ...problem import SpmmProblem
from ..base import kernel_columns_and_batch, operand_shapes, require_dtype
from ..config import CpuDepthwiseConfig
from .kernel import SUPPORTED_DTYPES
from .tiles import RowTiles, apply_epilogue, bias_reader, fma, kernel_body, scratch, values_and_biases


@dataclass(frozen=True)
class DepthwiseArrays:
    """The constant arrays a depthwise kernel reads."""

    values: np.ndarray  # float [M * taps]: each filter's value per used tap, then the bias adds' values
    channels: np.ndarray  # int32 [M]: the input channel each output channel reads
    taps: tuple[tuple[int, int], ...]  # (ky, kx) of the used taps
    bias_starts: tuple[int, ...]  # in ``values``, one per bias add of the epilogue


def input_channels(problem: SpmmProblem) -> np.ndarray | None:
    """The input channel each row of ``problem``'s weight reads (0 for rows without
    nonzeros), or None if some row reads several, or the convolution is not NCHW."""
    window = problem.window
    if window is None or window.channels_last:
        return None
    indptr, columns, _ = problem.weight.csr
    channel = np.asarray(columns) // window.taps
    counts = np.diff(indptr)
    first = np.zeros(problem.M, dtype=np.int64)
    first[counts > 0] = channel[indptr[:-1][counts > 0]]  # each row's first nonzero's channel
    if np.any(channel != np.repeat(first, counts)):
        return None
    return first


def require_depthwise(problem: SpmmProblem) -> np.ndarray:
    """``input_channels(problem)``; raises ``UnsupportedProblem`` where there are none."""
    channels = input_channels(problem)
    if channels is None:
        raise UnsupportedProblem(
            "the depthwise kernel takes NCHW convolutions whose filters each read one input channel"
        )
    return channels


def depthwise_arrays(problem: SpmmProblem) -> DepthwiseArrays:
    channels = require_depthwise(problem)
    kh, kw = problem.window.kernel
    indptr, columns, nonzeros = problem.weight.csr
    rows = np.repeat(np.arange(problem.M), np.diff(indptr))
    tap_of = np.asarray(columns) % (kh * kw)
    used = np.unique(tap_of)
    filters = np.zeros((problem.M, len(used)), dtype=problem.dtype)
    filters[rows, np.searchsorted(used, tap_of)] = nonzeros
    values, bias_starts = values_and_biases(problem, filters)
    taps = tuple((int(t) // kw, int(t) % kw) for t in used)
    return DepthwiseArrays(values, channels.astype(np.int32), taps, bias_starts)


def row_vectors(width: int, lanes: int) -> tuple[int, list[int]]:
    """Lanes per vector (``lanes``, or the widest power of two within ``width``) and where
    each vector of a row of ``width`` pixels starts: the last one ends at the row's end."""
    lanes = min(lanes, 1 << (width.bit_length() - 1))
    return lanes, [min(start, width - lanes) for start in range(0, width, lanes)]


def cpu_depthwise_kernel(problem: SpmmProblem, config: CpuDepthwiseConfig, name: str):
    """The kernel's PrimFunc and the arrays it takes."""
    require_dtype(problem, SUPPORTED_DTYPES, "the CPU generator")
    arrays = depthwise_arrays(problem)
    dtype, window, M = problem.dtype, problem.window, problem.M
    x_dims, y_dims = operand_shapes(problem)
    columns, batch = kernel_columns_and_batch(problem, x_dims)
    oh, ow = window.output_size
    lanes, starts = row_vectors(ow, config.vector_lanes)
    rows, row_starts = row_vectors(oh, config.output_rows)
    image = RowTiles(problem, columns, lanes)  # the padded copy's geometry, one channel at a time
    tap_offsets = [image.plane_offset(ky, kx) for ky, kx in arrays.taps]
    xs, ys = problem.x_strides(), problem.y_strides()

    with IRBuilder() as builder:
        with T.prim_func():
            constants = [("values", arrays.values.shape, dtype), ("channels", arrays.channels.shape, "int32")]
            with kernel_body(name, problem, x_dims, y_dims, constants) as (x_flat, r_flat, (values, channels), y_flat):
                bias = bias_reader(problem, values, arrays.bias_starts)
                with T.parallel(0, batch * M) as task:
                    b, m = tirx.floordiv(task, M), tirx.floormod(task, M)
                    plane = scratch(image.plane_size, dtype)
                    image.fill_plane(x_flat, b * xs.batch, channels[m], plane, 0)
                    weights = [values[m * len(arrays.taps) + t] for t in range(len(arrays.taps))]
                    with T.serial(0, len(row_starts)) as step:
                        first_row = tirx.min(step * rows, oh - rows)
                        for start in starts:
                            with T.vectorized(0, lanes) as lane:
                                base = first_row * window.stride[0] * image.row + start + lane
                                for r in range(rows):
                                    acc = tirx.const(0, dtype)
                                    for weight, offset in zip(weights, tap_offsets):
                                        tap = plane[base + r * window.stride[0] * image.row + offset]
                                        acc = fma(tap, weight, acc, dtype)
                                    at = b * ys.batch + m * ys.k + (first_row + r) * ow + start + lane
                                    value = apply_epilogue(problem.epilogue, acc, m, dtype, r_flat, at, bias)
                                    T.buffer_store(y_flat, value, [at])
    return builder.get(), arrays
