"""ResNet-50, MobileNet v1/v2 and a BERT encoder built in code, pruned, compiled end to end."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import sparsert_tvm as sp
from helpers import CPU_TARGET, assert_close, device_of
from sparsert_tvm import models
from sparsert_tvm.prune import prune_model

FULL_SIZE = {  # builder, sparse layers expected at 90% (of all weight layers)
    "resnet50": (lambda rng: models.resnet50(rng), 53, 54),  # every conv but the dense stem, classifier
    "mobilenet_v1": (lambda rng: models.mobilenet_v1(rng), 14, 28),  # pointwise + classifier
    "mobilenet_v2": (lambda rng: models.mobilenet_v2(rng), 35, 53),  # expansions, projections, last 1x1, classifier
    "bert_base_2_layers": (lambda rng: models.bert_encoder(rng, layers=2), 12, 16),  # Q, K, V, out, FFN x2 per layer
}
DENSE_REASONS = ("density 1.000 above threshold", "depthwise", "weight is not a constant")


def pruned_module(model, sparsity=0.9):
    pruned, _ = prune_model(model, sparsity)
    return pruned, from_onnx(pruned, keep_params_in_input=False)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_models_import_and_the_pass_finds_their_layers(name):
    build, sparse, layers = FULL_SIZE[name]
    _, mod = pruned_module(build(np.random.default_rng(0)))
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    report = sp.report_of(sp.SparsifyWeights(cuda, dry_run=True)(mod))
    assert (len(report.sparse_layers), len(report.layers)) == (sparse, layers), report.table()
    for layer in report.sparse_layers:
        assert 0.09 <= layer.density <= 0.11  # magnitude pruning per layer at 90%
    for layer in report.layers:
        assert layer.sparse or any(reason in layer.reason for reason in DENSE_REASONS), layer.reason


SMALL = {
    "resnet50": lambda rng: models.resnet50(rng, width=0.125, blocks=(1, 1), size=32, classes=10),
    "mobilenet_v1": lambda rng: models.mobilenet_v1(rng, width=0.25, depth=3, size=32, classes=10),
    "mobilenet_v2": lambda rng: models.mobilenet_v2(rng, width=0.25, depth=3, size=32, classes=10),
    "bert": lambda rng: models.bert_encoder(rng, layers=1, hidden=64, heads=2, ffn=128, seq=8),
}


def check_against_dense(model, target, sparsity=0.9):
    """Sparse build against TVM's dense build of the same pruned model, on the same input.

    fp32 sums in another order differ by rounding only: 2e-5 of the output's scale
    (``assert_close``) is ~100 ulps and far below any real indexing or epilogue error.
    """
    pruned, mod = pruned_module(model, sparsity)
    x = models.random_input(pruned)
    report = sp.SparsityReport()
    device = device_of(target)
    sparse = relax.VirtualMachine(sp.compile(mod, target, report=report), device)
    dense = relax.VirtualMachine(tvm.compile(mod, target), device)
    out = sparse["main"](tvm.runtime.tensor(x, device)).numpy()
    assert report.sparse_layers
    assert_close(out, dense["main"](tvm.runtime.tensor(x, device)).numpy())
    return report


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_match_the_dense_build_on_the_cpu(name):
    check_against_dense(SMALL[name](np.random.default_rng(1)), CPU_TARGET)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mobilenet_v1", "bert_base_2_layers"])
def test_full_size_models_match_the_dense_build_on_the_gpu(gpu_target, name):
    build, sparse, _ = FULL_SIZE[name]
    report = check_against_dense(build(np.random.default_rng(2)), gpu_target)
    assert len(report.sparse_layers) == sparse
