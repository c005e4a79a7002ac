"""python benchmarks/e2e.py --out benchmarks/results/e2e-h200.json [--models ...] [--batches 1 8] [--resume]

End-to-end latency of whole pruned models on the GPU: sparsert against TVM's dense build and
PyTorch, every contender in this process on the same input.

Each model of ``sparsert_tvm.models`` (random weights, batch norm folded) is magnitude-pruned
per layer by ``sparsert_tvm.prune.prune_model`` (stem and depthwise convolutions kept dense,
its defaults; ``keep_scale`` so that the output still depends on the input) and imported by TVM's ONNX frontend with the weights as constants. Contenders:

  sparsert, sparsert_cuda_graph      sparsert_tvm.compile (default thresholds) on the Relax VM,
                                     and built with TVM's CUDA-graph rewrite
  sparsert_tuned(_cuda_graph)        with --tune N: the same, every layer tuned (``TuneOptions(max_candidates=N,
                                     budget_s=--tune-budget)``, the run's database X.tuning.json beside X.json)
  tvm_dense, tvm_dense_cuda_graph    tvm.compile of the same module, both ways
  torch_fp32, torch_tf32, torch_fp16 the same ONNX graph run by eager PyTorch (onnx_torch.py),
                                     cuDNN's fastest algorithm per shape, TF32 off unless named

TVM's figures come from the VM's time evaluator (median of 7 repeats of at least 200 ms,
``sparsert_tvm.bench.end_to_end_us``); PyTorch's from a CUDA graph of the forward pass timed
with CUDA events (``harness.graph_time_us``). The sparse output is checked against TVM's dense
output (1e-4 of the output's scale: both are fp32 sums, in another order) and against
PyTorch fp32 (1e-3: cuDNN may pick Winograd or FFT algorithms, less exact in fp32). Also
recorded: the sparse build's per-call time split (``bench.call_times``: each call between two
device syncs), compile times (with the kernel cache as found: SPARSERT_CACHE=0 for cold ones),
and the sparsity report's counts. A contender that cannot run is null, with a note.

``--out X.json`` writes X.json, X.md and, with matplotlib, X.png, after every model;
``--deadline`` starts no model after that many seconds and ``--resume`` keeps the entries
X.json holds, so a long run can take several calls. Batch 1 runs first, cheap models first.
``--dtype float16`` converts the imported module with TVM's ``ToMixedPrecision`` (every
operator in float16) for both TVM builds, and checks sparsert against them and PyTorch fp16
(5e-2 of the scale: each layer rounds its sums to float16).
``--target llvm --small`` runs small versions on the CPU (PyTorch fp32 only, wall-clock
timing): a smoke test of this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsert_tvm  # noqa: E402
from harness import graph_time_us  # noqa: E402
from onnx_torch import OnnxModule  # noqa: E402
from sparsert_tvm import bench, models  # noqa: E402
from sparsert_tvm.build import cuda_target, host_cpu_target  # noqa: E402
from sparsert_tvm.cache import cache_dir  # noqa: E402
from sparsert_tvm.errors import last_line  # noqa: E402
from sparsert_tvm.prune import prune_model  # noqa: E402
import results_json  # noqa: E402

MODELS = {  # cheapest first: a run cut short by its deadline has the cheap models
    "dcgan": models.dcgan_generator,
    "mobilenet_v1": models.mobilenet_v1,
    "mobilenet_v2": models.mobilenet_v2,
    "resnet50": models.resnet50,
    "bert_base": models.bert_encoder,
}
SMALL = {  # --small: versions that build in seconds on a CPU (as tests/test_models.py's)
    "dcgan": {"width": 0.125, "size": 16, "latent": 16},
    "mobilenet_v1": {"width": 0.25, "depth": 3, "size": 32, "classes": 10},
    "mobilenet_v2": {"width": 0.5, "depth": 3, "size": 32, "classes": 10},
    "resnet50": {"width": 0.125, "blocks": (1, 1), "size": 32, "classes": 10},
    "bert_base": {"layers": 1, "hidden": 64, "heads": 2, "ffn": 128, "seq": 8},
}
CONTENDERS = ("sparsert", "sparsert_cuda_graph", "tvm_dense", "tvm_dense_cuda_graph",
              "torch_fp32", "torch_tf32", "torch_fp16")
TUNED = ("sparsert_tuned", "sparsert_tuned_cuda_graph")  # with --tune
TORCH_MODES = {"torch_fp32": "fp32", "torch_tf32": "tf32", "torch_fp16": "fp16"}
COMPARISONS = {  # (output, reference): tolerance relative to the output's scale, None: recorded only
    "float32": {
        ("sparsert", "tvm_dense"): 1e-4,
        ("sparsert_tuned", "tvm_dense"): 1e-4,
        ("sparsert", "torch_fp32"): 1e-3,
        ("torch_tf32", "torch_fp32"): None,
        ("torch_fp16", "torch_fp32"): None,
    },
    # Both TVM builds round every operator's sums to float16 (the unrolled kernels after every
    # FMA), in different orders, through ~50 layers; PyTorch's fp16 convolutions sum in float32.
    "float16": {
        ("sparsert", "tvm_dense"): 5e-2,
        ("sparsert_tuned", "tvm_dense"): 5e-2,
        ("sparsert", "torch_fp16"): 5e-2,
        ("sparsert", "torch_fp32"): None,
        ("tvm_dense", "torch_fp32"): None,
        ("torch_fp16", "torch_fp32"): None,
    },
}
DTYPE_NOTE = ("float16: both TVM builds (sparsert, tvm_dense) are the model after relax.transform.ToMixedPrecision"
              "(out_dtype='float16'), input and output cast at the ends; PyTorch runs as named.\n")
TOP_CALLS = 10
TIMING = {
    "cuda": "Microseconds per inference (median). TVM builds: Relax VM time evaluator, plain and built with TVM's "
            "CUDA-graph rewrite; PyTorch: eager, captured in a CUDA graph, timed with CUDA events.",
    "llvm": "CPU smoke run, microseconds per inference (median). TVM builds: Relax VM time evaluator; "
            "PyTorch: eager, wall-clock time.",
}


def build_model(name: str, batch: int, small: bool):
    return MODELS[name](np.random.default_rng(0), batch=batch, **(SMALL[name] if small else {}))


@dataclass
class Where:
    """Where the contenders run: TVM's target and device, and PyTorch's device."""

    target: tvm.target.Target
    device: tvm.runtime.Device
    torch_device: torch.device

    @classmethod
    def of(cls, target: str) -> Where:
        if target == "cuda":
            return cls(cuda_target(), tvm.cuda(0), torch.device("cuda"))
        return cls(host_cpu_target(), tvm.cpu(0), torch.device("cpu"))

    @property
    def cuda(self) -> bool:
        return self.torch_device.type == "cuda"


def measure_tvm(label, builder, report, where: Where, x, runs, split) -> tuple[bench.BuildTimes, np.ndarray]:
    """Compiles ``builder(report)``, runs it once for its output and times it on the Relax VM;
    on CUDA also as built under TVM's CUDA-graph rewrite (``builder(None)``)."""
    device = where.device
    arrays = [tvm.runtime.tensor(x, device)]
    start = time.perf_counter()
    executable = builder(report)
    compile_s = time.perf_counter() - start
    vm = relax.VirtualMachine(executable, device)
    output = vm["main"](*arrays).numpy()
    times = bench.BuildTimes(label, compile_s, bench.end_to_end_us(vm, device, arrays))
    if split:
        times.calls = bench.call_times(executable, device, arrays, runs)
    if where.cuda:
        times.cuda_graph_us, times.cuda_graph_note = bench.with_cuda_graph(
            functools.partial(builder, None), device, arrays, output)
    else:
        times.cuda_graph_note = "CUDA only"
    return times, output


def measure_torch(model, x: np.ndarray, mode: str, device: torch.device, runs: int) -> tuple[float, np.ndarray]:
    """PyTorch running the ONNX graph in ``mode`` (fp32, tf32, fp16). Returns (us, output)."""
    dtype = torch.float16 if mode == "fp16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.benchmark = True  # cuDNN's fastest algorithm per shape, picked during the warm-up
    try:
        module = OnnxModule(model).to(device, dtype)
        x_torch = torch.from_numpy(x).to(device, dtype)

        def step(_):
            return module(x_torch)

        with torch.inference_mode():
            us = graph_time_us(step, [x_torch], replays=runs) if device.type == "cuda" else wall_time_us(step, runs)
            return us, step(0).float().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def wall_time_us(step, runs: int) -> float:
    """CPU smoke runs only: median wall time of ``runs`` calls after a warm-up."""
    step(0)
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        step(i)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e6


def run_entry(name: str, sparsity: float, batch: int, where: Where, args, say) -> dict:
    model, pruned_layers = prune_model(build_model(name, batch, args.small), sparsity, keep_scale=True)
    mod = from_onnx(model, keep_params_in_input=False)
    if args.dtype == "float16":  # both TVM builds; the input and output stay float32
        mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    x = models.random_input(model)
    entry = {"model": name, "sparsity": sparsity, "batch": batch, "dtype": args.dtype, "input": list(x.shape),
             "us": dict.fromkeys(CONTENDERS + (TUNED if args.tune else ())), "notes": {}, "compile_s": {}}
    outputs, report = {}, sparsert_tvm.SparsityReport()
    builders = {"sparsert": lambda report: sparsert_tvm.compile(mod, where.target, report=report)}
    tuned_report = sparsert_tvm.SparsityReport()
    if args.tune:
        options = sparsert_tvm.TuneOptions(max_candidates=args.tune, budget_s=args.tune_budget,
                                           database=tuning_database(args.out))
        builders["sparsert_tuned"] = lambda report: sparsert_tvm.compile(mod, where.target, report=report, tune=options)
    if args.dtype == "float16" and where.cuda:  # a crash would end the whole run
        entry["notes"]["tvm_dense"] = "not built in float16: TVM's CUDA build segfaulted on MobileNet v1 (dlight tensorize)"
    else:
        builders["tvm_dense"] = lambda report: tvm.compile(mod, where.target)
    for label, builder in builders.items():
        say(f"{label}: compiling and timing")
        try:
            times, outputs[label] = measure_tvm(label, builder, tuned_report if label == "sparsert_tuned" else report,
                                                where, x, args.runs, label == "sparsert")
        except Exception as error:  # noqa: BLE001 - a contender that cannot run is null
            entry["notes"][label] = last_line(error)
            continue
        entry["us"][label], entry["us"][f"{label}_cuda_graph"] = times.end_to_end_us, times.cuda_graph_us
        entry["compile_s"][label] = round(times.compile_s, 2)
        if times.cuda_graph_note:
            entry["notes"][f"{label}_cuda_graph"] = times.cuda_graph_note
        if times.calls:
            entry["split"] = [dataclasses.asdict(call) for call in times.top(TOP_CALLS)]
            entry["split_by_kind"] = {**times.by_kind(), "total": sum(times.by_kind().values())}
    entry["layers"] = layer_counts(report, pruned_layers)
    if args.tune:
        entry["tuning"] = tuning_summary(tuned_report, args)
    for label, mode in TORCH_MODES.items():
        if not where.cuda and mode != "fp32":
            entry["notes"][label] = "CUDA only"
            continue
        say(f"{label}: timing")
        try:
            entry["us"][label], outputs[label] = measure_torch(model, x, mode, where.torch_device, args.runs)
        except Exception as error:  # noqa: BLE001 - a contender that cannot run is null
            entry["notes"][label] = last_line(error)
    entry["max_rel_error"], entry["correct"] = check(outputs, COMPARISONS[args.dtype])
    return entry


def layer_counts(report: sparsert_tvm.SparsityReport, pruned_layers) -> dict:
    sparse = report.sparse_layers
    return {
        "rewritten": len(sparse), "candidates": len(report.layers), "nnz": sum(layer.nnz for layer in sparse),
        "kernel_generation_s": round(sum(layer.compile_s for layer in sparse), 2),
        "pruned": sum(layer.pruned for layer in pruned_layers), "weight_layers": len(pruned_layers),
    }


def tuning_database(out: str) -> Path:
    """The run's own database, beside its results: each layer is tuned once per run, and
    a later run with the same file reuses what it holds."""
    return Path(out).with_suffix(".tuning.json")


def tuning_summary(report: sparsert_tvm.SparsityReport, args) -> dict:
    """How the tuned build's layers got their configs, the time the tuner spent, and its own
    estimate (single cold launches) of what that saved per layer."""
    sparse = report.sparse_layers
    sources = [layer.params.get("config_source", "default") for layer in sparse]
    timed = [layer.params for layer in sparse if "tuned_us" in layer.params]
    return {
        "max_candidates": args.tune, "budget_s": args.tune_budget,
        "configs": {source: sources.count(source) for source in sorted(set(sources))},
        "tune_s": round(sum(params["tune_s"] for params in timed), 1),
        "cold_us_default": round(sum(params["default_us"] for params in timed), 1),
        "cold_us_tuned": round(sum(params["tuned_us"] for params in timed), 1),
    }


def check(outputs: dict, comparisons: dict) -> tuple[dict, bool]:
    """Errors of the outputs that ran against their references; correct if sparsert's were
    measured against at least one reference and are all within tolerance."""
    errors, checked = {}, []
    for (label, reference), tolerance in comparisons.items():
        if label in outputs and reference in outputs:
            error = bench.relative_error(outputs[label], outputs[reference])
            errors[f"{label}_vs_{reference}"] = error
            if tolerance is not None:
                checked.append(error < tolerance)
    return errors, bool(checked) and all(checked)


# -- output ------------------------------------------------------------------------------
def best(entry: dict, label: str) -> float | None:
    """A TVM build's faster figure (plain VM or CUDA graph), or the contender's only one."""
    values = [entry["us"].get(key) for key in (label, f"{label}_cuda_graph")]
    return min((v for v in values if v), default=None)


def _us(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _speedup(ours, theirs) -> str:
    return f"{theirs / ours:.2f}x" if ours and theirs else "-"


def _cells(entry: dict) -> list:
    """The model, sparsity and batch columns of a table."""
    return [entry["model"], f"{entry['sparsity']:.0%}", entry["batch"]]


def _name(entry: dict) -> str:
    return f"{entry['model']} {entry['sparsity']:.0%} batch {entry['batch']}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def contenders(entries: list[dict]) -> tuple[str, ...]:
    """The contenders of the run: the tuned build's only where it was asked for."""
    tuned = any(TUNED[0] in e["us"] for e in entries)
    return CONTENDERS[:2] + (TUNED if tuned else ()) + CONTENDERS[2:]


def markdown(result: dict) -> list[str]:
    entries, shown = result["models"], contenders(result["models"])
    tuned = TUNED[0] in shown
    latency = _table(["model", "sparsity", "batch", *shown, "correct"],
                     [[*_cells(e), *(_us(e["us"].get(c)) for c in shown), "yes" if e["correct"] else "NO"]
                      for e in entries])
    others = ("tvm_dense", *TORCH_MODES)
    speedups = _table(["model", "sparsity", "batch", *(f"vs {c}" for c in others),
                       *(["tuned over untuned"] if tuned else [])],
                      [[*_cells(e), *(_speedup(best(e, "sparsert"), best(e, c)) for c in others),
                        *([_speedup(best(e, TUNED[0]), best(e, "sparsert"))] if tuned else [])]
                       for e in entries])
    builds = _table(
        ["model", "sparsity", "batch", "rewritten / candidates", "nnz", "compile s (sparse / dense)",
         "sparse build by kind (us per run)", "max error"],
        [[*_cells(e), f"{e['layers']['rewritten']} / {e['layers']['candidates']}", f"{e['layers']['nnz']:,}",
          " / ".join(str(e["compile_s"].get(label, "-")) for label in ("sparsert", "tvm_dense")),
          ", ".join(f"{k} {v:,.0f}" for k, v in e.get("split_by_kind", {}).items()) or "-",
          ", ".join(f"{k} {v:.1e}" for k, v in e["max_rel_error"].items()) or "-"] for e in entries])
    lines = [
        f"# End-to-end latency: {result['device']}, {result['date']}", "",
        TIMING[result["target"]], "",
        *([DTYPE_NOTE] if result.get("dtype") == "float16" else []),
        *latency, "", "Speedup of sparsert (its faster figure) over each contender (TVM dense: its faster figure):", "",
        *speedups, "", "Layers, compile time, the sparse build's instrumented time by kind, output errors:", "",
        *builds,
    ]
    tuning = [[*_cells(e), f"{t['max_candidates']} / {t['budget_s']:g}",
               ", ".join(f"{k} {v}" for k, v in t["configs"].items()), t["tune_s"],
               f"{t['cold_us_default']:,.1f} -> {t['cold_us_tuned']:,.1f}"]
              for e in entries if (t := e.get("tuning")) and e["us"].get(TUNED[0])]
    if tuning:
        lines += ["", "Tuning (configs by source; the tuner's own sums of single cold launches over the tuned layers):",
                  "", *_table(["model", "sparsity", "batch", "candidates / budget s", "configs", "tune s",
                               "cold us default -> tuned"], tuning)]
    notes = [f"- {_name(e)}, {label}: {note}" for e in entries for label, note in e["notes"].items()]
    if notes:
        lines += ["", "Contenders not measured, and why:", "", *notes]
    for e in entries:
        if e.get("split"):
            calls = [[c["name"], c["kind"], c["calls"], f"{c['us']:,.1f}"] for c in e["split"][:5]]
            lines += ["", f"Slowest calls of the sparse build, {_name(e)}:", "",
                      *_table(["call", "kind", "calls per run", "us per run"], calls)]
    return lines


def plot(result: dict, path: Path) -> None:
    """Grouped bars: each contender's latency per model, sparsity and batch (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries, shown = result["models"], contenders(result["models"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(entries)), 4.5))
    width = 0.8 / len(shown)
    for i, contender in enumerate(shown):
        values = [e["us"].get(contender) or np.nan for e in entries]  # a missing contender draws no bar
        ax.bar(np.arange(len(entries)) + (i - len(shown) / 2 + 0.5) * width, values, width, label=contender)
    ax.set_xticks(np.arange(len(entries)), [f"{e['model']}\n{e['sparsity']:.0%} b{e['batch']}" for e in entries])
    ax.set_yscale("log")
    ax.set_ylabel("us per inference (log)")
    ax.set_title(f"End-to-end latency, {result['device']}", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> list[str]:
    out.write_text(results_json.dumps(result))
    lines = markdown(result)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        pass  # matplotlib is optional: the JSON and the table are the results
    return lines


def device_name(target: str) -> str:
    if target == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="X.json; X.md and X.png are written beside it")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["mobilenet_v1", "resnet50"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9], help="e.g. 0.9 0.95")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=20,
                        help="instrumented runs for the split; at most this many CUDA-graph replays for PyTorch")
    parser.add_argument("--deadline", type=float, default=None, help="start no model after this many seconds")
    parser.add_argument("--resume", action="store_true", help="keep the entries --out holds, run the rest")
    parser.add_argument("--target", choices=["cuda", "llvm"], default="cuda", help="llvm: a CPU smoke run")
    parser.add_argument("--small", action="store_true", help="small versions of the models (CPU smoke runs)")
    parser.add_argument("--tune", type=int, default=0, metavar="CANDIDATES",
                        help="also build with the autotuner, this many candidates per layer (sparsert_tuned)")
    parser.add_argument("--tune-budget", type=float, default=30.0, help="seconds of tuning per layer at most")
    parser.add_argument("--dtype", choices=list(COMPARISONS), default="float32",
                        help="float16: both TVM builds converted by relax.transform.ToMixedPrecision (CUDA)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.target == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: --target llvm --small runs a CPU smoke test")
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(args.target), "date": datetime.date.today().isoformat(), "target": args.target,
              "small": args.small, "dtype": args.dtype, "kernel_cache": str(cache_dir()) if cache_dir() else None,
              "models": []}
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        kind = (previous["device"], previous["small"], previous.get("dtype", "float32"))
        if kind != (result["device"], result["small"], result["dtype"]):
            sys.exit(f"{out} holds {kind} (device, small, dtype): not resuming it here")
        result["models"] = previous["models"]
    done = {(e["model"], e["sparsity"], e["batch"]) for e in result["models"]}
    todo = [(name, sparsity, batch) for batch in sorted(args.batches) for sparsity in args.sparsity
            for name in MODELS if name in args.models and (name, sparsity, batch) not in done]
    print(f"{len(todo)} models to run ({len(done)} resumed) on {result['device']}", flush=True)
    where, lines = Where.of(args.target), markdown(result)
    for i, (name, sparsity, batch) in enumerate(todo):
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            print(f"deadline: {len(todo) - i} models left for --resume", flush=True)
            break
        label = f"[{i + 1}/{len(todo)}] {name} {sparsity:.0%} batch {batch}"
        entry = run_entry(name, sparsity, batch, where, args, lambda step: print(f"{label}: {step}", flush=True))
        result["models"].append(entry)
        lines = write(result, out)
        us = ", ".join(f"{c} {_us(value)}" for c, value in entry["us"].items())
        print(f"{label}: {us} us; correct: {entry['correct']}", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
