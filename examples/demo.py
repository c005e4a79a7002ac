"""The main job: a 90%-pruned model built in code, imported through ONNX, compiled with sparse
kernels for the best target here (the GPU if there is one, else the CPU), checked against the
dense model, timed, and reported layer by layer.

    python examples/demo.py [--batch 8] [--density 0.1]
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm
from tvm.relax.frontend.onnx import from_onnx

import sparsert_tvm
from sparsert_tvm import bench, models


def run_model(name, onnx_model, x, target):
    """What `sparsert bench` does: both builds, outputs compared, timed, the time split."""
    result = bench.bench(from_onnx(onnx_model, keep_params_in_input=False), target, [x])
    print(f"\n== {name}: input {x.shape}, {target.kind.name}")
    if not result.max_rel_error < 1e-4:
        raise SystemExit(f"{name}: sparse output differs from the dense model (relative error {result.max_rel_error:.2e})")
    print(f"   latency: sparse {result.sparse.end_to_end_us:.1f} us, dense {result.dense.end_to_end_us:.1f} us "
          f"-> {result.speedup:.2f}x")
    print(bench.table(result, top=4), end="")
    print(result.report.table(), end="")


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
    run_model("MLP 512-1024-512-256", mlp, rng.standard_normal((args.batch, 512)).astype("float32"), target)
    convnet = models.convnet(rng, channels=128, size=14, density=args.density)
    x = rng.standard_normal((args.batch, 128, 14, 14)).astype("float32")
    run_model("bottleneck block, 128 channels at 14x14", convnet, x, target)


if __name__ == "__main__":
    main()
