"""Sparse kernels against dense and sparse libraries on the GPU, one JSON per run.

    python benchmarks/spmm.py --suite paper --dtype float32 --out benchmarks/results/spmm-paper-fp32-h100.json

Each case runs every contender in this process on the same inputs, timed with CUDA graphs
(see harness.py); our output is checked against a float64 product. A contender that cannot
run a case is recorded as null. Dense contenders do not depend on the weight's values, so
their times are measured once per shape and reused by the cases sharing it. With
``--tune-candidates K`` our kernel is autotuned first (K configs, CUDA-graph timing); all
cases' candidates are assembled up front by a pool of processes. ``--deadline`` stops
starting new cases after that many seconds and ``--resume`` skips the cases a previous
partial run of the same JSON holds, so a long suite can run in several calls.
``summarize.py`` turns the JSON into tables and a plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import layers  # noqa: E402
from harness import SpmmCase, graph_timer, reference, sparse_problem, time_sparsert, time_torch, time_tvm_dense  # noqa: E402

from sparsert_tvm.build import cuda_target  # noqa: E402
from sparsert_tvm.problem import Layout  # noqa: E402
from sparsert_tvm.schedules.config import CudaSpmmConfig  # noqa: E402
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule, cuda_arch  # noqa: E402
from sparsert_tvm.tuning import space  # noqa: E402
from sparsert_tvm.tuning.tuner import TuneOptions, assemble_candidate  # noqa: E402

CONTENDERS = {"cublas_fp32": "fp32", "cublas_tf32": "tf32", "cublas_fp16": "fp16", "cusparse_fp32": "csr"}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}  # max error relative to the output's scale
# Larger weights run untuned in the suite: their candidates' ptxas time would not fit the
# device time a run gets (the JSON's tune_s and params say which cases were tuned).
TUNE_NNZ_LIMIT = 150_000
REAL_WEIGHTS = Path(__file__).resolve().parents[1] / ".data" / "resnet50_3x3_pruned.npz"


def uniform(m, k, density, seed=0):
    """A uniform random mask; seeded by shape so that a shape shared by networks is one weight."""
    rng = np.random.default_rng([m, k, int(density * 1000), seed])
    return ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")


def threshold_suite(dtype):
    """Where does dense win? A few FC and 1x1-conv shapes over a range of densities."""
    cases = []
    for density in (0.05, 0.1, 0.2, 0.3):
        for m, k in ((768, 768), (3072, 768)):
            for n in (1, 8, 128):
                weight = uniform(m, k, density)
                cases.append((SpmmCase(f"fc{m}x{k}-n{n}-d{density}", "bert-fc", weight, Layout.ROWS, n, dtype), None))
        for m, k, s in ((256, 256, 196), (512, 512, 49), (128, 128, 784)):
            weight = uniform(m, k, density)
            case = SpmmCase(f"conv{m}x{k}-s{s}-d{density}", "resnet50-1x1", weight, Layout.CHANNELS, s, dtype)
            cases.append((case, None))
    return cases


def rows_suite(dtype):
    """Rows per block for fully connected layers at small N (code streaming)."""
    cases = []
    for m, k in ((768, 768), (3072, 768)):
        weight = uniform(m, k, 0.1)
        for n in (1, 8):
            for rows in (1, 2, 4):
                config = CudaSpmmConfig(rows_per_block=rows, threads_per_block=32)
                cases.append((SpmmCase(f"fc{m}x{k}-n{n}-r{rows}", "bert-fc", weight, Layout.ROWS, n, dtype), config))
    return cases


def paper_suite(dtype):
    """The SparseRT paper's kind of suite: 1x1 convolutions of four CNNs at batch 1 and 8, the
    FC layers of three transformers at five N, DeepBench GEMMs, and real pruned weights; at
    densities 0.1 and 0.05, plus 0.2 and 0.3 on a subset to see where dense wins."""
    cases = []

    def add(name, group, weight, layout, columns, images=1):
        cases.append((SpmmCase(name, group, weight, layout, columns, dtype, images), None))

    for density in (0.1, 0.05):
        for group, shapes in layers.CONV_NETWORKS.items():
            for m, k, s in shapes:
                for batch in (1, 8):
                    add(f"{group}-{m}x{k}-s{s}-b{batch}-d{density}", group, uniform(m, k, density), Layout.CHANNELS, s, batch)
        for group, shapes in layers.FC_NETWORKS.items():
            for m, k in shapes:
                for n in layers.FC_COLUMNS:
                    add(f"{group}-{m}x{k}-n{n}-d{density}", group, uniform(m, k, density), Layout.ROWS, n)
        for m, k, n in layers.DEEPBENCH:
            add(f"deepbench-{m}x{k}-n{n}-d{density}", "deepbench", uniform(m, k, density), Layout.ROWS, n)
    for density in (0.2, 0.3):
        for m, k, s in layers.RESNET50_1X1[::3]:
            add(f"resnet50-1x1-{m}x{k}-s{s}-b1-d{density}", "resnet50-1x1", uniform(m, k, density), Layout.CHANNELS, s)
        for m, k in layers.FC_NETWORKS["bert_base-fc"]:
            for n in (8, 128):
                add(f"bert_base-fc-{m}x{k}-n{n}-d{density}", "bert_base-fc", uniform(m, k, density), Layout.ROWS, n)
    if REAL_WEIGHTS.exists():
        real = np.load(REAL_WEIGHTS)
        for key in sorted(real.files):
            weight = real[key].astype("float32")
            weight = weight.reshape(weight.shape[0], -1)  # im2col form [out, in * 3 * 3]
            s = layers.REAL_3X3[key.split("_")[1]]
            for batch in (1, 8):
                add(f"real-{key}-im2col-s{s}-b{batch}", "resnet50-3x3-real-im2col", weight, Layout.CHANNELS, s, batch)
    return sorted(cases, key=lambda case: _priority(case[0]))


def _priority(case: SpmmCase) -> int:
    """Run order, so that a run cut short by its deadline has covered every family first:
    batch 1 at densities 0.1 and 0.05, then batch 8, then DeepBench, then the dense-wins subset."""
    if case.name.endswith(("d0.2", "d0.3")):
        return 3
    if case.group == "deepbench":
        return 2
    return 1 if case.images > 1 else 0


SUITES = {"threshold": threshold_suite, "rows": rows_suite, "paper": paper_suite}


class DenseTimes:
    """Dense contenders' times by shape: values do not change a dense kernel's time."""

    def __init__(self):
        self.times = {}

    def get(self, case: SpmmCase) -> dict:
        m, k, n = case.shape
        key = (m, k, case.columns, case.images, case.layout, case.dtype)
        if key not in self.times:
            us = {}
            for name, mode in CONTENDERS.items():
                if mode != "csr":
                    us[name] = _attempt(lambda: time_torch(case, mode)[0])
            # TVM's float16 dense kernel crashes the process (segfault in s_tir Tensorize while
            # dlight schedules it for tensor cores) in apache-tvm 0.27.0.post1: null.
            us["tvm_dense"] = _attempt(lambda: time_tvm_dense(case)[0]) if case.dtype == "float32" else None
            self.times[key] = us
        return dict(self.times[key])


def _attempt(measure):
    try:
        return measure()
    except Exception:  # noqa: BLE001 - a contender that cannot run a case is null
        return None


def run_case(case: SpmmCase, config, dense: DenseTimes, tune: TuneOptions | None) -> dict:
    m, k, n = case.shape
    row = {
        "case": case.name, "group": case.group, "kind": "spmm", "M": m, "K": k, "N": n,
        "density": round(float(np.count_nonzero(case.weight)) / case.weight.size, 4), "dtype": case.dtype,
        "us": {}, "correct": False, "compile_s": None, "tune_s": 0.0, "code_bytes": None, "params": {},
    }
    expected = reference(case)
    try:
        options = None if tune is None or config is not None else dataclasses.replace(tune, timer=graph_timer(case))
        us, out, info = time_sparsert(case, config, options, TUNE_NNZ_LIMIT)
        scale = max(1.0, float(expected.abs().max()))
        error = float((out.double() - expected).abs().max()) / scale
        row["us"]["sparsert"] = us
        row["correct"] = error < TOLERANCE[case.dtype]
        row["max_rel_error"] = error
        row.update(compile_s=info["compile_s"], tune_s=info["tune_s"], code_bytes=info["code_bytes"], params=info["params"])
    except Exception:  # noqa: BLE001 - recorded, the suite goes on
        row["us"]["sparsert"] = None
        row["error"] = traceback.format_exc(limit=3)
    row["us"].update(dense.get(case))
    row["us"]["cusparse_fp32"] = _attempt(lambda: time_torch(case, "csr")[0])
    return row


def _assemble_candidates(job) -> float:
    """In a worker process: assembles the candidates of one case into the kernel cache."""
    case, limit, arch = job
    start = time.perf_counter()
    rule = CudaSpmmRule()
    problem = sparse_problem(case)
    tuned = limit and problem.weight.nnz <= TUNE_NNZ_LIMIT
    configs = space.candidates(problem, rule.check, limit) if tuned else [rule.default_config(problem, None)]
    for config in configs:
        assemble_candidate(problem, config, "bench", arch)
    return time.perf_counter() - start


def assemble_ahead(cases, limit: int, jobs: int, timeout: float | None = None):
    if jobs < 1:
        return 0.0
    arch = cuda_arch(cuda_target())
    jobs_list = [(case, limit, arch) for case, config in cases if config is None]
    end = time.perf_counter() + (timeout or float("inf"))
    seconds = 0.0
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        results = pool.imap_unordered(_assemble_candidates, jobs_list)
        for _ in jobs_list:
            try:
                seconds += results.next(timeout=max(0.0, end - time.perf_counter()))
            except multiprocessing.TimeoutError:
                break  # the rest are assembled when their case runs
        pool.terminate()  # cache writes are atomic: a killed worker leaves no partial entry
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="paper")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tune-candidates", type=int, default=0, help="autotune with this many configs (0: untuned)")
    parser.add_argument("--jobs", type=int, default=16, help="processes assembling kernels ahead of timing")
    parser.add_argument("--deadline", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--resume", default=None, help="JSON of a partial run: keep its cases, run the rest")
    args = parser.parse_args()
    start = time.perf_counter()
    cases = SUITES[args.suite](args.dtype)
    rows = json.loads(Path(args.resume).read_text())["cases"] if args.resume else []
    done = {row["case"] for row in rows}
    cases = [(case, config) for case, config in cases if case.name not in done]
    tune = None
    if args.tune_candidates:  # candidates were assembled ahead, all processes at once
        tune = TuneOptions(max_candidates=args.tune_candidates, budget_s=30.0, progress=False, assemble_ahead=False)
    ahead = assemble_ahead(cases, args.tune_candidates, args.jobs, args.deadline and args.deadline / 3)
    print(f"{len(cases)} cases to run ({len(done)} resumed); assembled ahead in {time.perf_counter() - start:.0f} s "
          f"({ahead:.0f} s of work)", flush=True)
    dense = DenseTimes()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "suite": args.suite,
              "dtype": args.dtype, "tune_candidates": args.tune_candidates, "cases": rows}
    for i, (case, config) in enumerate(cases):
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(f"deadline: {len(cases) - i} cases left for --resume", flush=True)
            break
        rows.append(run_case(case, config, dense, tune))
        us = rows[-1]["us"]
        print(f"[{i + 1}/{len(cases)}] {case.name}: sparsert {us['sparsert']} us, cublas {us['cublas_fp32']} us", flush=True)
        if i % 10 == 9:
            Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
