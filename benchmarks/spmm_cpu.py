"""Sparse matrix products on the CPU: our kernels against dense and sparse libraries.

    python benchmarks/spmm_cpu.py [--densities 0.1,0.05] [--unrolled-max-nnz 20000] [--name 2core]

Cases: the 1x1 convolutions of ResNet-50 and MobileNet v1 at batch 1 (NCHW: ``X[K, H*W]``)
and BERT-base's fully connected layers at N in {1, 8, 32, 128} tokens (``X[N, K]``), with
uniform random masks. Contenders, all on the same inputs and with as many threads as there
are cores: the CSR kernel and the unrolled kernel, each called directly (no Relax VM),
PyTorch's dense fp32 product (its BLAS: oneDNN / MKL), PyTorch's CSR product and SciPy's (one
thread). The summary compares the libraries with the kernel the pass picks by default
(``tuning.default_cpu_kernel``: unrolled up to ``CPU_UNROLLED_MAX_NNZ`` nonzeros). The
unrolled kernel is built only up to ``--unrolled-max-nnz`` nonzeros (about half a
millisecond per nonzero to compile here); a contender that did not run a case is ``null``.
Each contender's time is the fastest of ``--rounds`` measurements of about 2 ms (the JSON
keeps the median too). Each round takes every contender in turn; before each it waits for
the thread pools of the one before to stop spinning (``bench.wait_for_idle_threads``) and
then wakes the contender's own with one unmeasured measurement: on this 2-vCPU virtual
machine the first calls after a pause took up to 20 ms. Two-thread contenders, ours and
PyTorch's, still ran some rounds up to 1.7x slower than others, as if on one core; the
fastest round is what each can do. Writes
``benchmarks/results/spmm-cpu-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import layers  # noqa: E402
import results_json  # noqa: E402

from sparsert_tvm.bench import wait_for_idle_threads  # noqa: E402
from sparsert_tvm.build import host_cpu_target  # noqa: E402
from sparsert_tvm.problem import Layout, SpmmProblem  # noqa: E402
from sparsert_tvm.schedules.cpu.rule import CpuSpmmRule  # noqa: E402
from sparsert_tvm.tuning import CPU_UNROLLED_MAX_NNZ, cpu_config, default_cpu_kernel  # noqa: E402
from sparsert_tvm.weights import SparseMatrix  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("torch_dense", "torch_csr", "scipy_csr")
CONTENDERS = ("sparsert", "sparsert_unrolled", *LIBRARIES)
NETWORKS = ("resnet50-1x1", "mobilenet_v1-1x1")
FC_COLUMNS = (1, 8, 32, 128)


def cases(densities):
    for density in densities:
        for group in NETWORKS:
            for m, k, spatial in layers.CONV_NETWORKS[group]:
                yield f"{group}-{m}x{k}-s{spatial}-d{density}", group, m, k, spatial, Layout.CHANNELS, density
        for m, k in layers.FC_NETWORKS["bert_base-fc"]:
            for n in FC_COLUMNS:
                yield f"bert_base-fc-{m}x{k}-n{n}-d{density}", "bert_base-fc", m, k, n, Layout.ROWS, density


def weight(m: int, k: int, density: float) -> np.ndarray:
    rng = np.random.default_rng([m, k, int(density * 1000)])
    return ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")


def run_case(name, group, m, k, n, layout, density, args, target, rule) -> dict:
    w = weight(m, k, density)
    x_shape, y_shape = ((1, k, n), (1, m, n)) if layout is Layout.CHANNELS else ((n, k), (n, m))
    problem = SpmmProblem(SparseMatrix.from_dense(w), layout, "float32", x_shape, y_shape)
    x = np.random.default_rng(1).standard_normal(x_shape).astype("float32")
    reference = problem.reference(x)
    row = {"case": name, "group": group, "kind": "spmm", "M": m, "K": k, "N": n, "density": density,
           "nnz": problem.weight.nnz, "us": dict.fromkeys(CONTENDERS), "median_us": dict.fromkeys(CONTENDERS),
           "compile_s": {}, "max_rel_error": {},
           "params": {}}
    timers = {}
    row["default"] = "sparsert_unrolled" if default_cpu_kernel(problem) == "unrolled" else "sparsert"
    for label, kernel in (("sparsert", "csr"), ("sparsert_unrolled", "unrolled")):
        if kernel == "unrolled" and problem.weight.nnz > args.unrolled_max_nnz:
            if row["default"] == label:
                raise SystemExit(f"--unrolled-max-nnz {args.unrolled_max_nnz} leaves out {name}'s default kernel")
            continue
        config = cpu_config(problem, kernel, target)
        timers[label] = _our_kernel(problem, rule, config, target, x, reference, row, label)
    timers.update(_libraries(w, x, layout))
    samples = {label: [] for label in timers}
    for _ in range(args.rounds):  # each round takes every contender, so that a slow spell slows all alike
        for label, timer in timers.items():
            wait_for_idle_threads()
            timer()  # wakes the contender's threads: the first call after a pause took up to 20 ms
            samples[label].append(timer())
    for label, times in samples.items():
        row["us"][label], row["median_us"][label] = min(times), statistics.median(times)
    return row


def _our_kernel(problem, rule, config, target, x, reference, row, label):
    start = time.perf_counter()
    built = rule.build(problem, config, target, "bench")
    row["compile_s"][label] = time.perf_counter() - start
    row["params"][label] = built.params
    module = built.external_modules[0]
    operands = [tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in built.constants)]
    y = tvm.runtime.tensor(np.zeros(reference.shape, "float32"))
    module[built.extern](*operands, y)
    row["max_rel_error"][label] = float(np.abs(y.numpy() - reference).max() / max(np.abs(reference).max(), 1e-30))
    evaluator = module.time_evaluator(built.extern, tvm.cpu(), number=_calls(lambda: module[built.extern](*operands, y)))
    return lambda: evaluator(*operands, y).mean * 1e6


def _libraries(w, x, layout):
    """Timers of the library contenders; each computes the same product as our kernels."""
    dense, xt = torch.from_numpy(w), torch.from_numpy(x)
    csr, scipy_csr = dense.to_sparse_csr(), scipy.sparse.csr_matrix(w)
    if layout is Layout.CHANNELS:
        xt, xn = xt[0], x[0]
        steps = {"torch_dense": lambda: dense @ xt, "torch_csr": lambda: csr @ xt, "scipy_csr": lambda: scipy_csr @ xn}
    else:
        steps = {"torch_dense": lambda: xt @ dense.t(), "torch_csr": lambda: (csr @ xt.t()).t(),
                 "scipy_csr": lambda: (scipy_csr @ x.T).T}
    return {label: _loop_timer(step) for label, step in steps.items()}


def _calls(step, budget_s: float = 0.002) -> int:
    """Calls per measurement so that one measurement takes about ``budget_s``."""
    step()
    start = time.perf_counter()
    step()
    return max(1, int(budget_s / max(time.perf_counter() - start, 1e-7)))


def _loop_timer(step):
    calls = _calls(step)

    def timer():
        start = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - start) / calls * 1e6

    return timer


def summary(result: dict) -> list[str]:
    rows = result["cases"]
    lines = [f"# Sparse products on the CPU ({result['machine']}, {result['date']})", "",
             f"`python benchmarks/spmm_cpu.py {result['args']}`; {result['threads']} threads everywhere but SciPy;",
             "each time is the fastest of the rounds, taken in turn (the JSON has their medians too).",
             "Speedups are the contender's time over our default kernel's (above 1: we are faster): the",
             f"unrolled kernel up to {CPU_UNROLLED_MAX_NNZ:,} nonzeros, the CSR kernel above. The unrolled kernel",
             "is built up to the nonzeros in the command (compile time).", "",
             "## Geometric means", "",
             "| group | density | cases | vs torch dense | vs torch CSR | vs SciPy CSR | unrolled default (cases) "
             "| CSR / unrolled (cases) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["group"], r["density"]) for r in rows}, key=lambda g: (g[0], -g[1]))
    for group, density in [*keys, ("all", None)]:
        chosen = [r for r in rows if group == "all" or (r["group"] == group and r["density"] == density)]
        ratios = [_geomean(chosen, c) for c in ("torch_dense", "torch_csr", "scipy_csr")]
        both = [r for r in chosen if r["us"]["sparsert_unrolled"] is not None]
        unrolled_default = sum(r["default"] == "sparsert_unrolled" for r in chosen)
        csr_over_unrolled = _geomean(both, "sparsert", "sparsert_unrolled")
        lines.append(f"| {group} | {density if density else 'all'} | {len(chosen)} | "
                     + " | ".join(f"{v:.2f}x" for v in ratios)
                     + f" | {unrolled_default} | " + (f"{csr_over_unrolled:.2f}x ({len(both)}) |" if both else "- |"))
    lines += ["", "## Where a library is faster than our default kernel", ""]
    for r in rows:
        us, ours = r["us"], r["us"][r["default"]]
        best = min((us[c], c) for c in LIBRARIES if us[c] is not None)
        if best[0] < ours:
            lines.append(f"- {r['case']} ({r['nnz']:,} nonzeros): {best[1]} {ours / best[0]:.2f}x faster")
    lines += ["", "## Cases", "",
              "| case | nnz | CSR | unrolled | torch dense | torch CSR | SciPy | default | vs dense "
              "| CSR build | unrolled build | max error |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        us, built = r["us"], r["compile_s"]
        lines.append(f"| {r['case']} | {r['nnz']:,} | " + " | ".join(_us(us[c]) for c in CONTENDERS)
                     + f" | {'unrolled' if r['default'] == 'sparsert_unrolled' else 'CSR'}"
                     + f" | {us['torch_dense'] / us[r['default']]:.2f}x | {built['sparsert']:.2f} s | "
                     + (f"{built['sparsert_unrolled']:.1f} s" if "sparsert_unrolled" in built else "-")
                     + f" | {max(r['max_rel_error'].values()):.1e} |")
    return lines


def _geomean(rows, contender, over=None) -> float:
    """Geometric mean of ``contender``'s time over ``over``'s (by default each case's default kernel)."""
    ratios = [r["us"][contender] / r["us"][over or r["default"]] for r in rows if r["us"][contender] is not None]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")


def _us(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", default="0.1,0.05")
    parser.add_argument("--unrolled-max-nnz", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--name", default=f"{os.cpu_count()}core")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    target, rule = host_cpu_target(), CpuSpmmRule()
    densities = [float(d) for d in args.densities.split(",")]
    rows = []
    for case in cases(densities):
        if args.cases in case[0]:
            rows.append(run_case(*case, args, target, rule))
            us = rows[-1]["us"]
            print(f"{case[0]}: " + ", ".join(f"{c} {_us(us[c])}" for c in CONTENDERS), flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "target": str(target), "date": datetime.date.today().isoformat(), "threads": os.cpu_count(),
              "args": " ".join(sys.argv[1:]), "cases": rows}
    stem = RESULTS / f"spmm-cpu-{args.name}"
    stem.with_suffix(".json").write_text(results_json.dumps(result))
    stem.with_suffix(".md").write_text("\n".join(summary(result)) + "\n")
    print("\n".join(summary(result)[:20]))


if __name__ == "__main__":
    main()
