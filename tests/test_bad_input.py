"""Inputs that must give the dense answer, an untouched operator with a reason, or a clear
error: never a different number, never a crash inside TVM."""

import multiprocessing
import os
import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from click.testing import CliRunner
from onnx import TensorProto, helper
from tvm import relax

import sparsert_tvm as sp
from helpers import CPU_TARGET, Compiled, assert_close, make_case, sparse_matrix
from sparsert_tvm import cache
from sparsert_tvm.cli import main as cli
from sparsert_tvm.problem import Layout, SpmmProblem
from sparsert_tvm.schedules.cuda.assemble import assemble
from sparsert_tvm.schedules.cuda.ptx import emit_spmm_ptx
from sparsert_tvm.weights import SparseMatrix

needs_ptxas = pytest.mark.skipif(
    shutil.which("ptxas") is None and not os.path.exists("/usr/local/cuda/bin/ptxas"), reason="ptxas not installed"
)


def linear(x_shape, weight: np.ndarray, dtype: str) -> tvm.IRModule:
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(x, relax.const(weight, dtype)))
        builder.emit_func_output(out)
    return builder.get()


def dense_vm(mod):
    return relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16", "int8"])
def test_other_dtypes_stay_dense_with_the_dense_answer(dtype):
    rng = np.random.default_rng(0)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    weight = (sparse_matrix(rng, (8, 6), 0.3) * 4).astype(np_dtype)
    mod = linear((3, 8), weight, dtype)
    out = sp.SparsifyWeights(CPU_TARGET, 1.0)(mod)
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "dense" and dtype in layer.reason
    assert tvm_ffi.structural_equal(out["main"], mod["main"])
    if dtype in ("float16", "float64"):  # what TVM's CPU build runs
        x = (rng.standard_normal((3, 8)) * 4).astype(np_dtype)
        expected = dense_vm(mod)["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(Compiled(mod, CPU_TARGET)(x), expected)


@pytest.mark.parametrize("shape", [(1, 17), (17, 1), (1, 1)], ids=str)
def test_single_row_or_column_weights(target, shape):
    rng = np.random.default_rng(1)
    case = make_case(rng, "matmul_t", *shape, 1.0, (None, shape[1]), ("bias", "relu"))
    compiled = Compiled(case.module(), target)
    for batch in (1, 19):
        arrays = case.inputs(rng, batch)
        assert_close(compiled(*arrays), case.reference(arrays))


def test_layers_over_the_code_size_cap_stay_dense():
    rng = np.random.default_rng(2)
    case = make_case(rng, "matmul", 16, 16, 0.5, (None, 16))
    nnz = int(np.count_nonzero(case.weight))
    out = sp.SparsifyWeights(CPU_TARGET, 1.0, kernel_config={"max_layer_nnz": nnz - 1})(case.module())
    (layer,) = sp.report_of(out).layers
    assert layer.decision == "dense" and "unrolled-code cap" in layer.reason
    assert sp.CudaSpmmConfig().max_layer_nnz == 1_000_000 and sp.CpuSpmmConfig().max_layer_nnz == 250_000


def test_wrong_input_shape_or_dtype_at_run_time_is_an_error(target):
    rng = np.random.default_rng(3)
    case = make_case(rng, "matmul_t", 12, 16, 0.2, (None, 16), ("relu",))
    compiled = Compiled(case.module(), target)
    # The Relax VM checks the arguments against the function's signature before any kernel runs.
    for bad, message in [
        (np.zeros((3, 15), "float32"), "mismatch"),
        (np.zeros((3, 16), "float64"), "dtype float32"),
        (np.zeros((16,), "float32"), "ndim 2"),
    ]:
        with pytest.raises((ValueError, RuntimeError), match=message):
            compiled(bad)
    arrays = case.inputs(rng, 4)  # still fine afterwards
    assert_close(compiled(*arrays), case.reference(arrays))


def _assemble_worker(args):
    cache_dir, units = args
    os.environ["SPARSERT_CACHE_DIR"] = cache_dir
    return assemble(units, "sm_90")


@needs_ptxas
def test_concurrent_compiles_share_the_cache_safely(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    problem = SpmmProblem(SparseMatrix.from_dense(sparse_matrix(rng, (32, 32), 0.2)), Layout.ROWS, "float32", (4, 32), (4, 32))
    units = emit_spmm_ptx(problem, sp.CudaSpmmConfig(max_instructions_per_segment=150), "k", "sm_90").units
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        cubins = pool.map(_assemble_worker, [(str(tmp_path), units)] * 4)
    assert len(set(cubins)) == 1
    (entry,) = (tmp_path / "cubin").iterdir()  # one entry, no temporary files left behind
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path))
    assert cache.load("cubin", entry.name) == cubins[0]
    entry.write_bytes(b"garbage")
    assert cache.load("cubin", entry.name) is None  # a corrupt entry is ignored, then rebuilt


def test_a_changed_weight_never_reuses_a_kernel():
    rng = np.random.default_rng(5)
    weight = sparse_matrix(rng, (8, 8), 0.5)
    changed = weight.copy()
    row, col = (int(i[0]) for i in np.nonzero(weight))
    changed[row, col] += 1e-6
    units = [
        emit_spmm_ptx(SpmmProblem(SparseMatrix.from_dense(w), Layout.ROWS, "float32", (4, 8), (4, 8)), sp.CudaSpmmConfig(), "k", "sm_90").units
        for w in (weight, changed)
    ]
    assert cache.cache_key("sm_90", *units[0]) != cache.cache_key("sm_90", *units[1])
    assert SparseMatrix.from_dense(weight).digest != SparseMatrix.from_dense(changed).digest


def test_cli_reports_bad_model_files_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    result = CliRunner().invoke(cli, ["inspect", str(garbage)])
    assert result.exit_code == 1 and "cannot read ONNX model" in result.output
    assert "Traceback" not in result.output

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    unsupported = tmp_path / "unsupported.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, unsupported)
    result = CliRunner().invoke(cli, ["inspect", str(unsupported)])
    assert result.exit_code == 1 and "TVM cannot import" in result.output
    assert "Traceback" not in result.output

    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.output
