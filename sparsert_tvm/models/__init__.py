"""Networks built in code as ONNX models with random weights, for the demo, tests and
benchmarks: small pruned ones (``small``), and ResNet-50, MobileNet v1/v2 (``cnn``), a
BERT encoder (``bert``) and DCGAN's generator (``generator``) to prune with
``sparsert_tvm.prune``."""

from .bert import bert_encoder
from .cnn import mobilenet_v1, mobilenet_v2, random_input, resnet50
from .generator import dcgan_generator
from .small import convnet, mlp

__all__ = ["bert_encoder", "convnet", "dcgan_generator", "mlp", "mobilenet_v1", "mobilenet_v2", "random_input",
           "resnet50"]
