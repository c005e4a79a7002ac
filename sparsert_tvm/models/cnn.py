"""ResNet-50, MobileNet v1 and MobileNet v2 as ONNX, with random weights (batch norm folded
into biases), at any width, depth and input size so that tests can build small versions.

Prune them with ``sparsert_tvm.prune.prune_model``; residual branches end in a convolution
scaled down (``gain``) so that the activations of a randomly initialised deep network stay
of order one. ``features_output=True`` adds the last feature map (the classifier's input)
as a second output: global pooling averages most of a wrong pixel away, the map does not.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphBuilder

RESNET50_BLOCKS = (3, 4, 6, 3)
MOBILENET_V1_PLAN = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
# (expansion, channels, repeats, first stride) of MobileNet v2's inverted residual stages.
MOBILENET_V2_PLAN = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
RESIDUAL_GAIN = 0.3


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)


def resnet50(rng, width=1.0, blocks=RESNET50_BLOCKS, size=224, batch=1, classes=1000, features_output=False
             ) -> onnx.ModelProto:
    """Bottleneck ResNet (v1.5: the stride sits on the 3x3 convolution)."""
    g = GraphBuilder(rng)
    stem = _scaled(64, width)
    x = g.conv("x", 3, stem, kernel=7, stride=2)
    x = g.node("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = stem
    for stage, repeats in enumerate(blocks):
        mid = _scaled(64 * 2**stage, width)
        cout = mid * 4
        for i in range(repeats):
            stride = 2 if i == 0 and stage > 0 else 1
            h = g.conv(x, cin, mid, 1)
            h = g.conv(h, mid, mid, 3, stride=stride)
            h = g.conv(h, mid, cout, 1, act=None, gain=RESIDUAL_GAIN)
            shortcut = x if stride == 1 and cin == cout else g.conv(x, cin, cout, 1, stride=stride, act=None)
            x = g.node("Relu", [g.node("Add", [h, shortcut])])
            cin = cout
    out = g.classifier(x, cin, classes)
    return g.model((batch, 3, size, size), out, (batch, classes), "resnet50", [x] if features_output else [])


def mobilenet_v1(rng, width=1.0, size=224, batch=1, classes=1000, depth=None, features_output=False
                 ) -> onnx.ModelProto:
    """Depthwise-separable blocks: 3x3 depthwise + ReLU, 1x1 pointwise + ReLU (the first
    ``depth`` of the 13 blocks, all by default)."""
    g = GraphBuilder(rng)
    cin = _scaled(32, width)
    x = g.conv("x", 3, cin, kernel=3, stride=2)
    for channels, stride in MOBILENET_V1_PLAN[:depth]:
        cout = _scaled(channels, width)
        x = g.conv(x, cin, cin, kernel=3, stride=stride, groups=cin)
        x = g.conv(x, cin, cout, kernel=1)
        cin = cout
    out = g.classifier(x, cin, classes)
    return g.model((batch, 3, size, size), out, (batch, classes), "mobilenet_v1", [x] if features_output else [])


def mobilenet_v2(rng, width=1.0, size=224, batch=1, classes=1000, depth=None, features_output=False
                 ) -> onnx.ModelProto:
    """Inverted residuals: 1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, linear 1x1 projection
    (the first ``depth`` of the 7 stages, all by default)."""
    g = GraphBuilder(rng)
    cin = _scaled(32, width)
    x = g.conv("x", 3, cin, kernel=3, stride=2, act="relu6")
    for expansion, channels, repeats, first_stride in MOBILENET_V2_PLAN[:depth]:
        cout = _scaled(channels, width)
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            hidden = cin * expansion
            h = g.conv(x, cin, hidden, 1, act="relu6") if expansion != 1 else x
            h = g.conv(h, hidden, hidden, 3, stride=stride, groups=hidden, act="relu6")
            h = g.conv(h, hidden, cout, 1, act=None, gain=RESIDUAL_GAIN)
            x = g.node("Add", [x, h]) if stride == 1 and cin == cout else h
            cin = cout
    last = _scaled(1280, max(1.0, width))
    x = g.conv(x, cin, last, 1, act="relu6")
    out = g.classifier(x, last, classes)
    return g.model((batch, 3, size, size), out, (batch, classes), "mobilenet_v2", [x] if features_output else [])


def random_input(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(dims).astype("float32")
