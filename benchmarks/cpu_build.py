"""Wall time of a whole CPU build of a pruned model, as a user sees it.

    python benchmarks/cpu_build.py [--model mobilenet_v1] [--width 0.5] [--sparsity 0.9]

``sparsert_tvm.compile`` (the pass, the kernels' code generation, ``tvm.compile``), then
creating the ``relax.VirtualMachine`` (where LLVM code still to be generated is generated),
then one inference, with the model's output checked against TVM's dense build. Random
weights (``sparsert_tvm.models``), magnitude-pruned per layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm as sp  # noqa: E402
from sparsert_tvm import models  # noqa: E402
from sparsert_tvm.build import host_cpu_target  # noqa: E402
from sparsert_tvm.prune import prune_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mobilenet_v1", "mobilenet_v2", "resnet50"], default="mobilenet_v1")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    model, _ = prune_model(getattr(models, args.model)(np.random.default_rng(0), width=args.width), args.sparsity)
    mod = from_onnx(model, keep_params_in_input=False)
    x = tvm.runtime.tensor(models.random_input(model))
    target = host_cpu_target()
    start = time.perf_counter()
    executable = sp.compile(mod, target)
    built = time.perf_counter()
    vm = relax.VirtualMachine(executable, tvm.cpu())
    loaded = time.perf_counter()
    out = vm["main"](x).numpy()
    ran = time.perf_counter()
    dense = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](x).numpy()
    error = float(np.abs(out - dense).max() / np.abs(dense).max())
    print(f"{args.model} width {args.width} at {args.sparsity:.0%}: compile {built - start:.1f} s, "
          f"virtual machine {loaded - built:.1f} s, first run {ran - loaded:.2f} s, "
          f"total {ran - start:.1f} s; error against TVM's dense build {error:.1e}")


if __name__ == "__main__":
    main()
