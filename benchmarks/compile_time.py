"""Compile time and code size of the kernels for large layers.

For each weight, times a build with the kernel cache off. CUDA: PTX generation, assembly
(ptxas, parallel segments, nvlink), and the whole ``SparsifyWeights`` pass plus
``tvm.compile``; where a GPU is present it also runs the kernel against numpy. CPU
(``--target llvm``): ``sparsert_tvm.compile`` and loading the module, then a check against
numpy. Writes ``benchmarks/results/compile_time-<target>-<machine>.json`` and a table.

    python benchmarks/compile_time.py [--target cuda|llvm] [--shapes 2048x512,3072x768] [--density 0.1]
    python benchmarks/compile_time.py --model resnet50 [--sparsity 0.9] [--batch 1]

``--model`` times ``SparsifyWeights`` for CUDA on a whole pruned model of
``sparsert_tvm.models`` (kernel cache off; no GPU needed: the cubins are not packaged), with
each layer's kernel generation time and code size, into ``compile_time-model-<name>-...``.
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
import results_json  # noqa: E402

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


def random_weight(m: int, k: int, density: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")


def max_relative_error(vm, device, weight: np.ndarray) -> float:
    rng = np.random.default_rng(1)
    errors = []
    for batch in (1, 37, 256):
        x = rng.standard_normal((batch, weight.shape[1])).astype("float32")
        out = vm["main"](tvm.runtime.tensor(x, device)).numpy()
        ref = x.astype(np.float64) @ weight.T.astype(np.float64)
        errors.append(float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max())))
    return max(errors)


def measure_cuda(m: int, k: int, density: float, arch: str, gpu: bool) -> dict:
    weight = random_weight(m, k, density)
    n = tirx.Var("n", "int64")
    problem = SpmmProblem(SparseMatrix.from_dense(weight), Layout.ROWS, "float32", (n, k), (n, m))
    config = default_cuda_config(problem, "unrolled")
    row = {"target": "cuda", "M": m, "K": k, "density": density, "nnz": int(np.count_nonzero(weight)), "arch": arch}

    start = time.perf_counter()
    kernel = emit_spmm_ptx(problem, config, "bench_kernel", arch)
    row["ptx_s"] = time.perf_counter() - start
    row["ptx_bytes"] = kernel.ptx_bytes
    row["segments"] = max(1, len(kernel.units) - 1)
    start = time.perf_counter()
    cubin = assemble(kernel.units, arch, **config.assembler_options())
    row["assemble_s"] = time.perf_counter() - start
    row["code_bytes"] = len(cubin)
    row["jobs"] = default_jobs()

    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host=host_cpu_target())
    start = time.perf_counter()
    if gpu:
        executable = sp.compile(linear_module(weight), target, 1.0)
        row["build_s"] = time.perf_counter() - start
        row["max_rel_error"] = max_relative_error(relax.VirtualMachine(executable, tvm.cuda(0)), tvm.cuda(0), weight)
        row["correct"] = row["max_rel_error"] < 1e-5
    else:
        # Without a driver TVM cannot hold the cubin in a CUDA module; that last step takes
        # milliseconds, so the rest of the build (pass, PTX, ptxas, tvm.compile) is timed.
        cuda_rule.create_cuda_module = lambda cubin, kernel: None
        mod = sp.SparsifyWeights(target, 1.0)(linear_module(weight))
        tvm.compile(mod.without_attr("external_mods"), target, tir_pipeline=sp.build.register_pipeline())
        row["build_s"] = time.perf_counter() - start
    return row


def measure_cpu(m: int, k: int, density: float) -> dict:
    """tvm.compile plus loading the module (LLVM generates machine code at load time)."""
    weight = random_weight(m, k, density)
    row = {"target": "llvm", "M": m, "K": k, "density": density, "nnz": int(np.count_nonzero(weight))}
    start = time.perf_counter()
    executable = sp.compile(linear_module(weight), host_cpu_target(), 1.0)
    row["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    vm = relax.VirtualMachine(executable, tvm.cpu())
    row["load_s"] = time.perf_counter() - start
    row["max_rel_error"] = max_relative_error(vm, tvm.cpu(), weight)
    row["correct"] = row["max_rel_error"] < 1e-5
    return row


def measure_model(name: str, sparsity: float, batch: int, arch: str) -> dict:
    """The CUDA pass over a whole pruned model: per layer and in total."""
    from tvm.relax.frontend.onnx import from_onnx

    from sparsert_tvm import models
    from sparsert_tvm.prune import prune_model

    builders = {"resnet50": models.resnet50, "mobilenet_v1": models.mobilenet_v1, "mobilenet_v2": models.mobilenet_v2,
                "bert_base": models.bert_encoder}
    model, _ = prune_model(builders[name](np.random.default_rng(0), batch=batch), sparsity)
    mod = from_onnx(model, keep_params_in_input=False)
    cuda_rule.create_cuda_module = lambda cubin, kernel: None  # packaging needs a driver; it takes ms
    start = time.perf_counter()
    report = sp.report_of(sp.SparsifyWeights(tvm.target.Target({"kind": "cuda", "arch": arch}), None)(mod))
    total = time.perf_counter() - start
    layers = [{"name": l.name, "op": l.op, "M": l.M, "K": l.K, "nnz": l.nnz, "compile_s": round(l.compile_s, 2),
               "code_bytes": l.code_bytes} for l in report.sparse_layers]
    return {"model": name, "sparsity": sparsity, "batch": batch, "arch": arch, "jobs": default_jobs(),
            "pass_s": round(total, 1), "sparse_layers": len(layers), "candidates": len(report.layers),
            "nnz": sum(l["nnz"] for l in layers), "code_bytes": sum(l["code_bytes"] or 0 for l in layers),
            "layers": layers}


def write_model_result(row: dict, name: str) -> None:
    slowest = sorted(row["layers"], key=lambda l: -l["compile_s"])[:5]
    lines = [
        f"# CUDA pass over {row['model']} at {row['sparsity']:.0%}, batch {row['batch']} ({name}, "
        f"{row['jobs']} ptxas jobs, kernel cache off, {datetime.date.today().isoformat()})", "",
        f"{row['sparse_layers']} of {row['candidates']} layers rewritten, {row['nnz']:,} nonzeros, "
        f"{row['code_bytes'] / 2**20:.1f} MB of cubins, {row['pass_s']:.0f} s for the whole pass.", "",
        "Slowest layers:", "", "| layer | op | M x K | nnz | build | cubin |", "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {l['name']} | {l['op']} | {l['M']}x{l['K']} | {l['nnz']:,} | {l['compile_s']:.1f} s "
              f"| {(l['code_bytes'] or 0) / 2**20:.2f} MB |" for l in slowest]
    stem = RESULTS / f"compile_time-model-{row['model']}-{name}"
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(results_json.dumps(row))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=["cuda", "llvm"], default="cuda")
    parser.add_argument("--shapes", default="2048x512,3072x768")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--name", default=None, help="result file suffix (default: the machine)")
    parser.add_argument("--model", choices=["resnet50", "mobilenet_v1", "mobilenet_v2", "bert_base"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    os.environ["SPARSERT_CACHE"] = "0"  # time real compiles
    gpu = tvm.cuda(0).exist
    if args.model:
        write_model_result(measure_model(args.model, args.sparsity, args.batch, args.arch),
                           args.name or f"{os.cpu_count()}core")
        return
    rows = []
    for shape in args.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        row = measure_cuda(m, k, args.density, args.arch, gpu) if args.target == "cuda" else measure_cpu(m, k, args.density)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": tvm.cuda(0).device_name if gpu else None,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.name or ("h100" if gpu else f"{os.cpu_count()}core")
    stem = RESULTS / f"compile_time-{args.target}-{name}"
    stem.with_suffix(".json").write_text(results_json.dumps(result))
    lines = [
        f"# {args.target} compile time ({result['machine']}; device: {result['device'] or 'none'}; {result['date']})",
        "",
        "| weight | nnz | build | load | code | correct |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        load = f"{r['load_s']:.1f} s" if "load_s" in r else "-"
        code = f"{r['code_bytes'] / 2**20:.1f} MB" if "code_bytes" in r else "-"
        lines.append(
            f"| {r['M']}x{r['K']} @ {r['density']} | {r['nnz']:,} | {r['build_s']:.1f} s | {load} | {code} "
            f"| {r.get('correct', '-')} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
