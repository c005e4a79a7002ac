"""Our kernels and the dense contenders timed with a warm and with a cold L2, in one process.

Warm is how the suites time by default: a CUDA graph replays one kernel, whose code (our
weights) and weights stay in L2. Cold (``--cold`` in the suites) overwrites twice the L2 and
reads the input back before every launch, as a whole model runs a layer: its input was just
written by the layer before, its code and weights come from device memory. Each case runs
its default config, or each ``--config`` alternative (``A;B``, as in the suites), and every
kernel is timed warm, cold, warm, cold, so that drift hits both alike.

    python benchmarks/cold_l2.py --suite conv --cases 'stage3-d0\\.1-b8$' \\
        --config 'rows_per_block=4;rows_per_block=8' --out benchmarks/results/cold-l2.json

writes the JSON and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conv
import harness
import results_json
import spmm
import torch
from harness import graph_timer, sparse_problem, time_torch
from suite import overridden_config, parse_overrides

from sparsert_tvm.build import cuda_target
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule

SUITES = {"conv": conv.paper_suite, "spmm": spmm.paper_suite}
STATES = ("warm", "cold")


def warm_and_cold(measure, rounds: int = 2) -> dict[str, list[float]]:
    """Microseconds of ``measure()`` in each L2 state, ``rounds`` times in turns."""
    times = {state: [] for state in STATES}
    try:
        for _ in range(rounds):
            for state in STATES:
                harness.COLD_L2 = state == "cold"
                times[state].append(measure())
    finally:
        harness.COLD_L2 = False
    return times


def run_case(case, alternatives: list[str]) -> list[dict]:
    rule, target = CudaSpmmRule(), cuda_target()
    problem = sparse_problem(case)
    timer = graph_timer(case)
    rows = []
    for text in alternatives:
        config = overridden_config(case, parse_overrides(text)) or rule.default_config(problem, target)
        built = rule.build(problem, config, target, "bench")
        times = warm_and_cold(functools.partial(timer, built, target))
        rows.append({"case": case.name, "contender": f"sparsert [{text or 'default'}]",
                     "code_bytes": built.code_bytes, "params": built.params, "us": times})
    for name, mode in case.libraries.items():
        if mode != "csr":
            times = warm_and_cold(functools.partial(_library_us, case, mode))
            rows.append({"case": case.name, "contender": name, "us": times})
    return rows


def _library_us(case, mode: str) -> float:
    return time_torch(case, mode)[0]


def table(rows: list[dict]) -> str:
    lines = ["| case | contender | code KB | warm us | cold us | cold / warm |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        warm, cold = (statistics.median(row["us"][state]) for state in STATES)
        code = f"{row['code_bytes'] / 1024:,.0f}" if row.get("code_bytes") else ""
        lines.append(f"| {row['case']} | {row['contender']} | {code} | {warm:.1f} | {cold:.1f} | {cold / warm:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), required=True, help="the paper suite of conv.py or spmm.py")
    parser.add_argument("--cases", required=True, help="regular expression over case names")
    parser.add_argument("--config", default="", help="A;B;...: each case once with each (FIELD=V,...)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cases = [case for case, _ in SUITES[args.suite]("float32") if re.search(args.cases, case.name)]
    if not cases:
        parser.error(f"no case of the {args.suite} suite matches {args.cases!r}")
    out = Path(args.out)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "suite": args.suite, "cases": []}
    for case in cases:
        result["cases"] += run_case(case, args.config.split(";"))
        out.write_text(results_json.dumps(result))
        print(table([row for row in result["cases"] if row["case"] == case.name]).split("\n", 2)[2], flush=True)
    header = f"# {out.stem}: {result['device']}, {result['date']}\n\nMedians of two rounds each (`benchmarks/cold_l2.py`).\n\n"
    out.with_suffix(".md").write_text(header + table(result["cases"]) + "\n")


if __name__ == "__main__":
    main()
