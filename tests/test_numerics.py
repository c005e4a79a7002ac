"""Every generated kernel against numpy: shapes, densities, empty rows, batches, epilogues."""

import numpy as np
import pytest

from helpers import CPU_TARGET, KINDS, Case, Compiled, assert_close, make_case, pruned_matrix, sparse_matrix

X_SHAPES = {  # (batch stays symbolic where None)
    "matmul": (None, 48),
    "matmul_t": (None, 48),
    "conv_nchw": (None, 48, 5, 3),
    "conv_nhwc": (None, 5, 3, 48),
}


def check(case: Case, target, batches=(1, 3), seed=0, **options):
    """Compiles ``case`` with every candidate rewritten and compares each batch with numpy."""
    compiled = Compiled(case.module(), target, **options)
    assert [layer.decision for layer in compiled.report] == ["sparse"], compiled.report.table()
    rng = np.random.default_rng(seed)
    for batch in batches:
        arrays = case.inputs(rng, batch)
        assert_close(compiled(*arrays), case.reference(arrays), case.dtype)
    return compiled.report


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_densities(target, kind, density):
    rng = np.random.default_rng(1)
    check(make_case(rng, kind, 40, 48, density, X_SHAPES[kind]), target)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "epilogue",
    [("bias",), ("relu",), ("bias", "relu6"), ("bias", "residual", "relu"), ("residual", "clip"), ("relu", "bias")],
    ids="+".join,
)
def test_epilogues(target, kind, epilogue):
    rng = np.random.default_rng(2)
    case = make_case(rng, kind, 24, 48, 0.15, X_SHAPES[kind], epilogue)
    report = check(case, target)
    assert report.layers[0].epilogue == [
        {"bias": "bias", "relu": "relu", "relu6": "relu6", "clip": "clip(-0.5, 0.5)", "residual": "residual"}[op]
        for op in epilogue
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_rows_and_columns(target, kind):
    rng = np.random.default_rng(3)
    case = make_case(rng, kind, 33, 48, 0.2, X_SHAPES[kind], ("bias",), empty_rows=9, empty_cols=20)
    check(case, target)


@pytest.mark.parametrize("kind", KINDS)
def test_odd_sizes_and_static_batch(target, kind):
    rng = np.random.default_rng(4)
    x_shape = {"matmul": (7, 13), "matmul_t": (2, 3, 13), "conv_nchw": (3, 13, 7, 1), "conv_nhwc": (2, 1, 7, 13)}[kind]
    check(make_case(rng, kind, 7, 13, 0.3, x_shape), target, batches=(None,))


def test_uneven_pruned_rows(target):
    rng = np.random.default_rng(5)
    case = Case("matmul_t", pruned_matrix(rng, (96, 64), 0.1), (None, 64))
    report = check(case, target, batches=(1, 130))
    assert report.layers[0].nnz == np.count_nonzero(case.weight)


@pytest.mark.parametrize(
    "config",
    [
        {"rows_per_block": 1},
        {"rows_per_block": 8, "columns_per_thread": 2, "balance_rows": False},
        {"columns_per_thread": 4, "threads_per_block": 32},
        {"max_instructions_per_segment": 100},  # many separately assembled segments
    ],
    ids=str,
)
def test_cuda_tilings(gpu_target, config):
    rng = np.random.default_rng(6)
    for kind in ("matmul", "conv_nchw"):
        case = make_case(rng, kind, 37, 48, 0.2, X_SHAPES[kind], ("bias", "residual", "relu"))
        report = check(case, gpu_target, batches=(1, 5, 300), kernel_config=config)
        for key, value in config.items():
            assert report.layers[0].params[key] == value


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "kind, x_shape, config",
    [
        ("conv_nchw", (None, 48, 4, 6), {"vector_width": 2}),
        ("conv_nchw", (None, 48, 4, 6), {"vector_width": 4, "columns_per_thread": 2, "threads_per_block": 32}),
        ("matmul_t", (64, 48), {"vector_width": 4}),  # X transposed in Relax, vector loads of X^T
        ("matmul", (None, 48), {}),  # symbolic rows: one column per register
        ("conv_nhwc", (2, 3, 5, 48), {"rows_per_block": 8}),
    ],
    ids=str,
)
def test_cuda_vectors_and_float16(gpu_target, dtype, kind, x_shape, config):
    rng = np.random.default_rng(10)
    case = make_case(rng, kind, 37, 48, 0.2, x_shape, ("bias", "residual", "relu6"), dtype=dtype)
    batches = (1, 3) if None in x_shape else (None,)
    report = check(case, gpu_target, batches=batches, kernel_config=config)
    for key, value in config.items():
        assert report.layers[0].params[key] == value


def test_cuda_float16_pairs_by_default(gpu_target):
    rng = np.random.default_rng(11)
    case = make_case(rng, "conv_nchw", 64, 48, 0.1, (2, 48, 7, 8), ("bias", "relu"), dtype="float16")
    report = check(case, gpu_target, batches=(None,))
    assert report.layers[0].params["vector_width"] >= 2


@pytest.mark.parametrize(
    "config",
    [
        {"vector_lanes": 1},
        {"vector_lanes": 4, "rows_per_chunk": 5},
        {"max_nnz_per_segment": 30, "rows_per_chunk": 3},
        {"kernel": "csr", "vector_lanes": 1, "chains": 1},
        {"kernel": "csr", "vector_lanes": 4, "row_blocks": 3, "chains": 3},
        {"kernel": "csr", "vector_lanes": 8, "row_blocks": 200},  # more blocks than rows: some empty
    ],
    ids=str,
)
@pytest.mark.parametrize("kind", ["matmul", "matmul_t", "conv_nchw", "conv_nhwc"])
def test_cpu_tilings(config, kind):
    """150 rows: the CSR kernel's row output (matmul) is stored in chunks of 64 rows."""
    rng = np.random.default_rng(7)
    case = make_case(rng, kind, 150, 48, 0.2, X_SHAPES[kind], ("bias", "residual", "relu"))
    report = check(case, CPU_TARGET, batches=(1, 5, 19), kernel_config=config)
    assert {key: report.layers[0].params[key] for key in config} == config


@pytest.mark.parametrize("lanes", [4, 16, 32])
@pytest.mark.parametrize("spatial", [(4, 8), (5, 3)], ids=["whole-tiles", "partial-tile"])
def test_cpu_vector_stores(lanes, spatial):
    """NCHW outputs in whole tiles of columns are stored as vectors straight from the sums;
    otherwise staged and stored one by one with the last tile's bounds check."""
    rng = np.random.default_rng(12)
    case = make_case(rng, "conv_nchw", 37, 48, 0.2, (None, 48, *spatial), ("bias", "residual", "relu6"))
    check(case, CPU_TARGET, batches=(1, 3), kernel_config={"vector_lanes": lanes})
    check(case, CPU_TARGET, batches=(1, 3), kernel_config={"kernel": "csr", "vector_lanes": lanes})


def test_1d_activation(target):
    rng = np.random.default_rng(8)
    case = Case("matmul", sparse_matrix(rng, (10, 12), 0.3), (12,))
    check(case, target, batches=(None,))


@pytest.mark.parametrize("x_shape", [(40, 48), (2, 20, 48)], ids=str)
def test_many_static_columns(target, x_shape):
    """Enough static columns that the CUDA path transposes X (in Relax) first."""
    rng = np.random.default_rng(9)
    case = make_case(rng, "matmul_t", 37, 48, 0.2, x_shape, ("bias", "residual", "relu"))
    report = check(case, target, batches=(None,))
    if target.kind.name == "cuda":
        assert report.layers[0].params["x_transposed"]
