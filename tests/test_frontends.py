"""Models from PyTorch (torch.export) and TFLite through TVM's importers (ONNX is in test_onnx.py)."""

import numpy as np
import tflite
import torch
from tvm.relax.frontend.tflite import from_tflite
from tvm.relax.frontend.torch import from_exported_program

from helpers import Compiled, assert_close, sparse_matrix
from tflite_builder import TfliteModel


class SmallNet(torch.nn.Module):
    """A 1x1 convolution and two Linear layers: the forms PyTorch models export."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 1)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def pruned_net(density: float) -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_((torch.rand_like(p) < density).float())
    return net


def test_pytorch_model_through_torch_export(target):
    net = pruned_net(0.1)
    x = torch.randn(2, 16, 4, 4)
    mod = from_exported_program(torch.export.export(net, (x,)), keep_params_as_input=False)
    compiled = Compiled(mod, target, density_threshold=None)
    layers = compiled.report.layers
    assert [(layer.op, layer.decision, layer.epilogue) for layer in layers] == [
        ("conv2d 1x1 NCHW", "sparse", ["bias", "relu"]),
        ("matmul", "sparse", ["bias", "relu"]),
        ("matmul", "sparse", ["bias"]),
    ]
    (out,) = compiled(x.numpy())
    with torch.no_grad():
        expected = net(x).numpy()
    assert_close(out, expected)
    assert np.count_nonzero(expected) > 0


def test_tflite_model_built_in_the_test(target):
    """A 1x1 CONV_2D (NHWC, OHWI filter) with fused ReLU, then FULLY_CONNECTED + ReLU and a
    plain FULLY_CONNECTED: the TFLite forms of pointwise convolutions and dense layers."""
    rng = np.random.default_rng(3)
    weights = [sparse_matrix(rng, shape, 0.1) for shape in ((24, 16), (32, 24), (10, 32))]
    biases = [rng.standard_normal(w.shape[0]).astype("float32") for w in weights]
    m = TfliteModel()
    x = m.tensor("x", (2, 3, 3, 16))
    h = m.conv_1x1(x, weights[0], biases[0], (2, 3, 3, 24), relu=True)
    h = m.fully_connected(h, weights[1], biases[1], (18, 32), relu=True)  # on [18, 24] rows
    y = m.fully_connected(h, weights[2], biases[2], (18, 10))
    mod = from_tflite(tflite.Model.GetRootAsModel(m.build([x], [y]), 0))
    compiled = Compiled(mod, target, density_threshold=None)
    assert [(layer.op, layer.decision, layer.epilogue) for layer in compiled.report.layers] == [
        ("conv2d 1x1 NHWC", "sparse", ["bias", "relu"]),
        ("matmul", "sparse", ["bias", "relu"]),
        ("matmul", "sparse", ["bias"]),
    ]
    data = rng.standard_normal((2, 3, 3, 16)).astype("float32")
    expected = np.maximum(data.reshape(18, 16).astype(np.float64) @ weights[0].T + biases[0], 0)
    expected = np.maximum(expected @ weights[1].T + biases[1], 0) @ weights[2].T + biases[2]
    out = compiled(data)
    assert out.size == expected.size  # TVM's importer keeps the leading dims: [2, 3, 3, 10]
    assert_close(out.reshape(expected.shape), expected)
