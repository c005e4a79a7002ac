"""The sparsert command line, and deploying what it builds with TVM's runtime alone."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import tvm
from click.testing import CliRunner
from onnx import numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from helpers import CPU_TARGET, assert_close
from sparsert_tvm import bench, models
from sparsert_tvm.cli import main as cli
from sparsert_tvm.prune import magnitude_prune, prune_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def dense_convnet(tmp_path):
    path = tmp_path / "dense.onnx"
    onnx.save(models.convnet(np.random.default_rng(0), density=1.0), path)
    return path


def initializers(path) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if len(i.dims) == 4}


def weight_densities(path) -> dict:
    return {name: np.count_nonzero(w) / w.size for name, w in initializers(path).items()}


def test_magnitude_prune_keeps_the_largest():
    weight = np.array([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]], "float32")
    np.testing.assert_array_equal(magnitude_prune(weight, 0.5), np.array([[0, -5.0, 0.3], [2.0, 0, 0]], "float32"))
    assert np.count_nonzero(magnitude_prune(weight, 0.0)) == 6


def test_prune_keeps_first_conv_unless_asked(dense_convnet, tmp_path):
    out = tmp_path / "pruned.onnx"
    result = invoke("prune", dense_convnet, "--sparsity", 0.9, "-o", out)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(out))
    densities = weight_densities(out)
    assert densities["w1"] == 1.0 and "first convolution" in result.output
    assert all(abs(densities[w] - 0.1) < 0.02 for w in ("w2", "w3", "w4"))
    result = invoke("prune", dense_convnet, "--sparsity", 0.9, "--prune-first-conv", "-o", out)
    assert abs(weight_densities(out)["w1"] - 0.1) < 0.02
    assert invoke("prune", dense_convnet, "--sparsity", 1.5, "-o", out).exit_code == 1


def test_prune_can_keep_each_layers_weight_norm(dense_convnet, tmp_path):
    plain, scaled = tmp_path / "plain.onnx", tmp_path / "scaled.onnx"
    assert invoke("prune", dense_convnet, "--sparsity", 0.9, "-o", plain).exit_code == 0
    assert invoke("prune", dense_convnet, "--sparsity", 0.9, "--keep-scale", "-o", scaled).exit_code == 0
    original, plain, scaled = (initializers(path) for path in (dense_convnet, plain, scaled))
    for name in ("w2", "w3", "w4"):
        np.testing.assert_array_equal(plain[name] != 0, scaled[name] != 0)
        np.testing.assert_allclose(np.linalg.norm(scaled[name]), np.linalg.norm(original[name]), rtol=1e-5)
        assert np.linalg.norm(plain[name]) < 0.9 * np.linalg.norm(original[name])
    np.testing.assert_array_equal(scaled["w1"], original["w1"])  # kept dense: untouched


def test_compile_run_and_deploy_with_the_runtime_only(target, dense_convnet, tmp_path):
    kind = target.kind.name
    device = "cuda" if kind == "cuda" else "cpu"
    pruned, module = tmp_path / "pruned.onnx", tmp_path / "model.so"
    assert invoke("prune", dense_convnet, "--sparsity", 0.9, "-o", pruned).exit_code == 0
    result = invoke("compile", pruned, "--target", kind, "-o", module, "--input-shape", "x:2x32x8x8")
    assert result.exit_code == 0, result.output
    assert "conv2d 1x1 NCHW" in result.output and "sparse" in result.output

    x = np.random.default_rng(1).standard_normal((2, 32, 8, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    mod = from_onnx(onnx.load(pruned), keep_params_in_input=False)
    expected = relax.VirtualMachine(tvm.compile(mod, CPU_TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    result = invoke("run", module, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--device", device)
    assert result.exit_code == 0, result.output
    assert_close(np.load(tmp_path / "y.npy"), expected)

    # A separate process with TVM's runtime only: no sparsert_tvm, no compiler.
    script = textwrap.dedent(f"""
        import sys, numpy as np, tvm
        from tvm import relax
        device = tvm.{device}(0)
        vm = relax.VirtualMachine(tvm.runtime.load_module({str(module)!r}), device)
        y = vm["main"](tvm.runtime.tensor(np.load({str(tmp_path / 'x.npy')!r}), device)).numpy()
        np.save({str(tmp_path / 'deployed.npy')!r}, y)
        assert "sparsert_tvm" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert_close(np.load(tmp_path / "deployed.npy"), expected)


def test_run_reports_user_errors_in_one_line(dense_convnet, tmp_path):
    module = tmp_path / "model.so"
    assert invoke("compile", dense_convnet, "--target", "llvm", "-o", module).exit_code == 0
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), "float32"))
    result = invoke("run", module, "--input", tmp_path / "bad.npy", "--device", "cpu")
    assert result.exit_code == 1 and "rejected its inputs" in result.output and "Traceback" not in result.output
    not_a_module = tmp_path / "junk.so"
    not_a_module.write_bytes(b"junk")
    result = invoke("run", not_a_module, "--input", tmp_path / "bad.npy", "--device", "cpu")
    assert result.exit_code == 1 and "cannot load" in result.output
    result = invoke("compile", dense_convnet, "-o", module, "--input-shape", "x=1x2")
    assert result.exit_code == 2 and "NAME:D1xD2" in result.output
    result = invoke("compile", dense_convnet, "-o", module, "--target", "tpu")
    assert result.exit_code == 2 and "unknown target" in result.output
    result = invoke("compile", dense_convnet, "-o", module, "--target", "llvm", "--tune")
    assert result.exit_code == 1 and "CUDA targets only" in result.output and "Traceback" not in result.output


@pytest.fixture
def small_mobilenet(tmp_path):
    path = tmp_path / "small.onnx"
    model = models.mobilenet_v1(np.random.default_rng(0), width=0.25, depth=2, size=16, classes=10)
    onnx.save(prune_model(model, 0.9)[0], path)
    return path


def test_bench_times_sparse_against_dense_with_the_split(small_mobilenet, tmp_path):
    result = invoke("bench", small_mobilenet, "--target", "llvm", "--batch", 2, "--json", tmp_path / "bench.json",
                    "--plot", tmp_path / "split.png")
    assert result.exit_code == 0, result.output
    assert "dense (TVM)" in result.output and "sparse (sparsert)" in result.output
    assert "onnxruntime" in result.output  # its latency, or why there is none
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["inputs"] == [[2, 3, 16, 16]]  # --batch replaced the file's batch of 1
    dense, sparse = figures["builds"]
    assert dense["end_to_end_us"] > 0 and sparse["end_to_end_us"] > 0
    assert 0 <= figures["max_rel_error"] < 1e-4  # the sparse build computed what the dense one did
    assert {c["kind"] for c in sparse["calls"]} == {"sparse kernel", "TVM kernel"}
    assert not any(c["kind"] == "sparse kernel" for c in dense["calls"])
    total = sum(c["us"] for c in sparse["calls"])
    assert "total" in result.output and f"{total:,.1f} us" in result.output
    assert dense["cuda_graph_us"] is None and sparse["cuda_graph_note"] == ""  # CUDA graphs are tried on CUDA only
    assert (tmp_path / "split.png").stat().st_size > 0


@pytest.mark.gpu
def test_bench_on_the_gpu_tries_cuda_graphs(gpu_target, small_mobilenet, tmp_path):
    result = invoke("bench", small_mobilenet, "--target", "cuda", "--json", tmp_path / "bench.json")
    assert result.exit_code == 0, result.output
    for build in json.loads((tmp_path / "bench.json").read_text())["builds"]:
        assert (build["cuda_graph_us"] is None) != (build["cuda_graph_note"] == "")  # a time, or why not
        assert f"CUDA graph, {build['label']}" in result.output


def test_cuda_graph_variant_reports_a_failure_instead_of_raising():
    mod = from_onnx(models.mlp(np.random.default_rng(0), batch=4), keep_params_in_input=False)
    x = np.random.default_rng(1).standard_normal((4, 64)).astype("float32")
    arrays = [tvm.runtime.tensor(x)]
    plain = tvm.compile(mod, CPU_TARGET)  # stands in for the CUDA-graph build, which needs a GPU
    expected = relax.VirtualMachine(plain, tvm.cpu())["main"](*arrays).numpy()

    def failing_build():
        raise RuntimeError("capture failed\nCheck failed: stream is capturing")

    assert bench.with_cuda_graph(failing_build, tvm.cpu(), arrays, expected) == (None, "Check failed: stream is capturing")
    us, note = bench.with_cuda_graph(lambda: plain, tvm.cpu(), arrays, expected)
    assert us > 0 and note == ""
    us, note = bench.with_cuda_graph(lambda: plain, tvm.cpu(), arrays, expected + 1)
    assert us is None and "output differs" in note


def test_batch_option_is_checked(small_mobilenet):
    result = invoke("inspect", small_mobilenet, "--target", "llvm", "--batch", 0)
    assert result.exit_code == 2 and "not a batch size" in result.output and "Traceback" not in result.output
    result = invoke("inspect", small_mobilenet, "--target", "llvm", "--batch", 4)
    assert result.exit_code == 0 and "4*64" in result.output  # N = batch * 8x8 pixels


def test_bench_needs_static_shapes(dense_convnet):
    result = invoke("bench", dense_convnet, "--target", "llvm")
    assert result.exit_code == 2 and "--input-shape" in result.output and "Traceback" not in result.output


def test_tflite_files_go_through_the_same_commands(tmp_path):
    from tflite_builder import TfliteModel

    rng = np.random.default_rng(4)
    m = TfliteModel()
    x = m.tensor("x", (4, 32))
    weight = (rng.standard_normal((16, 32)) * (rng.random((16, 32)) < 0.1)).astype("float32")
    y = m.fully_connected(x, weight, rng.standard_normal(16).astype("float32"), (4, 16), relu=True)
    path = tmp_path / "fc.tflite"
    path.write_bytes(m.build([x], [y]))
    result = invoke("inspect", path, "--target", "llvm")
    assert result.exit_code == 0 and "1 of 1 candidates sparse" in result.output
    result = invoke("bench", path, "--target", "llvm", "--batch", 2, "--json", tmp_path / "bench.json")
    assert result.exit_code == 0 and "sparse (sparsert)" in result.output
    assert json.loads((tmp_path / "bench.json").read_text())["inputs"] == [[2, 32]]  # the file says 4
    (tmp_path / "junk.tflite").write_bytes(b"junk")
    result = invoke("inspect", tmp_path / "junk.tflite")
    assert result.exit_code == 1 and "junk.tflite" in result.output and "Traceback" not in result.output


def test_an_onnxruntime_that_cannot_read_the_model_is_reported_not_fatal(monkeypatch):
    import types

    from sparsert_tvm.bench import onnxruntime_us

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported model IR version: 14, max supported IR version: 13")

    fake = types.SimpleNamespace(
        __version__="1.0", get_available_providers=lambda: ["CPUExecutionProvider"], InferenceSession=refuse
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    us, why = onnxruntime_us("model.onnx", [], CPU_TARGET)
    assert us is None and "IR version" in why and "onnxruntime 1.0 failed" in why


@pytest.mark.parametrize("target", [CPU_TARGET, tvm.target.Target("cuda")], ids=["cpu", "cuda"])
def test_onnxruntime_on_the_cpu_is_timed_once_tvm_threads_are_idle(monkeypatch, target):
    """TVM's CPU workers spin for a while after our kernels ran: onnxruntime on the CPU is
    timed only after ``wait_for_idle_threads``, its first runs after the wait unmeasured."""
    import types

    events = []

    class Session:
        def __init__(self, path, providers):
            events.append("session")

        def get_inputs(self):
            return [types.SimpleNamespace(name="x")]

        def run(self, outputs, feed):
            events.append("run")

    provider = "CPUExecutionProvider" if target.kind.name == "llvm" else "CUDAExecutionProvider"
    fake = types.SimpleNamespace(
        __version__="1.0", get_available_providers=lambda: [provider], InferenceSession=Session
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setattr(bench, "wait_for_idle_threads", lambda: events.append("wait"))
    us, why = bench.onnxruntime_us("model.onnx", [np.zeros(1, "float32")], target, runs=3)
    assert us is not None and why == ""
    runs = events.count("run")
    assert events == ["session"] + (["wait"] if provider == "CPUExecutionProvider" else []) + ["run"] * runs
    assert runs > 3  # warm-up runs before the timed ones


def test_siblings_are_one_layer_unless_kept_apart(tmp_path):
    """A BERT layer's query, key and value projections: one row of the report (one kernel) by
    default, three with --siblings-apart, in inspect and compile alike."""
    path = tmp_path / "bert.onnx"
    model = models.bert_encoder(np.random.default_rng(0), layers=1, hidden=32, heads=2, ffn=64, seq=4)
    onnx.save(prune_model(model, 0.9)[0], path)
    combined = invoke("inspect", path, "--target", "llvm")
    apart = invoke("inspect", path, "--target", "llvm", "--siblings-apart")
    assert combined.exit_code == 0 and apart.exit_code == 0, combined.output + apart.output
    assert "lv1+lv4+lv7" in combined.output and "96x32" in combined.output
    assert "lv1+" not in apart.output and apart.output.count("32x32") == 4  # q, k, v, the attention's output
    built = invoke("compile", path, "--target", "llvm", "-o", tmp_path / "bert.so", "--siblings-apart")
    assert built.exit_code == 0 and "lv1+" not in built.output, built.output
