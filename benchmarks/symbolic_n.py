"""python benchmarks/symbolic_n.py --out benchmarks/results/symbolic-n-h100.json [--layers 768x768,3072x768]

Fully connected layers whose N (batch x sequence) is symbolic, as a model imported with
dynamic axes has them: ``y = x @ W^T + b`` with ``x: [n, K]``, built once and run at several
N. Contenders, each a whole module on the Relax VM (so the transpose of X the column-lane
kernel needs is in its time):

  default     sparsert_tvm.compile's choice for the symbolic N
  unrolled    kernel_config={"kernel": "unrolled"}: the unrolled kernel on X as it is
  static      sparsert_tvm.compile of the same layer with N fixed (rebuilt per N)

Every build of a layer is made before any is timed; then at each N the contenders are timed
in turns, twice, and each keeps the faster of its two figures: timed once, right after
seconds of compiling, calls of 10-20 us came out up to 1.4x slower on the H100
(symbolic-n-h100.md). A figure is the VM's time evaluator (median of 7 repeats of at least
40 ms); outputs checked against numpy. Writes the JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, tirx

import sparsert_tvm
from sparsert_tvm import bench
from sparsert_tvm.build import cuda_target
from sparsert_tvm.tuning.measure import relative_error

CONTENDERS = {"default": None, "unrolled": {"kernel": "unrolled"}}


def fc_module(weight: np.ndarray, bias: np.ndarray, columns) -> tvm.IRModule:
    """``x @ weight^T + bias`` with ``x: [columns, K]`` (``columns`` an int or a symbolic var)."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([columns, weight.shape[1]], "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            product = builder.emit(relax.op.matmul(x, relax.op.permute_dims(relax.const(weight))))
            out = builder.emit_output(relax.op.add(product, relax.const(bias)))
        builder.emit_func_output(out)
    return builder.get()


ROUNDS = 2


def build(mod, target, config=None):
    report = sparsert_tvm.SparsityReport()
    executable = sparsert_tvm.compile(mod, target, 1.0, report=report, kernel_config=config)
    params = report.layers[0].params
    return executable, {key: params.get(key) for key in ("kernel", "lanes", "x_transposed", "rows_per_block")}


def run(layers, density: float, ns, target, device) -> list[dict]:
    rows = []
    for m, k in layers:
        rng = np.random.default_rng(0)
        weight = (rng.standard_normal((m, k)) * (rng.random((m, k)) < density)).astype("float32")
        bias = rng.standard_normal(m).astype("float32")
        symbolic = fc_module(weight, bias, tirx.Var("n", "int64"))
        shared = {name: build(symbolic, target, config) for name, config in CONTENDERS.items()}
        static = {n: build(fc_module(weight, bias, n), target) for n in ns}
        for n in ns:
            x = rng.standard_normal((n, k)).astype("float32")
            expected = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
            contenders = shared | {"static": static[n]}
            args = [tvm.runtime.tensor(x, device)]
            vms, results = {}, {}
            for name, (executable, params) in contenders.items():
                vms[name] = relax.VirtualMachine(executable, device)
                error = relative_error(vms[name]["main"](*args).numpy(), expected)
                results[name] = {"layer": f"{m}x{k}", "density": density, "N": n, "contender": name,
                                 "params": params, "us": float("inf"), "max_rel_error": error}
            for _ in range(ROUNDS):
                for name, vm in vms.items():
                    us = bench.end_to_end_us(vm, device, args, min_ms=40)
                    results[name]["us"] = min(results[name]["us"], us)
            for name, row in results.items():
                rows.append(row)
                print(f"{m}x{k} N={n} {name}: {row['us']:.1f} us ({row['params']})", flush=True)
    return rows


def markdown(result: dict) -> str:
    by_case = {}
    for row in result["rows"]:
        by_case.setdefault((row["layer"], row["N"]), {})[row["contender"]] = row["us"]
    lines = [f"# Symbolic N: {result['device']}, {result['date']}", "",
             "| layer | N | default us | unrolled us | static us | default vs unrolled |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (layer, n), us in by_case.items():
        lines.append(f"| {layer} | {n} | {us['default']:.1f} | {us['unrolled']:.1f} | {us['static']:.1f} | "
                     f"{us['unrolled'] / us['default']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", default="768x768,3072x768", help="MxK,... (output x input features)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--ns", default="1,8,32,128,512", help="column counts to run the symbolic builds at")
    args = parser.parse_args()
    layers = [tuple(int(d) for d in text.split("x")) for text in args.layers.split(",")]
    ns = [int(n) for n in args.ns.split(",")]
    device = tvm.cuda(0)
    result = {"device": device.device_name, "date": datetime.date.today().isoformat(),
              "rows": run(layers, args.density, ns, cuda_target(), device)}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
