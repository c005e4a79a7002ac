"""Dense stems and depthwise convolutions on the CPU: the unrolled kernel against TVM's build.

    python benchmarks/small_conv_cpu.py [--name 2core]

Decides which small convolutions ``SparsifyWeights`` rewrites at any density on the CPU
(``SMALL_CONVOLUTION_NNZ``). Each layer (dense weights, ReLU fused) is built by
``tvm.compile`` and by ``sparsert_tvm.compile`` with threshold 1 for this machine's CPU,
timed with the VM's time evaluator (median of 5 repeats of 10 runs), outputs compared.
Writes ``benchmarks/results/small-conv-cpu-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm as sp  # noqa: E402
from sparsert_tvm.build import host_cpu_target  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name: (out channels, in channels, kernel, input size, stride, groups)
LAYERS = {
    "mobilenet stem 3x3/2, 32x3 @224": (32, 3, 3, 224, 2, 1),
    "resnet-50 stem 7x7/2, 64x3 @224": (64, 3, 7, 224, 2, 1),
    "depthwise 3x3, 128 @56": (128, 128, 3, 56, 1, 128),
    "depthwise 3x3, 512 @14": (512, 512, 3, 14, 1, 512),
}


def conv_module(m, c, k, size, stride, groups) -> tvm.IRModule:
    weight = np.random.default_rng(0).standard_normal((m, c // groups, k, k)).astype("float32")
    x = relax.Var("x", relax.TensorType((1, c, size, size), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(x, relax.const(weight), strides=stride, padding=k // 2, groups=groups))
            out = builder.emit_output(relax.op.nn.relu(conv))
        builder.emit_func_output(out)
    return builder.get()


def measure(name: str) -> dict:
    m, c, k, size, stride, groups = LAYERS[name]
    mod, target = conv_module(*LAYERS[name]), host_cpu_target()
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, c, size, size)).astype("float32"))
    row = {"layer": name, "weights": m * (c // groups) * k * k}
    outputs = {}
    for label, build in {"tvm": lambda: tvm.compile(mod, target), "sparsert": lambda: sp.compile(mod, target, 1.0)}.items():
        start = time.perf_counter()
        vm = relax.VirtualMachine(build(), tvm.cpu())
        row[f"{label}_build_s"] = round(time.perf_counter() - start, 2)
        outputs[label] = vm["main"](x).numpy()
        row[f"{label}_us"] = vm.time_evaluator("main", tvm.cpu(), number=10, repeat=5)(x).median * 1e6
    row["speedup"] = row["tvm_us"] / row["sparsert_us"]
    row["max_rel_error"] = float(np.abs(outputs["tvm"] - outputs["sparsert"]).max() / np.abs(outputs["tvm"]).max())
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=f"{os.cpu_count()}core")
    args = parser.parse_args()
    rows = []
    for name in LAYERS:
        rows.append(measure(name))
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    result = {"date": datetime.date.today().isoformat(), "machine": machine, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"small-conv-cpu-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Dense small convolutions on the CPU ({machine}, {result['date']})", "",
        "| layer | weights | TVM | sparsert | speedup | max error | sparsert build |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['layer']} | {r['weights']:,} | {r['tvm_us']:,.0f} us | {r['sparsert_us']:,.0f} us "
              f"| {r['speedup']:.2f}x | {r['max_rel_error']:.1e} | {r['sparsert_build_s']:.1f} s |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
