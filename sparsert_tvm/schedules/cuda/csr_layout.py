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
    if sort_rows:
        groups = group_rows_by_length(row_nnz, rows_per_block)
    else:
        groups = group_rows(row_nnz, rows_per_block, balance=False)
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


def _bias_bits(problem: SpmmProblem) -> np.ndarray:
    """[M, bias adds]: float32 bits of each row's values (the kernel adds them in float32)."""
    biases = [np.asarray(op.values, np.float32) for op in problem.epilogue if isinstance(op, BiasAdd)]
    return np.stack(biases, axis=1).view(np.uint32) if biases else np.zeros((problem.M, 0), np.uint32)
