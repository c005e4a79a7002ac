"""Sparse kernels against dense and sparse libraries on the GPU, one JSON per run.

    python benchmarks/spmm.py --suite threshold --out benchmarks/results/spmm-threshold.json

Each case runs every contender in this process on the same inputs, timed with CUDA graphs
(see harness.py); our output is checked against a float64 product. A contender that cannot
run a case is recorded as null. ``summarize.py`` turns the JSON into tables and a plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import SpmmCase, reference, time_sparsert, time_torch, time_tvm_dense  # noqa: E402

from sparsert_tvm.problem import Layout  # noqa: E402
from sparsert_tvm.schedules.config import CudaSpmmConfig  # noqa: E402

CONTENDERS = {"cublas_fp32": "fp32", "cublas_tf32": "tf32", "cublas_fp16": "fp16", "cusparse_fp32": "csr"}


def uniform(rng, m, k, density):
    return ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")


def threshold_suite(rng):
    """Where does dense win? A few FC and 1x1-conv shapes over a range of densities."""
    cases = []
    for density in (0.05, 0.1, 0.2, 0.3):
        for m, k in ((768, 768), (3072, 768)):
            for n in (1, 8, 128):
                weight = uniform(rng, m, k, density)
                cases.append((SpmmCase(f"fc{m}x{k}-n{n}-d{density}", "bert-fc", weight, Layout.ROWS, n), None))
        for m, k, s in ((256, 256, 196), (512, 512, 49), (128, 128, 784)):
            weight = uniform(rng, m, k, density)
            cases.append((SpmmCase(f"conv{m}x{k}-s{s}-d{density}", "resnet50-1x1", weight, Layout.CHANNELS, s), None))
    return cases


def rows_suite(rng):
    """Rows per block for fully connected layers at small N (code streaming)."""
    cases = []
    for m, k in ((768, 768), (3072, 768)):
        weight = uniform(rng, m, k, 0.1)
        for n in (1, 8):
            for rows in (1, 2, 4):
                config = CudaSpmmConfig(rows_per_block=rows, threads_per_block=32)
                cases.append((SpmmCase(f"fc{m}x{k}-n{n}-r{rows}", "bert-fc", weight, Layout.ROWS, n), config))
    return cases


SUITES = {"threshold": threshold_suite, "rows": rows_suite}


def run_case(case: SpmmCase, config=None) -> dict:
    m, k, n = case.shape
    row = {
        "case": case.name, "group": case.group, "kind": "spmm", "M": m, "K": k, "N": n,
        "density": round(float(np.count_nonzero(case.weight)) / case.weight.size, 4), "dtype": "float32",
        "us": {}, "correct": False, "compile_s": None, "tune_s": 0.0, "code_bytes": None, "params": {},
    }
    expected = reference(case)
    try:
        us, out, info = time_sparsert(case, config)
        error = float((out.double() - expected).abs().max() / max(1.0, float(expected.abs().max())))
        row["us"]["sparsert"] = us
        row["correct"] = error < 1e-4
        row["max_rel_error"] = error
        row.update(compile_s=info["compile_s"], code_bytes=info["code_bytes"], params=info["params"])
    except Exception:  # noqa: BLE001 - recorded, the suite goes on
        row["us"]["sparsert"] = None
        row["error"] = traceback.format_exc(limit=3)
    for name, mode in CONTENDERS.items():
        try:
            row["us"][name] = time_torch(case, mode)[0]
        except Exception:  # noqa: BLE001
            row["us"][name] = None
    try:
        row["us"]["tvm_dense"] = time_tvm_dense(case)[0]
    except Exception:  # noqa: BLE001
        row["us"]["tvm_dense"] = None
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="threshold")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cases = SUITES[args.suite](np.random.default_rng(0))
    rows = []
    for i, (case, config) in enumerate(cases):
        rows.append(run_case(case, config))
        us = rows[-1]["us"]
        print(f"[{i + 1}/{len(cases)}] {case.name}: sparsert {us['sparsert']} us, cublas {us['cublas_fp32']} us", flush=True)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "suite": args.suite, "cases": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
