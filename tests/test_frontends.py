"""Models from PyTorch through torch.export and TVM's importer (ONNX is in test_onnx.py)."""

import numpy as np
import torch
from tvm.relax.frontend.torch import from_exported_program

from helpers import Compiled, assert_close


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
