"""How many activation loads grouping rows by shared columns saves, without a GPU.

    python benchmarks/shared_columns.py > benchmarks/results/shared-columns-2core.md

For every unrolled default of the float32 paper suites (spmm.py's FC and 1x1 layers,
conv.py's ResNet-50 3x3 layers with the real pruned filters), counts the loads (each row
group's distinct nonzero columns) and the heaviest group's work (nonzeros plus loads) with
balanced grouping and with ``share_columns``, at the default's rows per block.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import conv  # noqa: E402
import spmm  # noqa: E402
from harness import sparse_problem  # noqa: E402

from sparsert_tvm.schedules.config import CudaSpmmConfig  # noqa: E402
from sparsert_tvm.schedules.row_groups import unrolled_row_groups  # noqa: E402
from sparsert_tvm.tuning import default_cuda_config  # noqa: E402


def group_loads(weight, groups) -> tuple[int, int]:
    """Loads of all groups, and the heaviest group's nonzeros plus loads."""
    mask = weight.dense != 0
    loads = [int(mask[list(rows)].any(axis=0).sum()) for rows in groups]
    work = [load + int(mask[list(rows)].sum()) for load, rows in zip(loads, groups)]
    return sum(loads), max(work)


def main():
    cases = [c for c, _ in spmm.paper_suite("float32")] + [c for c, _ in conv.resnet50_suite("float32")]
    rows = defaultdict(list)
    seconds = []
    for case in cases:
        problem = sparse_problem(case)
        config = default_cuda_config(problem)
        if not isinstance(config, CudaSpmmConfig) or config.rows_per_block == 1:
            continue
        balanced = unrolled_row_groups(problem.weight, config.rows_per_block, True, False)
        start = time.perf_counter()
        sharing = unrolled_row_groups(problem.weight, config.rows_per_block, True, True)
        seconds.append(time.perf_counter() - start)
        loads, heaviest = group_loads(problem.weight, balanced)
        shared_loads, shared_heaviest = group_loads(problem.weight, sharing)
        family = case.group + (" batch 8" if case.images > 1 else "")
        rows[family].append((shared_loads / loads, shared_heaviest / heaviest,
                             (shared_loads + problem.weight.nnz) / (loads + problem.weight.nnz)))
    print("| family | unrolled defaults | loads (median, min-max) | instructions | heaviest group (median, max) |")
    print("| --- | --- | --- | --- | --- |")
    for family, values in sorted(rows.items()):
        loads, heaviest, instructions = (np.array(v) for v in zip(*values))
        print(f"| {family} | {len(values)} | {np.median(loads):.3f} ({loads.min():.3f}-{loads.max():.3f}) | "
              f"{np.median(instructions):.3f} | {np.median(heaviest):.3f} ({heaviest.max():.3f}) |")
    print(f"\nGrouping took {np.median(seconds):.3f} s per layer (median), {max(seconds):.2f} s at most.")


if __name__ == "__main__":
    main()
