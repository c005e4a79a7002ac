"""Which rows of a weight share a block: balanced grouping and grouping by shared columns."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import pruned_matrix, sparse_matrix
from sparsert_tvm.schedules.config import CudaSpmmConfig
from sparsert_tvm.schedules.row_groups import group_rows, group_rows_sharing_columns, unrolled_row_groups
from sparsert_tvm.weights import SparseMatrix


def loads(weight: SparseMatrix, groups) -> int:
    """Activation vectors the groups load: each group's distinct nonzero columns."""
    return sum(int((weight.dense[list(rows)] != 0).any(axis=0).sum()) for rows in groups)


def work(weight: SparseMatrix, rows) -> int:
    mask = weight.dense[list(rows)] != 0
    return int(mask.sum() + mask.any(axis=0).sum())


def sharing(weight: SparseMatrix, rows_per_group: int):
    return unrolled_row_groups(weight, rows_per_group, balance=True, share_columns=True)


@given(
    rows=st.integers(1, 40),
    columns=st.integers(1, 30),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    rows_per_group=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_groups_sharing_columns_partition_the_rows_like_balanced_groups(rows, columns, density, rows_per_group, seed):
    weight = SparseMatrix.from_dense(sparse_matrix(np.random.default_rng(seed), (rows, columns), density, empty_rows=2))
    groups = sharing(weight, rows_per_group)
    assert sorted(r for g in groups for r in g) == list(range(rows))
    assert all(1 <= len(g) <= rows_per_group for g in groups) and all(list(g) == sorted(g) for g in groups)
    assert len(groups) == len(group_rows(weight.row_nnz, rows_per_group, True)) == -(-rows // rows_per_group)
    assert [work(weight, g) for g in groups] == sorted((work(weight, g) for g in groups), reverse=True)
    assert groups == sharing(weight, rows_per_group)  # deterministic: kernels are cached by config


@pytest.mark.parametrize("shape, density, rows_per_group, at_most", [
    ((768, 192), 0.1, 16, 0.85),  # uniform masks: rows share columns by chance only (0.76 seen)
    ((256, 288), 0.1, 8, 0.9),  # 0.84
    ((128, 576), 0.1, 16, 0.85),  # magnitude-pruned, uneven rows: 0.77
])
def test_sharing_columns_loads_fewer_activations(shape, density, rows_per_group, at_most):
    rng = np.random.default_rng(0)
    dense = sparse_matrix(rng, shape, density) if shape[0] > 256 else pruned_matrix(rng, shape, density)
    weight = SparseMatrix.from_dense(dense)
    balanced = group_rows(weight.row_nnz, rows_per_group, True)
    assert loads(weight, sharing(weight, rows_per_group)) <= at_most * loads(weight, balanced)


def test_rows_of_one_pattern_are_grouped_together():
    # Rows of two patterns, interleaved: balanced grouping mixes them (it packs the heavier
    # rows first, one per group), grouping by shared columns keeps each pattern together,
    # so that every group loads one pattern's columns.
    heavy, light = np.zeros(12), np.zeros(12)
    heavy[:3], light[6:8] = 1.0, 2.0
    weight = SparseMatrix.from_dense(np.stack([heavy, light] * 4))
    assert sharing(weight, 4) == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert loads(weight, sharing(weight, 4)) == 3 + 2
    assert loads(weight, group_rows(weight.row_nnz, 4, True)) == 2 * (3 + 2)


def test_sharing_columns_needs_balanced_rows():
    with pytest.raises(ValueError, match="needs balance_rows"):
        CudaSpmmConfig(share_columns=True, balance_rows=False)


def test_unrolled_row_groups_follow_the_config_fields():
    weight = SparseMatrix.from_dense(sparse_matrix(np.random.default_rng(1), (20, 16), 0.3))
    assert unrolled_row_groups(weight, 4, False, False) == [tuple(range(i, i + 4)) for i in range(0, 20, 4)]
    assert unrolled_row_groups(weight, 4, True, False) == group_rows(weight.row_nnz, 4, True)
    indptr, indices, _ = weight.csr
    assert unrolled_row_groups(weight, 4, True, True) == group_rows_sharing_columns(indptr, indices, 16, 4)
