"""Where the CSR kernel finds each nonzero: the arrays it carries, laid out for its warps.

A warp owns one row of ``A`` and reads it in *chunks* of ``chunk`` nonzeros. With lanes
over nonzeros a chunk is 32, lane ``l`` of chunk ``t`` taking element ``first + 32 * t + l``:
every chunk is one coalesced 128-byte load of values (and 64 of u16 indices). With lanes
over columns a chunk is one loop trip's nonzeros, read by every lane. Either way the loop
needs no predicate: each row is padded to a multiple of the chunk with zero values whose
column is the row's last one, so a padded entry reads an activation the row reads anyway (a
column never read by the row could hold an infinity and turn the row into NaN). Empty rows
take no chunk at all.

Per warp slot (``block * rows_per_block + warp``) a table holds ``(first, chunks, row)`` and
the float32 bits of the row's value of each bias add, padded to 16 bytes (vector loads);
slots beyond the last row have the row ``NO_ROW`` and exit at once.

Through a convolution's window (``window_csr_layout``) a row's nonzeros are ordered by tap
``(ky, kx)``, then channel, and each of its ``warps_per_row`` warps gets a contiguous share
of them with a slot of its own, which also holds the warp's trips of each tap: a tap's
nonzeros read the same shifted window, so the kernel tests the padding once per tap, not
per nonzero. Each tap's run is padded to whole trips with zero values of its last channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...problem import BiasAdd, SpmmProblem
from ..row_groups import group_rows, group_rows_by_length

LANES = 32
NO_ROW = 0xFFFFFFFF
SLOT_FIELDS = 3  # first element, chunks, row; the biases follow
# Column indices fit in 16 bits up to this many columns of A.
MAX_U16_COLUMNS = 1 << 16


@dataclass(frozen=True)
class CsrLayout:
    groups: tuple[tuple[int, ...], ...]  # rows of each block, warp by warp
    values: np.ndarray  # the weight's dtype, rows padded to multiples of the chunk
    indices: np.ndarray  # uint16 where K allows it, else uint32
    slots: np.ndarray  # uint32 [blocks * rows_per_block, 4 * n]: first element, chunks, row, biases

    @property
    def padded_nnz(self) -> int:
        return len(self.values)


def csr_layout(problem: SpmmProblem, rows_per_block: int, sort_rows: bool, chunk: int = LANES) -> CsrLayout:
    weight = problem.weight
    row_nnz = weight.row_nnz
    groups = _row_groups(row_nnz, rows_per_block, sort_rows)
    chunks = -(-row_nnz // chunk)
    total = int(chunks.sum()) * chunk
    values = np.zeros(total, weight.dense.dtype)
    indices = np.zeros(total, np.uint16 if problem.K <= MAX_U16_COLUMNS else np.uint32)
    bias = _bias_bits(problem)
    width = -(-(SLOT_FIELDS + bias.shape[1]) // 4) * 4
    slots = np.zeros((len(groups) * rows_per_block, width), np.uint32)
    slots[:, 2] = NO_ROW
    first = 0
    for g, rows in enumerate(groups):
        for w, m in enumerate(rows):
            columns, row_values = weight.row(m)
            size = int(chunks[m]) * chunk
            values[first : first + len(columns)] = row_values
            indices[first : first + len(columns)] = columns
            if len(columns):
                indices[first + len(columns) : first + size] = columns[-1]
            slot = slots[g * rows_per_block + w]
            slot[:SLOT_FIELDS] = first, chunks[m], m
            slot[SLOT_FIELDS : SLOT_FIELDS + bias.shape[1]] = bias[m]
            first += size
    return CsrLayout(groups=tuple(groups), values=values, indices=indices, slots=slots)


def window_csr_layout(
    problem: SpmmProblem, rows_per_block: int, warps_per_row: int, unroll: int, sort_rows: bool
) -> CsrLayout:
    """The layout of the CSR kernel through a convolution's window: slot ``(block *
    rows_per_block + row) * warps_per_row + part`` holds ``(first, trips, row)``, the biases,
    then the trips of each tap (``window_taps(problem)`` of them), two 16-bit counts a word."""
    weight, taps = problem.weight, window_taps(problem)
    row_nnz = weight.row_nnz
    groups = _row_groups(row_nnz, rows_per_block, sort_rows)
    bias = _bias_bits(problem)
    tap_field = SLOT_FIELDS + bias.shape[1]
    tap_words = -(-taps // 2)
    slots = np.zeros((len(groups) * rows_per_block * warps_per_row, -(-(tap_field + tap_words) // 4) * 4), np.uint32)
    slots[:, 2] = NO_ROW
    values, indices = [], []
    first = 0
    for g, rows in enumerate(groups):
        for w, m in enumerate(rows):
            columns, row_values = weight.row(m)
            order = np.lexsort((columns, columns % taps))  # by tap, then channel
            columns, row_values = columns[order], row_values[order]
            bounds = np.linspace(0, len(columns), warps_per_row + 1).round().astype(int)
            for part in range(warps_per_row):
                share = slice(bounds[part], bounds[part + 1])
                trips = _tap_runs(columns[share], row_values[share], taps, unroll, values, indices)
                slot = slots[(g * rows_per_block + w) * warps_per_row + part]
                slot[:SLOT_FIELDS] = first, trips.sum(), m
                slot[SLOT_FIELDS:tap_field] = bias[m]
                paired = np.zeros(2 * tap_words, np.uint32)
                paired[:taps] = trips
                slot[tap_field : tap_field + tap_words] = paired[0::2] | paired[1::2] << 16
                first += int(trips.sum()) * unroll
    dtype = weight.dense.dtype
    return CsrLayout(
        groups=tuple(groups),
        values=np.concatenate(values).astype(dtype) if values else np.zeros(0, dtype),
        indices=np.concatenate(indices).astype(np.uint32) if indices else np.zeros(0, np.uint32),
        slots=slots,
    )


def window_taps(problem: SpmmProblem) -> int:
    kh, kw = problem.window.kernel
    return kh * kw


def _tap_runs(columns, row_values, taps, unroll, values: list, indices: list) -> np.ndarray:
    """Appends each tap's run of ``columns`` (sorted by tap), padded to whole trips with zero
    values of the run's last column; returns the trips of each tap."""
    trips = np.zeros(taps, np.int64)
    tap_of = columns % taps
    for t in np.unique(tap_of):
        run = tap_of == t
        size = -(-int(run.sum()) // unroll) * unroll
        padded_columns = np.full(size, columns[run][-1])
        padded_columns[: run.sum()] = columns[run]
        padded_values = np.zeros(size, row_values.dtype)
        padded_values[: run.sum()] = row_values[run]
        indices.append(padded_columns)
        values.append(padded_values)
        trips[t] = size // unroll
    return trips


def _row_groups(row_nnz: np.ndarray, rows_per_block: int, sort_rows: bool) -> list[tuple[int, ...]]:
    """Each block's rows: of similar lengths, heaviest first, or consecutive."""
    return group_rows_by_length(row_nnz, rows_per_block) if sort_rows else group_rows(row_nnz, rows_per_block, False)


def _bias_bits(problem: SpmmProblem) -> np.ndarray:
    """[M, bias adds]: float32 bits of each row's values (the kernel adds them in float32)."""
    biases = [np.asarray(op.values, np.float32) for op in problem.epilogue if isinstance(op, BiasAdd)]
    return np.stack(biases, axis=1).view(np.uint32) if biases else np.zeros((problem.M, 0), np.uint32)
