"""The CSR kernel's column lanes through a convolution's window (``csr_window_lanes``):
emulated against numpy's convolution over every geometry, its layout, what it rejects, when
it is the default; assembled with ptxas; on the GPU where there is one."""

import dataclasses
import subprocess

import numpy as np
import pytest

from conv_cases import make_conv
from helpers import assert_close
from sparsert_tvm.errors import UnsupportedProblem
from sparsert_tvm.schedules.config import CudaCsrConfig
from sparsert_tvm.schedules.cuda import rule as cuda_rule
from sparsert_tvm.schedules.cuda.assemble import assemble, find_tool
from sparsert_tvm.schedules.cuda.csr_layout import NO_ROW, SLOT_FIELDS, window_csr_layout
from sparsert_tvm.schedules.cuda.csr_ptx import emit_csr_ptx
from sparsert_tvm.tuning import default_cuda_config, prefers_window_lanes, space
from test_conv import GEOMETRIES, check, conv, problem_of
from test_cuda_codegen import emulate, needs_ptxas


def lanes(columns=32, unroll=2, rows=2, warps=1, sort_rows=True) -> CudaCsrConfig:
    return CudaCsrConfig(
        lanes="columns", columns_per_block=columns, unroll=unroll, rows_per_block=rows, warps_per_row=warps,
        sort_rows=sort_rows,
    )


CONFIGS = [
    lanes(),
    lanes(columns=64, unroll=8, rows=3, warps=2),  # rows of a block sharing no slot; missing slots at the barrier
    lanes(columns=128, unroll=1, rows=1, warps=4, sort_rows=False),
    lanes(columns=128, unroll=4, rows=4, warps=2),
]
CONFIG_IDS = ["plain", "two-columns-two-warps", "four-columns-four-warps", "four-columns-unroll-4"]


def emulate_case(case, config, batch=2):
    rng = np.random.default_rng(0)
    arrays = case.inputs(rng, batch)
    out, _ = emulate(problem_of(case), config, rng, arrays)
    assert not np.isnan(out).any()  # every output written
    assert_close(out, case.reference(arrays), case.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_every_geometry_and_epilogue(name, config, dtype):
    """Every load is checked against the buffers' bounds: a tap read in the padding instead
    of skipped fails here even where it would read a zero."""
    rng = np.random.default_rng(9)
    case = conv(rng, name, "NCHW", m=10, channels=3, dtype=dtype, batch=2, epilogue=("bias", "residual", "relu6"))
    emulate_case(case, config)


@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_densities_and_empty_rows(density, config):
    rng = np.random.default_rng(10)
    case = make_conv(rng, 7, 4, (3, 3), (6, 5), density, padding=(1, 1, 1, 1), layout="NCHW", batch=3,
                     epilogue=("bias",))
    case.weight[2] = 0  # an empty row among full ones
    emulate_case(case, config, batch=3)


def test_a_symbolic_batch_folds_into_the_columns():
    rng = np.random.default_rng(11)
    case = conv(rng, "3x3/2", "NCHW", m=6, channels=3)  # batch symbolic
    problem = problem_of(case)
    assert problem.static_batch is None
    arrays = case.inputs(rng, 5)
    out, _ = emulate(problem, lanes(columns=64), rng, arrays, x_shape=arrays[0].shape)
    assert_close(out, case.reference(arrays))


def test_layout_orders_taps_pads_them_and_gives_each_warp_a_slot():
    rng = np.random.default_rng(12)
    case = make_conv(rng, 3, 5, (3, 3), (4, 4), 0.0, padding=(1, 1, 1, 1), layout="NCHW", batch=1, epilogue=("bias",))
    weight = case.weight.reshape(3, -1)
    weight[0, [0 * 9 + 4, 3 * 9 + 4, 1 * 9 + 0]] = [1.0, 2.0, 3.0]  # taps (1, 1), (1, 1), (0, 0)
    weight[2, 4 * 9 + 8] = 4.0  # row 1 stays empty
    problem = problem_of(case)
    layout = window_csr_layout(problem, rows_per_block=2, warps_per_row=2, unroll=2, sort_rows=True)
    assert layout.groups == ((0, 2), (1,))
    assert layout.slots.shape[0] == 2 * 2 * 2  # a slot per warp, missing ones included
    rows = layout.slots[:, 2].tolist()
    assert rows == [0, 0, 2, 2, 1, 1, NO_ROW, NO_ROW]
    taps = SLOT_FIELDS + 1  # after the one bias
    trips = [[(word >> shift) & 0xFFFF for word in slot[taps : taps + 5] for shift in (0, 16)][:9]
             for slot in layout.slots]
    # Row 0's three nonzeros split 2 + 1 (by position in tap order): tap 0 goes to warp 0
    # with the first of tap 4; warp 1 takes the second of tap 4.
    assert trips[0] == [1, 0, 0, 0, 1, 0, 0, 0, 0] and trips[1] == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    first = layout.slots[0, 0]
    assert layout.indices[first : first + 4].tolist() == [9, 9, 4, 4]  # each tap padded with its last channel
    assert layout.values[first : first + 4].tolist() == [3.0, 0.0, 1.0, 0.0]
    assert trips[3] == [0] * 8 + [1] and trips[2] == [0] * 9  # row 2's single nonzero: warp 1 of its pair
    assert sum(map(sum, trips[4:])) == 0  # an empty row and a missing one run no trip


def test_what_window_lanes_reject():
    rng = np.random.default_rng(13)
    rule = cuda_rule.CudaSpmmRule()
    nhwc = problem_of(conv(rng, "3x3", "NHWC", batch=1))
    with pytest.raises(UnsupportedProblem, match="NCHW"):
        rule.check(nhwc, lanes())
    nchw = problem_of(conv(rng, "3x3", "NCHW", batch=1))
    rule.check(nchw, lanes())
    with pytest.raises(UnsupportedProblem, match="lanes over columns"):
        rule.check(nchw, CudaCsrConfig())  # lanes over nonzeros read X by column offsets
    many_channels = dataclasses.replace(
        nchw, window=dataclasses.replace(nchw.window, channels=2**16 * 2)
    )
    with pytest.raises(UnsupportedProblem, match="16-bit trip counts"):
        rule.check(many_channels, lanes())


def stage4(rng, batch, density=0.1):
    """ResNet-50's stage-4 3x3 layer (512 channels of 7x7), about 236k nonzeros at 10%."""
    return make_conv(rng, 512, 512, (3, 3), (7, 7), density, padding=(1, 1, 1, 1), layout="NCHW", batch=batch)


def test_default_for_few_pixels_and_many_nonzeros_only():
    rng = np.random.default_rng(14)
    batch1 = problem_of(stage4(rng, 1))
    assert prefers_window_lanes(batch1)
    config = default_cuda_config(batch1)
    assert config.column_lanes and config.columns_per_block == 32 and config.warps_per_row == 2
    for other in (
        dataclasses.replace(batch1, x_shape=(8, *batch1.x_shape[1:]), y_shape=(8, *batch1.y_shape[1:])),
        problem_of(stage4(rng, 1, density=0.03)),  # too few nonzeros
        problem_of(stage4(rng, None)),  # a symbolic batch: how many pixels is unknown
    ):
        assert not prefers_window_lanes(other)
        assert default_cuda_config(other).KERNEL == "unrolled"


def test_tuning_space_has_window_lanes_only_for_few_pixels():
    rng = np.random.default_rng(15)
    check = cuda_rule.CudaSpmmRule().check
    few = problem_of(conv(rng, "3x3", "NCHW", m=16, channels=8, batch=1))
    many = dataclasses.replace(few, x_shape=(64, *few.x_shape[1:]), y_shape=(64, *few.y_shape[1:]))
    kernels = [{c.KERNEL for c in space.candidates(p, check, 24)} for p in (few, many)]
    assert kernels == [{"unrolled", "csr"}, {"unrolled"}]


def test_cost_model_counts_each_taps_padded_trips():
    """One nonzero in each of a 3x3 kernel's taps is 9 trips at any unrolling, not 2 at 8:
    the model ranks 8 nonzeros per trip no better than 1 there, and better where every tap
    has 8."""
    rng = np.random.default_rng(19)
    cost = {}
    for per_tap in (1, 8):
        case = make_conv(rng, 64, 16, (3, 3), (6, 6), 0.0, padding=(1, 1, 1, 1), layout="NCHW", batch=1)
        case.weight[:, :per_tap] = 1.0  # per_tap channels of every tap in every row
        problem = problem_of(case)
        for unroll in (1, 8):
            cost[per_tap, unroll] = space.estimated_cost(problem, lanes(unroll=unroll))
    assert cost[1, 8] >= cost[1, 1]
    assert cost[8, 8] < cost[8, 1]
    assert space._window_trips(problem_of(case).weight, 9, 8).tolist() == [9] * 64


@needs_ptxas
def test_ptxas_assembles_the_default_without_spills(tmp_path):
    problem = problem_of(stage4(np.random.default_rng(16), 1))
    kernel = emit_csr_ptx(problem, default_cuda_config(problem), "k", "sm_90")
    assert kernel.folds_batch
    source = tmp_path / "k.ptx"
    source.write_text(kernel.units[0])
    result = subprocess.run([find_tool("ptxas"), "-arch=sm_90", "-v", str(source), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True, check=True)
    assert "0 bytes spill stores" in result.stderr
    assert assemble(kernel.units, "sm_90")  # through the product's own path too


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ["3x3", "3x3/2", "7x7/2", "5x3/1x2-asymmetric"])
@pytest.mark.parametrize("config", [{"columns_per_block": 32, "warps_per_row": 2}, {"columns_per_block": 128, "unroll": 4}],
                         ids=str)
def test_modules_on_the_gpu(gpu_target, dtype, name, config):
    rng = np.random.default_rng(17)
    case = conv(rng, name, "NCHW", m=20, channels=6, dtype=dtype, epilogue=("bias", "residual", "relu"))
    (layer,) = check(case, gpu_target, batches=(1, 3), kernel_config={"kernel": "csr", "lanes": "columns"} | config)
    assert layer.params["kernel"] == "csr" and layer.params["lanes"] == "columns"


@pytest.mark.gpu
def test_default_on_resnet50_stage4_at_batch_1(gpu_target):
    case = stage4(np.random.default_rng(18), 1)
    (layer,) = check(case, gpu_target, batches=(1,), density_threshold=None)
    assert layer.params["kernel"] == "csr" and layer.params["config_source"] == "default"
