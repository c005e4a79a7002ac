"""Direct sparse convolutions (any kernel size, stride and padding) against numpy's im2col."""

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import tvm
from hypothesis import assume, given
from hypothesis import strategies as st

from conv_cases import ConvCase, make_conv
from helpers import CPU_TARGET, Compiled, assert_close
import sparsert_tvm as sp
from sparsert_tvm import SparsifyWeights, report_of
from sparsert_tvm.errors import UnsupportedProblem
from sparsert_tvm.passes.candidates import find_candidates
from sparsert_tvm.problem import ConvWindow
from sparsert_tvm.schedules.config import CudaSpmmConfig
from sparsert_tvm.schedules.cuda.ptx import emit_spmm_ptx
from sparsert_tvm.schedules.cuda.row_span import RowSpan
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule
from sparsert_tvm.schedules.cuda.staged_input import StagedInput
from sparsert_tvm.tuning import default_cuda_config, register_caps, space, tuner, with_segment_budget
from sparsert_tvm.tuning.tuner import TuneOptions
from test_cuda_codegen import emulate, needs_ptxas

class Geometry(NamedTuple):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    size: tuple[int, int]  # of the input
    dilation: tuple[int, int] = (1, 1)

    def options(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


GEOMETRIES = {name: Geometry(*values) for name, values in {
    "3x3": ((3, 3), (1, 1), (1, 1, 1, 1), (9, 8)),
    "3x3/2": ((3, 3), (2, 2), (1, 1, 1, 1), (9, 8)),
    "3x3-valid": ((3, 3), (1, 1), (0, 0, 0, 0), (5, 10)),  # width 8 out of 10: chunks narrower than 4 pixels
    "1x1/2": ((1, 1), (2, 2), (0, 0, 0, 0), (9, 8)),  # ResNet's downsampling shortcut
    "5x5": ((5, 5), (1, 1), (2, 2, 2, 2), (7, 6)),
    "7x7/2": ((7, 7), (2, 2), (3, 3, 3, 3), (11, 10)),  # ResNet's stem
    "1x3": ((1, 3), (1, 1), (0, 1, 0, 1), (5, 6)),
    "3x1-valid": ((3, 1), (1, 1), (0, 0, 0, 0), (6, 5)),
    "5x3/1x2-asymmetric": ((5, 3), (1, 2), (2, 0, 1, 3), (9, 8)),
    "3x3-on-1x1": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # only the centre tap reads data
    "4x4/4": ((4, 4), (4, 4), (0, 0, 0, 0), (9, 19)),  # patches; the widest stride gathered by shuffles
    # Dilated (DeepLab's "same" 3x3; a stride and a different dilation per axis): spread kernels
    # whose zero taps the kernels skip.
    "3x3-dilated-2": ((3, 3), (1, 1), (2, 2, 2, 2), (9, 8), (2, 2)),
    "2x3/1x2-dilated-3x2": ((2, 3), (1, 2), (1, 2, 2, 1), (8, 11), (3, 2)),
}.items()}
LAYOUTS = ["NCHW", "NHWC"]


def conv(rng, name, layout, density=0.3, m=12, channels=5, **options) -> ConvCase:
    geometry = GEOMETRIES[name]
    options.setdefault("batch", None)  # symbolic unless asked
    return make_conv(rng, m, channels, geometry.kernel, geometry.size, density, layout=layout, **geometry.options(),
                     **options)


def check(case: ConvCase, target, batches=(1, 3), **options):
    compiled = Compiled(case.module(), target, **options)
    assert [layer.decision for layer in compiled.report] == ["sparse"], compiled.report.table()
    rng = np.random.default_rng(0)
    for batch in batches:
        arrays = case.inputs(rng, batch)
        assert_close(compiled(*arrays), case.reference(arrays), case.dtype)
    return compiled.report


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_geometries(target, layout, name):
    rng = np.random.default_rng(1)
    case = conv(rng, name, layout, epilogue=("bias", "residual", "relu"))
    (layer,) = check(case, target)
    assert layer.op.startswith("conv2d") and layer.epilogue == ["bias", "residual", "relu"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_densities(target, layout, density):
    check(conv(np.random.default_rng(2), "3x3", layout, density), target)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epilogue", [(), ("relu6",), ("bias", "relu6"), ("residual",)], ids=str)
def test_epilogues_and_a_static_batch(target, layout, epilogue):
    check(conv(np.random.default_rng(3), "3x3/2", layout, epilogue=epilogue, batch=2), target, batches=(2,))


@pytest.mark.parametrize("layout, kernel_layout", [("NHWC", "OHWI"), ("NHWC", "OIHW"), ("NCHW", "HWIO")])
def test_kernel_layouts(target, layout, kernel_layout):
    check(conv(np.random.default_rng(4), "5x3/1x2-asymmetric", layout, kernel_layout=kernel_layout), target)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [32, 37, 70])  # whole tiles at stride 1, partial last tiles, several
@pytest.mark.parametrize("name", ["3x3", "3x3/2", "7x7/2", "5x3/1x2-asymmetric"])
def test_rows_wider_than_a_tile(layout, width, name):
    """On the CPU a window is tiled by pieces of output rows (16 lanes here), read from a
    zero-padded copy of the image (NHWC transposed into it): NCHW rows of whole tiles are
    stored straight from the sums, a partial last tile (and NHWC) through ``yt``."""
    geometry = GEOMETRIES[name]
    case = make_conv(np.random.default_rng(15), 6, 3, geometry.kernel, (5, width), 0.4, **geometry.options(),
                     layout=layout, batch=None, epilogue=("bias", "residual", "relu"))
    check(case, CPU_TARGET, batches=(1, 2), kernel_config={"vector_lanes": 16})


def test_empty_filters_and_unused_channels(target):
    rng = np.random.default_rng(5)
    case = conv(rng, "3x3", "NCHW", 0.4, m=16, channels=6, epilogue=("bias",))
    case.weight[:5] = 0  # filters without nonzeros: only the bias
    case.weight[:, 2] = 0  # an input channel nothing reads
    check(case, target)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["3x3", "3x3/2", "1x1/2", "5x5"])
@pytest.mark.parametrize("groups, m, channels", [(2, 8, 6), (6, 6, 6), (4, 8, 4)], ids=["grouped", "depthwise", "x2"])
def test_grouped_and_depthwise(target, layout, name, groups, m, channels):
    """A grouped convolution's weight is held block-diagonal: each output channel must read
    its own group's inputs only."""
    case = conv(np.random.default_rng(12), name, layout, 0.7, m=m, channels=channels, groups=groups, epilogue=("bias", "relu"))
    (layer,) = check(case, target)
    assert ("depthwise" in layer.op) == (groups == channels)
    assert tuple(layer.weight_shape) == (m, channels // groups * int(np.prod(case.weight.shape[2:])))
    assert layer.density == np.count_nonzero(case.weight) / case.weight.size


def test_grouped_pointwise(target):
    rng = np.random.default_rng(13)
    check(make_conv(rng, 8, 4, (1, 1), (5, 6), 0.5, groups=2, batch=None, epilogue=("residual",)), target)


def test_small_dense_convolutions_are_unrolled():
    """With the default threshold, dense stem and depthwise convolutions are rewritten (TVM's
    dense ones are slower); on CUDA a large dense one, a dense 1x1 or an explicit threshold
    keeps TVM's, on the CPU only an explicit threshold (and narrow groups, ``test_pass``)."""
    rng = np.random.default_rng(14)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    cases = {
        "depthwise": conv(rng, "3x3", "NCHW", 1.0, m=32, channels=32, groups=32),
        "stem": conv(rng, "7x7/2", "NCHW", 1.0, m=16, channels=3),
        "pointwise": make_conv(rng, 32, 32, (1, 1), (4, 4), 1.0),
        "large": make_conv(rng, 64, 64, (3, 3), (4, 4), 1.0, padding=(1, 1, 1, 1)),
    }

    def decisions(target, threshold=None):
        return {
            name: report_of(SparsifyWeights(target, threshold, dry_run=True)(case.module())).layers[0].sparse
            for name, case in cases.items()
        }

    assert decisions(cuda) == {"depthwise": True, "stem": True, "pointwise": False, "large": False}
    assert not any(decisions(cuda, 0.5).values())
    assert all(decisions(CPU_TARGET).values())
    assert not any(decisions(CPU_TARGET, 0.5).values())


def test_the_cpu_build_fuses_what_tvm_keeps():
    """A convolution left to TVM (an NHWC depthwise one) must not leave its bias and ReLU as
    passes of their own (``tvm.compile``'s generic CPU pipeline fuses nothing)."""
    from sparsert_tvm.bench import call_times

    case = make_conv(np.random.default_rng(16), 64, 64, (3, 3), (6, 6), 1.0, groups=64, padding=(1, 1, 1, 1),
                     layout="NHWC", epilogue=("bias", "relu"))
    executable = sp.compile(case.module(), CPU_TARGET)
    x = tvm.runtime.tensor(case.inputs(np.random.default_rng(0), 1)[0])
    symbols = {call.name for call in call_times(executable, tvm.cpu(0), [x], runs=1)}
    assert any(s.startswith("fused_conv2d") and "relu" in s for s in symbols), symbols
    assert not any(s.startswith(("add", "relu")) for s in symbols), symbols


CUDA_TILINGS = [
    {"rows_per_block": 1, "threads_per_block": 32},
    {"rows_per_block": 5, "columns_per_thread": 2, "threads_per_block": 32},
    {"rows_per_block": 3, "vector_width": 2, "threads_per_block": 32},
    {"rows_per_block": 2, "vector_width": 4, "threads_per_block": 32},
    {"max_instructions_per_segment": 90},  # many separately assembled segments
    {"fold_batch": True, "rows_per_block": 2, "threads_per_block": 64},  # blocks across images
    {"split_k": 2, "rows_per_block": 4, "threads_per_block": 64},  # slices summed through shared memory
    {"split_k": 4, "threads_per_block": 128, "max_instructions_per_segment": 90},
    {"threads_per_block": 96, "fold_batch": True},  # tiles of whole warps, not a power of two
    {"padding_from_zeros": True},  # padding read from the module's zero array
    {"padding_from_zeros": True, "max_instructions_per_segment": 90, "fold_batch": True},
    {"grid_split": 2, "rows_per_block": 4, "threads_per_block": 64},  # shares summed across blocks
    {"grid_split": 4, "fold_batch": True, "max_instructions_per_segment": 90},
]
CPU_TILINGS = [
    {"vector_lanes": 4},
    {"vector_lanes": 8, "rows_per_chunk": 3, "max_nnz_per_segment": 30},
    {"kernel": "csr", "vector_lanes": 4, "row_blocks": 3, "chains": 3},
    {"kernel": "csr", "vector_lanes": 2, "row_blocks": 1, "chains": 1},
]


def check_tiling(target, layout, tiling):
    batch = 3 if tiling.get("grid_split", 1) > 1 else None  # its sums are sized for a static batch
    case = conv(np.random.default_rng(6), "3x3", layout, m=20, channels=6, epilogue=("bias", "relu"), batch=batch)
    (layer,) = check(case, target, batches=(batch,) if batch else (1, 3), kernel_config=tiling)
    assert {key: layer.params[key] for key in tiling} == tiling


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiling", CUDA_TILINGS, ids=str)
def test_cuda_tilings(gpu_target, layout, tiling):
    check_tiling(gpu_target, layout, tiling)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiling", CPU_TILINGS, ids=str)
def test_cpu_tilings(layout, tiling):
    check_tiling(CPU_TARGET, layout, tiling)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name, width", [(n, w) for n in ("3x3", "3x3/2", "5x5") for w in (1, 2)] + [("3x3", 4)])
def test_float16_on_the_gpu(gpu_target, layout, name, width):
    """float16 windows, scalar (the default) and paired in f16x2 registers."""
    rng = np.random.default_rng(7)
    case = conv(rng, name, layout, dtype="float16", epilogue=("bias", "relu"))
    (layer,) = check(case, gpu_target, kernel_config={"vector_width": width, "threads_per_block": 32})
    assert layer.params["vector_width"] == width


@pytest.mark.gpu
@pytest.mark.parametrize(
    "tiling",
    [
        {"stage_channels": 2, "rows_per_block": 4, "threads_per_block": 64},
        {"stage_channels": 3, "fold_batch": True, "columns_per_thread": 2, "max_instructions_per_segment": 90},
        {"stage_channels": 4, "fold_batch": True, "grid_split": 2, "vector_width": 2, "threads_per_block": 32},
    ],
    ids=str,
)
@pytest.mark.parametrize("name", ["3x3", "3x3/2", "5x5"])
def test_staged_input_on_the_gpu(gpu_target, name, tiling):
    """Input staged in shared memory (NCHW only): correct across chunks, images and shares."""
    case = conv(np.random.default_rng(14), name, "NCHW", m=20, channels=6, epilogue=("bias", "relu"), batch=3)
    (layer,) = check(case, gpu_target, batches=(3,), kernel_config=tiling)
    assert {key: layer.params[key] for key in tiling} == tiling


@pytest.mark.gpu
def test_stride_two_layer_splits_its_grid_and_relaunches_identically(gpu_target):
    """The default for a stride-2 layer (32 rows, a grid split): correct, and launched again
    the same bit for bit, so the last block of each tile reset its count."""
    rng = np.random.default_rng(13)
    case = make_conv(rng, 64, 64, (3, 3), (28, 28), 0.1, stride=(2, 2), padding=(1, 1, 1, 1), batch=2,
                     epilogue=("bias", "relu"))
    compiled = Compiled(case.module(), gpu_target)
    (layer,) = compiled.report
    assert layer.decision == "sparse" and layer.params["grid_split"] == 8 and layer.params["rows_per_block"] == 32
    arrays = case.inputs(rng, 2)
    first = compiled(*arrays)
    assert_close(first, case.reference(arrays))
    for _ in range(3):
        assert np.array_equal(compiled(*arrays), first)


def test_staged_band_covers_every_tile_and_is_refused_where_it_cannot_work():
    """The band's rows are the most any tile reads (a tile may run from one image into the
    next, padding rows between them), its bytes fit in shared memory, and layouts, shapes
    and tilings the copy cannot serve are refused with a reason."""
    rng = np.random.default_rng(21)
    case = make_conv(rng, 16, 8, (3, 3), (7, 7), 0.3, padding=(1, 1, 1, 1), batch=3)
    problem = problem_of(case)
    config = CudaSpmmConfig(threads_per_block=32, fold_batch=True, stage_channels=4)
    staged = StagedInput.of(problem, config)
    # 147 pixels in tiles of 32: the tile of pixels 32-63 runs from output row 4 of image 0
    # to output row 2 of image 1, which read padded rows 4-8 of image 0 and 0-4 of image 1.
    assert (staged.padded, staged.rows, staged.chunk, staged.slots) == ((9, 9), 5 + 5, 4, 3)
    assert staged.bytes == 4 * staged.rows * 9 * 4
    rule = CudaSpmmRule()
    refusals = {
        "NCHW": (make_conv(rng, 16, 8, (3, 3), (7, 7), 0.3, padding=(1, 1, 1, 1), batch=3, layout="NHWC"), config),
        "static batch": (make_conv(rng, 16, 8, (3, 3), (7, 7), 0.3, padding=(1, 1, 1, 1), batch=None), config),
        "split_k": (case, dataclasses.replace(config, split_k=2, threads_per_block=64)),
        "thread per padded input column": (make_conv(rng, 16, 8, (3, 3), (7, 40), 0.3, padding=(1, 1, 1, 1), batch=1),
                                           config),
        "shared memory": (make_conv(rng, 16, 512, (3, 3), (56, 56), 0.3, padding=(1, 1, 1, 1), batch=1),
                          CudaSpmmConfig(threads_per_block=256, stage_channels=512)),
    }
    for reason, (refused, tiling) in refusals.items():
        with pytest.raises(UnsupportedProblem, match=reason):
            rule.check(problem_of(refused), tiling)


def test_asking_for_staging_turns_the_zero_array_off():
    """A small image's default reads its padding from a zero array, which staging cannot
    combine with: asking for staging (kernel_config or the tuner) turns it off, unless
    asked for both (then refused with the reason)."""
    rng = np.random.default_rng(23)
    problem = problem_of(make_conv(rng, 32, 16, (3, 3), (8, 8), 0.2, stride=(2, 2), padding=(1, 1, 1, 1), batch=2))
    rule, default = CudaSpmmRule(), default_cuda_config(problem)
    assert default.padding_from_zeros
    staged = rule.with_overrides(problem, default, {"stage_channels": 4})
    assert staged.stage_channels == 4 and not staged.padding_from_zeros
    rule.check(problem, staged)
    assert all(not c.padding_from_zeros for c in space._staged(default, (4, 8)))
    with pytest.raises(UnsupportedProblem, match="padding_from_zeros"):
        rule.check(problem, rule.with_overrides(problem, default, {"stage_channels": 4, "padding_from_zeros": True}))


def test_float16_stays_dense_on_the_cpu():
    compiled = Compiled(conv(np.random.default_rng(8), "3x3", "NCHW", dtype="float16").module(), CPU_TARGET)
    (layer,) = compiled.report
    assert layer.decision == "dense" and "float16" in layer.reason


# -- the CUDA generator without a GPU --------------------------------------------------------


def problem_of(case: ConvCase):
    """What the pass makes of ``case``: the real candidate analysis, not a hand-built problem."""
    (candidate,) = find_candidates("main", case.module()["main"])
    assert candidate.reason is None, candidate.reason
    return candidate.problem


EMULATED_CONFIGS = [
    CudaSpmmConfig(rows_per_block=4, threads_per_block=32),
    CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=2, max_instructions_per_segment=150),
    CudaSpmmConfig(rows_per_block=2, threads_per_block=32, vector_width=2),
    # Blocks across images: vectors of one thread in different images.
    CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=3, fold_batch=True),
    CudaSpmmConfig(rows_per_block=2, threads_per_block=32, vector_width=2, fold_batch=True,
                   max_instructions_per_segment=150),
    # Chunks of up to 4 elements, predicated as a whole at the borders.
    CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=2, vector_width=4, fold_batch=True),
    # Slices of a block sharing its columns, each with whole kernel rows.
    CudaSpmmConfig(rows_per_block=3, threads_per_block=64, split_k=2),
    CudaSpmmConfig(rows_per_block=2, threads_per_block=128, columns_per_thread=2, vector_width=2, fold_batch=True,
                   split_k=4, max_instructions_per_segment=150),
    # Tiles of three warps (trimmed tiles need not be a power of two), across images.
    CudaSpmmConfig(rows_per_block=2, threads_per_block=96, fold_batch=True),
    # Padding read from the module's zero array, in one function and in segments.
    CudaSpmmConfig(rows_per_block=2, threads_per_block=32, padding_from_zeros=True),
    CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=2, vector_width=4, fold_batch=True,
                   padding_from_zeros=True, max_instructions_per_segment=150),
    # Shares of each group's kernel rows in blocks of their own, summed by the last to finish.
    CudaSpmmConfig(rows_per_block=4, threads_per_block=32, grid_split=2),
    CudaSpmmConfig(rows_per_block=3, threads_per_block=64, columns_per_thread=2, vector_width=2, fold_batch=True,
                   grid_split=4, max_instructions_per_segment=150),
    # Input staged in shared memory two channels at a time (NCHW only); a band running across
    # images, in segments and shares of a grid split.
    CudaSpmmConfig(rows_per_block=4, threads_per_block=32, stage_channels=2),
    CudaSpmmConfig(rows_per_block=3, threads_per_block=64, columns_per_thread=2, vector_width=2, fold_batch=True,
                   stage_channels=2, grid_split=2, max_instructions_per_segment=150),
    # Rows grouped by the taps they share, in shares of a grid split.
    CudaSpmmConfig(rows_per_block=4, threads_per_block=32, grid_split=2, share_columns=True),
]
EMULATED_IDS = [
    "plain", "two-columns-segmented", "vectors", "folded-three-columns", "folded-vectors-segmented", "folded-wide-vectors",
    "split-two", "split-four-folded-vectors-segmented", "folded-three-warps", "zero-array",
    "zero-array-folded-wide-vectors-segmented", "grid-split-two", "grid-split-four-folded-vectors-segmented",
    "staged", "staged-folded-vectors-grid-split-segmented",
    "sharing-columns-grid-split",
]


def emulate_window(case: ConvCase, config: CudaSpmmConfig, rng, layout: str):
    """``case`` emulated with ``config`` (one pixel per vector where its output width does
    not divide): the output and the reference, or None where ``config`` stages the input of
    an NHWC layer, which the generator must refuse."""
    problem = problem_of(case)
    if problem.window.output_size[1] % config.vector_width:
        config = dataclasses.replace(config, vector_width=1)
    arrays = case.inputs(rng, 2)
    if config.stage_channels and layout == "NHWC":
        with pytest.raises(UnsupportedProblem, match="NCHW"):
            emulate(problem, config, rng, arrays)
        return None
    out, _ = emulate(problem, config, rng, arrays)
    return out, case.reference(arrays)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("config", EMULATED_CONFIGS, ids=EMULATED_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_emulated_windows(name, layout, config, dtype):
    """Every load is checked against the buffers' bounds, so a tap reading outside the input
    (instead of a padding zero) fails here even where it would happen to read a zero."""
    rng = np.random.default_rng(9)
    case = conv(rng, name, layout, m=10, channels=3, dtype=dtype, batch=2, epilogue=("bias", "residual", "relu6"))
    result = emulate_window(case, config, rng, layout)
    if result is not None:
        out, reference = result
        assert out.dtype == np.dtype(dtype)
        assert_close(out, reference, dtype)


@pytest.mark.parametrize("config", EMULATED_CONFIGS, ids=EMULATED_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_emulated_depthwise(layout, config):
    rng = np.random.default_rng(15)
    case = conv(rng, "3x3/2", layout, 1.0, m=6, channels=6, groups=6, batch=2, epilogue=("bias", "relu6"))
    result = emulate_window(case, config, rng, layout)
    if result is not None:
        assert_close(*result)


@st.composite
def row_spans(draw):
    kw, stride, pixels = draw(st.integers(1, 7)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    left, right = draw(st.integers(0, kw - 1)), draw(st.integers(0, kw - 1))
    out_width = pixels * draw(st.integers(1, 4))
    width = max(1, (out_width - 1) * stride + kw - left - right + draw(st.integers(0, stride - 1)))
    window = ConvWindow(3, (1, kw), (1, stride), (0, left, 0, right), (2, width), draw(st.booleans()))
    assume(window.output_size[1] == out_width)
    taps = draw(st.sets(st.integers(0, kw - 1), min_size=1))
    return RowSpan.of(window, pixels), sorted(taps)


@given(row_spans())
def test_row_span_loads_are_aligned_and_cover_every_tap(span_and_taps):
    """Each load is aligned to its size in memory and lies in one chunk, the loads cover
    every (pixel, tap) read, and a chunk is inside the input row for every vector exactly
    when ``chunk_in_image`` says so, wholly inside or wholly outside otherwise."""
    span, taps = span_and_taps
    win = span.window
    step, width = span.pixels * win.stride[1], win.input_size[1]
    assert win.channels_last and span.chunk == 1 or step % span.chunk == 0 == width % span.chunk
    loaded = set()
    for q, first, size in span.loads(taps):
        assert first % size == 0 and (span.first + first) % size == 0  # ix0 is a multiple of the chunk
        assert q * span.chunk <= first and first + size <= (q + 1) * span.chunk <= span.length
        loaded.update(range(first, first + size))
    assert {span.register(j, kx) for j in range(span.pixels) for kx in taps} <= loaded
    # Kept per set of taps: asked again, in another order, or of a new span, the same loads.
    assert span.loads(taps) == span.loads(taps[::-1]) == RowSpan(win, span.pixels, span.chunk).loads(taps)
    origins = range(0, win.output_size[1] * win.stride[1], step)
    for q in range(span.chunks):
        columns = [[ix0 + span.chunk_start(q) + e for e in range(span.chunk)] for ix0 in origins]
        inside = [[0 <= x < width for x in chunk] for chunk in columns]
        assert all(len(set(flags)) == 1 for flags in inside)  # never straddles a border
        assert span.chunk_in_image(q) == all(flags[0] for flags in inside)


def test_default_window_configs_cap_registers_only_for_16_rows():
    """Blocks of 16 rows get 64 registers (.maxnreg); fewer rows leave ptxas its choice."""
    rng = np.random.default_rng(12)
    many_pixels = problem_of(make_conv(rng, 64, 8, (3, 3), (56, 56), 0.1, padding=(1, 1, 1, 1), batch=8))
    config = default_cuda_config(many_pixels)
    assert (config.rows_per_block, config.registers) == (16, 64)
    assert ".maxnreg 64" in emit_spmm_ptx(many_pixels, config, "k", "sm_90").units[0]
    few_pixels = problem_of(conv(rng, "3x3", "NCHW", batch=1))
    config = default_cuda_config(few_pixels)
    assert config.rows_per_block < 16 and config.registers == 0
    # The tuner's candidates follow the same rule, whatever the default's rows.
    unrolled = [c for c in space.candidates(many_pixels, CudaSpmmRule().check, 40) if c.KERNEL == "unrolled"]
    assert {c.rows_per_block for c in unrolled} >= {16, 4}
    assert all(c.registers == (64 if c.rows_per_block >= 16 else 0) for c in unrolled)


def test_stride_two_windows_get_sixteen_rows_and_a_grid_split():
    """A layer reading four input pixels per output pixel gets 16 rows per block (32 with
    the batch folded), and its grid is split into the fewest shares (up to 8) that give 128
    blocks; batch 1, stride 1, a symbolic batch, 1x1, depthwise, dense and float16 layers keep the
    thread-count rule without a split. The search keeps the default with twice and half its shares."""
    rng = np.random.default_rng(19)

    def default(batch=8, stride=(2, 2), groups=1, density=0.1, kernel=(3, 3), dtype="float32", layout="NCHW"):
        padding = (kernel[0] // 2,) * 4
        case = make_conv(rng, 256, 256, kernel, (28, 28), density, stride=stride, padding=padding,
                         batch=batch, groups=groups, dtype=dtype, layout=layout)
        problem = problem_of(case)
        return problem, default_cuda_config(problem)

    problem, config = default()  # folded: 32 rows, 8 groups x 7 tiles of 224 pixels, 4 shares for 224 blocks
    assert (config.rows_per_block, config.registers, config.segment_registers) == (32, 96, 96)
    assert (config.grid_split, config.threads_per_block) == (4, 224)
    shares = {c.grid_split for c in space.candidates(problem, CudaSpmmRule().check, 4) if c.KERNEL == "unrolled"}
    assert shares >= {2, 4, 8}
    assert default(batch=1)[1].grid_split == 1  # slower in the whole model at batch 1
    pair = default(batch=2, layout="NHWC")[1]  # 8 groups x 2 tiles of 196 pixels: 8 shares give 128 blocks
    assert (pair.rows_per_block, pair.grid_split) == (32, 8)
    assert default(stride=(1, 1))[1].grid_split == 1
    assert default(batch=None)[1].grid_split == 1
    assert default(groups=256, density=1.0)[1].grid_split == 1
    assert default(kernel=(1, 1))[1].grid_split == 1  # downsampling shortcuts: not timed with it
    assert default(dtype="float16")[1].grid_split == 1  # not yet run on a GPU
    dense = default(density=1.0)[1]  # a stem left dense: its FMAs limit it
    assert dense.grid_split == 1 and dense.rows_per_block < 32


def test_folded_window_configs_aim_at_100k_threads_like_single_images():
    """With the batch folded into the columns, rows per block are still chosen for about
    100k threads: ResNet-50's stage-3 layer (256 channels of 14x14) gets 4 rows at batch 8
    (7 tiles of 256-thread columns, 64 groups: 115k threads), not the 8 that twice the rows
    would give (faster as a microbenchmark, slower in the model), and 1 row at batch 1."""
    rng = np.random.default_rng(17)
    stage3 = make_conv(rng, 256, 256, (3, 3), (14, 14), 0.01, padding=(1, 1, 1, 1), batch=8)
    folded = default_cuda_config(problem_of(stage3))
    assert folded.fold_batch and folded.rows_per_block == 4
    single = make_conv(rng, 256, 256, (3, 3), (14, 14), 0.01, padding=(1, 1, 1, 1), batch=1)
    assert default_cuda_config(problem_of(single)).rows_per_block == 1
    # Depthwise rows share no input: the same rule.
    depthwise = make_conv(rng, 256, 256, (3, 3), (14, 14), 1.0, groups=256, padding=(1, 1, 1, 1), batch=8)
    config = default_cuda_config(problem_of(depthwise))
    assert config.fold_batch and config.rows_per_block == 4


def test_window_tiles_are_trimmed_to_the_warps_their_pixels_need():
    """1568 pixels (ResNet-50's stage 3 at batch 8) in 7 tiles of 224 threads, not 256 with
    the last one almost idle; the tuner's window candidates are trimmed the same way."""
    rng = np.random.default_rng(16)
    stage3 = problem_of(make_conv(rng, 32, 8, (3, 3), (14, 14), 0.1, padding=(1, 1, 1, 1), batch=8))
    config = default_cuda_config(stage3)
    assert config.fold_batch and config.threads_per_block == 224
    stage4 = problem_of(make_conv(rng, 32, 8, (3, 3), (7, 7), 0.1, padding=(1, 1, 1, 1), batch=1))
    assert default_cuda_config(stage4).threads_per_block == 32  # 49 pixels: two tiles of one warp
    for candidate in space.candidates(stage3, CudaSpmmRule().check, 1000):
        if candidate.KERNEL != "unrolled":
            continue
        pixels = 1568 if candidate.fold_batch else 196
        per_thread = candidate.columns_per_thread * candidate.vector_width
        tiles = -(-pixels // (candidate.threads_per_block * per_thread))
        assert tiles * (candidate.threads_per_block - 32) * per_thread < pixels, candidate  # not a warp to spare


@pytest.mark.parametrize("batch", [1, 8])
def test_window_searches_keep_twice_and_half_the_default_rows(batch):
    """However the cost model ranks them, a short search through a window times the default
    with twice and half its rows per block (the fastest row count on the H200 was one of the
    three on 29 of 30 ResNet-50 layers), each as the default rule would set it up."""
    rng = np.random.default_rng(18)
    stage4 = problem_of(make_conv(rng, 512, 64, (3, 3), (14, 14), 0.1, stride=(2, 2), padding=(1, 1, 1, 1), batch=batch))
    default = default_cuda_config(stage4)
    candidates = space.candidates(stage4, CudaSpmmRule().check, 3)
    assert candidates[0] == default
    for changed in (2 * default.rows_per_block, default.rows_per_block // 2):
        if changed in space.ROWS_PER_BLOCK:
            neighbour = dataclasses.replace(default, rows_per_block=changed, **register_caps(changed))
            assert with_segment_budget(neighbour, stage4) in candidates


def test_only_taps_that_can_read_padding_are_predicated():
    rng = np.random.default_rng(10)
    config = CudaSpmmConfig(rows_per_block=4, threads_per_block=32)
    valid = "".join(emit_spmm_ptx(problem_of(conv(rng, "3x3-valid", "NCHW", 1.0)), config, "k", "sm_90").units)
    assert "setp.lt.u32 %q" not in valid and "@%q" not in valid
    padded = emit_spmm_ptx(problem_of(conv(rng, "3x3", "NCHW", 1.0, channels=1)), config, "k", "sm_90")
    # 8 of the 9 taps touch the border; the centre tap always reads the image.
    loads = [line for line in "".join(padded.units).splitlines() if "ld.global.nc" in line]
    assert len(loads) == 9 * padded.row_groups
    assert sum(line.startswith("@%q") for line in loads) == 8 * padded.row_groups
    # Each lands in a register zeroed just before, and the FMAs are unconditional: a
    # predicated FMA instead would leave the load a partial definition of a reused register,
    # which ptxas serialises (2.3x slower on the H200).
    one_row = dataclasses.replace(config, rows_per_block=1)  # each tap feeds one FMA
    lines = "".join(emit_spmm_ptx(problem_of(conv(rng, "3x3", "NCHW", 1.0, channels=1)), one_row, "k", "sm_90").units)
    lines = lines.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("@%q"):
            register = line.split()[2].rstrip(",")
            assert lines[i - 1] == f"mov.f32 {register}, 0f00000000;"
    assert not any(line.startswith("@") and "fma" in line for line in lines)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_from_zeros_leaves_no_predicated_load_and_no_zeroing(layout):
    rng = np.random.default_rng(17)
    problem = problem_of(conv(rng, "3x3", layout, 1.0, channels=2))
    config = CudaSpmmConfig(rows_per_block=1, threads_per_block=32, padding_from_zeros=True)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    lines = "".join(kernel.units).splitlines()
    loads = [line for line in lines if "ld.global.nc" in line]
    assert len(loads) == 9 * 2 * kernel.row_groups and not any(line.startswith("@") for line in loads)
    assert not any(line.startswith("mov.f32 %s") for line in lines)
    # 8 of the 9 taps of each channel go through a switched base: one per tap that may
    # read padding, set up once per thread.
    assert sum("[%pzc" in line for line in loads) == 8 * 2 * kernel.row_groups
    assert sum(line.startswith("selp.b64 %pzc") for line in lines) == 8
    # No bytes of zeros in the module, however large the array.
    (declaration,) = [line for line in lines if line.startswith(".global")]
    assert declaration.endswith("];") and "=" not in declaration


def test_one_warp_window_tiles_read_padding_from_zeros_and_the_tuner_times_the_other_way():
    rng = np.random.default_rng(20)
    small = problem_of(make_conv(rng, 32, 8, (3, 3), (7, 7), 0.1, padding=(1, 1, 1, 1)))  # 49 pixels
    large = problem_of(make_conv(rng, 32, 8, (3, 3), (14, 14), 0.1, padding=(1, 1, 1, 1)))  # 196
    assert default_cuda_config(small).padding_from_zeros and not default_cuda_config(large).padding_from_zeros
    options = TuneOptions(registers=(), segment_registers=())
    best = default_cuda_config(large)
    assert tuner.winner_variants(large, best, False, options) == [dataclasses.replace(best, padding_from_zeros=True)]
    assert tuner.winner_variants(large, best, False, dataclasses.replace(options, padding_variants=False)) == []


def test_padding_from_zeros_is_checked():
    rng = np.random.default_rng(18)
    config = CudaSpmmConfig(padding_from_zeros=True)
    pointwise = problem_of(make_conv(rng, 8, 4, (1, 1), (5, 5), 0.5))  # no window: a plain product
    assert pointwise.window is None
    with pytest.raises(UnsupportedProblem, match="padding_from_zeros"):
        emit_spmm_ptx(pointwise, config, "k", "sm_90")
    # One image of 512 channels at 128x128 is 32 MB of float32: too much device memory.
    large = problem_of(make_conv(rng, 4, 512, (3, 3), (128, 128), 0.001, padding=(1, 1, 1, 1)))
    with pytest.raises(UnsupportedProblem, match="bytes of zeros"):
        CudaSpmmRule().check(large, config)


@needs_ptxas
@pytest.mark.parametrize(
    "dtype, width, zeros, shares, staged",
    [
        ("float32", 1, False, 1, 0), ("float16", 2, False, 1, 0), ("float32", 1, True, 1, 0),
        ("float16", 1, False, 4, 0), ("float32", 1, False, 2, 3), ("float16", 2, False, 1, 3),
    ],
)
def test_window_kernels_assemble(dtype, width, zeros, shares, staged):
    from sparsert_tvm.schedules.cuda.assemble import assemble

    rng = np.random.default_rng(11)
    layout = "NCHW" if staged else "NHWC"  # staging reads NCHW only
    problem = problem_of(conv(rng, "3x3/2", layout, 0.3, m=16, channels=8, dtype=dtype, epilogue=("bias", "relu"),
                              batch=2 if shares > 1 or staged else None))  # those need a static batch
    config = CudaSpmmConfig(
        rows_per_block=4, threads_per_block=32, columns_per_thread=2, vector_width=width, padding_from_zeros=zeros,
        grid_split=shares, stage_channels=staged,
    )
    kernel = emit_spmm_ptx(problem, dataclasses.replace(config, max_instructions_per_segment=600), "k", "sm_90")
    assert len(kernel.units) > 2
    assert assemble(kernel.units, "sm_90", 3)
