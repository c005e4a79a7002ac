"""Direct sparse convolutions against cuDNN and TVM's dense convolution on the GPU.

    python benchmarks/conv.py --suite paper --dtype float32 --out benchmarks/results/conv-paper-fp32-h100.json

Contenders: sparsert (the convolution read through its window, no im2col; of a transposed
convolution, its phase convolution and the interleave), cuDNN fp32 / TF32 / fp16 (torch,
fastest algorithm per shape), TVM's dense conv2d (conv2d_transpose). ``M`` is the output
channels, ``K`` input channels x kh x kw, ``N`` batch x output pixels. How cases run and
what the options do: suite.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import suite  # noqa: E402
from harness import ConvCase, TransposedConvCase, real_weights  # noqa: E402
from layers import UPSAMPLING, doubling_padding  # noqa: E402


# (out channels, in channels, kernel, input size, stride): padding keeps "same" sizes.
RESNET50_3X3 = {  # torchvision's ResNet-50 (v1.5: the stride is on the 3x3)
    "stage1": (64, 64, 3, 56, 1),
    "stage2": (128, 128, 3, 28, 1),
    "stage3": (256, 256, 3, 14, 1),
    "stage4": (512, 512, 3, 7, 1),
    "stage2-s2": (128, 128, 3, 56, 2),
    "stage3-s2": (256, 256, 3, 28, 2),
    "stage4-s2": (512, 512, 3, 14, 2),
}
VGG16_3X3 = [
    (64, 64, 3, 224, 1), (128, 64, 3, 112, 1), (128, 128, 3, 112, 1), (256, 128, 3, 56, 1),
    (256, 256, 3, 56, 1), (512, 256, 3, 28, 1), (512, 512, 3, 28, 1), (512, 512, 3, 14, 1),
]  # the first layer (3 input channels) has too few weights to prune
LARGE_KERNELS = {
    "resnet50-stem-7x7-s2": (64, 3, 7, 224, 2),
    "inception-5x5": (32, 16, 5, 28, 1),
    "inception-5x5-wide": (128, 32, 5, 14, 1),
}


# Layers of MobileNet v1 (224x224) that pruning leaves dense: the stem and the depthwise
# convolutions, as (channels, input size, stride); with ResNet-50's 7x7 stem.
MOBILENET_V1_DEPTHWISE = [
    (32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1), (256, 28, 2), (512, 14, 1),
    (512, 14, 2), (1024, 7, 1),
]
# DeepLab v3 on ResNet-50 at output stride 8 (torchvision's), 520x520 images: the 3x3 layers
# of stages 3 and 4 keep a 65x65 map and dilate instead of striding, as (channels, dilation).
# Its ASPP's 3x3 layers (2048 -> 256 channels at dilations 12-36) spread beyond the pass's cap.
DEEPLAB_V3_DILATED = {"stage3-d2": (256, 2), "stage4-d2": (512, 2), "stage4-d4": (512, 4)}
DENSE_STEMS = {"mobilenet-v1-stem-3x3-s2": (32, 3, 3, 224, 2), "resnet50-stem-7x7-s2": (64, 3, 7, 224, 2)}


def uniform(shape, density, seed=0):
    """A uniform random mask, seeded by shape and density."""
    rng = np.random.default_rng([*shape, int(density * 1000), seed])
    return ((rng.random(shape) < density) * rng.standard_normal(shape)).astype("float32")


def paper_suite(dtype):
    """ResNet-50's 3x3 layers (real pruned filters of stages 1-3 and uniform masks of all four
    stages), VGG-16's 3x3 layers, a 7x7 stride-2 stem and 5x5 layers; batch 1 and 8."""
    cases = []

    def add(name, group, filters, size, stride):
        for batch in (1, 8):
            padding = filters.shape[2] // 2
            case = ConvCase(f"{name}-b{batch}", group, filters, (size, size), stride, padding, dtype, batch)
            cases.append((case, None))

    for key, filters in real_weights().items():  # s91_stage1 ...
        m, c, k, size, stride = RESNET50_3X3[key.split("_")[1]]
        add(f"resnet50-3x3-real-{key}", "resnet50-3x3-real", filters, size, stride)
    for density in (0.1, 0.05):
        for stage, (m, c, k, size, stride) in RESNET50_3X3.items():
            add(f"resnet50-3x3-{stage}-d{density}", "resnet50-3x3", uniform((m, c, k, k), density), size, stride)
        for m, c, k, size, stride in VGG16_3X3:
            add(f"vgg16-3x3-{m}x{c}-{size}-d{density}", "vgg16-3x3", uniform((m, c, k, k), density), size, stride)
        for name, (m, c, k, size, stride) in LARGE_KERNELS.items():
            add(f"{name}-d{density}", "large-kernels", uniform((m, c, k, k), density), size, stride)
    # ResNet-50 first, batch 1 first: a run cut short by its deadline covers the headline.
    return sorted(cases, key=lambda pair: (not pair[0].group.startswith("resnet50"), pair[0].images))


def small_suite(dtype):
    """Dense layers that ``SMALL_CONVOLUTION_NNZ`` rewrites (stems, depthwise) and the dense
    crossover of a 3x3 layer (ResNet-50 stage 2 at densities up to 1), batch 1 and 8: where
    the unrolled kernel beats TVM's dense convolution, and cuDNN."""
    cases = []
    for batch in (1, 8):
        for name, (m, c, k, size, stride) in DENSE_STEMS.items():
            filters = uniform((m, c, k, k), 1.0)
            cases.append(ConvCase(f"{name}-b{batch}", "dense-stem", filters, (size, size), stride, k // 2, dtype, batch))
        for channels, size, stride in MOBILENET_V1_DEPTHWISE:
            filters = uniform((channels, 1, 3, 3), 1.0)
            name = f"mobilenet-v1-dw-{channels}-{size}{'-s2' if stride == 2 else ''}-b{batch}"
            cases.append(ConvCase(name, "depthwise", filters, (size, size), stride, 1, dtype, batch, groups=channels))
        for density in (0.2, 0.3, 0.5, 1.0):
            m, c, k, size, stride = RESNET50_3X3["stage2"]
            filters = uniform((m, c, k, k), density)
            name = f"resnet50-3x3-stage2-d{density}-b{batch}"
            cases.append(ConvCase(name, "crossover", filters, (size, size), stride, 1, dtype, batch))
    return [(case, None) for case in cases]


def quick_suite(dtype):
    """Four ResNet-50 layers at 90%, batch 1: a smoke run."""
    return [(case, config) for case, config in paper_suite(dtype) if case.images == 1 and "d0.1" in case.name][:4]


def dilated_suite(dtype):
    """DeepLab v3's dilated 3x3 layers at densities 0.1 and 0.05, batch 1 and 8."""
    cases = []
    for density in (0.1, 0.05):
        for name, (channels, dilation) in DEEPLAB_V3_DILATED.items():
            filters = uniform((channels, channels, 3, 3), density)
            for batch in (1, 8):
                cases.append(ConvCase(f"deeplabv3-{name}-d{density}-b{batch}", "deeplabv3-dilated", filters, (65, 65),
                                      1, dilation, dtype, batch, dilation=dilation))
    return [(case, None) for case in cases]


def transposed_suite(dtype):
    """Transposed convolutions doubling their input (``layers.UPSAMPLING``) and DCGAN's 4x4
    projection of its 100-long latent vector (a one-pixel input), at densities 0.1 and 0.05,
    batch 1 and 8."""
    cases = []
    for density in (0.1, 0.05):
        for batch in (1, 8):
            filters = uniform((100, 512, 4, 4), density)
            cases.append(TransposedConvCase(f"dcgan-projection-4x4-100->512-d{density}-b{batch}", "dcgan-transposed",
                                            filters, (1, 1), 1, 0, dtype, batch))
            for network, k, c, m, size in UPSAMPLING:
                padding, output_padding = doubling_padding(k)
                name = f"{network}-{k}x{k}-s2-{c}->{m}-{size}-d{density}-b{batch}"
                cases.append(TransposedConvCase(name, f"{network}-transposed", uniform((c, m, k, k), density),
                                                (size, size), 2, padding, dtype, batch, output_padding=output_padding))
    return [(case, None) for case in cases]


def resnet50_suite(dtype):
    """The paper suite's ResNet-50 cases only."""
    return [(case, config) for case, config in paper_suite(dtype) if case.group.startswith("resnet50")]


SUITES = {"paper": paper_suite, "resnet50": resnet50_suite, "small": small_suite, "quick": quick_suite,
          "dilated": dilated_suite, "transposed": transposed_suite}


if __name__ == "__main__":
    suite.main(SUITES, __doc__.split("\n\n")[0], "paper")
