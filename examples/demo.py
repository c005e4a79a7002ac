"""The main job: a 90%-pruned model built in code, imported through ONNX, compiled with sparse
kernels for the best target here (the GPU if there is one, else the CPU), checked against the
dense model, timed, and reported layer by layer.

    python examples/demo.py [--batch 8] [--density 0.1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import sparsert_tvm
from sparsert_tvm import models


def run_model(name, onnx_model, x, target, device):
    mod = from_onnx(onnx_model, keep_params_in_input=False)

    start = time.perf_counter()
    report = sparsert_tvm.SparsityReport()
    sparse = relax.VirtualMachine(sparsert_tvm.compile(mod, target, report=report), device)
    sparse_build = time.perf_counter() - start
    start = time.perf_counter()
    dense = relax.VirtualMachine(tvm.compile(mod, target), device)
    dense_build = time.perf_counter() - start

    x_dev = tvm.runtime.tensor(x, device)
    got, expected = sparse["main"](x_dev).numpy(), dense["main"](x_dev).numpy()
    error = float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))
    if not error < 1e-4:
        raise SystemExit(f"{name}: sparse output differs from the dense model (relative error {error:.2e})")

    times = {}
    for label, vm in (("sparse", sparse), ("dense", dense)):
        timer = vm.time_evaluator("main", device, number=50, repeat=7, min_repeat_ms=50)
        times[label] = timer(x_dev).median * 1e6
    print(f"\n== {name}: input {x.shape}, {target.kind.name}")
    print(f"   output matches TVM's dense build (max relative error {error:.1e})")
    print(f"   build: sparse {sparse_build:.1f} s, dense {dense_build:.1f} s")
    print(
        f"   latency: sparse {times['sparse']:.1f} us, dense {times['dense']:.1f} us "
        f"-> {times['dense'] / times['sparse']:.2f}x"
    )
    print(report.table(), end="")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.1, help="fraction of weights kept by pruning")
    args = parser.parse_args()

    target = sparsert_tvm.default_target()
    device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    print(f"target: {target.kind.name} ({device.device_name if target.kind.name == 'cuda' else target.attrs.get('mcpu', 'cpu')})")
    rng = np.random.default_rng(0)

    mlp = models.mlp(rng, features=(512, 1024, 512, 256), density=args.density)
    run_model("MLP 512-1024-512-256", mlp, rng.standard_normal((args.batch, 512)).astype("float32"), target, device)
    convnet = models.convnet(rng, channels=128, size=14, density=args.density)
    x = rng.standard_normal((args.batch, 128, 14, 14)).astype("float32")
    run_model("bottleneck block, 128 channels at 14x14", convnet, x, target, device)


if __name__ == "__main__":
    main()
