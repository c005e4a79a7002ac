"""The CPU's depthwise kernel (NCHW convolutions whose filters each read one input channel)
against numpy's im2col, and where the pass uses it."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparsert_tvm as sp
from conv_cases import make_conv
from helpers import CPU_TARGET
from sparsert_tvm.passes.candidates import find_candidates
from sparsert_tvm.schedules.cpu.depthwise_kernel import depthwise_arrays, input_channels, row_vectors
from test_conv import GEOMETRIES, check


def depthwise(rng, name, channels=6, multiplier=1, density=1.0, size=None, **options):
    geometry = GEOMETRIES[name]
    options.setdefault("batch", None)
    return make_conv(rng, channels * multiplier, channels, geometry.kernel, size or geometry.size, density,
                     groups=channels, **geometry.options(), **options)


def kernel_of(report) -> str:
    (layer,) = report.layers
    return layer.params["kernel"]


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("multiplier", [1, 2])
def test_geometries(name, multiplier):
    case = depthwise(np.random.default_rng(1), name, multiplier=multiplier, epilogue=("bias", "residual", "relu"))
    assert kernel_of(check(case, CPU_TARGET)) == "depthwise"


@pytest.mark.parametrize("width", [1, 3, 7, 14, 17, 37, 70])  # one lane; narrower, as wide as and wider than vectors
@pytest.mark.parametrize("height", [1, 3, 9])  # fewer rows than a step of four, and a last step moved back
@pytest.mark.parametrize("name", ["3x3", "3x3/2", "7x7/2"])
def test_row_vectors_overlap_at_the_end_of_rows_and_columns(name, width, height):
    case = depthwise(np.random.default_rng(2), name, channels=3, size=(height + 2, width), epilogue=("bias", "relu6"))
    check(case, CPU_TARGET, batches=(2,))


@pytest.mark.parametrize("config", [
    {"vector_lanes": 1, "output_rows": 1},
    {"vector_lanes": 4, "output_rows": 3},
    {"vector_lanes": 32, "output_rows": 4},
    {"vector_lanes": 8, "output_rows": 16},
], ids=str)
@pytest.mark.parametrize("name", ["3x3", "5x3/1x2-asymmetric"])
def test_configs(name, config):
    case = depthwise(np.random.default_rng(3), name, size=(11, 21), epilogue=("residual",))
    (layer,) = check(case, CPU_TARGET, kernel_config={"kernel": "depthwise", **config}).layers
    assert {key: layer.params[key] for key in ("kernel", *config)} == {"kernel": "depthwise", **config}


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5])
def test_pruned_filters_and_empty_channels(density):
    """Taps unused by every filter are left out; filters without nonzeros give their bias."""
    rng = np.random.default_rng(4)
    case = depthwise(rng, "5x5", channels=8, density=density, epilogue=("bias",))
    case.weight[:3] = 0
    case.weight[:, :, 0, :] = 0  # a kernel row no filter uses
    check(case, CPU_TARGET, density_threshold=1.0)
    (candidate,) = find_candidates("main", case.module()["main"])
    arrays = depthwise_arrays(candidate.problem)
    assert all(ky > 0 for ky, _ in arrays.taps)
    assert len(arrays.values) == 8 * len(arrays.taps) + 8 + 1  # filters, bias, one spare


def test_a_plane_too_large_for_the_stack():
    """Planes over 128 KiB are allocated from TVM's workspace, one per task."""
    case = depthwise(np.random.default_rng(5), "3x3", channels=2, size=(190, 190), epilogue=("bias",))
    check(case, CPU_TARGET, batches=(1,))


@pytest.mark.parametrize("kernel", ["csr", "unrolled"])
def test_the_product_kernels_still_take_depthwise_layers(kernel):
    case = depthwise(np.random.default_rng(6), "3x3/2", multiplier=2, density=0.5, epilogue=("bias", "relu"))
    assert kernel_of(check(case, CPU_TARGET, kernel_config={"kernel": kernel})) == kernel


def test_dense_depthwise_layers_are_rewritten_on_the_cpu_in_nchw_only():
    """At any density: NCHW gets the depthwise kernel; NHWC depthwise
    layers and other grouped ones stay with TVM unless sparse."""
    rng = np.random.default_rng(7)
    nchw = depthwise(rng, "3x3", epilogue=("bias", "relu"))
    (layer,) = sp.report_of(sp.SparsifyWeights(CPU_TARGET)(nchw.module())).layers
    assert layer.decision == "sparse" and layer.params["kernel"] == "depthwise"
    for case in (depthwise(rng, "3x3", layout="NHWC"), make_conv(rng, 8, 8, (3, 3), (6, 6), 1.0, groups=2)):
        (layer,) = sp.report_of(sp.SparsifyWeights(CPU_TARGET)(case.module())).layers
        assert layer.decision == "dense"


def test_convolutions_reading_several_channels_are_refused_with_a_reason():
    case = make_conv(np.random.default_rng(8), 6, 4, (3, 3), (6, 6), 0.5, batch=None)
    out = sp.SparsifyWeights(CPU_TARGET, 1.0, kernel_config={"kernel": "depthwise"})(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "dense" and "each read one input channel" in layer.reason


def test_matmuls_are_refused_with_a_reason():
    from helpers import Case

    case = Case("matmul_t", np.eye(4, dtype="float32"), (2, 4))
    out = sp.SparsifyWeights(CPU_TARGET, 1.0, kernel_config={"kernel": "depthwise"})(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "dense" and "NCHW convolutions" in layer.reason


def test_input_channels_follow_the_groups():
    case = depthwise(np.random.default_rng(9), "3x3", channels=4, multiplier=3, density=0.6)
    case.weight[5] = 0
    (candidate,) = find_candidates("main", case.module()["main"])
    channels = input_channels(candidate.problem)
    expected = np.arange(12) // 3
    expected[5] = 0  # an empty filter reads nothing; any channel does
    assert np.array_equal(channels, expected)


@pytest.mark.parametrize("config, error", [
    ({"kernel": "depthwise", "output_rows": 0}, ValueError),
    ({"kernel": "depthwise", "row_blocks": 2}, TypeError),
], ids=str)
def test_bad_configs_raise_up_front(config, error):
    with pytest.raises(error):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config=config)


@given(width=st.integers(1, 300), lanes=st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_row_vectors_cover_the_row_within_it(width, lanes):
    used, starts = row_vectors(width, lanes)
    assert used <= lanes and used & (used - 1) == 0 and used <= width
    assert all(0 <= s and s + used <= width for s in starts)
    covered = np.zeros(width, bool)
    for s in starts:
        covered[s : s + used] = True
    assert covered.all() and len(starts) == -(-width // used)
