"""The CPU's data-driven (CSR) kernel: its arrays, its default, and choosing between kernels.

Its numerics against numpy run in every CPU test of the other files (the ``target`` fixture
runs each with either CPU kernel as the default)."""

import numpy as np
import pytest
import tvm
from tvm import relax

import sparsert_tvm as sp
from sparsert_tvm import tuning
from sparsert_tvm.errors import UnsupportedProblem
from helpers import CPU_TARGET, Case, make_case, pruned_matrix
from sparsert_tvm.problem import Layout, SpmmProblem
from sparsert_tvm.schedules.cpu.csr_kernel import csr_arrays
from sparsert_tvm.weights import SparseMatrix
from test_numerics import X_SHAPES, check


def _problem(weight, n=8):
    m, k = weight.shape
    return SpmmProblem(SparseMatrix.from_dense(weight), Layout.ROWS, "float32", (n, k), (n, m))


@pytest.mark.parametrize("blocks", [1, 2, 7, 64])
def test_row_blocks_split_the_rows_into_even_consecutive_runs(blocks):
    rng = np.random.default_rng(0)
    problem = _problem(pruned_matrix(rng, (50, 40), 0.2))
    arrays = csr_arrays(problem, lambda k: 3 * k, blocks)
    indptr = arrays.index[: problem.M + 1]
    bounds = arrays.index[arrays.block_bounds : arrays.block_bounds + blocks + 1]
    assert bounds[0] == 0 and bounds[-1] == problem.M and (np.diff(bounds) >= 0).all()
    cost = np.diff(indptr) + 1  # a row costs its nonzeros and a store
    block_costs = [cost[lo:hi].sum() for lo, hi in zip(bounds[:-1], bounds[1:])]
    assert max(block_costs) <= cost.sum() / blocks + cost.max()
    # Offsets are the tap offsets of each nonzero's column, in CSR order.
    columns = np.nonzero(problem.weight.dense)[1]
    assert (arrays.index[arrays.offsets : arrays.offsets + problem.weight.nnz] == 3 * columns).all()
    assert (arrays.values[: problem.weight.nnz] == problem.weight.dense[problem.weight.dense != 0]).all()


@pytest.mark.parametrize(("k", "lanes"), [(768, 32), (2048, 32), (3072, 16), (8192, 16)])
def test_csr_tiles_narrow_where_a_staged_tile_would_leave_the_cache(k, lanes):
    """Two AVX-512 registers of columns, one where K rows of them pass 256 KB."""
    avx512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    weight = np.zeros((4, k), "float32")
    weight[:, ::97] = 1.0
    assert tuning.cpu_config(_problem(weight, n=128), "csr", avx512).vector_lanes == lanes


def test_offsets_beyond_32_bits_are_refused():
    """As an ``UnsupportedProblem``: the pass then leaves the layer dense, with the reason."""
    problem = _problem(np.eye(4, dtype="float32"))
    with pytest.raises(UnsupportedProblem, match="32 bits"):
        csr_arrays(problem, lambda k: k * 2**30, 1)


def test_the_cpu_default_unrolls_small_weights_only_and_either_kernel_is_a_choice(monkeypatch):
    monkeypatch.setattr(tuning.cpu_defaults, "CPU_UNROLLED_MAX_NNZ", 2048)  # a larger weight than the cap builds slowly
    rng = np.random.default_rng(1)
    small = make_case(rng, "conv_nchw", 30, 48, 0.2, X_SHAPES["conv_nchw"], ("bias", "relu"))
    assert np.count_nonzero(small.weight) <= tuning.cpu_defaults.CPU_UNROLLED_MAX_NNZ
    (layer,) = check(small, CPU_TARGET).layers
    assert layer.params["kernel"] == "unrolled"
    large = make_case(rng, "conv_nchw", 100, 48, 0.5, X_SHAPES["conv_nchw"], ("bias", "relu"))
    assert np.count_nonzero(large.weight) > tuning.cpu_defaults.CPU_UNROLLED_MAX_NNZ
    (layer,) = check(large, CPU_TARGET).layers
    assert layer.params["kernel"] == "csr" and layer.params["row_blocks"] >= 1
    (layer,) = check(small, CPU_TARGET, kernel_config={"kernel": "csr"}).layers
    assert layer.params["kernel"] == "csr"
    (layer,) = check(large, CPU_TARGET, kernel_config={"kernel": "unrolled"}).layers
    assert layer.params["kernel"] == "unrolled" and "rows_per_chunk" in layer.params
    # A dict without "kernel" holds the unrolled kernel's fields, as on CUDA.
    (layer,) = check(large, CPU_TARGET, kernel_config={"vector_lanes": 4}).layers
    assert layer.params["kernel"] == "unrolled" and layer.params["vector_lanes"] == 4


def test_csr_kernel_takes_weights_over_the_unrolled_cap():
    """Its code does not grow with the weight: a layer the unrolled kernel declines is built
    (in well under a second) and correct."""
    rng = np.random.default_rng(2)
    case = Case("matmul_t", rng.standard_normal((520, 500)).astype("float32"), (3, 500))
    (layer,) = check(case, CPU_TARGET, batches=(None,), density_threshold=1.0).layers
    assert layer.nnz > sp.CpuSpmmConfig().max_layer_nnz and layer.params["kernel"] == "csr"
    out = sp.SparsifyWeights(CPU_TARGET, 1.0, kernel_config={"kernel": "unrolled"})(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "dense" and "unrolled-code cap" in layer.reason


@pytest.mark.parametrize(
    "config, error",
    [
        ({"kernel": "dense"}, ValueError),
        ({"kernel": "csr", "rows_per_chunk": 3}, TypeError),
        ({"kernel": "csr", "chains": 0}, ValueError),
        ({"kernel": "unrolled", "row_blocks": 2}, TypeError),
    ],
    ids=str,
)
def test_bad_cpu_kernel_configs_raise_up_front(config, error):
    with pytest.raises(error):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config=config)


def test_zero_weights_are_skipped_with_infinite_activations():
    """Only true nonzeros are in the arrays: an Inf activation meets no zero weight, as in
    the unrolled kernel (the README's "Limits")."""
    weight = np.zeros((4, 6), "float32")
    weight[0, 1], weight[2, 3] = 2.0, -1.0
    vm = relax.VirtualMachine(sp.compile(Case("matmul_t", weight, (2, 6)).module(), CPU_TARGET, 1.0), tvm.cpu())
    x = np.ones((2, 6), "float32")
    x[:, 0] = np.inf  # a column of A without a nonzero
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert np.array_equal(y, np.array([[2, 0, -1, 0]] * 2, "float32"))
