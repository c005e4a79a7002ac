"""Which rows of ``A`` share a thread block.

Pruned weights have very uneven rows (some output channels keep ten times the nonzeros of
others), so consecutive runs of rows make some blocks much longer than others. Balanced
grouping packs rows, heaviest first, into the lightest block that still has room (the
longest-processing-time rule), then orders blocks heaviest first so the long ones start
early and the tail of the launch is short.
"""

from __future__ import annotations

import heapq

import numpy as np


def group_rows(row_nnz: np.ndarray, rows_per_group: int, balance: bool) -> list[tuple[int, ...]]:
    """Partition ``range(len(row_nnz))`` into groups of at most ``rows_per_group`` rows."""
    num_rows = len(row_nnz)
    num_groups = -(-num_rows // rows_per_group)
    if not balance:
        return [
            tuple(range(g * rows_per_group, min((g + 1) * rows_per_group, num_rows)))
            for g in range(num_groups)
        ]
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    loads = [0] * num_groups
    # (load, index) of the groups that still have room; ties go to the lower index.
    open_groups = [(0, g) for g in range(num_groups)]
    for row in sorted(range(num_rows), key=lambda r: (-int(row_nnz[r]), r)):
        load, g = heapq.heappop(open_groups)
        groups[g].append(row)
        loads[g] = load + int(row_nnz[row])
        if len(groups[g]) < rows_per_group:
            heapq.heappush(open_groups, (loads[g], g))
    order = sorted(range(num_groups), key=lambda g: (-loads[g], g))
    return [tuple(sorted(groups[g])) for g in order]
