"""How good is the tuner's cost model? Times every config of the search space for a few layers.

    python benchmarks/tuning_space.py --out benchmarks/results/tuning-space-h100.json
    python benchmarks/tuning_space.py --family conv --grid --out benchmarks/results/tuning-space-conv-h100.json
    python benchmarks/tuning_space.py --family conv --vary max_instructions_per_segment=4096,65536 --out ...

For each layer, all configs the generator accepts (up to --limit, ranked by the model; with
--grid, every rows x threads x columns-per-thread choice instead) are compiled and timed
with CUDA graphs. The summary says how often the model's top-k holds the
measured best, and how much the best beats the untuned default: that is what sets the
tuner's default number of candidates. ptxas -O1 against -O3 is timed for the default too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import ConvCase, SpmmCase, graph_timer, sparse_problem  # noqa: E402
from suite import parse_field  # noqa: E402

from sparsert_tvm.build import cuda_target  # noqa: E402
from sparsert_tvm.errors import SparseRTError, last_line  # noqa: E402
from sparsert_tvm.problem import Layout  # noqa: E402
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule  # noqa: E402
from sparsert_tvm.tuning import default_cuda_config, space  # noqa: E402
from sparsert_tvm.tuning.tuner import Tuner  # noqa: E402
import results_json  # noqa: E402

SPMM_LAYERS = [  # name, M, K, layout, columns, images
    ("resnet50-1x1-256x64-s56", 256, 64, Layout.CHANNELS, 3136, 1),
    ("resnet50-1x1-512x128-s28", 512, 128, Layout.CHANNELS, 784, 1),
    ("resnet50-1x1-1024x256-s14-b8", 1024, 256, Layout.CHANNELS, 196, 8),
    ("mobilenet-1x1-1024x1024-s7", 1024, 1024, Layout.CHANNELS, 49, 1),
    ("bert-fc-768x768-n8", 768, 768, Layout.ROWS, 8, 1),
    ("bert-fc-3072x768-n128", 3072, 768, Layout.ROWS, 128, 1),
]
CONV_LAYERS = [  # name, channels (in = out), input size, images: ResNet-50's 3x3 layers
    ("resnet50-3x3-stage1", 64, 56, 1),
    ("resnet50-3x3-stage2", 128, 28, 1),
    ("resnet50-3x3-stage3", 256, 14, 1),
    ("resnet50-3x3-stage4", 512, 7, 1),
    ("resnet50-3x3-stage1-b8", 64, 56, 8),
    ("resnet50-3x3-stage2-b8", 128, 28, 8),
    ("resnet50-3x3-stage3-b8", 256, 14, 8),
    ("resnet50-3x3-stage4-b8", 512, 7, 8),
]
GRID = {"rows_per_block": space.ROWS_PER_BLOCK, "threads_per_block": space.THREADS}  # the tuner's own


def layer_cases(family: str, dtype: str, density: float, rng):
    if family == "spmm":
        for name, m, k, layout, columns, images in SPMM_LAYERS:
            weight = ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")
            yield SpmmCase(name, name.split("-")[0], weight, layout, columns, dtype, images)
    else:
        for name, channels, size, images in CONV_LAYERS:
            shape = (channels, channels, 3, 3)
            filters = ((rng.random(shape) < density) * rng.standard_normal(shape)).astype("float32")
            yield ConvCase(name, "resnet50-3x3", filters, (size, size), 1, 1, dtype, images)


def grid_configs(problem, default, check, columns_per_thread):
    configs = [default]
    for rows in GRID["rows_per_block"]:
        for threads in GRID["threads_per_block"]:
            for cols in columns_per_thread:
                config = dataclasses.replace(default, rows_per_block=rows, threads_per_block=threads, columns_per_thread=cols)
                try:
                    check(problem, config)
                except Exception:  # noqa: BLE001 - configs the generator rejects are skipped
                    continue
                if config not in configs and rows * cols <= space.MAX_ACCUMULATORS:
                    configs.append(config)
    return configs


def varied_configs(default, vary: str):
    """The default config, then one copy per value of ``FIELD=v1,v2,...``."""
    field, _, values = vary.partition("=")
    configs = [default]
    for value in values.split(","):
        config = dataclasses.replace(default, **{field: parse_field(type(default), field, value)})
        if config not in configs:
            configs.append(config)
    return configs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--family", choices=["spmm", "conv"], default="spmm")
    parser.add_argument("--grid", action="store_true", help="time the whole grid, not the model's top --limit")
    parser.add_argument("--vary", default="", help="FIELD=v1,v2: the default and copies with FIELD set to each value")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--layers", default="", help="comma-separated names: only these layers")
    parser.add_argument("--columns-per-thread", default="1,2", help="grid values of columns_per_thread")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rule, target = CudaSpmmRule(), cuda_target()
    rows = []
    for dtype in args.dtypes.split(","):
        for case in layer_cases(args.family, dtype, args.density, rng):
            if args.layers and case.name not in args.layers.split(","):
                continue
            name, (m, k, n) = case.name, case.shape
            problem = sparse_problem(case)
            if args.vary:
                configs = varied_configs(default_cuda_config(problem, "unrolled"), args.vary)
            elif args.grid:
                columns = tuple(int(c) for c in args.columns_per_thread.split(","))
                configs = grid_configs(problem, default_cuda_config(problem, "unrolled"), rule.check, columns)
            else:
                configs = space.candidates(problem, rule.check, args.limit)
            timer = graph_timer(case)
            start = time.perf_counter()
            Tuner(rule, target, None)._assemble_ahead(problem, configs, "probe")
            compile_s = time.perf_counter() - start
            timings = []
            for config in configs:
                try:
                    us = timer(rule.build(problem, config, target, "probe"), target)
                except SparseRTError as error:  # e.g. segments in 1024-thread blocks: recorded, not timed
                    us, config_note = None, last_line(error)
                else:
                    config_note = None
                timings.append({"config": config.as_dict(), "cost": space.estimated_cost(problem, config), "us": us,
                                "note": config_note})
            o1 = dataclasses.replace(configs[0], ptxas_opt_level=1)
            start = time.perf_counter()
            built = rule.build(problem, o1, target, "probe")
            o1_compile_s = time.perf_counter() - start
            row = {"case": name, "dtype": dtype, "M": m, "K": k, "N": n, "nnz": problem.weight.nnz,
                   "timings": timings, "assemble_all_s": compile_s, "o1_us": timer(built, target), "o1_compile_s": o1_compile_s}
            rows.append(row)
            us = [math.inf if t["us"] is None else t["us"] for t in timings]
            best = int(np.argmin(us))
            print(f"{name} {dtype}: default {us[0]:.2f} us, best {us[best]:.2f} us (model rank {best}), "
                  f"-O1 {row['o1_us']:.2f} us; {len(us)} configs assembled in {compile_s:.1f} s; "
                  f"best {timings[best]['config']}", flush=True)
            # Written after every layer: a run cut short keeps what it measured.
            result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "layers": rows}
            Path(args.out).write_text(results_json.dumps(result))
            Path(args.out).with_suffix(".md").write_text("\n".join(markdown(result)) + "\n")


def markdown(result: dict) -> list[str]:
    """Per layer, the timed configs fastest first, with the fields that differ between them."""
    lines = [f"# Tuning space: {result['device']}, {result['date']}", "",
             "Microseconds per call (CUDA graphs); the model's estimate is relative.", ""]
    for row in result["layers"]:
        timings = row["timings"]
        fields = [f for f in timings[0]["config"] if len({str(t["config"].get(f)) for t in timings}) > 1]
        lines += [f"## {row['case']} ({row['dtype']}, {row['M']}x{row['K']}, N = {row['N']}, {row['nnz']:,} nonzeros)", "",
                  "| " + " | ".join([*fields, "us", "model", "default"]) + " |", "|" + " --- |" * (len(fields) + 3)]
        ranked = sorted(enumerate(timings), key=lambda it: math.inf if it[1]["us"] is None else it[1]["us"])
        for i, t in ranked:
            us = t["note"] if t["us"] is None else f"{t['us']:.2f}"
            cost = "-" if t["cost"] is None else f"{t['cost']:,.0f}"
            lines.append("| " + " | ".join([*(str(t["config"].get(f)) for f in fields), us, cost, "yes" if i == 0 else ""]) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
