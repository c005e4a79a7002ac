"""Which rows of ``A`` are computed together, and how code is cut into functions.

Pruned weights have very uneven rows (some output channels keep ten times the nonzeros of
others), so consecutive runs of rows make some blocks much longer than others. Balanced
grouping packs rows, heaviest first, into the lightest block that still has room (the
longest-processing-time rule), then orders blocks heaviest first so the long ones start
early and the tail of the launch is short.

A group loads each activation its rows need once, shared by the rows that use it, so groups
whose rows share nonzero columns load less: ``group_rows_sharing_columns`` builds groups
greedily for that, under the balanced grouping's heaviest group.
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
    for row in _heaviest_first(row_nnz):
        load, g = heapq.heappop(open_groups)
        groups[g].append(row)
        loads[g] = load + int(row_nnz[row])
        if len(groups[g]) < rows_per_group:
            heapq.heappush(open_groups, (loads[g], g))
    order = _heaviest_first(loads)
    return [tuple(sorted(groups[g])) for g in order]


def group_rows_sharing_columns(indptr: np.ndarray, indices: np.ndarray, num_columns: int,
                               rows_per_group: int) -> list[tuple[int, ...]]:
    """Groups of ``rows_per_group`` rows (of a CSR pattern) that share nonzero columns.

    Each group starts from the heaviest free row and takes, one at a time, the free row with
    the smallest share of columns the group does not load yet, among those that keep the
    group's work (nonzeros plus distinct columns) within that of the balanced grouping's
    heaviest group; where none does, the row that adds least. Heaviest groups first.
    Over the paper suites' unrolled defaults this loads 5-21% fewer activation vectors than
    balanced grouping (median by family); the heaviest group can come out heavier, up to
    1.6x on a few small layers (benchmarks/results/shared-columns-2core.md).
    """
    row_nnz = np.diff(indptr)
    num_rows = len(row_nnz)
    balanced = group_rows(row_nnz, rows_per_group, True)
    cap = max(_nonzeros_and_loads(indptr, indices, rows) for rows in balanced)
    # Which rows have each column (the pattern's transpose).
    by_column = np.argsort(indices, kind="stable")
    rows_of_entries = np.repeat(np.arange(num_rows), row_nnz)[by_column]
    column_start = np.concatenate([[0], np.cumsum(np.bincount(indices, minlength=num_columns))])
    free = np.ones(num_rows, dtype=bool)
    heaviest = _heaviest_first(row_nnz)
    groups, work, seed = [], [], 0
    while free.any():
        while not free[heaviest[seed]]:
            seed += 1
        row = heaviest[seed]
        loaded = np.zeros(num_columns, dtype=bool)
        shared = np.zeros(num_rows, dtype=np.int64)  # nonzeros of each row in loaded columns
        group, load = [], 0
        while True:
            free[row] = False
            group.append(row)
            new_columns = indices[indptr[row] : indptr[row + 1]]
            new_columns = new_columns[~loaded[new_columns]]
            load += int(row_nnz[row]) + len(new_columns)
            loaded[new_columns] = True
            shared += np.bincount(rows_of_entries[_ranges(column_start, new_columns)], minlength=num_rows)
            if len(group) == rows_per_group or not free.any():
                break
            added = row_nnz - shared  # columns each row would add
            fits = free & (load + row_nnz + added <= cap)
            if fits.any():  # ties: the heavier row, then the lower index
                score = np.where(fits, added / np.maximum(row_nnz, 1) - row_nnz * 1e-9, np.inf)
            else:
                score = np.where(free, (row_nnz + added).astype(float), np.inf)
            row = int(np.argmin(score))
        groups.append(tuple(sorted(group)))
        work.append(load)
    order = _heaviest_first(work)
    return [groups[g] for g in order]


def _heaviest_first(weights) -> list[int]:
    """Indices of ``weights`` (rows' nonzeros, groups' work), heaviest first, ties by index."""
    return sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i))


def _ranges(start: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """The positions ``start[i] ... start[i + 1] - 1`` of every ``i`` in ``picked``, concatenated."""
    lengths = start[picked + 1] - start[picked]
    offsets = np.repeat(start[picked] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(int(lengths.sum()))


def _nonzeros_and_loads(indptr: np.ndarray, indices: np.ndarray, rows) -> int:
    """Nonzeros plus distinct columns of ``rows``: the FMAs and loads of their group."""
    columns = [indices[indptr[r] : indptr[r + 1]] for r in rows]
    return sum(len(c) for c in columns) + len(np.unique(np.concatenate(columns))) if columns else 0


def unrolled_row_groups(weight, rows_per_group: int, balance: bool, share_columns: bool) -> list[tuple[int, ...]]:
    """The row groups of an unrolled kernel's config (``CudaSpmmConfig``'s grouping fields)
    for ``weight`` (a ``weights.SparseMatrix``)."""
    if share_columns:
        indptr, indices, _ = weight.csr
        return group_rows_sharing_columns(indptr, indices, weight.shape[1], rows_per_group)
    return group_rows(weight.row_nnz, rows_per_group, balance)


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
    order = _heaviest_first(row_nnz)
    return [tuple(order[i : i + rows_per_group]) for i in range(0, len(order), rows_per_group)]
