"""Tables and a plot from a benchmark JSON written by spmm.py.

    python benchmarks/summarize.py benchmarks/results/spmm-threshold-h100.json

Writes ``<stem>.md`` (geometric-mean speedups of sparsert over each contender by group and
density, then every case where sparsert loses to cuBLAS fp32) and ``<stem>.png`` (speedup
over cuBLAS fp32 against density) next to the JSON.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import gmean

BASELINES = ("cublas_fp32", "cublas_tf32", "cublas_fp16", "cusparse_fp32", "tvm_dense")


def speedups(cases, baseline):
    """sparsert's speedup over ``baseline`` per case, where both ran and ours was correct."""
    out = []
    for case in cases:
        ours, theirs = case["us"].get("sparsert"), case["us"].get(baseline)
        if ours and theirs and case["correct"]:
            out.append((case, theirs / ours))
    return out


def summary_table(cases) -> list[str]:
    groups = defaultdict(list)
    for case in cases:
        groups[(case["group"], round(case["density"] * 20) / 20)].append(case)  # nominal density
    header = "| group | density | cases | " + " | ".join(f"vs {b}" for b in BASELINES) + " |"
    lines = [header, "|" + " --- |" * (3 + len(BASELINES))]

    def row(label, density, members):
        cells = []
        for baseline in BASELINES:
            values = [s for _, s in speedups(members, baseline)]
            cells.append(f"{gmean(values):.2f}x" if values else "n/a")
        return f"| {label} | {density} | {len(members)} | " + " | ".join(cells) + " |"

    for (group, density), members in sorted(groups.items()):
        lines.append(row(group, f"{density:g}", members))
    lines.append(row("**all**", "all", cases))
    return lines


def losses(cases) -> list[str]:
    lines = ["| case | M x K | N | density | sparsert us | cuBLAS fp32 us | speedup |", "|" + " --- |" * 7]
    for case, speedup in sorted(speedups(cases, "cublas_fp32"), key=lambda cs: cs[1]):
        if speedup < 1:
            lines.append(
                f"| {case['case']} | {case['M']}x{case['K']} | {case['N']} | {case['density']:.2f} | "
                f"{case['us']['sparsert']:.1f} | {case['us']['cublas_fp32']:.1f} | {speedup:.2f}x |"
            )
    return lines


def plot(cases, path: Path, device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_group = defaultdict(list)
    for case, speedup in speedups(cases, "cublas_fp32"):
        by_group[case["group"]].append((case["density"], speedup, case["M"] * case["K"] * case["N"]))
    for group, points in sorted(by_group.items()):
        d, s, size = (np.array(v, dtype=float) for v in zip(*points))
        ax.scatter(d, s, s=12 + 40 * size / size.max(), alpha=0.7, label=group)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("weight density")
    ax.set_ylabel("speedup over cuBLAS fp32 (log)")
    ax.set_yscale("log")
    ax.set_title(f"sparsert fp32 kernels, {device}\n(marker size ~ M*K*N)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(path: str):
    source = Path(path)
    result = json.loads(source.read_text())
    cases = result["cases"]
    correct = sum(case["correct"] for case in cases)
    text = [
        f"# {source.stem}: {result['device']}, {result['date']}",
        "",
        f"{len(cases)} cases, {correct} correct against a float64 product. Geometric mean of "
        "sparsert's speedup (contender time / sparsert time), timed with CUDA graphs:",
        "",
        *summary_table(cases),
        "",
        "## Where sparsert loses to cuBLAS fp32",
        "",
        *losses(cases),
    ]
    source.with_suffix(".md").write_text("\n".join(text) + "\n")
    plot(cases, source.with_suffix(".png"), result["device"])
    print("\n".join(text))


if __name__ == "__main__":
    main(sys.argv[1])
