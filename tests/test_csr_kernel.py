"""The data-driven (CSR) CUDA kernel: emulated against numpy, assembled with ptxas, chosen
through the config, the tuning space, the database and the pass; on the GPU where there is one."""

import dataclasses
import subprocess
import time

import numpy as np
import pytest
import tvm
from tvm import tirx

import sparsert_tvm as sp
from helpers import CPU_TARGET, make_case, pruned_matrix, sparse_matrix
from ptx_emulator import PtxProgram
from sparsert_tvm.errors import UnsupportedProblem
from sparsert_tvm.problem import Layout, SpmmProblem
from sparsert_tvm.schedules.config import CudaCsrConfig, CudaSpmmConfig, cuda_config_from_dict
from sparsert_tvm.schedules.cuda import rule as cuda_rule
from sparsert_tvm.schedules.cuda.assemble import assemble, find_tool
from sparsert_tvm.schedules.cuda.csr_layout import LANES, NO_ROW, csr_layout
from sparsert_tvm.schedules.cuda.csr_ptx import emit_csr_ptx
from sparsert_tvm.tuning import (
    default_column_lanes_config,
    default_csr_config,
    default_cuda_config,
    prefers_column_lanes,
    prefers_csr,
    space,
)
from sparsert_tvm.tuning.database import TuningDatabase, TuningRecord, problem_key
from sparsert_tvm.tuning.measure import OutputCheck, random_arrays
from sparsert_tvm.tuning.tuner import TuneOptions, Tuner
from sparsert_tvm.weights import SparseMatrix
from test_conv import conv, problem_of
from test_cuda_codegen import emulate, needs_ptxas, problem_for
from test_numerics import check as check_module

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=CPU_TARGET)


def problem(rng, layout, weight, x_shape, epilogue=(), dtype="float32", transposed=False):
    p = problem_for(rng, layout, *weight.shape, 0, x_shape, epilogue, weight=weight, dtype=dtype)
    return dataclasses.replace(p, x_transposed=transposed)


def check(problem, config, rng, x_shape=None, tolerance=1e-5):
    out, ref = emulate(problem, config, rng, x_shape=x_shape)
    assert not np.isnan(out).any()  # every output element written
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=tolerance, atol=tolerance)


# -- numerics in the emulator ------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("columns", [1, 3, 8, 37])
def test_rows_layout_densities_and_column_tiles(density, columns):
    rng = np.random.default_rng(0)
    weight = sparse_matrix(rng, (37, 83), density)  # odd M and K; 37 rows fill no block of 4
    p = problem(rng, Layout.ROWS, weight, (columns, 83), ("bias", "residual", "relu6"))
    for tile in (1, 4, 16):  # 37 columns: 10 tiles of 4, the last partial
        check(p, CudaCsrConfig(rows_per_block=4, columns_per_block=tile), rng)


@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("x_shape", [(1, 40, 1, 1), (3, 40, 5, 3)], ids=str)
def test_channels_layout_with_batch(density, x_shape):
    rng = np.random.default_rng(1)
    weight = sparse_matrix(rng, (19, 40), density)
    p = problem(rng, Layout.CHANNELS, weight, x_shape, ("bias", "residual", "relu"))
    for config in (CudaCsrConfig(columns_per_block=2, unroll=1), CudaCsrConfig(rows_per_block=3, columns_per_block=16),
                   CudaCsrConfig(rows_per_block=2, columns_per_block=8, warps_per_row=4)):
        check(p, config, rng)


@pytest.mark.parametrize(
    "config",
    [
        CudaCsrConfig(rows_per_block=1, columns_per_block=1, unroll=1),
        CudaCsrConfig(rows_per_block=3, columns_per_block=5, unroll=2),
        CudaCsrConfig(rows_per_block=8, columns_per_block=16, unroll=4, sort_rows=False),
        CudaCsrConfig(rows_per_block=32, columns_per_block=2, unroll=8),
        CudaCsrConfig(rows_per_block=3, columns_per_block=3, unroll=2, warps_per_row=2),
        CudaCsrConfig(rows_per_block=4, columns_per_block=2, unroll=4, warps_per_row=2),
        CudaCsrConfig(rows_per_block=4, columns_per_block=1, unroll=4, warps_per_row=4),
        CudaCsrConfig(rows_per_block=1, columns_per_block=16, unroll=1, warps_per_row=8, sort_rows=False),
    ],
    ids=lambda c: f"r{c.rows_per_block}c{c.columns_per_block}u{c.unroll}w{c.warps_per_row}"
    f"{'' if c.sort_rows else '-unsorted'}",
)
def test_uneven_and_empty_rows(config):
    """Rows from empty to thirteen chunks in one block: warps run different trip counts, and
    where several share a row some of them run none (more warps than chunks); the last
    block's slots past the last row meet the barrier with the others."""
    rng = np.random.default_rng(2)
    weight = pruned_matrix(rng, (45, 400), 0.15)
    weight[[0, 7, 8, 44]] = 0
    weight[3] = rng.standard_normal(400)  # a dense row: 13 chunks
    p = problem(rng, Layout.ROWS, weight, (6, 400), ("bias", "residual"))
    check(p, config, rng)


EPILOGUES = [(), ("bias",), ("residual",), ("relu",), ("relu6",), ("clip",), ("bias", "residual", "relu"),
             ("residual", "bias", "clip"), ("bias", "relu", "bias")]


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "+".join(e) or "none")
@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.CHANNELS])
@pytest.mark.parametrize("lanes", ["nonzeros", "columns"])
def test_every_epilogue(lanes, layout, epilogue):
    rng = np.random.default_rng(3)
    weight = sparse_matrix(rng, (21, 70), 0.2)
    if lanes == "nonzeros":
        x_shape = (5, 70) if layout is Layout.ROWS else (2, 70, 2, 3)
        configs = [CudaCsrConfig(rows_per_block=2, columns_per_block=4),
                   CudaCsrConfig(rows_per_block=2, columns_per_block=4, warps_per_row=2)]
    else:  # column tiles of 64: X's columns must be neighbours (transposed, or NCHW)
        x_shape = (64, 70) if layout is Layout.ROWS else (2, 70, 4, 16)
        configs = [column_lanes(2, unroll=4, rows=2), column_lanes(2, unroll=2, rows=2, warps=2)]
    p = problem(rng, layout, weight, x_shape, epilogue, transposed=lanes == "columns" and layout is Layout.ROWS)
    for config in configs:
        check(p, config, rng)


def test_symbolic_columns_and_batch():
    rng = np.random.default_rng(4)
    weight = sparse_matrix(rng, (23, 64), 0.2)
    n = tirx.Var("n", "int64")
    rows = problem(rng, Layout.ROWS, weight, (n, 64), ("bias", "residual", "relu"))
    channels = problem(rng, Layout.CHANNELS, weight, (n, 64, 3, 3), ("residual",))
    for columns in (1, 5, 37):
        check(rows, CudaCsrConfig(columns_per_block=4), rng, x_shape=(columns, 64))
    check(channels, CudaCsrConfig(columns_per_block=4), rng, x_shape=(3, 64, 3, 3))


def test_transposed_and_leading_dimensions():
    rng = np.random.default_rng(5)
    weight = sparse_matrix(rng, (17, 30), 0.3)
    transposed = problem(rng, Layout.ROWS, weight, (20, 30), ("bias",), transposed=True)
    check(transposed, CudaCsrConfig(columns_per_block=8), rng)
    check(problem(rng, Layout.ROWS, weight, (2, 3, 30), ("residual",)), CudaCsrConfig(columns_per_block=4), rng)


def test_wide_weights_read_32_bit_indices():
    rng = np.random.default_rng(6)
    weight = sparse_matrix(rng, (5, 70_000), 0.002)
    p = problem(rng, Layout.ROWS, weight, (2, 70_000), ("bias",))
    text = emit_csr_ptx(p, CudaCsrConfig(columns_per_block=2), "k", "sm_90").units[0]
    assert "ld.global.nc.u32 %k0" in text and ".b32 k_indices" in text
    check(p, CudaCsrConfig(columns_per_block=2), rng)


@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.CHANNELS])
def test_float16_accumulates_in_float32(layout):
    rng = np.random.default_rng(7)
    weight = sparse_matrix(rng, (29, 300), 0.5)
    x_shape = (3, 300) if layout is Layout.ROWS else (2, 300, 2, 2)
    p = problem(rng, layout, weight, x_shape, ("bias", "residual", "relu6"), dtype="float16")
    text = emit_csr_ptx(p, CudaCsrConfig(columns_per_block=4), "k", "sm_90").units[0]
    assert ".b16 k_values" in text and "fma.rn.f32" in text and "f16x2" not in text
    for config in (CudaCsrConfig(columns_per_block=4), CudaCsrConfig(columns_per_block=4, warps_per_row=2)):
        out, ref = emulate(p, config, rng)
        assert out.dtype == np.float16
        # float32 sums rounded once: within one float16 ulp of the float64 answer, where a
        # float16 accumulation of 150 products is off by ~1e-2 (test_cuda_codegen).
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=1e-3, atol=1e-3)


# -- lanes over columns --------------------------------------------------------------------


def column_lanes(width=1, unroll=2, rows=4, sort_rows=True, warps=1, pipelined=False):
    return CudaCsrConfig(rows_per_block=rows, columns_per_block=32 * width, unroll=unroll, lanes="columns",
                         sort_rows=sort_rows, warps_per_row=warps, pipelined=pipelined)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.2, 1.0])
@pytest.mark.parametrize("columns", [32, 40, 96, 128])
def test_column_lanes_over_a_transposed_x(density, columns):
    """Tiles of 32-128 columns, the last one partial where 40 or 96 columns do not fill it."""
    rng = np.random.default_rng(30)
    weight = sparse_matrix(rng, (21, 70), density)  # 21 rows fill no block of 4
    p = problem(rng, Layout.ROWS, weight, (columns, 70), ("bias", "residual", "relu6"), transposed=True)
    for width, unroll, warps in ((1, 1, 1), (2, 2, 1), (4, 8, 1), (1, 2, 4), (2, 1, 2)):
        if columns % width == 0:
            for pipelined in (False, True):
                check(p, column_lanes(width, unroll, warps=warps, pipelined=pipelined), rng)


@pytest.mark.parametrize("x_shape", [(1, 40, 4, 8), (3, 40, 7, 7), (2, 40, 16, 16)], ids=str)
def test_column_lanes_over_nchw_images(x_shape):
    rng = np.random.default_rng(31)
    weight = sparse_matrix(rng, (19, 40), 0.15)
    p = problem(rng, Layout.CHANNELS, weight, x_shape, ("bias", "residual", "relu"))
    widths = [w for w in (1, 2, 4) if x_shape[2] * x_shape[3] % w == 0]
    for width in widths:
        check(p, column_lanes(width, unroll=4, rows=3), rng)
        check(p, column_lanes(width, unroll=2, rows=3, pipelined=True), rng)


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("warps", [1, 2, 8])
@pytest.mark.parametrize("unroll", [1, 2, 8])
def test_column_lanes_with_uneven_and_empty_rows(unroll, warps, pipelined):
    """Warps of a row run different trip counts, some none (more warps than trips); the
    last block's slots past the last row meet the barrier with the others."""
    rng = np.random.default_rng(32)
    weight = pruned_matrix(rng, (45, 200), 0.15)
    weight[[0, 7, 8, 44]] = 0
    weight[3] = rng.standard_normal(200)  # a dense row: 25 trips of 8
    p = problem(rng, Layout.ROWS, weight, (64, 200), ("bias", "residual"), transposed=True)
    # Warps' partial sums change the order of a float32 sum of up to 200 products.
    check(p, column_lanes(2, unroll, rows=4, warps=warps, pipelined=pipelined), rng, tolerance=1e-4)
    check(p, column_lanes(1, unroll, rows=2, sort_rows=False, warps=warps, pipelined=pipelined), rng, tolerance=1e-4)


def test_column_lanes_with_a_symbolic_batch():
    rng = np.random.default_rng(34)
    weight = sparse_matrix(rng, (23, 64), 0.2)
    n = tirx.Var("n", "int64")
    channels = problem(rng, Layout.CHANNELS, weight, (n, 64, 4, 8), ("bias", "residual"))
    for batch in (1, 3):
        check(channels, column_lanes(4, unroll=2), rng, x_shape=(batch, 64, 4, 8))
        check(channels, column_lanes(2, unroll=4, pipelined=True), rng, x_shape=(batch, 64, 4, 8))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_column_lanes_over_a_transposed_x_with_a_symbolic_n(dtype):
    """X^T's rows are N apart, known at run time only: the pairs hold row numbers and each
    trip scales them by the row's bytes. 2-D and 3-D X (its leading dimensions flattened),
    N below, at and past whole tiles, shared rows and pipelined trips."""
    rng = np.random.default_rng(38)
    weight = pruned_matrix(rng, (21, 70), 0.2)
    weight[5] = 0  # an empty row
    n = tirx.Var("n", "int64")
    flat = problem(rng, Layout.ROWS, weight, (n, 70), ("bias", "residual", "relu6"), dtype=dtype, transposed=True)
    leading = problem(rng, Layout.ROWS, weight, (2, n, 70), ("residual",), dtype=dtype, transposed=True)
    assert flat.runtime_row_stride and flat.x_strides().k is None
    text = emit_csr_ptx(flat, column_lanes(1, unroll=4), "k", "sm_90").units[0]
    assert f"mul.lo.u32 %xrow, %ncols, {2 if dtype == 'float16' else 4};" in text
    assert text.count("mad.wide.u32 %pk0, %on0, %xrow, %px;") == 1
    tolerance = 1e-3 if dtype == "float16" else 1e-5
    for config in (column_lanes(1, unroll=2), column_lanes(1, unroll=8, rows=2, warps=2, pipelined=True)):
        for columns in (1, 5, 32, 33, 64):
            check(flat, config, rng, x_shape=(columns, 70), tolerance=tolerance)
        check(leading, config, rng, x_shape=(2, 19, 70), tolerance=tolerance)


def test_only_column_lanes_read_a_transposed_x_of_symbolic_n():
    rng = np.random.default_rng(39)
    p = problem(rng, Layout.ROWS, sparse_matrix(rng, (16, 32), 0.3), (tirx.Var("n", "int64"), 32), transposed=True)
    rule = cuda_rule.CudaSpmmRule()
    rule.check(p, column_lanes())
    with pytest.raises(UnsupportedProblem, match="immediates: X transposed needs a static column count"):
        rule.check(p, CudaSpmmConfig())
    with pytest.raises(UnsupportedProblem, match="only the CSR kernel's column lanes"):
        rule.check(p, CudaCsrConfig(columns_per_block=4))
    with pytest.raises(UnsupportedProblem, match="static column count divisible by 2"):
        rule.check(p, column_lanes(2))
    # Which kernels the pass transposes X for: static N from 16 columns, symbolic N for column lanes only.
    assert rule.transposes_input(dataclasses.replace(p, x_shape=(16, 32), y_shape=(16, 16), x_transposed=False))
    assert not rule.transposes_input(p) and not rule.transposes_input(p, CudaSpmmConfig())  # few nonzeros
    assert rule.transposes_input(p, column_lanes()) and not rule.transposes_input(p, CudaCsrConfig())
    # The tuner's operands and reference: X^T as [K, N], the output as [N, M].
    x, y = random_arrays(p, symbolic_size=7)
    assert x.shape == (32, 7) and y.shape == (7, 16)
    assert OutputCheck(p, symbolic_size=7).expected.shape == (7, 16)


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.CHANNELS])
def test_column_lanes_in_float16_accumulate_in_float32(layout, pipelined):
    rng = np.random.default_rng(35)
    weight = sparse_matrix(rng, (29, 300), 0.5)
    x_shape = (64, 300) if layout is Layout.ROWS else (2, 300, 4, 8)
    p = problem(rng, layout, weight, x_shape, ("bias", "residual", "relu6"), dtype="float16",
                transposed=layout is Layout.ROWS)
    config = column_lanes(4, unroll=4, pipelined=pipelined)
    text = emit_csr_ptx(p, config, "k", "sm_90").units[0]
    assert "ld.global.nc.v4.b16" in text and "fma.rn.f32" in text and "f16x2" not in text
    out, ref = emulate(p, config, rng)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=1e-3, atol=1e-3)


def test_column_lanes_read_pairs_for_every_lane_and_shuffle_nothing():
    rng = np.random.default_rng(36)
    weight = sparse_matrix(rng, (40, 100), 0.1)
    p = problem(rng, Layout.CHANNELS, weight, (1, 100, 8, 16), ("bias",))
    text = emit_csr_ptx(p, column_lanes(4, unroll=4), "k", "sm_90").units[0]
    assert ".global .align 16 .b32 k_pairs" in text and "k_values" not in text
    # Four nonzeros' pairs per trip: those of the first trip ahead of the loop, then of the next.
    assert text.count("ld.global.nc.v4.u32 {%wn") == 4
    assert text.count("ld.global.nc.v4.f32 {%x") == 4 and text.count("fma.rn.f32") == 16
    assert "st.global.v4.f32" in text and "shfl" not in text and "bar.sync" not in text
    shared = emit_csr_ptx(p, column_lanes(4, unroll=4, rows=2, warps=4), "k", "sm_90").units[0]
    # 256 threads x 4 columns x 4 bytes
    assert ".shared .align 16 .b8 k_partials[4096]" in shared and shared.count("bar.sync 0;") == 1
    assert shared.count("ld.shared.v4.f32") == 3  # the row's first warp adds the other three
    # Rows are padded to whole trips: offsets of X rows (bytes), values as float32 bits.
    layout = csr_layout(p, 4, True, chunk=4)
    assert layout.padded_nnz % 4 == 0 and (layout.slots[layout.slots[:, 2] != NO_ROW, 0] % 4 == 0).all()


def test_pipelined_trips_load_the_next_trip_before_their_fmas():
    """In the loop, each half loads the other buffer's activations (and converts float16
    only where the FMAs use it) before its own FMAs: no instruction between the loads and
    the FMAs waits on the loads just issued."""
    rng = np.random.default_rng(36)
    for dtype in ("float32", "float16"):
        p = problem(rng, Layout.ROWS, sparse_matrix(rng, (8, 64), 0.5), (64, 64), dtype=dtype, transposed=True)
        text = emit_csr_ptx(p, column_lanes(2, unroll=2, pipelined=True), "k", "sm_90").units[0]
        loop = text[text.index("PIPE:"):text.index("PIPE_END:\n")]
        first, second = loop.split("bra.uni PIPE_END;")
        for half, (loaded, used) in ((first, ("b", "a")), (second, ("a", "b"))):
            lines = half.splitlines()
            loads = [i for i, line in enumerate(lines) if line.startswith("ld.global.nc.v2") and f"%{'x' if dtype == 'float32' else 'h'}{loaded}" in line]
            fmas = [i for i, line in enumerate(lines) if line.startswith("fma.rn.f32") and f"%x{used}" in line]
            assert loads and fmas and max(loads) < min(fmas)
            assert not any(f"%x{loaded}" in line or f"%h{loaded}" in line for line in lines[max(loads) + 1:])
    with pytest.raises(ValueError, match="lanes over columns"):
        CudaCsrConfig(pipelined=True)
    windowed = problem_of(conv(rng, "3x3", "NCHW", 0.3, batch=1))
    with pytest.raises(UnsupportedProblem, match="pipelined"):
        cuda_rule.CudaSpmmRule().check(windowed, column_lanes(pipelined=True))


def test_what_column_lanes_reject():
    rng = np.random.default_rng(37)
    weight = sparse_matrix(rng, (16, 32), 0.3)
    rule = cuda_rule.CudaSpmmRule()
    untransposed = problem(rng, Layout.ROWS, weight, (64, 32))
    with pytest.raises(UnsupportedProblem, match="neighbours in memory"):
        rule.check(untransposed, column_lanes())
    odd = problem(rng, Layout.CHANNELS, weight, (1, 32, 5, 7))
    rule.check(odd, column_lanes(1))
    with pytest.raises(UnsupportedProblem, match="divisible by 2"):
        rule.check(odd, column_lanes(2))
    for bad in ({"lanes": "rows"}, {"lanes": "columns", "columns_per_block": 16}, {"columns_per_block": 32},
                {"warps_per_row": 3}, {"lanes": "columns", "columns_per_block": 32, "warps_per_row": 3},
                {"lanes": "columns", "columns_per_block": 32, "warps_per_row": 8, "rows_per_block": 8}):
        with pytest.raises(ValueError):
            CudaCsrConfig(**bad)
    assert cuda_config_from_dict(column_lanes(2).as_dict()) == column_lanes(2)
    assert cuda_config_from_dict({"kernel": "csr", "lanes": "columns"}).columns_per_block == 32
    legacy = {k: v for k, v in CudaCsrConfig().as_dict().items() if k != "lanes"}
    assert cuda_config_from_dict(legacy) == CudaCsrConfig()  # records from before lanes


def test_emulator_is_loud_about_partial_warps_and_array_bounds():
    def program(body):
        lines = [".global .align 4 .b32 k_data[2] = {", "1,2", "};", ".visible .entry k(.param .u64 p_y)", "{"]
        return PtxProgram("\n".join(lines + ["mov.u32 %r1, %tid.x;"] + body + ["DONE:", "ret;", "}"]))

    half_warp = ["setp.lt.u32 %p0, %r1, 16;", "@%p0 bra DONE;", "shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;"]
    with pytest.raises(AssertionError, match="16 of 32 lanes"):
        program(half_warp).launch("k", (1, 1, 1), 32, [0], {})
    past_the_end = ["mov.u64 %rd1, k_data;", "mul.wide.u32 %rd2, %r1, 4;", "add.s64 %rd1, %rd1, %rd2;",
                    "ld.global.nc.u32 %r3, [%rd1];"]
    with pytest.raises(IndexError, match="past the end of k_data"):
        program(past_the_end).launch("k", (1, 1, 1), 32, [0], {})
    program(past_the_end).launch("k", (1, 1, 1), 2, [0], {})  # two threads read the two elements


# -- the layout and the text -------------------------------------------------------------


def test_layout_pads_rows_with_their_last_column_and_marks_missing_slots():
    weight = np.zeros((5, 100), np.float32)
    weight[0, [3, 50]] = 1.0
    weight[2, :40] = 2.0
    weight[4, 99] = 3.0  # row 1 and row 3 stay empty
    p = problem(np.random.default_rng(8), Layout.ROWS, weight, (1, 100), ("bias",))
    layout = csr_layout(p, rows_per_block=2, sort_rows=True)
    assert layout.groups == ((2, 0), (4, 1), (3,))  # heaviest first
    first, chunks, rows = layout.slots[:, 0], layout.slots[:, 1], layout.slots[:, 2]
    assert rows.tolist() == [2, 0, 4, 1, 3, NO_ROW]
    assert chunks.tolist() == [2, 1, 1, 0, 0, 0] and layout.padded_nnz == 4 * LANES
    row0 = slice(first[1], first[1] + LANES)
    assert layout.indices[row0].tolist() == [3, 50] + [50] * (LANES - 2)
    assert layout.values[row0].tolist() == [1.0, 1.0] + [0.0] * (LANES - 2)
    bias = np.asarray(p.epilogue[0].values, np.float32)
    assert layout.slots[:5, 3].view(np.float32).tolist() == bias[[2, 0, 4, 1, 3]].tolist()


def test_values_are_data_not_instructions():
    rng = np.random.default_rng(9)
    small, large = (problem(rng, Layout.ROWS, sparse_matrix(rng, (64, 256), d), (4, 256)) for d in (0.01, 0.5))
    config = CudaCsrConfig(columns_per_block=4, unroll=2)
    texts = [emit_csr_ptx(p, config, "k", "sm_90").units[0] for p in (small, large)]
    assert texts[0].count("fma.rn.f32") == texts[1].count("fma.rn.f32") == 3 * 4  # (2 + 1 chunks) x 4 columns
    assert ".const .align 16 .b32 k_slots" in texts[0] and "ld.const.v4.u32" in texts[0]
    assert "shfl.sync.bfly.b32" in texts[0] and "brx.idx" not in texts[0]


def test_large_slot_tables_live_in_global_memory():
    rng = np.random.default_rng(10)
    p = problem(rng, Layout.ROWS, sparse_matrix(rng, (3000, 8), 0.5), (1, 8), ("bias",))  # 48 KB of slots
    text = emit_csr_ptx(p, CudaCsrConfig(), "k", "sm_90").units[0]
    assert ".global .align 16 .b32 k_slots" in text and "ld.global.nc.v4.u32" in text


def test_what_the_csr_kernel_rejects():
    rng = np.random.default_rng(11)
    windowed = problem_of(conv(rng, "3x3", "NCHW", 0.3, batch=1))
    rule = cuda_rule.CudaSpmmRule()
    with pytest.raises(UnsupportedProblem, match="window"):
        rule.check(windowed, CudaCsrConfig())
    dense = problem(rng, Layout.ROWS, sparse_matrix(rng, (16, 16), 1.0), (2, 16))
    with pytest.raises(UnsupportedProblem, match="CSR kernel's cap"):
        rule.check(dense, CudaCsrConfig(max_layer_nnz=255))
    with pytest.raises(UnsupportedProblem, match="float32, float16"):
        rule.check(problem(rng, Layout.ROWS, np.eye(4), (2, 4), dtype="float64"), CudaCsrConfig())
    # Offsets from 32-bit indices are 64-bit, but the strides themselves must fit in 32 bits.
    huge = problem(rng, Layout.CHANNELS, sparse_matrix(rng, (4, 4), 0.5), (1, 4, 2**31, 1))
    with pytest.raises(UnsupportedProblem, match="32-bit strides"):
        rule.check(huge, CudaCsrConfig())
    for bad in ({"rows_per_block": 33}, {"columns_per_block": 17}, {"unroll": 3}, {"columns_per_block": 0}):
        with pytest.raises(ValueError):
            CudaCsrConfig(**bad)


@needs_ptxas
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ptxas_assembles_a_large_layer(dtype, capsys):
    """1024x4096 at 10% (BERT-large's FC2): about 420k nonzeros in the module's arrays."""
    rng = np.random.default_rng(12)
    weight = sparse_matrix(rng, (1024, 4096), 0.1)
    p = problem(rng, Layout.ROWS, weight, (8, 4096), ("bias", "residual", "relu"), dtype=dtype)
    config = CudaCsrConfig(columns_per_block=8, unroll=4)
    start = time.perf_counter()
    kernel = emit_csr_ptx(p, config, "k", "sm_90")
    emitted = time.perf_counter()
    cubin = assemble(kernel.units, "sm_90")
    assembled = time.perf_counter()
    assert cubin[:4] == b"\x7fELF"
    element = 4 if dtype == "float32" else 2
    assert len(cubin) < (element + 2) * p.weight.nnz * 1.3  # the arrays and little else
    with capsys.disabled():
        print(f"\n  CSR {dtype} 1024x4096 @10% ({p.weight.nnz:,} nnz): PTX {kernel.ptx_bytes / 1e6:.1f} MB in "
              f"{emitted - start:.2f} s, ptxas {assembled - emitted:.2f} s, cubin {len(cubin) / 1e6:.2f} MB")


@needs_ptxas
def test_no_spills_at_the_widest_tile_of_the_tuning_space(tmp_path):
    rng = np.random.default_rng(13)
    p = problem(rng, Layout.ROWS, sparse_matrix(rng, (64, 512), 0.1), (16, 512), ("bias", "residual"))
    widest = CudaCsrConfig(
        rows_per_block=8, columns_per_block=max(space.CSR_COLUMNS_PER_BLOCK), unroll=max(space.CSR_UNROLL)
    )
    transposed = dataclasses.replace(p, x_transposed=True, x_shape=(128, 512))
    transposed = dataclasses.replace(transposed, y_shape=(128, 64))
    for problem_, config in ((p, widest), (transposed, column_lanes(4, unroll=max(space.CSR_COLUMN_UNROLL), rows=8))):
        kernel = emit_csr_ptx(problem_, config, "k", "sm_90")
        path = tmp_path / "k.ptx"
        path.write_text(kernel.units[0])
        command = [find_tool("ptxas"), "-arch=sm_90", "-v", str(path), "-o", str(tmp_path / "k.cubin")]
        info = subprocess.run(command, capture_output=True, text=True)
        assert info.returncode == 0 and "0 bytes spill stores" in info.stderr, info.stderr


# -- configs, defaults, tuning, the pass --------------------------------------------------


def test_config_dicts_name_their_kernel():
    csr = CudaCsrConfig(rows_per_block=2, columns_per_block=8, unroll=4)
    assert csr.as_dict()["kernel"] == "csr" and CudaSpmmConfig().as_dict()["kernel"] == "unrolled"
    assert cuda_config_from_dict(csr.as_dict()) == csr
    assert cuda_config_from_dict(CudaSpmmConfig(rows_per_block=2).as_dict()) == CudaSpmmConfig(rows_per_block=2)
    legacy = {k: v for k, v in CudaSpmmConfig(vector_width=2).as_dict().items() if k != "kernel"}
    assert cuda_config_from_dict(legacy) == CudaSpmmConfig(vector_width=2)  # records from before the key
    with pytest.raises(ValueError, match="unknown CUDA kernel"):
        cuda_config_from_dict({"kernel": "dense"})
    with pytest.raises(TypeError):
        cuda_config_from_dict({"kernel": "csr", "threads_per_block": 64})
    assert sp.CudaCsrConfig is CudaCsrConfig


def fc(rng, m, k, columns, density=0.1):
    weight = SparseMatrix.from_dense(sparse_matrix(rng, (m, k), density))
    return SpmmProblem(weight, Layout.ROWS, "float32", (columns, k), (columns, m))


def test_csr_is_the_default_only_for_large_matrix_vector_layers():
    rng = np.random.default_rng(14)
    big = fc(rng, 1536, 1024, 1)  # about 157k nonzeros
    assert prefers_csr(big) and isinstance(default_cuda_config(big), CudaCsrConfig)
    assert default_cuda_config(big).columns_per_block == 1
    assert prefers_csr(dataclasses.replace(big, x_shape=(8, 1024), y_shape=(8, 1536)))
    assert not prefers_csr(dataclasses.replace(big, x_shape=(16, 1024), y_shape=(16, 1536)))
    n = tirx.Var("n", "int64")
    assert not prefers_csr(dataclasses.replace(big, x_shape=(n, 1024), y_shape=(n, 1536)))
    assert prefers_csr(fc(rng, 768, 768, 1))  # 59k nonzeros
    assert not prefers_csr(fc(rng, 256, 768, 1))  # 20k nonzeros: not measured
    channels = SpmmProblem(big.weight, Layout.CHANNELS, "float32", (1, 1024, 1, 1), (1, 1536, 1, 1))
    assert not prefers_csr(channels)
    assert isinstance(default_cuda_config(big, "unrolled"), CudaSpmmConfig)
    with pytest.raises(ValueError, match="unknown CUDA kernel"):
        default_cuda_config(big, "dense")


def test_column_lanes_are_the_default_from_16_to_128_neighbouring_columns():
    rng = np.random.default_rng(23)
    weight = fc(rng, 1024, 1024, 1).weight  # about 105k nonzeros

    def rows_layer(columns, transposed=True, m=1024):
        w = weight if m == 1024 else fc(rng, m, 1024, 1).weight
        return SpmmProblem(w, Layout.ROWS, "float32", (columns, 1024), (columns, m), x_transposed=transposed)

    for columns in (16, 32, 64, 128):
        config = default_cuda_config(rows_layer(columns))
        assert prefers_column_lanes(rows_layer(columns)) and config.column_lanes and config.unroll == 8
        rule = cuda_rule.CudaSpmmRule()
        rule.check(rows_layer(columns), config)
    for columns in (8, 196, 512):
        assert not prefers_column_lanes(rows_layer(columns))
    assert not prefers_column_lanes(rows_layer(32, transposed=False))  # X's columns K apart
    # Lanes of 1, 2 or 4 columns; rows split among warps while the launch is small.
    assert default_cuda_config(rows_layer(32)).columns_per_block == 32
    assert default_cuda_config(rows_layer(64)).columns_per_block == 64
    assert default_cuda_config(rows_layer(128)).columns_per_block == 128
    assert default_cuda_config(rows_layer(32)).warps_per_row == 4  # 1024 rows
    assert default_cuda_config(rows_layer(32, m=4096)).warps_per_row == 1
    assert default_column_lanes_config(rows_layer(96)).columns_per_block == 64  # 2 tiles, not 1 of 25% idle lanes
    # NCHW 1x1 layers at batch 1 (measured), not at batch 8 (not measured).
    def channels(batch, spatial):
        return SpmmProblem(weight, Layout.CHANNELS, "float32", (batch, 1024, *spatial), (batch, 1024, *spatial))

    assert prefers_column_lanes(channels(1, (7, 7))) and not prefers_column_lanes(channels(8, (7, 7)))
    assert default_cuda_config(channels(1, (7, 7))).columns_per_block == 32  # 49 columns: one per lane
    assert not prefers_column_lanes(channels(1, (14, 14)))
    small = SpmmProblem(fc(rng, 256, 256, 1).weight, Layout.CHANNELS, "float32", (1, 256, 7, 7), (1, 256, 7, 7))
    assert not prefers_column_lanes(small)  # 6.5k nonzeros: not measured
    # A symbolic N: once X is transposed, from 50k nonzeros, whatever N turns out to be.
    n = tirx.Var("n", "int64")
    symbolic = SpmmProblem(weight, Layout.ROWS, "float32", (n, 1024), (n, 1024), x_transposed=True)
    config = default_cuda_config(symbolic)
    assert config.column_lanes and config.columns_per_block == 32  # one column per lane: N may be odd
    cuda_rule.CudaSpmmRule().check(symbolic, config)
    assert not prefers_column_lanes(dataclasses.replace(symbolic, x_transposed=False))
    small = SpmmProblem(fc(rng, 256, 256, 1).weight, Layout.ROWS, "float32", (n, 256), (n, 256), x_transposed=True)
    assert not prefers_column_lanes(small) and not default_cuda_config(small).KERNEL == "csr"


def test_long_rows_of_few_rows_are_shared_by_warps_by_default():
    """Column tiles of 4 (of 2 for rows of 6-12 chunks), then warps a row, while the launch
    stays within about 6k warps and no warp goes without a chunk; each trip loads as many
    chunks as the busiest warp has (up to 4)."""
    rng = np.random.default_rng(25)

    def picked(problem, *fields, config_of=default_cuda_config):
        config = config_of(problem)
        return tuple(getattr(config, field) for field in fields)

    long_rows = fc(rng, 768, 3072, 1)  # 10-13 chunks a row, 768 rows
    unroll = 2 if long_rows.weight.row_nnz.max() <= 12 * 32 else 4
    assert picked(long_rows, "warps_per_row", "unroll") == (4, unroll)
    many_rows = fc(rng, 3072, 768, 1)  # 3-4 chunks, 3072 rows: two warps make 6144
    assert picked(many_rows, "warps_per_row", "unroll") == (2, 2)
    assert picked(fc(rng, 4096, 1024, 1), "warps_per_row") == (1,)
    # At N = 8 tiles of 4 columns come first: 3072 rows in two tiles are 6144 warps already,
    # 768 rows of 3-4 chunks leave room for 4 warps a row. Rows of 6-12 chunks take tiles
    # of 2 with 2 warps where those fit (768 rows), else tiles of 4 (1024 rows); longer
    # rows (about 24 chunks at a density of 0.25) keep tiles of 4.
    eight = dataclasses.replace(many_rows, x_shape=(8, 768), y_shape=(8, 3072))
    assert picked(eight, "columns_per_block", "warps_per_row") == (4, 1)
    short_rows = fc(rng, 768, 768, 8)  # 3-4 chunks a row
    assert picked(short_rows, "columns_per_block", "warps_per_row") == (4, 4)
    few_rows = dataclasses.replace(long_rows, x_shape=(8, 3072), y_shape=(8, 768))
    assert picked(few_rows, "columns_per_block", "warps_per_row") == (2, 2)
    more_rows = fc(rng, 1024, 4096, 8)
    assert picked(more_rows, "columns_per_block", "warps_per_row") == (4, 2)
    longer_rows = fc(rng, 768, 3072, 8, density=0.25)
    assert picked(longer_rows, "columns_per_block", "warps_per_row") == (4, 4)
    wide = dataclasses.replace(many_rows, x_shape=(20, 768), y_shape=(20, 3072))
    assert picked(wide, "columns_per_block", "warps_per_row", config_of=default_csr_config) == (16, 1)
    three = dataclasses.replace(many_rows, x_shape=(3, 768), y_shape=(3, 3072))
    assert picked(three, "columns_per_block", config_of=default_csr_config) == (3,)
    one_chunk = fc(rng, 768, 768, 1, density=0.02)
    assert picked(one_chunk, "warps_per_row", config_of=default_csr_config) == (1,)


def test_overrides_asking_for_column_lanes_start_from_their_default():
    rule = cuda_rule.CudaSpmmRule()
    p = dataclasses.replace(fc(np.random.default_rng(24), 512, 512, 64), x_transposed=True)
    config = rule.with_overrides(p, rule.default_config(p, None), {"kernel": "csr", "lanes": "columns", "unroll": 2})
    assert config.column_lanes and config.unroll == 2 and config.columns_per_block == 64
    back = rule.with_overrides(p, config, {"kernel": "csr", "lanes": "nonzeros"})
    assert not back.column_lanes and back.columns_per_block <= 16


def test_tuning_space_holds_valid_csr_candidates():
    rng = np.random.default_rng(15)
    p = fc(rng, 256, 512, 3)
    rule = cuda_rule.CudaSpmmRule()
    configs = space.candidates(p, rule.check, 200)
    csr = [c for c in configs if isinstance(c, CudaCsrConfig)]
    assert csr and any(isinstance(c, CudaSpmmConfig) for c in configs)
    for config in csr:
        rule.check(p, config)
        assert config.columns_per_block < 2 * 3 or config.columns_per_block == 1  # no tile of mostly missing columns
    costs = [space.estimated_cost(p, c) for c in configs[1:]]
    assert costs == sorted(costs)
    assert not [c for c in csr if c.column_lanes]  # X's columns are K apart
    # Rows of at most 68 nonzeros (three chunks): two warps may share one, never four.
    assert {c.warps_per_row for c in csr} == {1, 2}
    transposed = dataclasses.replace(fc(rng, 256, 512, 64), x_transposed=True)
    configs = space.candidates(transposed, rule.check, 400)
    lanes = [c for c in configs if isinstance(c, CudaCsrConfig) and c.column_lanes]
    assert lanes and {c.warps_per_row for c in lanes} == {1, 2, 4}
    for config in lanes:
        rule.check(transposed, config)
    # Windowed convolutions get column lanes only (the kernel rejects lanes over nonzeros).
    windowed = problem_of(conv(rng, "3x3", "NCHW", 0.3, batch=1))
    csr = [c for c in space.candidates(windowed, rule.check, 200) if isinstance(c, CudaCsrConfig)]
    assert csr and all(c.column_lanes for c in csr)


def test_cost_model_puts_the_code_stream_against_the_arrays():
    """N = 1 on a BERT-sized layer: the unrolled code streams ~16 bytes per nonzero (what the
    H100 measurements show as its time), the CSR kernel reads ~6; at N = 512 it is the other
    way round (every 16 columns read the arrays and X again)."""
    rng = np.random.default_rng(16)
    p = fc(rng, 3072, 768, 1)
    best = space.candidates(p, cuda_rule.CudaSpmmRule().check, 5)[1]
    assert isinstance(best, CudaCsrConfig)
    unrolled_us = space.estimated_cost(p, default_cuda_config(p, "unrolled")) / 1750
    assert 8 < unrolled_us < 30  # measured: 16.4 us (tuned)
    wide = dataclasses.replace(p, x_shape=(512, 768), y_shape=(512, 3072), x_transposed=True)
    cheapest = {}
    for config in space.candidates(wide, cuda_rule.CudaSpmmRule().check, 1000):
        cost = space.estimated_cost(wide, config)
        cheapest[config.KERNEL] = min(cost, cheapest.get(config.KERNEL, cost))
    assert cheapest[CudaSpmmConfig.KERNEL] < cheapest[CudaCsrConfig.KERNEL]
    # At N = 32 lanes over nonzeros read a row of X per lane and column (36.5 us on the
    # H200 where column lanes took 8-11): the model ranks column lanes first.
    n32 = dataclasses.replace(p, x_shape=(32, 768), y_shape=(32, 3072), x_transposed=True)
    ranked = space.candidates(n32, cuda_rule.CudaSpmmRule().check, 6)[1:]
    assert all(isinstance(c, CudaCsrConfig) and c.column_lanes for c in ranked[:3])


def test_database_round_trip_of_a_csr_config(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    p = fc(np.random.default_rng(17), 64, 96, 2)
    config = CudaCsrConfig(rows_per_block=2, columns_per_block=2, unroll=1)
    tuner = Tuner(cuda_rule.CudaSpmmRule(), CUDA, TuneOptions(progress=False, database=tmp_path / "t.json"))
    record = TuningRecord(config=config.as_dict(), us=1.0, default_us=2.0, candidates=2, tune_s=0.1)
    tuner.database.put(problem_key(p, tuner.arch), record)
    reread = Tuner(cuda_rule.CudaSpmmRule(), CUDA, None, database=TuningDatabase(tmp_path / "t.json"))
    assert reread.lookup(p) == config
    record.config = config.as_dict() | {"kernel": "sparse-tensor-core"}  # a kernel this version lacks
    tuner.database.put(problem_key(p, tuner.arch), record)
    assert Tuner(cuda_rule.CudaSpmmRule(), CUDA, None, database=tmp_path / "t.json").lookup(p) is None


@needs_ptxas
def test_tuner_times_csr_candidates(tmp_path, monkeypatch):
    """Timing is faked (no GPU here): the fake prefers CSR configs, which the tuner records."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)

    def timer(built, target):
        return 1.0 if built.params["kernel"] == "csr" else 5.0

    rng = np.random.default_rng(18)
    case = make_case(rng, "matmul_t", 96, 128, 0.1, (2, 128), ("bias",))
    options = TuneOptions(max_candidates=40, timer=timer, progress=False, database=tmp_path / "t.json",
                          check_outputs=False)  # outputs are checked in test_tuning.py
    out = sp.SparsifyWeights(CUDA, 1.0, tune=options)(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.params["config_source"] == "tuned" and layer.params["kernel"] == "csr"
    again = sp.SparsifyWeights(CUDA, 1.0, tuning_database=tmp_path / "t.json")(case.module())
    (reused,) = sp.report_of(again).layers
    assert reused.params["config_source"] == "database"
    fields = CudaCsrConfig().as_dict()
    assert {k: reused.params[k] for k in fields} == {k: layer.params[k] for k in fields}


@needs_ptxas
@pytest.mark.parametrize(
    "kernel_config",
    [CudaCsrConfig(rows_per_block=2, columns_per_block=4), {"kernel": "csr", "columns_per_block": 4}],
    ids=["instance", "dict"],
)
def test_pass_with_a_csr_kernel_config(monkeypatch, kernel_config):
    made = []
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: made.append(kernel) or None)
    rng = np.random.default_rng(19)
    case = make_case(rng, "matmul", 40, 64, 0.2, (None, 64), ("bias", "residual", "relu"))
    out = sp.SparsifyWeights(CUDA, 1.0, kernel_config=kernel_config)(case.module())
    (layer,) = sp.report_of(out).layers
    (kernel,) = made
    assert layer.decision == "sparse" and layer.params["kernel"] == "csr"
    assert layer.params["config_source"] == "kernel_config" and layer.params["columns_per_block"] == 4
    assert layer.code_bytes > 0 and layer.params["row_groups"] == kernel.row_groups
    script = out[layer.kernel].script()
    assert f'T.call_packed("{kernel.name}"' in script
    assert f"{kernel.row_groups}, T.int64(1), {kernel.threads})" in script  # grid y, one image, block
    assert "kernel=csr" in sp.report_of(out).table()
    assert f"0 nonzeros unrolled, {layer.nnz:,} read from arrays" in sp.report_of(out).summary()
    assert tvm.compile(out.without_attr("external_mods"), CUDA, tir_pipeline=sp.build.register_pipeline()) is not None


@needs_ptxas
def test_pass_picks_column_lanes_by_default_for_a_wide_enough_static_n(monkeypatch):
    """The pass transposes X before asking for the default: a BERT-like layer at N = 32."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    rng = np.random.default_rng(25)
    case = make_case(rng, "matmul", 512, 1024, 0.1, (32, 1024), ("bias",))  # about 52k nonzeros
    out = sp.SparsifyWeights(CUDA, 1.0)(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "sparse" and layer.params["config_source"] == "default"
    assert layer.params["kernel"] == "csr" and layer.params["lanes"] == "columns" and layer.params["x_transposed"]
    assert "lanes=columns" in sp.report_of(out).table()


@needs_ptxas
@pytest.mark.parametrize("x_shape", [(None, 64), (2, None, 64)], ids=str)
def test_column_lanes_asked_for_a_symbolic_n_transpose_x(monkeypatch, x_shape):
    """The pass transposes X for them (flattened to [N, K] first where it has more
    dimensions) and, where Y has more than two, passes the residual and takes the output as
    [N, M]; by default a symbolic N keeps the unrolled kernel on X as it is."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    rng = np.random.default_rng(26)
    case = make_case(rng, "matmul", 40, 64, 0.2, x_shape, ("bias", "residual"))
    out = sp.SparsifyWeights(CUDA, 1.0, kernel_config={"kernel": "csr", "lanes": "columns"})(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "sparse" and layer.params["x_transposed"] and layer.params["lanes"] == "columns"
    script = out["main"].script()
    assert script.count("R.permute_dims(") == 1
    assert script.count("R.reshape(") == (0 if len(x_shape) == 2 else 3)  # X, the residual, the output
    assert "out_ty=R.Tensor((n * 2, 40)" in script if len(x_shape) == 3 else "out_ty=R.Tensor((n, 40)" in script
    default = sp.SparsifyWeights(CUDA, 1.0)(case.module())  # 512 nonzeros: the unrolled kernel
    (layer,) = sp.report_of(default).layers
    assert layer.params["kernel"] == "unrolled" and not layer.params["x_transposed"]
    assert "permute_dims" not in default["main"].script()


@needs_ptxas
def test_a_symbolic_n_of_many_nonzeros_gets_column_lanes_by_default(monkeypatch):
    """From 50k nonzeros the default is column lanes on X^T; asking for the unrolled kernel
    leaves X as it is (its offsets are immediates), not the layer dense."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    rng = np.random.default_rng(27)
    case = make_case(rng, "matmul", 512, 1024, 0.1, (None, 1024), ("bias",))  # about 52k nonzeros
    (layer,) = sp.report_of(sp.SparsifyWeights(CUDA, 1.0)(case.module())).layers
    assert layer.decision == "sparse" and layer.params["config_source"] == "default"
    assert layer.params["lanes"] == "columns" and layer.params["x_transposed"]
    unrolled = sp.SparsifyWeights(CUDA, 1.0, kernel_config={"rows_per_block": 8})(case.module())
    (layer,) = sp.report_of(unrolled).layers
    assert layer.decision == "sparse" and layer.params["kernel"] == "unrolled" and not layer.params["x_transposed"]
    assert "permute_dims" not in unrolled["main"].script()


def test_bad_csr_kernel_configs():
    with pytest.raises(TypeError, match="unknown kernel_config field.*CudaCsrConfig"):
        sp.SparsifyWeights(CUDA, 0.5, kernel_config={"kernel": "csr", "threads_per_block": 64})
    with pytest.raises(TypeError, match="unknown kernel_config field.*CudaSpmmConfig"):
        sp.SparsifyWeights(CUDA, 0.5, kernel_config={"columns_per_block": 4})  # no "kernel": the unrolled one
    with pytest.raises(ValueError, match="unknown CUDA kernel"):
        sp.SparsifyWeights(CUDA, 0.5, kernel_config={"kernel": "dense"})
    with pytest.raises(ValueError, match="unroll"):
        sp.SparsifyWeights(CUDA, 0.5, kernel_config={"kernel": "csr", "unroll": 3})
    with pytest.raises(TypeError, match="CudaSpmmConfig or CudaCsrConfig"):
        sp.SparsifyWeights(CUDA, 0.5, kernel_config=sp.CpuSpmmConfig())
    with pytest.raises(TypeError, match="CpuSpmmConfig"):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config=CudaCsrConfig())
    with pytest.raises(TypeError, match="unknown kernel_config field.*CpuCsrConfig"):
        sp.SparsifyWeights(CPU_TARGET, 0.5, kernel_config={"kernel": "csr", "lanes": "columns"})  # CUDA's field


# -- on the GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "kind, x_shape, config",
    [
        ("matmul", (None, 96), {"kernel": "csr", "columns_per_block": 4}),
        ("matmul_t", (3, 96), {"kernel": "csr", "columns_per_block": 3, "unroll": 1}),
        ("matmul_t", (37, 96), {"kernel": "csr", "columns_per_block": 16, "rows_per_block": 8}),
        ("conv_nchw", (None, 96, 3, 5), {"kernel": "csr", "columns_per_block": 8}),
        ("conv_nhwc", (2, 3, 5, 96), {"kernel": "csr", "columns_per_block": 2, "sort_rows": False}),
        ("matmul_t", (1, 96), {"kernel": "csr", "columns_per_block": 1, "warps_per_row": 4, "rows_per_block": 2}),
        ("matmul", (None, 96), {"kernel": "csr", "columns_per_block": 8, "warps_per_row": 2, "unroll": 1}),
    ],
    ids=str,
)
def test_csr_modules_on_the_gpu(gpu_target, dtype, kind, x_shape, config):
    rng = np.random.default_rng(20)
    case = make_case(rng, kind, 45, 96, 0.15, x_shape, ("bias", "residual", "relu6"), dtype=dtype)
    report = check_module(case, gpu_target, batches=(1, 5, 300) if None in x_shape else (None,), kernel_config=config)
    assert report.layers[0].params["kernel"] == "csr"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "kind, x_shape, config",
    [
        ("matmul", (64, 96), {"columns_per_block": 64, "unroll": 4}),
        ("matmul_t", (40, 96), {"columns_per_block": 32, "unroll": 1, "sort_rows": False}),
        ("conv_nchw", (None, 96, 4, 8), {"columns_per_block": 128, "unroll": 8, "rows_per_block": 8}),
        ("conv_nchw", (2, 96, 7, 7), {"columns_per_block": 32, "unroll": 2}),
        ("matmul", (96, 96), {"columns_per_block": 32, "unroll": 4, "warps_per_row": 4, "rows_per_block": 2}),
        ("conv_nchw", (None, 96, 4, 4), {"columns_per_block": 64, "unroll": 8, "warps_per_row": 2}),
        ("matmul_t", (40, 96), {"columns_per_block": 32, "unroll": 2, "pipelined": True}),
        ("conv_nchw", (None, 96, 4, 8), {"columns_per_block": 128, "unroll": 8, "pipelined": True}),
        ("matmul", (96, 96), {"columns_per_block": 64, "unroll": 4, "warps_per_row": 4, "rows_per_block": 2,
                              "pipelined": True}),
        ("matmul", (None, 96), {"columns_per_block": 32, "unroll": 4}),
        ("matmul", (2, None, 96), {"columns_per_block": 32, "unroll": 8, "warps_per_row": 2, "pipelined": True}),
    ],
    ids=str,
)
def test_column_lane_modules_on_the_gpu(gpu_target, dtype, kind, x_shape, config):
    rng = np.random.default_rng(22)
    case = make_case(rng, kind, 45, 96, 0.15, x_shape, ("bias", "residual", "relu6"), dtype=dtype)
    config = {"kernel": "csr", "lanes": "columns"} | config
    report = check_module(case, gpu_target, batches=(1, 5, 300) if None in x_shape else (None,), kernel_config=config)
    assert report.layers[0].params["kernel"] == "csr" and report.layers[0].params["lanes"] == "columns"


@pytest.mark.gpu
def test_csr_default_on_a_large_matrix_vector_layer(gpu_target):
    rng = np.random.default_rng(21)
    case = make_case(rng, "matmul_t", 1536, 1024, 0.1, (1, 1024), ("bias", "relu"))
    (layer,) = check_module(case, gpu_target, batches=(None,), density_threshold=None).layers
    assert layer.params["kernel"] == "csr" and layer.params["config_source"] == "default"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_csr_default_on_long_rows_at_eight_columns(gpu_target, dtype):
    """BERT-base's 768x3072 layer at N = 8: tiles of 2 columns, 2 warps a row, by default."""
    rng = np.random.default_rng(22)
    case = make_case(rng, "matmul_t", 768, 3072, 0.1, (8, 3072), ("bias",), dtype=dtype)
    (layer,) = check_module(case, gpu_target, batches=(None,), density_threshold=None).layers
    assert (layer.params["kernel"], layer.params["columns_per_block"], layer.params["warps_per_row"]) == ("csr", 2, 2)
