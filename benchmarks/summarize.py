"""Tables and a plot from a benchmark JSON written by spmm.py or conv.py (``X.json`` or, as the
largest runs are kept, gzipped ``X.json.gz``).

    python benchmarks/summarize.py benchmarks/results/spmm-paper-fp32-h100-1206.json.gz \
        [--roofline benchmarks/results/roofline-h100.json]

Writes ``<stem>.md`` (geometric-mean speedups of sparsert over each contender by model
family, batch, density and dtype; what tuning gained; compile time and code size; every
case where sparsert loses to the dense library of its own precision, with the likely
limit) and ``<stem>.png`` (speedup over that library against density and against problem
size) next to the JSON. With ``--roofline`` (``roofline.py``'s measurements of the same
GPU), SparseRT's targets are bounded by the time to read X and write Y, not by the run's
fastest kernel, and a table says how far each family's times are above their bounds.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import gmean

import results_json

BASELINES = {  # by the JSON's "kind"
    "spmm": ("cublas_fp32", "cublas_tf32", "cublas_fp16", "cusparse_fp32", "tvm_dense"),
    "conv": ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "tvm_dense"),
    "conv_transpose": ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "tvm_dense"),
}
LIBRARY = {"spmm": "cuBLAS", "conv": "cuDNN", "conv_transpose": "cuDNN"}
COLD_NOTE = (", each call with a cold L2 but its input (`--cold`: weights and our kernels' code come from "
             "device memory, as in a whole model)")


def same_precision(kind: str, dtype: str) -> str:
    return BASELINES[kind][0 if dtype == "float32" else 2]


def speedups(cases, baseline):
    """sparsert's speedup over ``baseline`` per case, where both ran and ours was correct."""
    out = []
    for case in cases:
        ours, theirs = case["us"].get("sparsert"), case["us"].get(baseline)
        if ours and theirs and case["correct"]:
            out.append((case, theirs / ours))
    return out


def family(case) -> str:
    batch = " batch 8" if "-b8" in case["case"] else ""
    return f"{case['group']}{batch}"


def nominal_density(case) -> float:
    """The density a case was made at: 0.09 (real weights) reads as 0.1."""
    return round(case["density"] * 20) / 20


def summary_table(cases, kind: str) -> list[str]:
    baselines = BASELINES[kind]
    groups = defaultdict(list)
    for case in cases:
        groups[(case["dtype"], family(case), nominal_density(case))].append(case)
    header = "| dtype | family | density | cases | " + " | ".join(f"vs {b}" for b in baselines) + " |"
    lines = [header, "|" + " --- |" * (4 + len(baselines))]

    def row(dtype, label, density, members):
        cells = []
        for baseline in baselines:
            values = [s for _, s in speedups(members, baseline)]
            cells.append(f"{gmean(values):.2f}x" if values else "n/a")
        return f"| {dtype} | {label} | {density} | {len(members)} | " + " | ".join(cells) + " |"

    for (dtype, label, density), members in sorted(groups.items()):
        lines.append(row(dtype, label, f"{density:g}", members))
    for density in sorted({d for _, _, d in groups}):
        members = [c for (_, _, d), cs in groups.items() if d == density for c in cs]
        lines.append(row("all", "**all families**", f"{density:g}", members))
    lines.append(row("all", "**whole suite**", "all", cases))
    return lines


def tuning_lines(cases) -> list[str]:
    tuned = [c for c in cases if c["correct"] and c["params"].get("default_us") and c["us"].get("sparsert")]
    if not tuned:
        return ["No case was tuned."]
    gains = [c["params"]["default_us"] / c["us"]["sparsert"] for c in tuned]
    seconds = [c["tune_s"] for c in tuned]
    return [
        f"{len(tuned)} cases tuned (the others were over the suite's tuning size limit or not run "
        f"with tuning): geometric-mean gain over the untuned default {gmean(gains):.2f}x, best "
        f"{max(gains):.2f}x; tuning took {np.median(seconds):.1f} s per layer (median), "
        f"{max(seconds):.1f} s at most."
    ]


# SparseRT's targets (issue 3): (dtype, baseline, density) -> geometric-mean speedup to reach.
TARGETS = {("float32", "cublas_fp32", 0.1): 3.4, ("float32", "cublas_fp32", 0.05): 5.4,
           ("float32", "cublas_tf32", 0.1): 1.0, ("float16", "cublas_fp16", 0.05): 1.0}
# FP32 FMAs per second at the boost clock: 132 SMs x 128 lanes x 1.98 GHz (H100 SXM, H200).
FMA_PER_S = {"H100": 132 * 128 * 1.98e9, "H200": 132 * 128 * 1.98e9}


def fma_per_s(device: str) -> float | None:
    """The FP32 FMA peak of ``device`` (a torch device name), if known."""
    return next((rate for name, rate in FMA_PER_S.items() if name in device), None)


def target_lines(cases, device: str, roofline: dict | None = None) -> list[str]:
    """Each target against the run. For float32, what the suite's sizes allow: each case's
    time is bounded below by the FP32 FMA peak and by a floor, and the bounds cap each case's
    speedup; cases whose cap is below the target cap the geometric mean, so the others must
    beat the target by the factor in the last column. Without a ``roofline`` the floor is the
    run's fastest kernel; with one (``roofline.py`` on the same GPU) it is the time of a copy
    that reads X and writes Y (``copy_floor_us``)."""
    fma = fma_per_s(device)
    timed = [c["us"]["sparsert"] for c in cases if c["us"].get("sparsert") and c["correct"]]
    fastest = min(timed) if timed else None
    floor_name = "launch, copy of X and Y" if roofline else "floor"
    lines = [f"| dtype | vs | density | cases | reached | target | bound ({floor_name}, FMA peak) | cases the "
             f"{'bound' if roofline else 'floor'} keeps below the target | the others must become |",
             "|" + " --- |" * 9]
    for (dtype, baseline, density), target in TARGETS.items():
        members = speedups([c for c in cases if c["dtype"] == dtype and abs(c["density"] - density) < 0.02],
                           baseline)
        if not members:
            continue
        reached = gmean([s for _, s in members])
        bound = capped = needed = "-"
        if fma and dtype == "float32":
            floors = [copy_floor_us(c, roofline) if roofline else fastest for c, _ in members]
            caps = [c["us"][baseline] / bound_us(c, floor, fma) for (c, _), floor in zip(members, floors)]
            low = [cap for cap in caps if cap < target]
            others = [s for (_, s), cap in zip(members, caps) if cap >= target]
            bound = f"{gmean(caps):.2f}x"
            capped = f"{len(low)} ({roofline['device']}, {roofline['date']})" if roofline else \
                f"{len(low)} (floor {fastest:.2f} us)"
            if gmean(caps) < target:
                needed = "out of reach: the bound is below the target"
            elif others:  # the factor f with gmean(low + f * others) = target
                factor = np.exp((len(caps) * np.log(target) - np.log(low).sum() - np.log(others).sum()) / len(others))
                needed = f"{factor:.2f}x faster"
        if reached >= target:
            needed = "met"
        lines.append(f"| {dtype} | {baseline} | {density:g} | {len(members)} | {reached:.2f}x | {target:g}x | "
                     f"{bound} | {capped} | {needed} |")
    return lines if len(lines) > 2 else ["No case of the targets' dtypes, densities and libraries."]


def bound_us(case, floor_us: float, fma_per_s: float) -> float:
    """The least time of ``case``: its floor, or its multiply-adds at the FMA peak."""
    return max(floor_us, case["density"] * case["M"] * case["K"] * case["N"] / fma_per_s * 1e6)


def headroom_lines(cases, device: str, roofline: dict) -> list[str]:
    """By family, at the float32 targets' densities: how far sparsert's times are above each
    case's bound (copy of X and Y, or the FMA peak), next to the speedup over cuBLAS fp32 it
    reached and the speedup that bound would allow (geometric means)."""
    fma = fma_per_s(device)
    groups = defaultdict(list)
    for case, speedup in speedups([c for c in cases if c["dtype"] == "float32"], "cublas_fp32"):
        if fma and nominal_density(case) in (0.05, 0.1):
            bound = bound_us(case, copy_floor_us(case, roofline), fma)
            groups[(nominal_density(case), family(case))].append((case, speedup, bound))
    if not groups:
        return ["No float32 case at 0.05 or 0.1 on a GPU of known FMA peak."]
    lines = ["| density | family | cases | time over its bound | reached vs cublas_fp32 | bound allows |",
             "|" + " --- |" * 6]
    for (density, label), members in sorted(groups.items()):
        over = gmean([c["us"]["sparsert"] / bound for c, _, bound in members])
        reached = gmean([s for _, s, _ in members])
        allowed = gmean([c["us"]["cublas_fp32"] / bound for c, _, bound in members])
        lines.append(f"| {density:g} | {label} | {len(members)} | {over:.2f}x | {reached:.2f}x | {allowed:.2f}x |")
    return lines


def copy_floor_us(case, roofline: dict) -> float:
    """The least time to read X and write Y of ``case`` once: the roofline's copy time,
    interpolated (log-log) at the case's bytes; past the largest copy, at its bandwidth."""
    element = 4 if case["dtype"] == "float32" else 2
    moved = element * case["N"] * (case["K"] + case["M"])
    sizes = np.array([point["bytes"] for point in roofline["copy"]], dtype=float)
    times = np.array([point["us"] for point in roofline["copy"]], dtype=float)
    if moved >= sizes[-1]:
        return float(times[-1] * moved / sizes[-1])
    copy = float(np.exp(np.interp(np.log(moved), np.log(sizes), np.log(times))))
    return max(roofline["launch_us"], copy)


def compile_lines(cases) -> list[str]:
    """Compile time (PTX generation + ptxas, cache off) and cubin size against nonzeros;
    a tuned case the ahead-of-time pool did not reach has no compile time of its own."""
    built = [c for c in cases if c.get("code_bytes") and c.get("compile_s") is not None]
    if not built:
        return ["No kernel was built."]
    lines = ["| family | cases | nonzeros (median) | compile s (median / max) | cubin KB (median / max) |"]
    lines.append("|" + " --- |" * 5)
    groups = defaultdict(list)
    for case in built:
        groups[family(case)].append(case)
    for label, members in sorted(groups.items()):
        nnz = np.median([round(c["density"] * c["M"] * c["K"]) for c in members])
        seconds = [c["compile_s"] for c in members]
        kb = [c["code_bytes"] / 1024 for c in members]
        lines.append(
            f"| {label} | {len(members)} | {nnz:,.0f} | {np.median(seconds):.1f} / {max(seconds):.1f} | "
            f"{np.median(kb):,.0f} / {max(kb):,.0f} |"
        )
    return lines


def likely_limit(case) -> str:
    params = case.get("params") or {}
    if params.get("kernel") == "csr":
        if params.get("lanes") == "columns":
            return "latency: each trip of a warp waits on its activation loads, one row of X per nonzero"
        return "the arrays: every column tile reads all values and indices again, then reduces each row"
    if case["kind"] in ("conv", "conv_transpose"):  # a transposed one's N: the model's output pixels
        if case["N"] <= 196:
            return "few output pixels: few column tiles to fill the GPU, each row group loads most taps"
        return "loads per FMA: each row group loads every tap its rows use, predicated at the borders"
    if case["N"] <= 8:
        return "instruction fetch: every column re-streams the unrolled code, nothing to amortise it"
    if case["N"] >= 1024:
        return "throughput: each row group re-reads X from L2; dense GEMM is compute-efficient here"
    if params.get("x_transposed"):  # the suite's FC layers; Nsight Compute and sweeps on the H100 at N = 512
        return ("instruction fetch and load latency, not L2 bandwidth (41% and 51% of stalls at N = 512); "
                "no tiling of this kernel does better (fc-n512-tiles-h100.md)")
    return "L2 traffic: each of the M / rows_per_block row groups re-reads all of X"


def losses(cases, kind: str) -> list[str]:
    lines = [f"| case | M x K | N | density | dtype | sparsert us | {LIBRARY[kind]} us | speedup | likely limit |"]
    lines.append("|" + " --- |" * 9)
    lost = []
    for dtype in ("float32", "float16"):
        baseline = same_precision(kind, dtype)
        lost += [(c, s, baseline) for c, s in speedups([c for c in cases if c["dtype"] == dtype], baseline) if s < 1]
    for case, speedup, baseline in sorted(lost, key=lambda t: t[1]):
        lines.append(
            f"| {case['case']} | {case['M']}x{case['K']} | {case['N']} | {case['density']:.2f} | {case['dtype']} | "
            f"{case['us']['sparsert']:.1f} | {case['us'][baseline]:.1f} | {speedup:.2f}x | {likely_limit(case)} |"
        )
    return lines


def plot(cases, path: Path, device: str, kind: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    by_group = defaultdict(list)
    for dtype in ("float32", "float16"):
        for case, speedup in speedups([c for c in cases if c["dtype"] == dtype], same_precision(kind, dtype)):
            by_group[f"{case['group']} ({dtype})"].append((case["density"], speedup, case["M"] * case["K"] * case["N"]))
    for group, points in sorted(by_group.items()):
        d, s, size = (np.array(v, dtype=float) for v in zip(*points))
        axes[0].scatter(d, s, s=14, alpha=0.7, label=group)
        axes[1].scatter(size, s, s=14, alpha=0.7)
    for ax in axes:
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
    axes[0].set_xlabel("weight density")
    axes[0].set_ylabel(f"speedup over {LIBRARY[kind]} of the same precision (log)")
    axes[1].set_xlabel("problem size M*K*N (log)")
    axes[1].set_xscale("log")
    fig.suptitle(f"sparsert kernels against {LIBRARY[kind]}, {device}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_dates(cases: list[dict], date: str) -> list[str]:
    """Where a resumed run mixes days (``suite.py --resume``): how many cases ran on each."""
    days = defaultdict(int)
    for case in cases:
        days[case.get("date", date)] += 1
    if len(days) < 2:
        return []
    counts = ", ".join(f"{n} on {day}" for day, n in sorted(days.items()))
    return [f"Resumed run: its cases ran on different days ({counts}; each case's `date`).", ""]


def main(path: str, roofline_path: str | None = None):
    source = results_json.stem(path)
    roofline = json.loads(Path(roofline_path).read_text()) if roofline_path else None
    result = results_json.load(path)
    cases = result["cases"]
    kind = cases[0]["kind"] if cases else "spmm"
    correct = sum(case["correct"] for case in cases)
    # A case sparsert declines (e.g. over the code-size cap: the pass leaves it dense) has no
    # time and is not "correct"; its error says why.
    declined = sum(case["us"]["sparsert"] is None for case in cases)
    declined_text = f", {declined} not run by sparsert (see their `error`)" if declined else ""
    text = [
        f"# {source.name}: {result['device']}, {result['date']}",
        "",
        *run_dates(cases, result["date"]),
        f"{len(cases)} cases, {correct} correct against a float64 product{declined_text}. Geometric mean of "
        "sparsert's speedup (contender time / sparsert time), timed with CUDA graphs"
        f"{COLD_NOTE if result.get('l2') == 'cold' else ''}:",
        "",
        *summary_table(cases, kind),
        "",
        "## SparseRT's targets",
        "",
        *target_lines(cases, result["device"], roofline),
        "",
        *(["## Distance to the bound (float32)", "",
           "Each case's bound is the longer of its copy of X and Y (`roofline.py`) and its "
           "multiply-adds at the FP32 FMA peak; families far above it have the most room left.", "",
           *headroom_lines(cases, result["device"], roofline), ""]
          if roofline and any(case["dtype"] == "float32" for case in cases) else []),
        "## Tuning",
        "",
        *tuning_lines(cases),
        "",
        "## Compile time and code size",
        "",
        *compile_lines(cases),
        "",
        f"## Where sparsert loses to {LIBRARY[kind]} of its own precision",
        "",
        *losses(cases, kind),
    ]
    source.parent.joinpath(source.name + ".md").write_text("\n".join(text) + "\n")
    plot(cases, source.parent / (source.name + ".png"), result["device"], kind)
    print("\n".join(text[:40]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tables and a plot from a benchmark JSON.")
    parser.add_argument("json")
    parser.add_argument("--roofline", help="roofline.py's JSON of the same GPU: bounds the targets by copy times")
    arguments = parser.parse_args()
    main(arguments.json, arguments.roofline)
