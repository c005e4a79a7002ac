"""Layer shapes of the networks in the kernel benchmark suite (inference at 224x224).

Each 1x1 convolution is ``(out_channels, in_channels, H*W of its input)`` at stride 1;
each fully connected layer is ``(out_features, in_features)``. Shapes that repeat inside a
network are listed once.
"""

from __future__ import annotations

RESNET50_1X1 = [
    (64, 64, 3136), (256, 64, 3136), (64, 256, 3136),
    (128, 256, 3136), (512, 128, 784), (128, 512, 784), (512, 256, 784),
    (256, 512, 784), (1024, 256, 196), (256, 1024, 196), (1024, 512, 196),
    (512, 1024, 196), (2048, 512, 49), (512, 2048, 49), (2048, 1024, 49),
]

MOBILENET_V1_1X1 = [
    (64, 32, 12544), (128, 64, 3136), (128, 128, 3136), (256, 128, 784), (256, 256, 784),
    (512, 256, 196), (512, 512, 196), (1024, 512, 49), (1024, 1024, 49),
]

# Inverted residual blocks: expansion (6x) and projection 1x1 convolutions.
MOBILENET_V2_1X1 = [
    (16, 32, 12544), (96, 16, 12544), (24, 96, 3136), (144, 24, 3136), (24, 144, 3136),
    (32, 144, 784), (192, 32, 784), (32, 192, 784), (64, 192, 196), (384, 64, 196),
    (64, 384, 196), (96, 384, 196), (576, 96, 196), (96, 576, 196), (160, 576, 49),
    (960, 160, 49), (160, 960, 49), (320, 960, 49), (1280, 320, 49),
]

EFFICIENTNET_B0_1X1 = [
    (16, 32, 12544), (96, 16, 12544), (24, 96, 3136), (144, 24, 3136), (24, 144, 3136),
    (40, 144, 784), (240, 40, 784), (40, 240, 784), (80, 240, 196), (480, 80, 196),
    (80, 480, 196), (112, 480, 196), (672, 112, 196), (112, 672, 196), (192, 672, 49),
    (1152, 192, 49), (192, 1152, 49), (320, 1152, 49), (1280, 320, 49),
]

CONV_NETWORKS = {
    "resnet50-1x1": RESNET50_1X1,
    "mobilenet_v1-1x1": MOBILENET_V1_1X1,
    "mobilenet_v2-1x1": MOBILENET_V2_1X1,
    "efficientnet_b0-1x1": EFFICIENTNET_B0_1X1,
}

# Attention projections (QKV fused for GPT-2) and the feed-forward pair.
FC_NETWORKS = {
    "bert_base-fc": [(768, 768), (3072, 768), (768, 3072)],
    "bert_large-fc": [(1024, 1024), (4096, 1024), (1024, 4096)],
    "gpt2-fc": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
}
FC_COLUMNS = (1, 8, 32, 128, 512)

# DeepBench-style GEMMs (speech and language models): (M, K, N).
DEEPBENCH = [(1760, 1760, 16), (2048, 2048, 32), (2560, 2560, 64), (4096, 4096, 16), (1024, 1024, 128)]

# Real magnitude-pruned ResNet-50 3x3 filters (data/README.md) as im2col matrices
# [out, in*9], with N = the layer's output positions.
REAL_3X3 = {"stage1": 3136, "stage2": 784, "stage3": 196}

# Transposed convolutions of stride 2 doubling their input (NCHW): (network, kernel, in
# channels, out channels, input size), DCGAN's 64x64 generator, U-Net's up-convolutions and an
# FCN-style 3x3 with output padding. Padding and output padding: ``doubling_padding``.
UPSAMPLING = [
    ("dcgan", 4, 512, 256, 4), ("dcgan", 4, 256, 128, 8), ("dcgan", 4, 128, 64, 16),
    ("u-net", 2, 512, 256, 28), ("u-net", 2, 256, 128, 56), ("fcn", 3, 256, 128, 14),
]


def doubling_padding(kernel: int, stride: int = 2) -> tuple[int, int]:
    """Padding and output padding with which a transposed convolution's output is exactly
    ``stride`` times its input."""
    return (kernel - stride + 1) // 2, (kernel - stride) % 2
