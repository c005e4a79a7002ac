"""How good is the tuner's cost model? Times every config of the search space for a few layers.

    python benchmarks/tuning_space.py --out benchmarks/results/tuning-space-h100.json

For each layer, all configs the generator accepts (up to --limit, ranked by the model) are
compiled and timed with CUDA graphs. The summary says how often the model's top-k holds the
measured best, and how much the best beats the untuned default: that is what sets the
tuner's default number of candidates. ptxas -O1 against -O3 is timed for the default too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import SpmmCase, graph_timer, sparse_problem  # noqa: E402

from sparsert_tvm.build import cuda_target  # noqa: E402
from sparsert_tvm.problem import Layout  # noqa: E402
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule  # noqa: E402
from sparsert_tvm.tuning import space  # noqa: E402
from sparsert_tvm.tuning.tuner import Tuner  # noqa: E402

LAYERS = [  # name, M, K, layout, columns, images
    ("resnet50-1x1-256x64-s56", 256, 64, Layout.CHANNELS, 3136, 1),
    ("resnet50-1x1-512x128-s28", 512, 128, Layout.CHANNELS, 784, 1),
    ("resnet50-1x1-1024x256-s14-b8", 1024, 256, Layout.CHANNELS, 196, 8),
    ("mobilenet-1x1-1024x1024-s7", 1024, 1024, Layout.CHANNELS, 49, 1),
    ("bert-fc-768x768-n8", 768, 768, Layout.ROWS, 8, 1),
    ("bert-fc-3072x768-n128", 3072, 768, Layout.ROWS, 128, 1),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rule, target = CudaSpmmRule(), cuda_target()
    rows = []
    for dtype in ("float32", "float16"):
        for name, m, k, layout, columns, images in LAYERS:
            weight = ((rng.random((m, k)) < args.density) * rng.standard_normal((m, k))).astype("float32")
            case = SpmmCase(name, name.split("-")[0], weight, layout, columns, dtype, images)
            problem = sparse_problem(case)
            configs = space.candidates(problem, rule.check, args.limit)
            timer = graph_timer(case)
            start = time.perf_counter()
            Tuner(rule, target, None)._assemble_ahead(problem, configs, "probe")
            compile_s = time.perf_counter() - start
            timings = []
            for config in configs:
                built = rule.build(problem, config, target, "probe")
                timings.append({"config": config.as_dict(), "cost": space.estimated_cost(problem, config), "us": timer(built, target)})
            o1 = dataclasses.replace(configs[0], ptxas_opt_level=1)
            start = time.perf_counter()
            built = rule.build(problem, o1, target, "probe")
            o1_compile_s = time.perf_counter() - start
            row = {"case": name, "dtype": dtype, "M": m, "K": k, "N": columns * images, "nnz": problem.weight.nnz,
                   "timings": timings, "assemble_all_s": compile_s, "o1_us": timer(built, target), "o1_compile_s": o1_compile_s}
            rows.append(row)
            us = [t["us"] for t in timings]
            best = int(np.argmin(us))
            print(f"{name} {dtype}: default {us[0]:.2f} us, best {us[best]:.2f} us (model rank {best}), "
                  f"-O1 {row['o1_us']:.2f} us; {len(us)} configs assembled in {compile_s:.1f} s; "
                  f"best {timings[best]['config']}", flush=True)
            # Written after every layer: a run cut short keeps what it measured.
            result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "layers": rows}
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
