"""The CPU CSR kernel's tiling against its default, on BERT-base's fully connected layers.

    python benchmarks/cpu_csr_tiles.py [--variants "vector_lanes=16;chains=4;..."] [--name 2core]

Each case (an FC layer at N tokens, uniform mask at density 0.1) is built with the default
config (``tuning.cpu_config``) and with each variant: the default with those fields
changed. All are called directly (no Relax VM), checked against numpy, and timed in
``--rounds`` rounds that take them in turn (each time the fastest round: see
``spmm_cpu.py``). Writes ``benchmarks/results/cpu-csr-tiles-<name>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spmm_cpu import RESULTS, _our_kernel, weight  # noqa: E402

from sparsert_tvm.build import host_cpu_target  # noqa: E402
from sparsert_tvm.problem import Layout, SpmmProblem  # noqa: E402
from sparsert_tvm.schedules.cpu.rule import CpuSpmmRule  # noqa: E402
from sparsert_tvm.tuning import cpu_config  # noqa: E402
from sparsert_tvm.weights import SparseMatrix  # noqa: E402

CASES = ((768, 768, 128), (3072, 768, 128), (768, 3072, 128), (3072, 768, 32), (768, 3072, 32))
DEFAULT_VARIANTS = "chains=1;chains=4;vector_lanes=16;vector_lanes=64;vector_lanes=16,chains=4"


def variant(default, text: str):
    fields = dict(item.split("=") for item in text.split(","))
    return dataclasses.replace(default, **{name: int(value) for name, value in fields.items()})


def run_case(m: int, k: int, n: int, variants: list[str], rounds: int, target, rule) -> list[str]:
    w = weight(m, k, 0.1)
    problem = SpmmProblem(SparseMatrix.from_dense(w), Layout.ROWS, "float32", (n, k), (n, m))
    x = np.random.default_rng(1).standard_normal((n, k)).astype("float32")
    reference = problem.reference(x)
    default = cpu_config(problem, "csr", target)
    configs = {"default": default} | {text: variant(default, text) for text in variants}
    row = {"compile_s": {}, "params": {}, "max_rel_error": {}}
    timers = {label: _our_kernel(problem, rule, config, target, x, reference, row, label)
              for label, config in configs.items()}
    samples = {label: [] for label in timers}
    for _ in range(rounds):  # one thread pool: no pauses needed between them
        for label, timer in timers.items():
            samples[label].append(timer())
    best = {label: min(times) for label, times in samples.items()}
    lines = []
    for label, config in configs.items():
        gfma = problem.weight.nnz * n / best[label] / 1e3
        lines.append(f"| {m}x{k} | {n} | {label} | {config.vector_lanes} | {config.row_blocks} | {config.chains} "
                     f"| {best[label]:,.1f} | {gfma:.1f} | {best['default'] / best[label]:.2f}x "
                     f"| {row['max_rel_error'][label]:.1e} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="FIELD=V,...;... of CpuCsrConfig")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--name", default=f"{os.cpu_count()}core")
    args = parser.parse_args()
    target, rule = host_cpu_target(), CpuSpmmRule()
    variants = args.variants.split(";")
    lines = [f"# The CPU CSR kernel's tiling on BERT-base's FC layers ({os.cpu_count()} cores, "
             f"{datetime.date.today().isoformat()})", "",
             f"`python benchmarks/cpu_csr_tiles.py {' '.join(sys.argv[1:])}`: density 0.1, LLVM for {target.attrs.get('mcpu', 'this CPU')}; the fastest of "
             f"{args.rounds} rounds; speedup over the default (above 1: the variant is faster).", "",
             "| layer | N | config | lanes | row blocks | chains | us | GFMA/s | vs default | max error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, k, n in CASES:
        lines += run_case(m, k, n, variants, args.rounds, target, rule)
        print("\n".join(lines[-len(variants) - 1:]), flush=True)
    (RESULTS / f"cpu-csr-tiles-{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
