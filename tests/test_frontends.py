"""Models from PyTorch (torch.export) and TFLite through TVM's importers (ONNX is in test_onnx.py)."""

import numpy as np
import pytest
import tflite
import torch
import torch.nn.utils.prune as prune
import tvm
from tvm import relax
from tvm.relax.frontend.tflite import from_tflite
from tvm.relax.frontend.torch import from_exported_program

import sparsert_tvm as sp
from helpers import CPU_TARGET, Compiled, assert_close, sparse_matrix
from test_transposed_conv import Geometry, TransposedCase
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


def test_weights_pruned_with_torch_nn_utils_prune_are_constants(target):
    """``torch.nn.utils.prune`` keeps each weight as ``weight_orig * weight_mask`` until
    ``prune.remove``; ``torch.export`` keeps that product, which the pass evaluates."""
    net = SmallNet().eval()
    for module in (net.conv, net.fc1, net.fc2):
        prune.l1_unstructured(module, "weight", amount=0.9)
    x = torch.randn(2, 16, 4, 4)
    mod = from_exported_program(torch.export.export(net, (x,)), keep_params_as_input=False)
    compiled = Compiled(mod, target, density_threshold=0.3)
    assert [(layer.decision, round(layer.density, 2)) for layer in compiled.report.layers] == [("sparse", 0.1)] * 3
    (out,) = compiled(x.numpy())
    with torch.no_grad():
        expected = net(x).numpy()
    assert_close(out, expected)


class TemporalBlock(torch.nn.Module):
    """1-D convolutions as speech and sequence models use them: a padded one with a
    BatchNorm1d and ReLU, a dilated depthwise one (a temporal convolutional network's), then a
    pointwise one with a residual."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(16, 32, 5, padding=2, bias=False)
        self.norm = torch.nn.BatchNorm1d(32)
        self.depthwise = torch.nn.Conv1d(32, 32, 3, padding=4, dilation=4, groups=32)
        self.pointwise = torch.nn.Conv1d(32, 32, 1)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return torch.relu(self.pointwise(self.depthwise(h)) + h)


def test_pytorch_conv1d_layers(target):
    torch.manual_seed(2)
    net = TemporalBlock().eval()
    with torch.no_grad():
        for conv in (net.conv, net.pointwise):
            conv.weight.mul_((torch.rand_like(conv.weight) < 0.1).float())
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 16, 40)
    mod = from_exported_program(torch.export.export(net, (x,)), keep_params_as_input=False)
    compiled = Compiled(mod, target, density_threshold=None)
    assert [(layer.op, layer.decision, layer.epilogue) for layer in compiled.report.layers] == [
        ("conv1d 5 NCW", "sparse", ["batch_norm", "relu"]),
        ("conv1d 3 dilation 4 depthwise NCW", "sparse", ["bias"]),  # a dense depthwise layer: at any density
        ("conv1d 1 NCW", "sparse", ["bias", "residual", "relu"]),
    ]
    (out,) = compiled(x.numpy())
    with torch.no_grad():
        expected = net(x).numpy()
    assert_close(out, expected)


def exported(net, x, density: float, norms) -> tvm.IRModule:
    """``net`` (in inference mode) with its convolution and linear weights masked to about
    ``density`` and its ``norms`` given statistics and affine parameters of their own, exported
    with ``torch.export`` and imported into Relax."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_((torch.rand_like(p) < density).float())
        for norm in norms:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    return from_exported_program(torch.export.export(net, (x,)), keep_params_as_input=False)


def assert_matches_torch(compiled, net, x):
    (out,) = compiled(x.numpy())
    with torch.no_grad():
        expected = net(x).numpy()
    assert_close(out, expected)
    assert np.count_nonzero(expected) > 0


class DilatedBlock(torch.nn.Module):
    """DeepLab's backbone past output stride 8: 3x3 convolutions that dilate instead of
    striding, with inference BatchNorms, and one dilated differently per axis."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(8, 16, 3, padding=2, dilation=2, bias=False),
                                          torch.nn.Conv2d(16, 16, 3, padding=(4, 2), dilation=(4, 2), bias=False)])
        self.norms = torch.nn.ModuleList([torch.nn.BatchNorm2d(16) for _ in range(2)])

    def forward(self, x):
        h = torch.relu(self.norms[0](self.convs[0](x)))
        return torch.relu(self.norms[1](self.convs[1](h)) + h)


def test_pytorch_dilated_convolutions(target):
    torch.manual_seed(3)
    net = DilatedBlock().eval()
    x = torch.randn(2, 8, 13, 11)
    compiled = Compiled(exported(net, x, 0.1, net.norms), target, density_threshold=0.3)
    assert [(layer.op, layer.decision, layer.epilogue) for layer in compiled.report.layers] == [
        ("conv2d 3x3 dilation 2 NCHW", "sparse", ["batch_norm", "relu"]),
        ("conv2d 3x3 dilation 4x2 NCHW", "sparse", ["batch_norm", "residual", "relu"]),
    ]
    assert [layer.K for layer in compiled.report.layers] == [8 * 9, 16 * 9]  # the weights as the model holds them
    assert_matches_torch(compiled, net, x)


class Decoder(torch.nn.Module):
    """A generator's projection of its latent vector (a ConvTranspose2d of a one-pixel input)
    and a generator's and a U-Net's upsampling: ConvTranspose2d with inference BatchNorms, one
    with output padding and a bias, and a vocoder's ConvTranspose1d."""

    def __init__(self):
        super().__init__()
        self.project = torch.nn.ConvTranspose2d(16, 8, 5, bias=False)
        self.up = torch.nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, bias=False)
        self.norms = torch.nn.ModuleList([torch.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(8)])
        self.out = torch.nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.wave = torch.nn.ConvTranspose1d(4, 2, 16, stride=8, padding=4)

    def forward(self, latent):
        h = torch.relu(self.norms[0](self.project(latent)))  # [2, 8, 5, 5]
        h = torch.relu(self.norms[1](self.up(h)))
        h = self.out(h)  # [2, 4, 20, 20]
        return self.wave(h.flatten(2))


def test_pytorch_transposed_convolutions(target):
    torch.manual_seed(4)
    net = Decoder().eval()
    x = torch.randn(2, 16, 1, 1)
    compiled = Compiled(exported(net, x, 0.2, net.norms), target, density_threshold=0.3)
    assert [(layer.op, layer.decision, layer.epilogue) for layer in compiled.report.layers] == [
        ("conv2d_transpose 5x5 NCHW", "sparse", ["batch_norm", "relu"]),
        ("conv2d_transpose 4x4 /2 NCHW", "sparse", ["batch_norm", "relu"]),
        ("conv2d_transpose 3x3 /2 NCHW", "sparse", ["bias"]),
        ("conv1d_transpose 16 /8 NCW", "sparse", ["bias"]),
    ]
    assert_matches_torch(compiled, net, x)


class Bottleneck(torch.nn.Module):
    """ResNet's bottleneck with a projection shortcut, every convolution followed by an
    inference BatchNorm (as torchvision's models are), then a Linear layer and BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(
            [torch.nn.Conv2d(16, 8, 1, bias=False), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
             torch.nn.Conv2d(8, 32, 1, bias=False), torch.nn.Conv2d(16, 32, 1, stride=2, bias=False)]
        )
        self.norms = torch.nn.ModuleList([torch.nn.BatchNorm2d(c) for c in (8, 8, 32, 32)])
        self.fc = torch.nn.Linear(32 * 4 * 4, 24)
        self.norm_fc = torch.nn.BatchNorm1d(24)

    def forward(self, x):
        (a, b, c, shortcut), (na, nb, nc, ns) = self.convs, self.norms
        h = torch.relu(na(a(x)))
        h = torch.relu(nb(b(h)))
        h = torch.relu(nc(c(h)) + ns(shortcut(x)))
        return torch.relu(self.norm_fc(self.fc(h.flatten(1))))


def test_pytorch_batch_norms_are_folded_into_the_layers(target):
    """torch.export keeps each BatchNorm apart; the pass folds it into the layer before it
    (its scale into the weight's rows, its shift as a bias) with the ReLU and the residual
    add after it, so no norm is left to TVM. The shortcut's and the main branch's last
    convolutions meet in one add: the later one keeps it."""
    torch.manual_seed(1)
    net = Bottleneck().eval()
    x = torch.randn(2, 16, 8, 8)
    mod = exported(net, x, 0.1, [*net.norms, net.norm_fc])
    compiled = Compiled(mod, target, density_threshold=None)
    epilogues = {layer.op: layer.epilogue for layer in compiled.report.layers}
    assert all(layer.decision == "sparse" for layer in compiled.report.layers), compiled.report.table()
    assert epilogues["conv2d 3x3 /2 NCHW"] == ["batch_norm", "relu"]
    assert epilogues["conv2d 1x1 /2 NCHW"] == ["batch_norm", "residual", "relu"]  # the shortcut, later
    assert epilogues["matmul"] == ["bias", "batch_norm", "relu"]
    assert sorted(map(tuple, epilogues.values())).count(("batch_norm",)) == 1  # the main branch's last
    ops = []
    relax.analysis.post_order_visit(
        sp.SparsifyWeights(target, None)(mod)["main"],
        lambda e: ops.append(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None,
    )
    assert "relax.nn.batch_norm" not in ops
    assert_matches_torch(compiled, net, x)


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


@pytest.mark.parametrize("size, kernel, stride, same", [
    ((4, 5), 3, 2, True),  # a decoder's upsampling; SAME gives uneven padding (0 top, 1 bottom)
    ((1, 1), 4, 1, False),  # a generator's projection of its latent vector (one pixel: a matmul)
])
def test_tflite_transpose_conv(target, size, kernel, stride, same):
    """TFLite's TRANSPOSE_CONV (NHWC, OHWI filter, the output shape an int32 input) arrives as
    an NHWC ``conv2d_transpose``, which TVM 0.27 cannot build itself: the pass makes such a
    model buildable, and a layer it leaves to TVM is a clear error."""
    rng = np.random.default_rng(5)
    weight = sparse_matrix(rng, (6, kernel * kernel * 8), 0.2).reshape(6, kernel, kernel, 8)  # OHWI
    bias = rng.standard_normal(6).astype("float32")
    out_size = tuple(n * stride if same else (n - 1) * stride + kernel for n in size)
    m = TfliteModel()
    x = m.tensor("x", (2, *size, 8))
    y = m.transpose_conv(x, weight, bias, (2, *out_size, 6), stride, same)
    mod = from_tflite(tflite.Model.GetRootAsModel(m.build([x], [y]), 0))
    with pytest.raises(sp.UnbuildableByTvm, match="conv2d_transpose in NHWC"):
        sp.compile(mod, CPU_TARGET, 0.0)
    compiled = Compiled(mod, target, density_threshold=None)
    ((op, decision, epilogue),) = [(layer.op, layer.decision, layer.epilogue) for layer in compiled.report.layers]
    assert op.startswith(f"conv2d_transpose {kernel}x{kernel}") and op.endswith("NHWC")
    assert (decision, epilogue) == ("sparse", ["bias"])
    pads = []
    for n, o in zip(size, out_size):  # TFLite's SAME: the excess cropped, the odd one at the end
        excess = (n - 1) * stride + kernel - o
        pads.append((excess // 2, excess - excess // 2))
    geometry = Geometry((kernel, kernel), (stride, stride), (pads[0][0], pads[1][0], pads[0][1], pads[1][1]), size=size)
    case = TransposedCase(np.ascontiguousarray(weight.transpose(3, 0, 1, 2)), geometry, layout="NHWC",
                          epilogue=("bias",), bias=bias)
    data = rng.standard_normal((2, *size, 8)).astype("float32")
    assert_close(compiled(data), case.reference([data]))
