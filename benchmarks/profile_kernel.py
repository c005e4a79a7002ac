"""Launches one benchmark case's sparse kernel a few times, plainly, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:bench_kernel --launch-skip 2 --launch-count 1 \\
        --set full python benchmarks/profile_kernel.py resnet50-3x3-real-s91_stage2-b1 [--config FIELD=V,...]

The case is named as in conv.py's and spmm.py's paper suites; ``--config`` changes fields of
its default config as suite.py's option does. Prints the config and the kernel's resources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import conv  # noqa: E402
import spmm  # noqa: E402
import suite  # noqa: E402
from harness import sparse_problem  # noqa: E402

from sparsert_tvm.build import cuda_target  # noqa: E402
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule  # noqa: E402
from sparsert_tvm.tuning.measure import build_launcher  # noqa: E402


def find_case(name: str, dtype: str):
    for make in (conv.paper_suite, spmm.paper_suite):
        for case, _ in make(dtype):
            if case.name == name:
                return case
    raise SystemExit(f"no case named {name!r} in the conv or spmm paper suites")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--config", default=None, help="FIELD=V,...: these fields of the default config changed")
    parser.add_argument("--launches", type=int, default=5)
    args = parser.parse_args()
    case = find_case(args.case, args.dtype)
    rule, target = CudaSpmmRule(), cuda_target()
    problem = sparse_problem(case)
    config = suite.overridden_config(case, suite.parse_overrides(args.config)) or rule.default_config(problem, target)
    built = rule.build(problem, config, target, "bench")
    lib, name = build_launcher(built, target)
    x = case.inputs()[0]
    if problem.x_transposed:
        x = x.t().contiguous()
    y = torch.empty(case.y_shape(), device="cuda", dtype=case.torch_dtype)
    launch = lib[name]
    for _ in range(args.launches):
        launch(tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y))
    torch.cuda.synchronize()
    print(f"{case.name}: {built.params}, {built.code_bytes:,} bytes of cubin", flush=True)


if __name__ == "__main__":
    main()
