"""Convolutions on the CPU: our kernels against TVM's build of the same layer.

    python benchmarks/conv_cpu.py [--suite small|resnet50|dilated|transposed] [--name 2core]

``small`` (dense stems and depthwise layers, NCHW) decides which small convolutions
``SparsifyWeights`` rewrites at any density on the CPU (``SMALL_CONVOLUTION_NNZ``);
``resnet50`` times ResNet-50's 3x3 layers at batch 1, pruned uniformly, in both layouts
(NCHW with OIHW weights as PyTorch and ONNX give them, NHWC with HWIO as TFLite does);
``dilated`` DeepLab v3's dilated 3x3 layers the same way; ``transposed`` upsampling layers
(DCGAN's generator, U-Net's up-convolutions, an FCN-style 3x3) doubling their input. Each
layer (ReLU fused) is built by ``tvm.compile`` and by ``sparsert_tvm.compile`` with each of our
CPU kernels (``kernel_config={"kernel": "csr" | "unrolled" | "depthwise"}``, those that take
the layer; the table says which one it gets by default) for this machine's CPU, beside
PyTorch's dense convolution (oneDNN, all cores; where torch is installed), and timed with
the VM's time evaluator in ``--rounds`` rounds that alternate the builds (10 runs each per
round); the median round is reported with the fastest and slowest, since a small shared
machine drifts by tens of percent between one layer's timings and the next. Outputs are
compared. Writes ``benchmarks/results/<suite>-conv-cpu-<name>.json`` and ``.md``.
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
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm as sp  # noqa: E402
from sparsert_tvm import tuning  # noqa: E402
from sparsert_tvm.passes.candidates import find_candidates  # noqa: E402
from sparsert_tvm.build import host_cpu_target  # noqa: E402
import results_json  # noqa: E402
from layers import UPSAMPLING, doubling_padding  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = ("csr", "unrolled", "depthwise")  # our CPU kernels, each asked for by name (where it applies)


class Layer(NamedTuple):
    out_channels: int
    in_channels: int
    kernel: int
    size: int
    stride: int = 1
    groups: int = 1
    density: float = 1.0
    layout: str = "NCHW"
    dilation: int = 1
    transposed: bool = False  # a transposed convolution doubling its input (stride 2)


SUITES = {
    "small": {
        "mobilenet stem 3x3/2, 32x3 @224": Layer(32, 3, 3, 224, 2),
        "resnet-50 stem 7x7/2, 64x3 @224": Layer(64, 3, 7, 224, 2),
        "depthwise 3x3, 32 @112": Layer(32, 32, 3, 112, groups=32),
        "depthwise 3x3/2, 64 @112": Layer(64, 64, 3, 112, 2, groups=64),
        "depthwise 3x3, 128 @56": Layer(128, 128, 3, 56, groups=128),
        "depthwise 3x3, 256 @28": Layer(256, 256, 3, 28, groups=256),
        "depthwise 3x3, 512 @14": Layer(512, 512, 3, 14, groups=512),
        "depthwise 3x3, 1024 @7": Layer(1024, 1024, 3, 7, groups=1024),
        "depthwise 5x5, 480 @14": Layer(480, 480, 5, 14, groups=480),
    },
    "resnet50": {
        f"3x3 {m}@{size}{'/2' if stride == 2 else ''}, {density:.0%} {layout}":
            Layer(m, m, 3, size, stride, 1, density, layout)
        for m, size, stride, density in
            [(64, 56, 1, 0.1), (128, 28, 1, 0.1), (256, 14, 1, 0.1), (512, 7, 1, 0.05), (128, 56, 2, 0.1)]
        for layout in ("NCHW", "NHWC")
    },
    # DeepLab v3 on ResNet-50 at output stride 16 (513x513 images: 33x33 maps), 90% pruned;
    # dilation 1 is the same layer undilated (the same nonzeros), what the spread kernel costs.
    "dilated": {
        f"3x3 dilation {dilation}, {m}@33, 10% {layout}": Layer(m, m, 3, 33, 1, 1, 0.1, layout, dilation)
        for m, dilation in [(256, 1), (256, 2), (512, 1), (512, 2), (512, 4)]
        for layout in ("NCHW", "NHWC")
    },
    # NCHW only: TVM 0.27 cannot build an NHWC transposed convolution itself.
    "transposed": {
        f"{kind} {k}x{k}/2, {c}->{m} @{size}, {density:.0%}": Layer(m, c, k, size, 2, 1, density, transposed=True)
        for kind, k, c, m, size in UPSAMPLING
        for density in (0.1, 0.05)
    },
}


def layer_weight(layer: Layer) -> np.ndarray:
    """The layer's OIHW (transposed: IOHW) filters, pruned uniformly to its density."""
    rng = np.random.default_rng(0)
    shape = (layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel)
    if layer.transposed:
        shape = (layer.in_channels, layer.out_channels // layer.groups, layer.kernel, layer.kernel)
    return (rng.standard_normal(shape) * (rng.random(shape) < layer.density)).astype("float32")


def conv_module(layer: Layer) -> tvm.IRModule:
    weight = layer_weight(layer)
    if layer.transposed:
        return _transposed_module(layer, weight)
    nhwc = layer.layout == "NHWC"
    kernel_layout = "HWIO" if nhwc else "OIHW"
    weight = np.ascontiguousarray(weight.transpose(["OIHW".index(axis) for axis in kernel_layout]))
    x = relax.Var("x", relax.TensorType(input_shape(layer), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(
                x, relax.const(weight), strides=layer.stride, padding=layer.dilation * (layer.kernel // 2),
                dilation=layer.dilation, groups=layer.groups, data_layout=layer.layout, kernel_layout=kernel_layout,
            ))
            out = builder.emit_output(relax.op.nn.relu(conv))
        builder.emit_func_output(out)
    return builder.get()


def _transposed_module(layer: Layer, weight: np.ndarray) -> tvm.IRModule:
    """The NCHW transposed convolution (IOHW kernel) of output twice its input's size."""
    x = relax.Var("x", relax.TensorType(input_shape(layer), "float32"))
    k, s = layer.kernel, layer.stride
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            padding, output_padding = doubling_padding(k, s)
            conv = builder.emit(relax.op.nn.conv2d_transpose(
                x, relax.const(weight), strides=s, padding=padding, output_padding=output_padding, groups=layer.groups,
            ))
            out = builder.emit_output(relax.op.nn.relu(conv))
        builder.emit_func_output(out)
    return builder.get()


def input_shape(layer: Layer) -> tuple[int, ...]:
    c, s = layer.in_channels, layer.size
    return (1, s, s, c) if layer.layout == "NHWC" else (1, c, s, s)


def measure(name: str, layer: Layer, rounds: int, unrolled_max_nnz: int) -> dict:
    mod, target = conv_module(layer), host_cpu_target()
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal(input_shape(layer)).astype("float32"))
    row = {"layer": name, "weights": layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel**2}
    # Dense small layers are rewritten only with the threshold at 1.
    threshold = 1.0 if layer.density == 1.0 else None
    outputs, timers = {}, {}
    builds = {"tvm": lambda report: tvm.compile(mod, target)} | {
        kernel: lambda report, kernel=kernel: sp.compile(
            mod, target, threshold, kernel_config={"kernel": kernel}, report=report
        )
        for kernel in KERNELS
        if kernel != "unrolled" or np.count_nonzero(layer_weight(layer)) <= unrolled_max_nnz
    }
    row["unrolled_us"] = row["unrolled_build_s"] = row["torch_us"] = None
    torch_run = _torch_run(layer, x.numpy())
    if torch_run is not None:
        outputs["torch"] = torch_run()
        timers["torch"] = lambda _x: _Seconds(torch_run, 10)
    for label, build in builds.items():
        report = sp.SparsityReport()
        start = time.perf_counter()
        vm = relax.VirtualMachine(build(report), tvm.cpu())
        if label != "tvm" and not report.sparse_layers:  # the kernel does not take this layer
            row[f"{label}_us"] = row[f"{label}_build_s"] = None
            continue
        row[f"{label}_build_s"] = round(time.perf_counter() - start, 2)
        outputs[label] = vm["main"](x).numpy()
        timers[label] = vm.time_evaluator("main", tvm.cpu(), number=10, repeat=1)
    times = {label: [] for label in timers}
    for _ in range(rounds):
        for label, timer in timers.items():
            times[label].append(timer(x).mean * 1e6)
    for label, us in times.items():
        row[f"{label}_us"], row[f"{label}_us_range"] = float(np.median(us)), [min(us), max(us)]
    (candidate,) = find_candidates("main", mod["main"])
    row["default"] = tuning.default_cpu_kernel(candidate.problem)
    row["speedup"] = row["tvm_us"] / row[f"{row['default']}_us"]
    row["speedup_torch"] = row["torch_us"] / row[f"{row['default']}_us"] if row["torch_us"] else None
    row["max_rel_error"] = max(_error(outputs["tvm"], outputs[kernel]) for kernel in outputs)
    return row


def _torch_run(layer: Layer, x: np.ndarray):
    """A function computing the layer (with its ReLU) densely in PyTorch on the CPU, its output
    in the layer's layout as numpy; None without torch."""
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    weight, k, s = torch.from_numpy(layer_weight(layer)), layer.kernel, layer.stride
    nhwc = layer.layout == "NHWC"
    data = torch.from_numpy(x).permute(0, 3, 1, 2) if nhwc else torch.from_numpy(x)  # NHWC: channels-last memory
    if layer.transposed:
        def conv(data):
            padding, output_padding = doubling_padding(k, s)
            return F.conv_transpose2d(data, weight, stride=s, padding=padding, output_padding=output_padding,
                                      groups=layer.groups)
    else:
        def conv(data):
            return F.conv2d(data, weight, stride=s, padding=layer.dilation * (k // 2), dilation=layer.dilation,
                            groups=layer.groups)

    def run():
        with torch.no_grad():
            y = torch.relu(conv(data))
        return (y.permute(0, 2, 3, 1) if nhwc else y).numpy()

    return run


class _Seconds:
    """Mean seconds of ``number`` calls of ``run``, as the time evaluator's result gives it."""

    def __init__(self, run, number: int):
        start = time.perf_counter()
        for _ in range(number):
            run()
        self.mean = (time.perf_counter() - start) / number


def _error(reference, output) -> float:
    return float(np.abs(reference - output).max() / np.abs(reference).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="small")
    parser.add_argument("--name", default=f"{os.cpu_count()}core")
    parser.add_argument("--rounds", type=int, default=8, help="timing rounds, alternating the builds")
    parser.add_argument("--unrolled-max-nnz", type=int, default=20_000,
                        help="build the unrolled kernel up to this many nonzeros (about 1.5 ms of build per nonzero)")
    args = parser.parse_args()
    rows = []
    for name, layer in SUITES[args.suite].items():
        rows.append(measure(name, layer, args.rounds, args.unrolled_max_nnz))
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    result = {"date": datetime.date.today().isoformat(), "machine": machine, "suite": args.suite,
              "rounds": args.rounds, "unrolled_max_nnz": args.unrolled_max_nnz, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{args.suite}-conv-cpu-{args.name}"
    stem.with_suffix(".json").write_text(results_json.dumps(result))
    lines = [
        f"# Convolutions on the CPU, suite {args.suite} ({machine}, {result['date']})", "",
        f"`python benchmarks/conv_cpu.py --suite {args.suite} --rounds {args.rounds} --unrolled-max-nnz "
        f"{args.unrolled_max_nnz}`: median of the alternating rounds (fastest-slowest round in brackets); "
        "`-`: the kernel does not take the layer, or was not built.", "",
        "| layer | weights | TVM | PyTorch (dense) | CSR kernel | unrolled kernel | depthwise kernel | default "
        "| default vs TVM | default vs PyTorch | max error | CSR build | unrolled build | depthwise build |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['layer']} | {r['weights']:,} | {_us(r, 'tvm')} | {_us(r, 'torch')} | {_us(r, 'csr')} "
              f"| {_us(r, 'unrolled')} | {_us(r, 'depthwise')} | {r['default']} | {r['speedup']:.2f}x "
              f"| {'-' if r['speedup_torch'] is None else format(r['speedup_torch'], '.2f') + 'x'} "
              f"| {r['max_rel_error']:.1e} | {_build(r, 'csr')} | {_build(r, 'unrolled')} | {_build(r, 'depthwise')} |"
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _us(row: dict, label: str) -> str:
    if row[f"{label}_us"] is None:
        return "-"
    lo, hi = row[f"{label}_us_range"]
    return f"{row[f'{label}_us']:,.0f} us ({lo:,.0f}-{hi:,.0f})"


def _build(row: dict, label: str) -> str:
    return "-" if row[f"{label}_build_s"] is None else f"{row[f'{label}_build_s']:.1f} s"


if __name__ == "__main__":
    main()
