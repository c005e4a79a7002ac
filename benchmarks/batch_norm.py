"""ResNet-50 as torchvision writes it (every convolution followed by a BatchNorm), pruned,
through ``torch.export``: what folding the norms into the sparse layers is worth.

    python benchmarks/batch_norm.py [--target cuda] [--batch 1] [--rounds 8] \
        --out benchmarks/results/batch-norm-cpu-2core.json

Builds the model twice with ``sparsert_tvm.compile``: as the pass is (each inference
``batch_norm`` folded into the layer before it) and with folding turned off in this process
(the norms then run as TVM's own kernels after the sparse ones). Both outputs are checked
against PyTorch; the two builds are timed in alternating rounds (Relax VM time evaluator).
Random weights; every layer but the stem magnitude-pruned to ``--sparsity``; random running
statistics.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm as sp  # noqa: E402
from sparsert_tvm.bench import wait_for_idle_threads  # noqa: E402
from sparsert_tvm.passes import candidates  # noqa: E402


class Bottleneck(torch.nn.Module):
    def __init__(self, inputs: int, width: int, stride: int):
        super().__init__()
        outputs = 4 * width
        self.convs = torch.nn.ModuleList([
            torch.nn.Conv2d(inputs, width, 1, bias=False),
            torch.nn.Conv2d(width, width, 3, stride, 1, bias=False),
            torch.nn.Conv2d(width, outputs, 1, bias=False),
        ])
        self.norms = torch.nn.ModuleList([torch.nn.BatchNorm2d(c) for c in (width, width, outputs)])
        self.shortcut = None
        if stride != 1 or inputs != outputs:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(inputs, outputs, 1, stride, bias=False), torch.nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            h = torch.relu(h) if i < 2 else h
        return torch.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet50(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.MaxPool2d(3, 2, 1),
        )
        blocks, inputs = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(count):
                blocks.append(Bottleneck(inputs, width, stride if i == 0 else 1))
                inputs = 4 * width
        self.blocks = torch.nn.Sequential(*blocks)
        self.fc = torch.nn.Linear(2048, 1000)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def pruned_resnet50(sparsity: float) -> ResNet50:
    torch.manual_seed(0)
    net = ResNet50().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.weight.shape[1] > 3:
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
                weight.mul_((weight.abs() > threshold).float())
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
    return net


def build(mod, target, fold: bool) -> tuple[relax.VMExecutable, sp.SparsityReport, float]:
    folding = candidates._folded_batch_norm
    if not fold:  # the pass as it was before folding: norms stay TVM's
        candidates._folded_batch_norm = lambda *args: []
    try:
        report = sp.SparsityReport()
        start = time.perf_counter()
        executable = sp.compile(mod, target, density_threshold=None, report=report)
        return executable, report, time.perf_counter() - start
    finally:
        candidates._folded_batch_norm = folding


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=["llvm", "cuda"], default="llvm")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    target = sp.build.cuda_target() if args.target == "cuda" else sp.build.host_cpu_target()
    device = tvm.cuda(0) if args.target == "cuda" else tvm.cpu()
    net = pruned_resnet50(args.sparsity)
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        expected = net(x).numpy()
    mod = from_exported_program(torch.export.export(net, (x,)), keep_params_as_input=False)
    builds, timers = {}, {}
    for label, fold in (("folded", True), ("unfolded", False)):
        executable, report, seconds = build(mod, target, fold)
        vm = relax.VirtualMachine(executable, device)
        vm.set_input("main", tvm.runtime.tensor(x.numpy(), device))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        out = (out if hasattr(out, "numpy") else out[0]).numpy()
        timers[label] = vm.time_evaluator("invoke_stateful", device, number=5, repeat=3, min_repeat_ms=0)
        builds[label] = {
            "build_s": round(seconds, 1),
            "sparse_layers": sum(layer.decision == "sparse" for layer in report.layers),
            "norms_folded": sum("batch_norm" in layer.epilogue for layer in report.layers),
            "max_rel_error": float(np.abs(out - expected).max() / np.abs(expected).max()),
            "ms": [],
        }
    for _ in range(args.rounds):  # in turns, so that the machine's drift hits both alike
        for label, timer in timers.items():
            wait_for_idle_threads()
            builds[label]["ms"] += [t * 1e3 for t in timer("main").results]
    for entry in builds.values():
        entry["median_ms"], entry["min_ms"] = round(float(np.median(entry["ms"])), 3), round(min(entry["ms"]), 3)
    result = {
        "device": torch.cuda.get_device_name() if args.target == "cuda" else platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(), "target": args.target, "batch": args.batch,
        "sparsity": args.sparsity, "builds": builds,
        "speedup_median": round(builds["unfolded"]["median_ms"] / builds["folded"]["median_ms"], 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for label, entry in builds.items():
        print(f"{label:9s} {entry['median_ms']:8.2f} ms (fastest {entry['min_ms']:.2f}), "
              f"{entry['norms_folded']} norms folded, {entry['sparse_layers']} sparse layers, "
              f"build {entry['build_s']} s, max error {entry['max_rel_error']:.1e}")
    print(f"folding: {result['speedup_median']}x (medians); wrote {args.out}")


if __name__ == "__main__":
    main()
