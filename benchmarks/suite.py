"""Runs a suite of kernel benchmark cases and writes one JSON per run (spmm.py, conv.py).

Each case runs every contender in this process on the same inputs, timed with CUDA graphs
(see harness.py); our output is checked against a float64 product. A contender that cannot
run a case is recorded as null. Dense contenders do not depend on the weight's values, so
their times are measured once per shape and reused by the cases sharing it. With
``--tune-candidates K`` our kernel is autotuned first (K configs, CUDA-graph timing); all
cases' candidates are assembled up front by a pool of processes. ``--cases`` picks cases by
name, ``--config FIELD=V,...`` times every case with those fields of its default config
changed (as ``kernel_config`` would; several alternatives separated by ``;`` time every case
with each, in one process: their kernels are assembled side by side and the contenders
timed once, and the run ends with each alternative's geometric-mean speedup over the
first), ``--cold`` times every contender with a cold L2 but its input (``harness``), as a
whole model runs it, ``--deadline`` stops starting new cases after that many
seconds and ``--resume`` skips the cases a previous partial run of the same JSON holds, so a
long suite can run in several calls.
``compile_s`` is the time to generate and assemble the default config's kernel without the
kernel cache (measured by the pool where it assembled ahead, else by an untuned build; null
for a tuned case the pool did not reach: its tune_s includes the compiles).
``summarize.py`` turns the JSON into tables and a plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import multiprocessing
import os
import re
import time
import traceback
from pathlib import Path

import harness
import torch
from harness import graph_timer, reference, sparse_problem, time_sparsert, time_torch, time_tvm_dense

from sparsert_tvm.build import cuda_target
from sparsert_tvm.schedules.config import CUDA_CONFIGS, CudaSpmmConfig
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule, cuda_arch
from sparsert_tvm.tuning import space
from sparsert_tvm.tuning.tuner import TuneOptions, assemble_candidate
import results_json  # noqa: E402

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}  # max error relative to the output's scale
# Larger weights run untuned in the suite: their candidates' ptxas time would not fit the
# device time a run gets (the JSON's tune_s and params say which cases were tuned).
TUNE_NNZ_LIMIT = 150_000


class DenseTimes:
    """Dense contenders' times by shape: values do not change a dense kernel's time."""

    def __init__(self):
        self.times = {}

    def get(self, case) -> dict:
        key = case.dense_key
        if key not in self.times:
            us = {}
            for name, mode in case.libraries.items():
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


def empty_row(case) -> dict:
    m, k, n = case.shape
    return {
        "case": case.name, "group": case.group, "kind": case.kind, "M": m, "K": k, "N": n,
        "density": round(case.density, 4), "dtype": case.dtype,
        "us": {}, "correct": False, "compile_s": None, "tune_s": 0.0, "code_bytes": None, "params": {},
    }


def run_case(case, config, dense: DenseTimes, tune: TuneOptions | None, compile_s: float | None = None) -> dict:
    row = empty_row(case)
    expected = reference(case)
    try:
        options = None if tune is None or config is not None else dataclasses.replace(tune, timer=graph_timer(case))
        us, out, info = time_sparsert(case, config, options, TUNE_NNZ_LIMIT)
        scale = max(1.0, float(expected.abs().max()))
        error = float((out.double() - expected).abs().max()) / scale
        row["us"]["sparsert"] = us
        row["correct"] = error < TOLERANCE[case.dtype]
        row["max_rel_error"] = error
        if compile_s is None and not info["tune_s"]:  # else the build found the tuner's cubin
            compile_s = info["compile_s"]
        row.update(compile_s=compile_s, tune_s=info["tune_s"], code_bytes=info["code_bytes"], params=info["params"])
    except Exception:  # noqa: BLE001 - recorded, the suite goes on
        row["us"]["sparsert"] = None
        row["error"] = traceback.format_exc(limit=3)
    row["us"].update(dense.get(case))
    for name, mode in case.libraries.items():
        if mode == "csr":  # depends on the weight's values
            row["us"][name] = _attempt(lambda: time_torch(case, mode)[0])
    return row


def overridden_config(case, overrides: dict):
    """The case's default config with the fields of ``overrides`` (a ``kernel_config`` dict),
    or None (the default, or the tuner's choice) where there are none."""
    if not overrides:
        return None
    rule = CudaSpmmRule()
    problem = sparse_problem(case)
    return rule.with_overrides(problem, rule.default_config(problem, None), overrides)


def parse_field(config_class, field: str, text: str):
    """``text`` as a value of ``field`` of ``config_class``, typed as its default is."""
    kind = type(getattr(config_class(), field))
    return text.lower() in ("1", "true") if kind is bool else kind(text)


def parse_overrides(text: str | None) -> dict:
    """``"rows_per_block=2,fold_batch=false"`` as a ``kernel_config`` dict (``kernel=csr``
    names the CSR kernel's fields)."""
    items = dict(item.partition("=")[::2] for item in filter(None, (text or "").split(",")))
    kernel = items.pop("kernel", CudaSpmmConfig.KERNEL)
    overrides = {} if kernel == CudaSpmmConfig.KERNEL else {"kernel": kernel}
    return overrides | {field: parse_field(CUDA_CONFIGS[kernel], field, value) for field, value in items.items()}


def _assemble_candidates(job) -> tuple[str, float, float]:
    """In a worker process: times the default config's kernel (or the one ``--config`` asks
    for) built without reading the cache (but stored in it), then assembles every other
    candidate of the case into the cache. Returns (case name, that kernel's compile seconds,
    seconds of work)."""
    case, config, limit, arch = job
    start = time.perf_counter()
    rule = CudaSpmmRule()
    problem = sparse_problem(case)
    tuned = config is None and limit and problem.weight.nnz <= TUNE_NNZ_LIMIT
    configs = space.candidates(problem, rule.check, limit) if tuned else [config or rule.default_config(problem, None)]
    os.environ["SPARSERT_CACHE"] = "refresh"
    compiling = time.perf_counter()
    assemble_candidate(problem, configs[0], "bench", arch)
    compile_s = time.perf_counter() - compiling
    del os.environ["SPARSERT_CACHE"]
    for config in configs[1:]:
        assemble_candidate(problem, config, "bench", arch)
    return case.name, compile_s, time.perf_counter() - start


def assemble_ahead(cases, limit: int, jobs: int, timeout: float | None = None) -> tuple[dict, float]:
    """Assembles the cases' kernels in ``jobs`` processes for at most ``timeout`` seconds.
    Returns the default kernels' compile seconds by case name, and the seconds of work."""
    if jobs < 1:
        return {}, 0.0
    arch = cuda_arch(cuda_target())
    jobs_list = [(case, config, limit, arch) for case, config in cases]
    end = time.perf_counter() + (timeout or 0.0)
    compile_s, seconds = {}, 0.0
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        results = pool.imap_unordered(_assemble_candidates, jobs_list)
        for _ in jobs_list:
            left = None if timeout is None else max(0.0, end - time.perf_counter())
            try:
                name, default_s, work_s = results.next(timeout=left)
            except multiprocessing.TimeoutError:
                break  # the rest are assembled when their case runs
            compile_s[name] = default_s
            seconds += work_s
        pool.terminate()  # cache writes are atomic: a killed worker leaves no partial entry
    return compile_s, seconds


def compare_alternatives(rows: list[dict], alternatives: list[str]) -> str:
    """A markdown table: each ``--config`` alternative's geometric-mean speedup over the first,
    on the cases both ran correctly."""
    times = {}
    for row in rows:
        base, _, text = row["case"].rpartition(" [")
        if row["correct"] and row["us"].get("sparsert"):
            times[(base, text.rstrip("]"))] = row["us"]["sparsert"]
    lines = ["| alternative | cases | speedup over the first |", "| --- | --- | --- |"]
    for text in alternatives:
        ratios = [times[(base, alternatives[0])] / us for (base, t), us in times.items()
                  if t == text and (base, alternatives[0]) in times]
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
        lines.append(f"| {text or 'default'} | {len(ratios)} | {mean:.2f}x |")
    return "\n".join(lines)


def main(suites: dict, description: str, default_suite: str):
    """Command line of a benchmark script whose ``suites`` map a name to ``dtype -> [(case, config)]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--suite", choices=sorted(suites), default=default_suite)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tune-candidates", type=int, default=0, help="autotune with this many configs (0: untuned)")
    parser.add_argument("--jobs", type=int, default=16, help="processes assembling kernels ahead of timing")
    parser.add_argument("--deadline", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--resume", default=None, help="JSON of a partial run: keep its cases, run the rest")
    parser.add_argument("--cold", action="store_true",
                        help="time every contender with a cold L2 but its input (harness.py), as in a whole model")
    parser.add_argument("--cases", default=None, help="run only the cases whose name matches this regular expression")
    parser.add_argument("--config", default=None,
                        help="FIELD=V,...: these fields of every case's default config changed; "
                             "A;B;...: every case once with each (rows named 'case [A]')")
    args = parser.parse_args()
    harness.COLD_L2 = args.cold
    alternatives = (args.config or "").split(";")
    overrides = [parse_overrides(text) for text in alternatives]
    start = time.perf_counter()
    today = datetime.date.today().isoformat()
    resumed = results_json.load(args.resume) if args.resume else {"cases": []}
    # Every row says the day it ran: a resumed file mixes runs.
    rows = [{"date": resumed["date"]} | row for row in resumed["cases"]]
    done = {row["case"] for row in rows}
    cases = []
    for case, config in suites[args.suite](args.dtype):
        if args.cases is not None and not re.search(args.cases, case.name):
            continue
        for text, fields in zip(alternatives, overrides):
            variant = case if len(alternatives) == 1 else dataclasses.replace(case, name=f"{case.name} [{text}]")
            if variant.name in done:
                continue
            try:
                cases.append((variant, config or overridden_config(case, fields)))
            except ValueError as error:  # fields this case's tiling cannot take: a row saying so
                rows.append(empty_row(variant) | {"us": {"sparsert": None}, "error": f"--config {text}: {error}"})
                print(f"{variant.name}: not run ({error})", flush=True)
    tune = None
    if args.tune_candidates:  # candidates were assembled ahead, all processes at once
        tune = TuneOptions(max_candidates=args.tune_candidates, budget_s=30.0, progress=False, assemble_ahead=False)
    compile_s, ahead = assemble_ahead(cases, args.tune_candidates, args.jobs, args.deadline and args.deadline / 3)
    print(f"{len(cases)} cases to run ({len(done)} resumed); assembled ahead in {time.perf_counter() - start:.0f} s "
          f"({ahead:.0f} s of work)", flush=True)
    dense = DenseTimes()
    result = {"device": torch.cuda.get_device_name(), "date": today, "suite": args.suite,
              "dtype": args.dtype, "tune_candidates": args.tune_candidates, "l2": "cold" if args.cold else "warm",
              "config": overrides[0] if len(overrides) == 1 else overrides, "cases": rows}
    for i, (case, config) in enumerate(cases):
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(f"deadline: {len(cases) - i} cases left for --resume", flush=True)
            break
        rows.append(run_case(case, config, dense, tune, compile_s.get(case.name)) | {"date": today})
        us = rows[-1]["us"]
        fp32 = next(iter(case.libraries))
        print(f"[{i + 1}/{len(cases)}] {case.name}: sparsert {us['sparsert']} us, {fp32} {us[fp32]} us", flush=True)
        if i % 10 == 9:
            Path(args.out).write_text(results_json.dumps(result))
    Path(args.out).write_text(results_json.dumps(result))
    if len(alternatives) > 1:
        print(compare_alternatives(rows, alternatives))

