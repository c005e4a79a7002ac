"""Property-based tests: random weights, epilogues, layouts and batches, sparse == dense.

Examples are drawn deterministically (the ``ci`` profile in conftest.py), so a failure
reproduces; a failure found becomes an ``@example`` on the test, kept for good.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CPU_TARGET, KINDS, Case, Compiled, assert_close, pruned_matrix

EPILOGUE_OPS = ("bias", "relu", "relu6", "clip", "residual")


@st.composite
def cases(draw):
    """A rewritable operator: form, weight (shape, density, row distribution, empty rows and
    columns), epilogue, and an activation shape with a static or symbolic batch."""
    kind = draw(st.sampled_from(KINDS))
    m, k = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    density = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        weight = pruned_matrix(rng, (m, k), density)
    else:
        weight = ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")
    if draw(st.booleans()):
        weight[: draw(st.integers(0, m))] = 0  # leading empty rows
    if draw(st.booleans()):
        weight[:, draw(st.integers(0, k - 1))] = 0  # an empty column
    epilogue = tuple(draw(st.lists(st.sampled_from(EPILOGUE_OPS), max_size=3, unique=True)))
    batch = None if draw(st.booleans()) else draw(st.integers(1, 5))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    x_shape = {
        "matmul": (batch, k),
        "matmul_t": (batch, draw(st.integers(1, 3)), k),
        "conv_nchw": (batch, k, *spatial),
        "conv_nhwc": (batch, *spatial, k),
    }[kind]
    bias = rng.standard_normal(m).astype("float32")
    return Case(kind, weight, x_shape, epilogue, bias), seed


def check_case(case_and_seed, target):
    case, seed = case_and_seed
    compiled = Compiled(case.module(), target, density_threshold=1.0)
    assert [layer.decision for layer in compiled.report] == ["sparse"], compiled.report.table()
    rng = np.random.default_rng(seed)
    for batch in (1, 3) if None in case.x_shape else (None,):
        arrays = case.inputs(rng, batch)
        assert_close(compiled(*arrays), case.reference(arrays))


@given(cases())
def test_sparse_equals_dense_on_cpu(case_and_seed):
    check_case(case_and_seed, CPU_TARGET)


@pytest.mark.gpu
@settings(max_examples=40)
@given(case_and_seed=cases())
def test_sparse_equals_dense_on_gpu(gpu_target, case_and_seed):
    check_case(case_and_seed, gpu_target)
