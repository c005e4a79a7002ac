"""ResNet-50, MobileNet v1/v2 and a BERT encoder built in code, pruned, compiled end to end."""


import numpy as np
import onnx
import pytest
import tvm
from click.testing import CliRunner
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import sparsert_tvm as sp
from helpers import CPU_TARGET, assert_close, device_of
from sparsert_tvm import models
from sparsert_tvm.cli import main as cli
from sparsert_tvm.prune import prune_model

FULL_SIZE = {  # builder, sparse layers expected on CUDA at 90% and 95% (of all weight layers)
    # Every layer: the pruned ones, and the dense stems and depthwise convolutions as small convolutions.
    "resnet50": (lambda rng: models.resnet50(rng), 54, 54),
    "mobilenet_v1": (lambda rng: models.mobilenet_v1(rng, features_output=True), 28, 28),
    "mobilenet_v2": (lambda rng: models.mobilenet_v2(rng, features_output=True), 53, 53),
    # Per layer: query, key and value as one layer (siblings), the attention's output, the FFN's two.
    "bert_base_2_layers": (lambda rng: models.bert_encoder(rng, layers=2), 8, 12),
    # 12 layers: 85M weights to draw, serialise and import (~10 s on 2 cores)
    "bert_base": (lambda rng: models.bert_encoder(rng), 48, 72),
    # Its first layer (the latent's projection, 819k weights) is kept dense by the pruning,
    # and rewritten at any density: the CSR kernel runs it (a matmul of 1 column).
    "dcgan": (lambda rng: models.dcgan_generator(rng), 5, 5),
}
DENSE_REASONS = ("density 1.000 above threshold", "depthwise", "weight is not a constant")


def pruned_module(model, sparsity=0.9):
    pruned, _ = prune_model(model, sparsity, keep_scale=True)  # random weights: keep the signal
    return pruned, from_onnx(pruned, keep_params_in_input=False)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "bert_base" else n for n in FULL_SIZE])
def test_full_size_models_import_and_the_pass_finds_their_layers(name):
    build, sparse, layers = FULL_SIZE[name]
    _, mod = pruned_module(build(np.random.default_rng(0)))
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    report = sp.report_of(sp.SparsifyWeights(cuda, dry_run=True)(mod))
    assert (len(report.sparse_layers), len(report.layers)) == (sparse, layers), report.table()
    for layer in report.sparse_layers:
        small = "small convolution" in layer.reason and layer.nnz <= sp.SMALL_CONVOLUTION_NNZ
        dense_transposed = "a transposed convolution (any density)" in layer.reason and layer.density == 1
        assert small or dense_transposed or 0.09 <= layer.density <= 0.11, layer  # magnitude pruning per layer at 90%
    for layer in report.layers:
        assert layer.sparse or any(reason in layer.reason for reason in DENSE_REASONS), layer.reason


SMALL = {  # the CNNs also output their last feature map (see check_against_dense)
    "resnet50": lambda rng: models.resnet50(rng, width=0.125, blocks=(1, 1), size=32, classes=10, features_output=True),
    "mobilenet_v1": lambda rng: models.mobilenet_v1(rng, width=0.25, depth=3, size=32, classes=10,
                                                    features_output=True),
    # At width 0.25 its 8-channel projections keep 3 weights each at 95%: the input's trace vanishes.
    "mobilenet_v2": lambda rng: models.mobilenet_v2(rng, width=0.5, depth=3, size=32, classes=10, features_output=True),
    "bert": lambda rng: models.bert_encoder(rng, layers=1, hidden=64, heads=2, ffn=128, seq=8),
    "dcgan": lambda rng: models.dcgan_generator(rng, width=0.25, size=16, latent=16),
}


# MobileNet v2: ToMixedPrecision itself fails on its imported ReLU6 (apache-tvm 0.27.0.post1,
# "Expected TensorType, but got R.Callable" in infer_amp_utils.cc).
@pytest.mark.parametrize("name", ["bert", "mobilenet_v1", "resnet50"])
def test_models_tvm_converts_to_float16_keep_every_sparse_layer(name):
    """``ToMixedPrecision`` casts each weight constant to float16 (``astype``) and runs the
    operators in float16: the pass sees through the cast and finds the same layers. (BERT's
    residual adds stay float32 after the conversion, so they are not fused into its kernels.)"""
    _, mod = pruned_module(SMALL[name](np.random.default_rng(0)))
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    half = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    assert "float16" in half.script()
    layers = {}
    for dtype, module in (("float32", mod), ("float16", half)):
        report = sp.report_of(sp.SparsifyWeights(cuda, dry_run=True)(module))
        layers[dtype] = sorted((l.op, l.M, l.K, l.nnz) for l in report.sparse_layers)
        assert {l.dtype for l in report.sparse_layers} == {dtype}
        assert (dtype == "float16") == (" float16" in report.table(width=400))
    assert layers["float32"] and layers["float16"] == layers["float32"]


def outputs(vm, x, device) -> list[np.ndarray]:
    result = vm["main"](tvm.runtime.tensor(x, device))
    return [result.numpy()] if hasattr(result, "numpy") else [value.numpy() for value in result]


def check_against_dense(model, target, sparsity=0.9, dtype="float32"):
    """Sparse build against TVM's dense build of the same pruned model, on the same input,
    output by output, each relative to its own largest magnitude.

    Tolerance 2e-5 of that scale (``assert_close``): on the small models below the two builds
    differ by at most 2e-7 of it (1-2 ulps: the same fp32 products summed in another order),
    while a wrong index, value or epilogue moves outputs by a sizeable fraction of it. For
    the comparison to mean anything, every output must depend on the input (a pruned random
    network can settle to its biases), and CNNs are compared on their last feature map too,
    not only on logits that global pooling has averaged. ``dtype="float16"`` converts the
    module with TVM's ``ToMixedPrecision`` first (both builds round each operator's sums to
    float16, in different orders: 2e-2 of the scale).
    """
    pruned, mod = pruned_module(model, sparsity)
    if dtype == "float16":
        mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    x, other_x = models.random_input(pruned, seed=0), models.random_input(pruned, seed=1)
    report = sp.SparsityReport()
    device = device_of(target)
    sparse = relax.VirtualMachine(sp.compile(mod, target, report=report), device)
    dense = relax.VirtualMachine(tvm.compile(mod, target), device)
    assert report.sparse_layers
    expected_outputs = outputs(dense, x, device)
    for got, expected, elsewhere in zip(outputs(sparse, x, device), expected_outputs, outputs(dense, other_x, device),
                                        strict=True):
        scale = float(np.abs(expected).max())
        assert np.abs(expected - elsewhere).max() > 1e-3 * scale, "output does not depend on the input"
        assert_close(got / scale, expected / scale, dtype)
    return report


@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_match_the_dense_build_on_the_cpu(name, sparsity):
    report = check_against_dense(SMALL[name](np.random.default_rng(1)), CPU_TARGET, sparsity)
    for layer in report.sparse_layers:  # the pruned layers; the dense stem and depthwise layers at any density
        assert abs(layer.density - (1 - sparsity)) < 0.02 or "(any density)" in layer.reason, layer
    small = [layer for layer in report.sparse_layers if "(any density)" in layer.reason]
    assert len([layer for layer in small if "depthwise" not in layer.op]) == (0 if name.startswith("bert") else 1)
    depthwise = [layer for layer in report.layers if "depthwise" in layer.op]
    assert bool(depthwise) == name.startswith("mobilenet")
    assert all(layer.sparse and layer.params["kernel"] == "depthwise" for layer in depthwise)
    # Every layer the report calls sparse is a kernel call in the module (projection shortcuts
    # and their bottleneck's last convolution meet in one residual add: both must stay).
    _, mod = pruned_module(SMALL[name](np.random.default_rng(1)), sparsity)
    out = sp.SparsifyWeights(CPU_TARGET)(mod)
    calls, remaining = [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_dps_packed" and e.args[0].global_symbol.startswith("sparsert_"):
                calls.append(e)
            elif e.op.name in ("relax.nn.conv2d", "relax.nn.conv2d_transpose", "relax.matmul"):
                remaining.append(e)

    relax.analysis.post_order_visit(out["main"], visit)
    assert len(calls) == len(out.attrs["external_mods"]) == len(report.sparse_layers)
    assert len(remaining) == len(report.layers) - len(report.sparse_layers)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_match_the_dense_build_on_the_gpu(gpu_target, name, sparsity):
    report = check_against_dense(SMALL[name](np.random.default_rng(1)), gpu_target, sparsity)
    assert report.sparse_layers


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bert", "mobilenet_v1", "resnet50"])  # see the float16 conversion test above
def test_small_models_converted_to_float16_match_the_dense_build_on_the_gpu(gpu_target, name):
    report = check_against_dense(SMALL[name](np.random.default_rng(1)), gpu_target, dtype="float16")
    assert report.sparse_layers and all(layer.dtype == "float16" for layer in report.sparse_layers)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "resnet50", "bert_base_2_layers"])
def test_full_size_models_match_the_dense_build_on_the_gpu(gpu_target, name, sparsity):
    build, sparse, _ = FULL_SIZE[name]
    report = check_against_dense(build(np.random.default_rng(2)), gpu_target, sparsity)
    assert len(report.sparse_layers) == sparse


@pytest.mark.slow  # 7-24 s per model on 2 cores (minutes each before the CPU's CSR kernel)
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "resnet50", "bert_base_2_layers"])
def test_full_size_models_match_the_dense_build_on_the_cpu(name, sparsity):
    report = check_against_dense(FULL_SIZE[name][0](np.random.default_rng(2)), CPU_TARGET, sparsity)
    assert report.sparse_layers


def test_inspect_a_full_size_model_pruned_at_95_percent_with_its_classifier_dense(tmp_path):
    pruned, layers = prune_model(models.mobilenet_v1(np.random.default_rng(0)), 0.95, classifier=False)
    kept = sorted(layer.why_not.split(" (")[0] for layer in layers if not layer.pruned)
    assert kept == ["classifier"] + ["depthwise"] * 13 + ["first convolution"]
    assert all(abs(layer.density - 0.05) < 0.005 for layer in layers if layer.pruned)
    path = tmp_path / "mobilenet_v1-95.onnx"
    onnx.save(pruned, path)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--target", "cuda"])
    assert result.exit_code == 0, result.output
    # The pointwise convolutions, and the dense stem and depthwise ones as small convolutions.
    assert "27 of 28 candidates sparse" in result.output
