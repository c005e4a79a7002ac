"""Which rows of ``A`` are computed together, and how code is cut into functions.

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


def split_by_cost(items: list, costs, max_cost: int) -> list[list]:
    """Consecutive runs of ``items`` whose ``costs`` add up to at most ``max_cost`` each (an
    item costing more than that gets a run of its own). Code generators compile each run as
    a separate function: compilers' time grows faster than linearly with function size."""
    runs, current, load = [], [], 0
    for item, cost in zip(items, costs, strict=True):
        if current and load + cost > max_cost:
            runs.append(current)
            current, load = [], 0
        current.append(item)
        load += cost
    runs.append(current)
    return runs


def group_rows_by_length(row_nnz: np.ndarray, rows_per_group: int) -> list[tuple[int, ...]]:
    """Rows sorted by nonzero count, heaviest first (ties by index), in runs of
    ``rows_per_group``: kernels whose rows run side by side (a warp each) then finish together,
    and the long blocks start first."""
    order = sorted(range(len(row_nnz)), key=lambda r: (-int(row_nnz[r]), r))
    return [tuple(order[i : i + rows_per_group]) for i in range(0, len(order), rows_per_group)]
