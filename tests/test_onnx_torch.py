"""The PyTorch executor of ONNX models (benchmarks/onnx_torch.py), against TVM's dense CPU build.

Tolerance: 1e-5 of each output's largest magnitude. Both run the same float32 operations on
the same weights, summed in different orders; on these models they differ by at most 6e-7
of that scale, while a wrong attribute (a stride, a padding, a group, a transposed weight)
moves outputs by a sizeable fraction of it. The CNNs also output their last feature map,
which global pooling has not averaged.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from helpers import CPU_TARGET
from sparsert_tvm import models
from sparsert_tvm.prune import prune_model

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from onnx_torch import OnnxModule  # noqa: E402

TOLERANCE = 1e-5
INPUT_SCALE = 10.0  # activations well above 6, so that ReLU6 (Clip) clips

SMALL = {
    "resnet50": lambda rng: models.resnet50(rng, width=0.25, blocks=(1, 1, 1, 1), size=32, classes=10,
                                            features_output=True),
    "mobilenet_v1": lambda rng: models.mobilenet_v1(rng, width=0.25, depth=4, size=32, classes=10,
                                                    features_output=True),
    "mobilenet_v2": lambda rng: models.mobilenet_v2(rng, width=0.5, depth=4, size=32, classes=10,
                                                    features_output=True),
    "bert": lambda rng: models.bert_encoder(rng, layers=1, hidden=64, heads=2, ffn=128, seq=8, batch=2),
}


def tvm_outputs(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """TVM's dense CPU build of ``model``, run on each input."""
    vm = relax.VirtualMachine(tvm.compile(from_onnx(model, keep_params_in_input=False), CPU_TARGET), tvm.cpu())
    results = [vm["main"](tvm.runtime.tensor(x)) for x in inputs]
    return [[r.numpy()] if hasattr(r, "numpy") else [v.numpy() for v in r] for r in results]


def torch_outputs(module: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        result = module(torch.from_numpy(x))
    return [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_executor_matches_tvms_dense_build(name):
    model, _ = prune_model(SMALL[name](np.random.default_rng(0)), 0.9)
    x, other_x = (INPUT_SCALE * models.random_input(model, seed=seed) for seed in (0, 1))
    expected_outputs, elsewhere_outputs = tvm_outputs(model, [x, other_x])
    got_outputs = torch_outputs(OnnxModule(model), x)
    assert len(got_outputs) == len(expected_outputs)
    for got, expected, elsewhere in zip(got_outputs, expected_outputs, elsewhere_outputs, strict=True):
        scale = float(np.abs(expected).max())
        assert np.abs(expected - elsewhere).max() > 1e-3 * scale, "output does not depend on the input"
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE * scale


def test_casting_the_module_casts_the_weights_only():
    """Reshape's shapes stay integers on the host; the float weights follow ``.to(dtype)``."""
    model = SMALL["bert"](np.random.default_rng(0))
    x = models.random_input(model)
    module = OnnxModule(model).to(torch.float64)
    assert all(buffer.dtype == torch.float64 for buffer in module.buffers())
    with torch.inference_mode():
        got = module(torch.from_numpy(x).double())
    (expected,) = tvm_outputs(model, [x])[0]
    assert got.dtype == torch.float64
    assert np.abs(got.numpy() - expected).max() <= TOLERANCE * np.abs(expected).max()


def one_node_model(op: str, inputs: list[str], **attributes) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attributes)], "one",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 8, 8]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("model, message", [
    (one_node_model("LRN", ["x"], size=3), "op ai.onnx.LRN is not covered"),
    (one_node_model("Conv", ["x", "w"], auto_pad="SAME_UPPER"), "attributes ['auto_pad'] not covered"),
    (one_node_model("Conv", ["x", "w"], pads=[1, 1, 0, 0]), "asymmetric pads"),
    (one_node_model("MaxPool", ["x"], kernel_shape=[3, 3, 3]), "over 3 spatial dimensions"),
])
def test_anything_else_is_not_implemented(model, message):
    with pytest.raises(NotImplementedError, match=message.replace("[", r"\[").replace("]", r"\]")):
        OnnxModule(model)


@pytest.mark.slow
def test_the_e2e_benchmark_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """A smoke run of benchmarks/e2e.py: its GPU contenders are null with a note."""
    import e2e

    out = tmp_path / "e2e.json"
    argv = ["e2e.py", "--target", "llvm", "--small", "--models", "mobilenet_v1", "--batches", "1", "--runs", "2",
            "--tune", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    e2e.main()
    (entry,) = e2e.json.loads(out.read_text())["models"]
    assert entry["correct"] and entry["layers"]["rewritten"] > 0
    assert entry["us"]["sparsert"] and entry["us"]["tvm_dense"] and entry["us"]["torch_fp32"]
    assert entry["us"]["torch_fp16"] is None and entry["notes"]["torch_fp16"] == "CUDA only"
    assert entry["us"]["sparsert_tuned"] is None and "CUDA" in entry["notes"]["sparsert_tuned"]
    assert "sparsert_tuned" in out.with_suffix(".md").read_text()
    assert "mobilenet_v1" in capsys.readouterr().out
