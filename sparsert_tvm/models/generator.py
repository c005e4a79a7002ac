"""DCGAN's generator as ONNX, with random weights (batch norm folded into biases): transposed
convolutions from a latent vector up to an image."""

from __future__ import annotations

import onnx

from .graph import GraphBuilder


def dcgan_generator(rng, width=1.0, size=64, batch=1, latent=100, channels=3) -> onnx.ModelProto:
    """``latent`` -> 4x4 (a 4x4 transposed convolution of the 1x1 input), then 4x4 stride-2
    transposed convolutions halving the channels and doubling the size up to ``size``,
    the last to ``channels`` with tanh."""
    g = GraphBuilder(rng)
    features = max(8, int(64 * width))
    doublings = (size // 4).bit_length() - 1
    if 4 << doublings != size:
        raise ValueError(f"size must be 4 times a power of two, got {size}")
    cout = features * 2 ** max(doublings - 1, 0)
    x = g.conv_transpose("x", latent, cout, kernel=4, stride=1, pad=0)
    for i in range(doublings):
        last = i == doublings - 1
        cin, cout = cout, channels if last else cout // 2
        x = g.conv_transpose(x, cin, cout, act="tanh" if last else "relu")
    return g.model((batch, latent, 1, 1), x, (batch, channels, size, size), "dcgan_generator")
