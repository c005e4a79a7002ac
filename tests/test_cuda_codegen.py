"""The CUDA path without a GPU: PTX emulated against numpy, assembled with ptxas, wired into
TVM (launch wrapper, module build), cached."""

import dataclasses
import math
import os
import shutil
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

import sparsert_tvm as sp
from helpers import CPU_TARGET, make_case, pruned_matrix, sparse_matrix
from ptx_emulator import PtxProgram
from sparsert_tvm import cache, models
from sparsert_tvm.errors import ToolchainError, UnsupportedProblem
from sparsert_tvm.passes.candidates import find_candidates
from sparsert_tvm.problem import BiasAdd, Clip, Layout, ResidualAdd, SpmmProblem
from sparsert_tvm.schedules.config import CudaCsrConfig, CudaSpmmConfig
from sparsert_tvm.schedules.cuda import assemble as assemble_module
from sparsert_tvm.schedules.cuda import rule as cuda_rule
from sparsert_tvm.schedules.cuda.assemble import assemble
from sparsert_tvm.schedules.cuda.ptx import emit_spmm_ptx
from sparsert_tvm.schedules.cuda.ptx_common import f32_immediate
from sparsert_tvm.schedules.cuda.unrolled_checks import ElementType
from sparsert_tvm.weights import SparseMatrix

needs_ptxas = pytest.mark.skipif(shutil.which("ptxas") is None and not os.path.exists("/usr/local/cuda/bin/ptxas"),
                                 reason="ptxas (CUDA toolkit) not installed")
GPU_PRESENT = tvm.cuda(0).exist


def problem_for(rng, layout, m, k, density, x_shape, epilogue=(), weight=None, dtype="float32"):
    weight = (sparse_matrix(rng, (m, k), density) if weight is None else weight).astype(dtype)
    ops = []
    for op in epilogue:
        if op == "bias":
            ops.append(BiasAdd(tuple(float(v) for v in rng.standard_normal(m))))
        elif op == "residual":
            ops.append(ResidualAdd())
        elif op == "relu6":
            ops.append(Clip(0.0, 6.0))
        elif op == "relu":
            ops.append(Clip(0.0, math.inf))
        elif op == "clip":
            ops.append(Clip(-0.5, 0.5))
    y_shape = list(x_shape)
    y_shape[1 if layout is Layout.CHANNELS else -1] = m
    return SpmmProblem(SparseMatrix.from_dense(weight), layout, dtype, tuple(x_shape), tuple(y_shape), tuple(ops))


def emulate(problem: SpmmProblem, config, rng, inputs=None, x_shape=None, order="shuffle"):
    """Runs the generated PTX (of either kernel, by the config's type) in the emulator on
    ``inputs`` (X and the residual; random if None), its blocks in ``order`` (see
    ``PtxProgram.launch``); returns (output, numpy reference). A problem with symbolic
    dimensions runs at ``x_shape``."""
    kernel = cuda_rule.emit_ptx(problem, config, "k", "sm_90")
    if x_shape is not None:
        y_shape = list(x_shape)
        y_shape[1 if problem.layout is Layout.CHANNELS else -1] = problem.M
        if problem.window is not None:  # static but for the batch
            y_shape = [x_shape[0], *problem.y_shape[1:]]
        problem = dataclasses.replace(problem, x_shape=tuple(x_shape), y_shape=tuple(y_shape))
    x_shape = tuple(int(d) for d in problem.x_shape)
    y_shape = tuple(int(d) for d in problem.y_shape)
    dtype = problem.dtype
    if inputs is None:
        inputs = [rng.standard_normal(x_shape).astype(dtype)]
        if problem.has_residual:
            inputs.append(rng.standard_normal(y_shape).astype(dtype))
    x = inputs[0]
    residual = inputs[1] if problem.has_residual else None
    # The kernel reads X^T where it asks for it; the reference takes X.
    x_read = np.ascontiguousarray(x.reshape(-1, problem.K).T) if problem.x_transposed else x
    y = np.full(y_shape, np.nan, dtype)
    launch_emulated(kernel, problem, x_read, residual, y, order)
    return y, problem.reference(x, residual)


def launch_emulated(kernel, problem: SpmmProblem, x, residual, y, order="shuffle"):
    """Runs ``kernel`` in the emulator over the grid the launch wrapper would give it for
    ``problem`` (static shapes), on X as the kernel reads it; writes ``y``."""
    buffers = {"x": x, "y": y}
    args = ["x"]
    if residual is not None:
        buffers["r"] = residual
        args.append("r")
    columns = problem.static_columns
    batch = 1 if problem.x_transposed else problem.static_batch
    if kernel.folds_batch:  # as the launch wrapper does
        columns, batch = columns * batch, 1
    grid = (-(-columns // kernel.columns_per_block), kernel.row_groups, batch)
    PtxProgram(*kernel.units).launch("k", grid, kernel.threads, args + ["y", columns], buffers, order)


@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.CHANNELS])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_emulated_kernel_matches_numpy(layout, density):
    rng = np.random.default_rng(0)
    x_shape = (37, 24) if layout is Layout.ROWS else (2, 24, 5, 7)
    problem = problem_for(rng, layout, 19, 24, density, x_shape, ("bias", "residual", "relu6"))
    out, ref = emulate(problem, CudaSpmmConfig(threads_per_block=32), rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        CudaSpmmConfig(rows_per_block=1, threads_per_block=32),
        CudaSpmmConfig(rows_per_block=8, threads_per_block=32, columns_per_thread=3, balance_rows=False),
        CudaSpmmConfig(rows_per_block=3, threads_per_block=64, columns_per_thread=2, max_instructions_per_segment=80),
        CudaSpmmConfig(rows_per_block=2, threads_per_block=1024),
        CudaSpmmConfig(rows_per_block=2, threads_per_block=512, max_instructions_per_segment=80),
        CudaSpmmConfig(rows_per_block=4, threads_per_block=64, split_k=2),
        CudaSpmmConfig(rows_per_block=3, threads_per_block=256, columns_per_thread=2, split_k=8,
                       max_instructions_per_segment=80),
        CudaSpmmConfig(rows_per_block=4, threads_per_block=32, share_columns=True),
        CudaSpmmConfig(rows_per_block=5, threads_per_block=64, split_k=2, share_columns=True,
                       max_instructions_per_segment=80),
    ],
    ids=["one-row", "eight-rows-three-columns", "segmented", "1024-threads", "512-threads-segmented", "split-two",
         "split-eight-two-columns-segmented", "sharing-columns", "sharing-columns-split-segmented"],
)
@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.CHANNELS])
def test_emulated_tilings(layout, config):
    rng = np.random.default_rng(1)
    weight = pruned_matrix(rng, (29, 40), 0.15)
    weight[3] = 0  # an empty row
    x_shape = (70, 40) if layout is Layout.ROWS else (3, 40, 9, 4)
    problem = problem_for(rng, layout, 29, 40, 0, x_shape, ("bias", "residual"), weight=weight)
    out, ref = emulate(problem, config, rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_segmented_kernels_refuse_blocks_nvlink_cannot_give_their_registers():
    rng = np.random.default_rng(1)
    problem = problem_for(rng, Layout.CHANNELS, 29, 40, 0.3, (1, 40, 9, 4))
    roomy = CudaSpmmConfig(threads_per_block=1024, max_instructions_per_segment=80, segment_registers=96)
    with pytest.raises(UnsupportedProblem, match="at most 682 threads"):
        emit_spmm_ptx(problem, roomy, "k", "sm_90")
    assert len(emit_spmm_ptx(problem, dataclasses.replace(roomy, max_instructions_per_segment=4096), "k", "sm_90").units) == 1


@needs_ptxas
def test_segmented_kernels_of_1024_threads_link_with_64_registers():
    rng = np.random.default_rng(1)
    problem = problem_for(rng, Layout.CHANNELS, 32, 64, 0.3, (1, 64, 32, 32))
    config = CudaSpmmConfig(rows_per_block=16, threads_per_block=1024, max_instructions_per_segment=128)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    assert len(kernel.units) > 2
    assert kernel_registers(assemble(kernel.units, "sm_90", **config.assembler_options())) <= 64


def test_values_are_immediates_and_each_needed_activation_is_loaded_once():
    rng = np.random.default_rng(2)
    n = tirx.Var("n", "int64")
    problem = problem_for(rng, Layout.ROWS, 16, 32, 0.2, (n, 32))
    config = CudaSpmmConfig(rows_per_block=4, columns_per_thread=2)
    text = "".join(emit_spmm_ptx(problem, config, "k", "sm_90").units)
    weight = problem.weight
    assert text.count("fma.rn.f32") == weight.nnz * 2
    for value in weight.dense[weight.dense != 0]:
        assert f32_immediate(float(value)) in text
    # No weight data in memory: the only global loads are activations.
    assert "ld.const" not in text and "ld.global.nc.f32 %x" in text
    assert "brx.idx" in text


def test_float_immediates_are_exact():
    for value in [0.1, -3.5e-39, 1e38, -0.0, float("inf"), 1.17549435e-38]:
        bits = int(f32_immediate(value)[2:], 16)
        assert struct.unpack("<f", struct.pack("<I", bits))[0] == np.float32(value)


@pytest.mark.parametrize("dtype, width", [("float32", 1), ("float16", 1), ("float16", 2)])
def test_a_rows_constants_are_spelled_as_one_value_at_a_time(dtype, width):
    """``ElementType.constants`` (a row's values converted at once) writes what the
    reference spelling does: ``f32_immediate`` for float32, the value's float16 bits
    (twice, for paired columns) moved into ``%w`` for float16."""
    largest = 1e38 if dtype == "float32" else 65504.0
    values = np.array([0.1, -3.5e-39, largest, -0.0, 1.17549435e-38, 6e-8, -2.5], dtype=dtype)
    element = ElementType(dtype, width)
    for value, (setup, operand) in zip(values.tolist(), element.constants(values)):
        assert (setup, operand) == element.constant(value)
        if dtype == "float32":
            assert setup == () and operand == f32_immediate(value)
        else:
            bits = int(np.float16(value).view(np.uint16))
            spelled = f"mov.b32 %w, 0x{bits << 16 | bits:08X};" if width == 2 else f"mov.b16 %w, 0x{bits:04X};"
            assert setup == (spelled,) and operand == "%w"


def test_unsupported_dtype_is_rejected():
    problem = SpmmProblem(SparseMatrix.from_dense(np.eye(4, dtype="float64")), Layout.ROWS, "float64", (4, 4), (4, 4))
    with pytest.raises(UnsupportedProblem, match="float32, float16"):
        emit_spmm_ptx(problem, CudaSpmmConfig(), "k", "sm_90")


VECTOR_CASES = [
    # layout, x_shape, transposed, columns_per_thread, vector_width
    (Layout.CHANNELS, (2, 24, 6, 6), False, 1, 2),
    (Layout.CHANNELS, (1, 24, 8, 9), False, 2, 4),
    (Layout.ROWS, (72, 24), True, 1, 4),  # vector loads of X^T, one store per column of Y
    (Layout.ROWS, (40, 24), True, 3, 2),
]


@pytest.mark.parametrize("layout, x_shape, transposed, cols, width", VECTOR_CASES)
def test_emulated_vector_loads_float32(layout, x_shape, transposed, cols, width):
    rng = np.random.default_rng(9)
    problem = problem_for(rng, layout, 21, 24, 0.3, x_shape, ("bias", "residual", "relu6"))
    problem = dataclasses.replace(problem, x_transposed=transposed)
    config = CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=cols, vector_width=width)
    text = "".join(emit_spmm_ptx(problem, config, "k", "sm_90").units)
    assert f"ld.global.nc.v{width}.f32" in text
    out, ref = emulate(problem, config, rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def float16_reference(problem: SpmmProblem, x: np.ndarray, residual=None) -> np.ndarray:
    """What the kernel computes, rounding to float16 after every FMA (k ascending) and op."""
    f16 = np.float16
    a = problem.weight.dense.astype(np.float64)
    xs = np.moveaxis(x.reshape(-1, problem.K), 0, 1) if problem.layout is Layout.ROWS else np.moveaxis(x, 1, 0)
    xs = xs.reshape(problem.K, -1).astype(np.float64)
    acc = np.zeros((problem.M, xs.shape[1]), f16)
    for k in range(problem.K):
        acc = (acc.astype(np.float64) + a[:, k, None] * xs[k]).astype(f16)
    if problem.layout is Layout.ROWS:
        acc = acc.T.reshape(problem.reference(x, residual).shape)
        rows = (None,) * (acc.ndim - 1) + (slice(None),)
    else:
        acc = np.moveaxis(acc.reshape(problem.M, x.shape[0], *x.shape[2:]), 0, 1)
        rows = (None, slice(None)) + (None,) * (acc.ndim - 2)
    for op in problem.epilogue:
        if isinstance(op, BiasAdd):
            acc = (acc.astype(np.float64) + np.asarray(op.values, f16).astype(np.float64)[rows]).astype(f16)
        elif isinstance(op, ResidualAdd):
            acc = (acc.astype(np.float64) + residual.astype(np.float64)).astype(f16)
        else:
            acc = np.clip(acc, f16(op.lo), f16(op.hi))
    return acc


FLOAT16_CASES = VECTOR_CASES + [
    (Layout.CHANNELS, (2, 24, 4, 4), False, 2, 8),
    (Layout.CHANNELS, (2, 24, 5, 5), False, 1, 1),  # odd columns: one half per register
    (Layout.ROWS, (9, 24), False, 2, 1),
]


@pytest.mark.parametrize("layout, x_shape, transposed, cols, width", FLOAT16_CASES)
def test_emulated_float16_kernels_round_like_float16(layout, x_shape, transposed, cols, width):
    rng = np.random.default_rng(10)
    problem = problem_for(rng, layout, 21, 24, 0.3, x_shape, ("bias", "residual", "relu6"), dtype="float16")
    problem = dataclasses.replace(problem, x_transposed=transposed)
    config = CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=cols, vector_width=width)
    text = "".join(emit_spmm_ptx(problem, config, "k", "sm_90").units)
    assert ("fma.rn.f16x2" in text) == (width > 1) and "fma.rn.f32" not in text
    kernel_rng = np.random.default_rng(11)
    out, ref64 = emulate(problem, config, kernel_rng)
    inputs_rng = np.random.default_rng(11)  # the same draws emulate() made
    x = inputs_rng.standard_normal(tuple(int(d) for d in problem.x_shape)).astype("float16")
    residual = inputs_rng.standard_normal(tuple(int(d) for d in problem.y_shape)).astype("float16")
    assert out.dtype == np.float16 and not np.isnan(out).any()
    np.testing.assert_array_equal(out, float16_reference(problem, x, residual))
    np.testing.assert_allclose(out.astype(np.float64), ref64.astype(np.float64), rtol=2e-2, atol=2e-2)


def test_emulated_scalar_float16_kernels_cut_into_segments_round_like_float16():
    """Scalar half kernels get small segments (``tuning.SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS``):
    cut into several, they still round after every FMA in the order of one function."""
    rng = np.random.default_rng(13)
    problem = problem_for(rng, Layout.CHANNELS, 21, 24, 0.3, (2, 24, 5, 5), ("bias", "residual"), dtype="float16")
    config = CudaSpmmConfig(rows_per_block=8, threads_per_block=32, max_instructions_per_segment=24)
    assert len(emit_spmm_ptx(problem, config, "k", "sm_90").units) > 2
    out, _ = emulate(problem, config, np.random.default_rng(14))
    inputs_rng = np.random.default_rng(14)  # the same draws emulate() made
    x = inputs_rng.standard_normal(tuple(int(d) for d in problem.x_shape)).astype("float16")
    residual = inputs_rng.standard_normal(tuple(int(d) for d in problem.y_shape)).astype("float16")
    np.testing.assert_array_equal(out, float16_reference(problem, x, residual))


@pytest.mark.parametrize(
    "x_shape, width, message",
    [
        ((1, 24, 5, 5), 2, "divisible"),
        ((16, 24), 2, "adjacent"),  # row-major X, not transposed
    ],
)
def test_vector_width_needs_adjacent_divisible_columns(x_shape, width, message):
    rng = np.random.default_rng(12)
    layout = Layout.ROWS if len(x_shape) == 2 else Layout.CHANNELS
    problem = problem_for(rng, layout, 8, 24, 0.3, x_shape)
    with pytest.raises(UnsupportedProblem, match=message):
        cuda_rule.CudaSpmmRule().check(problem, CudaSpmmConfig(vector_width=width))


def test_float32_vector_of_eight_is_rejected():
    rng = np.random.default_rng(13)
    problem = problem_for(rng, Layout.CHANNELS, 8, 24, 0.3, (1, 24, 4, 4))
    with pytest.raises(UnsupportedProblem, match="128-bit"):
        emit_spmm_ptx(problem, CudaSpmmConfig(vector_width=8), "k", "sm_90")


@needs_ptxas
@pytest.mark.parametrize(
    "layout, config, dtype",
    [
        (Layout.ROWS, CudaSpmmConfig(), "float32"),
        (Layout.ROWS, CudaSpmmConfig(columns_per_thread=4, max_instructions_per_segment=300), "float32"),
        (Layout.CHANNELS, CudaSpmmConfig(rows_per_block=8, columns_per_thread=2), "float32"),
        (Layout.CHANNELS, CudaSpmmConfig(vector_width=4, columns_per_thread=2), "float32"),
        (Layout.ROWS, CudaSpmmConfig(vector_width=2), "float16"),
        (Layout.CHANNELS, CudaSpmmConfig(vector_width=8, max_instructions_per_segment=300), "float16"),
        (Layout.CHANNELS, CudaSpmmConfig(columns_per_thread=2), "float16"),
        (Layout.CHANNELS, CudaSpmmConfig(rows_per_block=4, split_k=4, max_instructions_per_segment=300), "float32"),
        (Layout.ROWS, CudaSpmmConfig(vector_width=2, split_k=2), "float16"),
        (Layout.CHANNELS, CudaSpmmConfig(rows_per_block=16, grid_split=4, max_instructions_per_segment=300), "float32"),
        (Layout.ROWS, CudaSpmmConfig(vector_width=2, grid_split=2), "float16"),
    ],
)
def test_ptxas_assembles_for_sm90(layout, config, dtype):
    rng = np.random.default_rng(3)
    static = config.vector_width > 1 or config.grid_split > 1
    if layout is Layout.ROWS:
        x_shape = (64, 64) if static else (tirx.Var("n", "int64"), 64)
    else:
        x_shape = (2 if static else tirx.Var("n", "int64"), 64, 8, 8)
    problem = problem_for(rng, layout, 48, 64, 0.1, x_shape, ("bias", "residual", "relu6"), dtype=dtype)
    problem = dataclasses.replace(problem, x_transposed=layout is Layout.ROWS and static)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    cubin = assemble(kernel.units, "sm_90")
    assert cubin[:4] == b"\x7fELF"


def kernel_registers(cubin: bytes) -> int:
    """The most registers any function of ``cubin`` uses (EIATTR_REGCOUNT in ``.nv.info``)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entry_size) for i in range(count)]
    names = headers[names_index][4]
    registers = []
    for header in headers:
        name = cubin[names + header[0] : cubin.index(b"\0", names + header[0])]
        if name != b".nv.info":
            continue
        info, i = cubin[header[4] : header[4] + header[5]], 0
        while i < len(info):
            form, attribute = info[i], info[i + 1]
            if form == 4:  # attribute with a 16-bit size and a payload
                (size,) = struct.unpack_from("<H", info, i + 2)
                if attribute == 0x2F:  # (function symbol, register count)
                    registers.append(struct.unpack_from("<II", info, i + 4)[1])
                i += 4 + size
            else:
                i += 4 if form == 3 else 2
    return max(registers)


@needs_ptxas
def test_segments_get_registers_for_loads_in_flight(tmp_path, monkeypatch):
    """Separately assembled segments are kept to the ABI's few scratch registers unless
    capped higher: each load then waits for the FMA before it (2x slower on the H200)."""
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(5)
    problem = problem_for(rng, Layout.CHANNELS, 32, 256, 0.3, (1, 256, 1024))
    config = CudaSpmmConfig(rows_per_block=1, max_instructions_per_segment=256)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    assert len(kernel.units) > 2
    default_abi = kernel_registers(assemble(kernel.units, "sm_90"))
    roomy = kernel_registers(assemble(kernel.units, "sm_90", **config.assembler_options()))
    assert default_abi < 40 and roomy > default_abi + 8
    capped = dataclasses.replace(config, segment_registers=40)
    assert kernel_registers(assemble(kernel.units, "sm_90", **capped.assembler_options())) <= 40
    with pytest.raises(ValueError, match="segment_registers"):
        CudaSpmmConfig(segment_registers=300)


@needs_ptxas
def test_entry_register_cap_lets_ptxas_keep_loads_in_flight(tmp_path, monkeypatch):
    """Uncapped, ptxas keeps a 16-row block's kernel near 32 registers (loads issued just
    before their FMAs); ``registers`` is its .maxnreg, which ptxas fills and never exceeds."""
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(6)
    problem = problem_for(rng, Layout.CHANNELS, 32, 256, 0.3, (1, 256, 1024))
    free = CudaSpmmConfig(rows_per_block=16, max_instructions_per_segment=10**6)
    uncapped = kernel_registers(assemble(emit_spmm_ptx(problem, free, "k", "sm_90").units, "sm_90"))
    assert uncapped < 40
    for registers in (40, 96):
        kernel = emit_spmm_ptx(problem, dataclasses.replace(free, registers=registers), "k", "sm_90")
        assert f".maxnreg {registers}" in kernel.units[0]
        used = kernel_registers(assemble(kernel.units, "sm_90"))
        assert uncapped < used <= registers
    assert ".maxnreg" not in emit_spmm_ptx(problem, free, "k", "sm_90").units[0]
    with pytest.raises(ValueError, match="do not fit"):
        CudaSpmmConfig(threads_per_block=1024, registers=96)


@needs_ptxas
def test_a_refreshing_build_assembles_anew_and_stores_for_the_next(tmp_path, monkeypatch):
    """``SPARSERT_CACHE=refresh`` never reads an entry but writes one; ``0`` does neither."""
    from sparsert_tvm.schedules.cuda import assemble as assembler

    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(7)
    kernel = emit_spmm_ptx(problem_for(rng, Layout.ROWS, 8, 8, 0.5, (4, 8)), CudaSpmmConfig(), "k", "sm_90")
    runs = []
    run_ptxas = assembler.subprocess.run

    def counting(command, **options):
        runs.extend([] if "--version" in command else [command[0]])
        return run_ptxas(command, **options)

    monkeypatch.setattr(assembler.subprocess, "run", counting)
    monkeypatch.setenv("SPARSERT_CACHE", "0")
    assemble(kernel.units, "sm_90")
    assert len(runs) == 1 and not (tmp_path / "cubin").exists()
    monkeypatch.setenv("SPARSERT_CACHE", "refresh")
    for expected_runs in (2, 3):  # assembled every time, and stored
        cubin = assemble(kernel.units, "sm_90")
        assert len(runs) == expected_runs and len(list((tmp_path / "cubin").iterdir())) == 1
    monkeypatch.delenv("SPARSERT_CACHE")
    assert assemble(kernel.units, "sm_90") == cubin and len(runs) == 3  # the stored entry


@needs_ptxas
def test_assembly_is_cached_and_corrupt_entries_are_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(4)
    kernel = emit_spmm_ptx(problem_for(rng, Layout.ROWS, 8, 8, 0.5, (4, 8)), CudaSpmmConfig(), "k", "sm_90")
    first = assemble(kernel.units, "sm_90")
    (entry,) = (tmp_path / "cubin").iterdir()
    calls = []
    real_run = assemble_module._run
    monkeypatch.setattr(assemble_module, "_run", lambda cmd: calls.append(cmd) or real_run(cmd))
    assert assemble(kernel.units, "sm_90") == first and not calls  # served from the cache
    entry.write_bytes(entry.read_bytes()[:-10])  # truncated
    assert assemble(kernel.units, "sm_90") == first and calls  # detected, rebuilt
    assert cache.load("cubin", entry.name) == first


def test_missing_ptxas_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(os, "access", lambda *a: False)
    with pytest.raises(ToolchainError, match="ptxas not found"):
        assemble_module.find_tool("ptxas")


@pytest.mark.skipif(GPU_PRESENT, reason="checks the behaviour where TVM's CUDA runtime is missing")
@needs_ptxas
def test_cuda_target_without_cuda_runtime_says_so():
    rng = np.random.default_rng(5)
    case = make_case(rng, "matmul", 8, 8, 0.3, (None, 8))
    with pytest.raises(sp.RuntimeUnavailable, match="CUDA runtime"):
        sp.SparsifyWeights({"kind": "cuda", "arch": "sm_90"}, 1.0)(case.module())


@needs_ptxas
def test_launch_wrapper_and_cuda_build(monkeypatch):
    """The Relax side of the CUDA path, built for CUDA on any machine."""
    made = []
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: made.append(kernel) or None)
    rng = np.random.default_rng(6)
    case = make_case(rng, "conv_nchw", 40, 16, 0.2, (None, 16, 6, 6), ("bias", "residual", "relu"))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=CPU_TARGET)
    # A symbolic batch is folded into the columns by default: one launch row of 36 * d0
    # columns; unfolded, the batch is the grid's z dimension.
    for tiling, grid_tail in [(None, "T.int64(1), {threads})"), ({"fold_batch": False}, "d0, {threads})")]:
        made.clear()
        out = sp.SparsifyWeights(target, 1.0, kernel_config=tiling)(case.module())
        (layer,) = sp.report_of(out).layers
        (kernel,) = made
        script = out[layer.kernel].script()
        assert f'T.call_packed("{kernel.name}"' in script
        assert kernel.name != layer.kernel  # the wrapper finds the kernel by name
        assert kernel.folds_batch == layer.params["fold_batch"] == (tiling is None)
        assert f"{kernel.row_groups}, {grid_tail.format(threads=kernel.threads)}" in script  # grid y, z, block
        assert layer.code_bytes > 0 and layer.params["row_groups"] == kernel.row_groups
        without_kernels = out.without_attr("external_mods")
        assert tvm.compile(without_kernels, target, tir_pipeline=sp.build.register_pipeline()) is not None


@pytest.mark.parametrize("x_shape", [(24, 50), (3, 24, 50)])
def test_emulated_kernels_of_a_weight_on_the_left(x_shape):
    """``W @ x`` as the pass sees it (an NCHW 1x1 problem over x's matrices) and as the CUDA
    kernels compute it: their outputs, viewed back, equal numpy's product."""
    rng = np.random.default_rng(9)
    weight = sparse_matrix(rng, (19, 24), 0.2, empty_rows=3)
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(relax.const(weight), x))
        builder.emit_func_output(out)
    (candidate,) = find_candidates("main", builder.get()["main"])
    problem = candidate.problem
    images = x_shape[0] if len(x_shape) == 3 else 1
    assert problem.layout is Layout.CHANNELS and [int(d) for d in problem.x_shape] == [images, 24, 50]
    array = rng.standard_normal(x_shape).astype("float32")
    for config in (cuda_rule.CudaSpmmRule().default_config(problem, None), CudaCsrConfig(rows_per_block=2, unroll=2)):
        y, _ = emulate(problem, config, rng, [array.reshape([int(d) for d in problem.x_shape])])
        np.testing.assert_allclose(y.reshape(*x_shape[:-2], 19, 50), weight @ array, rtol=1e-5, atol=1e-5)


@needs_ptxas
def test_layers_built_side_by_side_match_one_by_one(monkeypatch):
    """The pass builds a model's kernels together (``build_all``): each comes out as ``build``
    alone makes it, in the layers' order, and a layer the generator turns down at build time
    stays dense with the reason while the others are rewritten."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: kernel)
    monkeypatch.setenv("SPARSERT_CACHE", "0")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=CPU_TARGET)
    model = models.mlp(np.random.default_rng(7), features=(64, 96, 80, 48), batch=4)
    mod = from_onnx(model, keep_params_in_input=False)
    emit = cuda_rule.emit_ptx

    def refuse_the_second(problem, config, name, arch):
        if problem.M == 80:
            raise UnsupportedProblem("refused for the test")
        return emit(problem, config, name, arch)

    monkeypatch.setattr(cuda_rule, "emit_ptx", refuse_the_second)
    out = sp.SparsifyWeights(target, 1.0)(mod)
    layers = sp.report_of(out).layers
    assert [layer.decision for layer in layers] == ["sparse", "dense", "sparse"]
    assert layers[1].reason == "refused for the test" and layers[1].kernel is None
    rule = cuda_rule.CudaSpmmRule()
    for layer, module in zip([layers[0], layers[2]], out.attrs["external_mods"]):
        (candidate,) = [c for c in find_candidates("main", mod["main"]) if c.tail.name == layer.name]
        problem = candidate.problem
        if rule.transposes_input(problem):
            problem = dataclasses.replace(problem, x_transposed=True)
        alone = rule.build(problem, rule.default_config(problem, target), target, layer.kernel)
        assert module.units == alone.external_modules[0].units and module.name == f"{layer.kernel}_kernel"
        assert {k: v for k, v in layer.params.items() if k != "config_source"} == alone.params
        assert layer.code_bytes == alone.code_bytes


@needs_ptxas
@pytest.mark.parametrize("combine", [False, True])
def test_layers_reading_one_input_share_its_transpose(monkeypatch, combine):
    """Attention's query, key and value layers read one input: on CUDA they are rewritten
    with one transpose of it between them, not one each, whether or not they are combined
    into one kernel (``combine_siblings``)."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=CPU_TARGET)
    model = models.bert_encoder(np.random.default_rng(8), layers=1, hidden=64, heads=2, ffn=128, seq=16)
    out = sp.SparsifyWeights(target, 1.0, combine_siblings=combine)(from_onnx(model, keep_params_in_input=False))
    kernels = 4 if combine else 6
    assert sum(layer.sparse for layer in sp.report_of(out).layers) == kernels
    calls = [b.value for block in out["main"].body.blocks for b in block.bindings
             if isinstance(b.value, tvm.relax.Call) and b.value.op.name == "relax.call_tir"]
    inputs = [call.args[1][0] for call in calls]
    transposes = [b.var for block in out["main"].body.blocks for b in block.bindings
                  if isinstance(b.value, tvm.relax.Call) and b.value.op.name == "relax.permute_dims"
                  and b.value.attrs.axes is None]
    # query/key/value, the attention's output, and each feed-forward layer: 4 inputs.
    assert len(transposes) == 4 and len(calls) == kernels
    assert all(any(x.same_as(t) for t in transposes) for x in inputs)
    if not combine:
        assert inputs[0].same_as(inputs[1]) and inputs[1].same_as(inputs[2])


def test_tool_processes_are_limited_to_the_cores(monkeypatch, tmp_path):
    """Layers assembled side by side, each with segments side by side, start no more ptxas
    processes at once than there are cores."""
    running, most = [0], [0]
    lock = threading.Lock()

    def fake_ptxas(command, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        Path(command[command.index("-o") + 1]).write_bytes(b"cubin")
        with lock:
            running[0] -= 1
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(assemble_module.subprocess, "run", fake_ptxas)
    monkeypatch.setattr(assemble_module, "find_tool", lambda name: name)
    monkeypatch.setattr(assemble_module, "_tool_version", lambda path: "fake")
    monkeypatch.setenv("SPARSERT_CACHE", "0")
    units = tuple(f"// unit {i}" for i in range(6))
    with ThreadPoolExecutor(max_workers=8) as pool:
        layers = [units + (f"// layer {layer}",) for layer in range(8)]
        list(pool.map(lambda layer: assemble_module.assemble(layer, "sm_90", jobs=8), layers))
    assert 1 <= most[0] <= assemble_module.default_jobs()


@pytest.mark.parametrize(
    "config",
    [
        CudaSpmmConfig(rows_per_block=2, threads_per_block=32, fold_batch=True),
        CudaSpmmConfig(rows_per_block=3, threads_per_block=32, columns_per_thread=3, fold_batch=True),
        CudaSpmmConfig(rows_per_block=4, threads_per_block=32, vector_width=4, fold_batch=True),
        CudaSpmmConfig(threads_per_block=32, columns_per_thread=2, fold_batch=True, max_instructions_per_segment=60),
        CudaSpmmConfig(rows_per_block=2, threads_per_block=128, vector_width=2, fold_batch=True, split_k=4),
    ],
    ids=["plain", "three-columns", "vectors", "segmented", "split-vectors"],
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_emulated_folded_batch(config, dtype):
    """NCHW with the batch folded into the columns: 5 images of 4x5 pixels, so blocks and
    a thread's vectors cross image borders."""
    rng = np.random.default_rng(12)
    problem = problem_for(rng, Layout.CHANNELS, 19, 24, 0.3, (5, 24, 4, 5), ("bias", "residual", "relu6"), dtype=dtype)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    assert kernel.folds_batch
    out, ref = emulate(problem, config, rng)
    tolerance = 2e-2 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=tolerance, atol=tolerance)


def test_folding_needs_a_batch_dimension():
    rng = np.random.default_rng(13)
    problem = problem_for(rng, Layout.ROWS, 8, 8, 0.5, (6, 8))
    with pytest.raises(UnsupportedProblem, match="fold_batch"):
        emit_spmm_ptx(problem, CudaSpmmConfig(fold_batch=True), "k", "sm_90")


@pytest.mark.parametrize("columns_per_thread, split_k", [(1, 1), (3, 1), (1, 2)])
def test_emulated_transposed_input(columns_per_thread, split_k):
    rng = np.random.default_rng(7)
    columns = 70
    problem = problem_for(rng, Layout.ROWS, 19, 24, 0.3, (columns, 24), ("bias", "residual", "relu6"))
    problem = dataclasses.replace(problem, x_transposed=True)
    assert problem.x_strides().k == columns  # rows of X^T are N apart
    config = CudaSpmmConfig(threads_per_block=32 * split_k, columns_per_thread=columns_per_thread, split_k=split_k)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    x = rng.standard_normal((columns, 24)).astype("float32")
    residual = rng.standard_normal((columns, 19)).astype("float32")
    buffers = {"x": np.ascontiguousarray(x.T), "r": residual, "y": np.full((columns, 19), np.nan, "float32")}
    grid = (-(-columns // kernel.columns_per_block), kernel.row_groups, 1)
    PtxProgram(*kernel.units).launch("k", grid, kernel.threads, ["x", "r", "y", columns], buffers)
    np.testing.assert_allclose(buffers["y"], problem.reference(x, residual), rtol=1e-5, atol=1e-5)


def test_cuda_rule_transposes_row_major_activations_with_many_columns():
    rule = cuda_rule.CudaSpmmRule()
    rng = np.random.default_rng(8)
    n = tirx.Var("n", "int64")
    assert not rule.transposes_input(problem_for(rng, Layout.ROWS, 8, 8, 0.5, (n, 8)))  # needs N static
    assert rule.transposes_input(problem_for(rng, Layout.ROWS, 8, 8, 0.5, (64, 8)))
    assert rule.transposes_input(problem_for(rng, Layout.ROWS, 8, 8, 0.5, (4, 5, 8)))
    assert not rule.transposes_input(problem_for(rng, Layout.ROWS, 8, 8, 0.5, (4, 8)))
    assert not rule.transposes_input(problem_for(rng, Layout.CHANNELS, 8, 8, 0.5, (n, 8, 4, 4)))


# -- split-K: slices of a block share the columns and sum their partial results ---------------


@pytest.mark.parametrize("columns", [70, 64, 1])
def test_split_k_threads_past_the_columns_reach_the_barrier_and_store_nothing(columns):
    """70 columns leave 26 of the last block's 32 column threads without a column; they
    compute column 0 for the barrier, and every store is guarded so that they write nothing
    (their column 0 would be the right value: only the guard check can catch a missing one)."""
    rng = np.random.default_rng(20)
    problem = problem_for(rng, Layout.ROWS, 21, 40, 0.2, (columns, 40), ("bias", "residual", "relu"))
    config = CudaSpmmConfig(rows_per_block=4, threads_per_block=128, split_k=4)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    assert kernel.columns_per_block == 32 and kernel.threads == 128
    stores = [line for line in kernel.units[0].splitlines() if "st.global" in line]
    assert stores and all(line.startswith("@%pv0 ") for line in stores)
    assert "bar.sync 0;" in kernel.units[0]
    out, ref = emulate(problem, config, rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_split_k_shares_the_work_of_each_group():
    """Each slice's section holds about a quarter of a group's FMAs."""
    rng = np.random.default_rng(21)
    problem = problem_for(rng, Layout.ROWS, 4, 400, 0.3, (32, 400))
    kernel = emit_spmm_ptx(problem, CudaSpmmConfig(rows_per_block=4, threads_per_block=128, split_k=4), "k", "sm_90")
    text = kernel.units[0]
    sections = [text.split(f"G0_S{s}:")[1].split(f"G0_S{s + 1}:" if s < 3 else "G0_SUM:")[0] for s in range(4)]
    fmas = [section.count("fma.rn") for section in sections]
    assert sum(fmas) == problem.weight.nnz
    assert max(fmas) <= 1.2 * sum(fmas) / 4 and min(fmas) >= 0.8 * sum(fmas) / 4


def test_segmented_split_k_gives_each_slice_functions_without_warp_branches():
    """ptxas adds two instructions to each load of a function that branches apart by warp:
    segments get one function per slice's share and one adding the sums, and only the
    entry branches by slice (around the calls) and waits at the barrier."""
    rng = np.random.default_rng(23)
    problem = problem_for(rng, Layout.ROWS, 24, 64, 0.3, (64, 64), ("bias",))
    config = CudaSpmmConfig(rows_per_block=4, threads_per_block=64, split_k=2, max_instructions_per_segment=200)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    entry, functions = kernel.units[0], kernel.units[1:]
    assert len(functions) % 3 == 0 and len(functions) >= 6  # per segment: two shares and a sum
    assert "bar.sync" in entry and "%slice" in entry
    assert not any("bar.sync" in f or "setp.ne.u32 %p0, %slice" in f for f in functions)
    assert sum("st.shared" in f for f in functions) == 2 * len(functions) // 3
    out, ref = emulate(problem, config, rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@st.composite
def split_cases(draw):
    """A random weight (empty rows included), layout, column count, and each group's columns
    split into shares: among a block's slices (``split_k``) or across blocks (``grid_split``)."""
    m, k = draw(st.integers(1, 20)), draw(st.integers(1, 48))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    shares, across_blocks = draw(st.sampled_from([2, 4, 8])), draw(st.booleans())
    config = CudaSpmmConfig(
        rows_per_block=draw(st.integers(1, 5)),
        threads_per_block=32 * draw(st.sampled_from([1, 2])) * (1 if across_blocks else shares),
        columns_per_thread=draw(st.integers(1, 2)),
        split_k=1 if across_blocks else shares,
        grid_split=shares if across_blocks else 1,
        max_instructions_per_segment=draw(st.sampled_from([60, 4096])),
    )
    layout = draw(st.sampled_from([Layout.ROWS, Layout.CHANNELS]))
    columns = draw(st.integers(1, 100))
    x_shape = (columns, k) if layout is Layout.ROWS else (draw(st.integers(1, 2)), k, 1, columns)
    return m, k, density, layout, x_shape, config, draw(st.integers(0, 2**16))


@settings(max_examples=50, deadline=None)
@given(split_cases())
def test_emulated_splits_match_numpy(case):
    """Blocks run in a shuffled order, so any share of a grid split's tile may finish last."""
    m, k, density, layout, x_shape, config, seed = case
    rng = np.random.default_rng(seed)
    problem = problem_for(rng, layout, m, k, density, x_shape, ("bias", "residual", "relu"))
    out, ref = emulate(problem, config, rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_instructions_per_segment", [60, 4096])
def test_grid_split_sums_shares_in_order_and_resets_its_counts(max_instructions_per_segment):
    """Whichever block of a tile finishes last, the sums are added in share order (the
    outputs are identical bit for bit), and the counts are back at zero for the next launch
    (the module's arrays live on across launches)."""
    rng = np.random.default_rng(31)
    problem = problem_for(rng, Layout.CHANNELS, 24, 64, 0.3, (2, 64, 3, 30), ("bias",))
    config = CudaSpmmConfig(rows_per_block=4, threads_per_block=32, grid_split=4,
                            max_instructions_per_segment=max_instructions_per_segment)
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    program = PtxProgram(*kernel.units)
    x = rng.standard_normal((2, 64, 3, 30)).astype("float32")
    grid = (-(-90 // kernel.columns_per_block), kernel.row_groups, 2)
    assert kernel.row_groups == 6 * 4
    outputs = []
    for order in ("forward", "reverse", "shuffle"):
        buffers = {"x": x, "y": np.full((2, 24, 3, 30), np.nan, "float32")}
        program.launch("k", grid, kernel.threads, ["x", "y", 90], buffers, order)
        assert not program.arrays["k_counts"].any()
        outputs.append(buffers["y"])
    np.testing.assert_allclose(outputs[0], problem.reference(x), rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(outputs[0], out) for out in outputs[1:])
    assert program.arrays["k_sums"].any()  # the partial sums went through the module array


def test_grid_split_is_checked():
    with pytest.raises(ValueError, match="grid_split"):
        CudaSpmmConfig(grid_split=3)
    with pytest.raises(ValueError, match="grid_split"):
        CudaSpmmConfig(threads_per_block=64, split_k=2, grid_split=2)
    rng = np.random.default_rng(23)
    symbolic = problem_for(rng, Layout.CHANNELS, 16, 16, 0.3, (tirx.Var("n", "int64"), 16, 4, 4))
    with pytest.raises(UnsupportedProblem, match="static column count and batch"):
        cuda_rule.CudaSpmmRule().check(symbolic, CudaSpmmConfig(grid_split=2))
    huge = problem_for(rng, Layout.CHANNELS, 1024, 16, 0.3, (64, 16, 32, 32))
    with pytest.raises(UnsupportedProblem, match="partial sums of"):
        emit_spmm_ptx(huge, CudaSpmmConfig(rows_per_block=16, grid_split=8), "k", "sm_90")


def test_split_k_is_checked():
    with pytest.raises(ValueError, match="split_k"):
        CudaSpmmConfig(split_k=3)
    with pytest.raises(ValueError, match="whole warps"):
        CudaSpmmConfig(threads_per_block=32, split_k=2)
    rng = np.random.default_rng(22)
    problem = problem_for(rng, Layout.ROWS, 64, 64, 0.1, (64, 64))
    roomy = CudaSpmmConfig(rows_per_block=16, threads_per_block=1024, columns_per_thread=4, split_k=2)
    with pytest.raises(UnsupportedProblem, match="shared memory"):
        emit_spmm_ptx(problem, roomy, "k", "sm_90")
    with pytest.raises(UnsupportedProblem, match="shared memory"):
        cuda_rule.CudaSpmmRule().check(problem, roomy)


def test_emulator_refuses_a_barrier_that_only_some_threads_reach():
    program = PtxProgram("""
.visible .entry k(.param .u32 p_n)
{
mov.u32 %r1, %tid.x;
setp.lt.u32 %p0, %r1, 32;
@%p0 bra DONE;
bar.sync 0;
DONE:
ret;
}
""")
    with pytest.raises(AssertionError, match="bar.sync"):
        program.launch("k", (1, 1, 1), 64, [0], {})
    program.launch("k", (1, 1, 1), 32, [0], {})  # nobody reaches it
