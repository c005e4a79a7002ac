"""A whole pruned model on the CPU: build time as a user sees it, and inference latency, with
the CPU's default kernels and with either kernel everywhere.

    python benchmarks/cpu_build.py [--model mobilenet_v1] [--width 0.5] [--size 224] [--sparsity 0.9]

For each build (``default``: each layer's default kernel; ``csr`` and ``unrolled``: that kernel
for every rewritten layer, through ``kernel_config``), ``sparsert_tvm.compile`` (the pass, the
kernels' code generation, ``tvm.compile``) and creating the ``relax.VirtualMachine`` are
timed, and the output is checked against TVM's dense build; then the builds' inference times
are taken in ``--rounds`` alternating rounds of 20 runs each (median, fastest and slowest
round). ``--libraries`` also times the same model, dense fp32, in PyTorch (eager, its CPU
libraries) and onnxruntime (its graph optimisations and MLAS; where installed). Random weights (``sparsert_tvm.models``), magnitude-pruned per layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm as sp  # noqa: E402
from sparsert_tvm import models  # noqa: E402
from sparsert_tvm.bench import onnxruntime_us, wait_for_idle_threads  # noqa: E402
from sparsert_tvm.build import host_cpu_target  # noqa: E402
from sparsert_tvm.prune import prune_model  # noqa: E402

BUILDS = {"default": None, "csr": {"kernel": "csr"}, "unrolled": {"kernel": "unrolled"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mobilenet_v1", "mobilenet_v2", "resnet50", "bert_base"],
                        default="mobilenet_v1")
    parser.add_argument("--width", type=float, default=0.5, help="CNNs: channels scaled by this")
    parser.add_argument("--size", type=int, default=224, help="CNNs: image size")
    parser.add_argument("--layers", type=int, default=12, help="bert_base: encoder layers (sequence 128)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--builds", default=",".join(BUILDS), help=f"comma-separated, of {list(BUILDS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--libraries", action="store_true",
                        help="also time the dense model in PyTorch (eager) and onnxruntime (where installed)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.model == "bert_base":
        network, shape = models.bert_encoder(rng, layers=args.layers), f"{args.layers} layers, sequence 128"
    else:
        network = getattr(models, args.model)(rng, width=args.width, size=args.size)
        shape = f"width {args.width} at {args.size}x{args.size}"
    model, _ = prune_model(network, args.sparsity)
    mod = from_onnx(model, keep_params_in_input=False)
    x = tvm.runtime.tensor(models.random_input(model))
    target = host_cpu_target()
    dense = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](x).numpy()
    print(f"{args.model} {shape}, {args.sparsity:.0%} pruned, {host_cpu_target()}")
    timers = {}
    for label in args.builds.split(","):
        start = time.perf_counter()
        executable = sp.compile(mod, target, kernel_config=BUILDS[label])
        built = time.perf_counter()
        vm = relax.VirtualMachine(executable, tvm.cpu())
        loaded = time.perf_counter()
        error = float(np.abs(vm["main"](x).numpy() - dense).max() / np.abs(dense).max())
        print(f"{label}: compile {built - start:.1f} s, virtual machine {loaded - built:.1f} s; "
              f"error against TVM's dense build {error:.1e}", flush=True)
        timers[label] = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=1)
    times = {label: [] for label in timers}
    for _ in range(args.rounds):
        for label, timer in timers.items():
            times[label].append(timer(x).mean * 1e6)
    for label, us in times.items():
        print(f"{label}: {np.median(us):,.0f} us per inference ({min(us):,.0f}-{max(us):,.0f})")
    if args.libraries:
        us = _pytorch_us(model, x.numpy(), args.rounds)
        print(f"PyTorch, dense fp32 (eager, {os.cpu_count()} threads): {np.median(us):,.0f} us per inference "
              f"({min(us):,.0f}-{max(us):,.0f})")
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "model.onnx")
            onnx.save(model, path)
            us, why_not = onnxruntime_us(path, [x.numpy()], target)
        print(f"onnxruntime, dense fp32: {us:,.0f} us per inference (median of 50)" if us else f"onnxruntime: {why_not}")


def _pytorch_us(model, x: np.ndarray, rounds: int) -> list[float]:
    """The same ONNX model run by PyTorch node by node (``onnx_torch``), after TVM's thread
    pool has gone quiet (taken in turn, each slowed the other down)."""
    import torch
    from onnx_torch import OnnxModule

    torch.set_num_threads(os.cpu_count())  # its default; said for the record
    module, tx = OnnxModule(model).eval(), torch.from_numpy(x)
    wait_for_idle_threads()
    us = []
    with torch.inference_mode():
        module(tx)
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(20):
                module(tx)
            us.append((time.perf_counter() - start) / 20 * 1e6)
    return us


if __name__ == "__main__":
    main()
