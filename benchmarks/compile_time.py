"""Compile time and code size of the CUDA kernels for large layers.

For each weight, times the stages of a CUDA build with the kernel cache off: PTX
generation, assembly (ptxas, parallel segments, nvlink), and the whole ``SparsifyWeights``
pass plus ``tvm.compile``. Where a GPU is present it also runs the kernel and checks it
against numpy. Writes ``benchmarks/results/compile_time-<host>.json`` and a markdown table.

    python benchmarks/compile_time.py [--shapes 2048x512,3072x768] [--density 0.1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, tirx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm as sp  # noqa: E402
from sparsert_tvm.build import host_cpu_target  # noqa: E402
from sparsert_tvm.problem import Layout, SpmmProblem  # noqa: E402
from sparsert_tvm.schedules.cuda import rule as cuda_rule  # noqa: E402
from sparsert_tvm.schedules.cuda.assemble import assemble, default_jobs  # noqa: E402
from sparsert_tvm.schedules.cuda.ptx import emit_spmm_ptx  # noqa: E402
from sparsert_tvm.tuning import default_cuda_config  # noqa: E402
from sparsert_tvm.weights import SparseMatrix  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def linear_module(weight: np.ndarray) -> tvm.IRModule:
    m, k = weight.shape
    x = relax.Var("x", relax.TensorType((tirx.Var("n", "int64"), k), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(x, relax.op.permute_dims(relax.const(weight))))
        builder.emit_func_output(out)
    return builder.get()


def measure(m: int, k: int, density: float, arch: str, gpu: bool) -> dict:
    rng = np.random.default_rng(0)
    weight = ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")
    n = tirx.Var("n", "int64")
    problem = SpmmProblem(SparseMatrix.from_dense(weight), Layout.ROWS, "float32", (n, k), (n, m))
    config = default_cuda_config(problem)
    row = {"M": m, "K": k, "density": density, "nnz": int(np.count_nonzero(weight)), "arch": arch}

    start = time.perf_counter()
    kernel = emit_spmm_ptx(problem, config, "bench_kernel", arch)
    row["ptx_s"] = time.perf_counter() - start
    row["ptx_bytes"] = kernel.ptx_bytes
    row["segments"] = max(1, len(kernel.units) - 1)
    start = time.perf_counter()
    cubin = assemble(kernel.units, arch, config.ptxas_opt_level)
    row["assemble_s"] = time.perf_counter() - start
    row["cubin_bytes"] = len(cubin)
    row["jobs"] = default_jobs()

    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host=host_cpu_target())
    start = time.perf_counter()
    if gpu:
        executable = sp.compile(linear_module(weight), target, 1.0)
        row["build_s"] = time.perf_counter() - start
    else:
        # Without a driver TVM cannot hold the cubin in a CUDA module; that last step takes
        # milliseconds, so the rest of the build (pass, PTX, ptxas, tvm.compile) is timed.
        cuda_rule.create_cuda_module = lambda cubin, kernel: None
        mod = sp.SparsifyWeights(target, 1.0)(linear_module(weight))
        tvm.compile(mod.without_attr("external_mods"), target, tir_pipeline=sp.build.register_pipeline())
        row["build_s"] = time.perf_counter() - start
    if gpu:
        vm = relax.VirtualMachine(executable, tvm.cuda(0))
        errors = []
        for batch in (1, 37, 256):
            x = rng.standard_normal((batch, k)).astype("float32")
            out = vm["main"](tvm.runtime.tensor(x, tvm.cuda(0))).numpy()
            ref = x.astype(np.float64) @ weight.T.astype(np.float64)
            errors.append(float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max())))
        row["max_rel_error"] = max(errors)
        row["correct"] = row["max_rel_error"] < 1e-5
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="2048x512,3072x768")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    os.environ["SPARSERT_CACHE"] = "0"  # time real compiles
    gpu = tvm.cuda(0).exist
    rows = []
    for shape in args.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        rows.append(measure(m, k, args.density, args.arch, gpu))
        print(json.dumps(rows[-1]), flush=True)
    host = socket.gethostname().split(".")[0] if gpu else "cpu-2core"
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": tvm.cuda(0).device_name if gpu else None,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"compile_time-{'gpu' if gpu else host}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# CUDA compile time ({result['machine']}; device: {result['device'] or 'none'}; {result['date']})",
        "",
        "| weight | nnz | PTX gen | assemble | segments | cubin | full build | correct |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        build = f"{r['build_s']:.1f} s" if "build_s" in r else "-"
        correct = str(r.get("correct", "-"))
        lines.append(
            f"| {r['M']}x{r['K']} @ {r['density']} | {r['nnz']:,} | {r['ptx_s']:.1f} s | {r['assemble_s']:.1f} s "
            f"| {r['segments']} | {r['cubin_bytes'] / 2**20:.1f} MB | {build} | {correct} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
