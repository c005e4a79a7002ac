"""End-to-end latency of a model, sparse against dense, with the per-layer time split.

Both builds come from the same Relax module: ``sparsert_tvm.compile`` (the pass, then
``tvm.compile``) and plain ``tvm.compile``. End-to-end times come from the Relax VM's time
evaluator. The split comes from the VM's instrumentation hook: every call the VM makes is
timed between two device synchronisations, so the split's total is a little above the
end-to-end time (each call pays a synchronisation), and the VM's own bookkeeping
(allocations, shape checks) is left out of it; it says where the kernel time goes, the
end-to-end figure says how fast the model is.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from . import build
from .report import SparsityReport


@dataclass
class CallTime:
    name: str  # the function the VM called (a kernel or a runtime builtin)
    kind: str  # "sparse kernel" or "TVM kernel"
    us: float  # per run, summed over the calls
    calls: int  # per run


@dataclass
class BuildTimes:
    label: str
    compile_s: float
    end_to_end_us: float
    calls: list[CallTime] = field(default_factory=list)

    def top(self, n: int = 10) -> list[CallTime]:
        return sorted(self.calls, key=lambda c: -c.us)[:n]

    def by_kind(self) -> dict[str, float]:
        totals = defaultdict(float)
        for call in self.calls:
            totals[call.kind] += call.us
        return dict(totals)


def kind_of(symbol: str) -> str:
    if symbol.startswith("sparsert_"):
        return "sparse kernel"
    if symbol.startswith("vm.builtin") or symbol.startswith("relax."):
        return "runtime"
    return "TVM kernel"


def end_to_end_us(vm: relax.VirtualMachine, device, inputs, min_ms: int = 200) -> float:
    timer = vm.time_evaluator("main", device, number=1, repeat=7, min_repeat_ms=min_ms)
    return float(np.median(timer(*inputs).results)) * 1e6


def call_times(executable, device, inputs, runs: int = 5) -> list[CallTime]:
    """Per function the VM calls: time per run, from ``runs`` instrumented runs after a warm-up."""
    vm = relax.VirtualMachine(executable, device)
    vm["main"](*inputs)
    totals, counts, started = defaultdict(float), defaultdict(int), {}

    def instrument(func, symbol, before_run, ret_value, *args):
        if kind_of(symbol) == "runtime":
            return  # allocations and shape bookkeeping: the callback would cost more than they do
        device.sync()
        if before_run:
            started[symbol] = time.perf_counter()
        else:
            totals[symbol] += time.perf_counter() - started.pop(symbol)
            counts[symbol] += 1

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*inputs)
    return [CallTime(s, kind_of(s), totals[s] * 1e6 / runs, counts[s] // runs) for s in totals]


@dataclass
class BenchResult:
    dense: BuildTimes
    sparse: BuildTimes
    report: SparsityReport
    max_rel_error: float  # of the sparse build's (first) output against the dense build's

    @property
    def speedup(self) -> float:
        return self.dense.end_to_end_us / self.sparse.end_to_end_us


def bench(mod: tvm.IRModule, target, inputs: list[np.ndarray], density_threshold=None, **options) -> BenchResult:
    """Builds ``mod`` dense and sparse for ``target``, compares their outputs and times both."""
    device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    arrays = [tvm.runtime.tensor(a, device) for a in inputs]
    results, outputs = [], []
    report = SparsityReport()
    for label in ("dense (TVM)", "sparse (sparsert)"):
        start = time.perf_counter()
        if label.startswith("dense"):
            executable = tvm.compile(mod, target)
        else:
            executable = build.compile(mod, target, density_threshold, report=report, **options)
        compile_s = time.perf_counter() - start
        vm = relax.VirtualMachine(executable, device)
        outputs.append(_first_output(vm["main"](*arrays)))
        times = BuildTimes(label, compile_s, end_to_end_us(vm, device, arrays))
        times.calls = call_times(executable, device, arrays)  # a VM of its own: it stays instrumented
        results.append(times)
    expected, got = outputs
    error = float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))) if expected.size else 0.0
    return BenchResult(results[0], results[1], report, error)


def _first_output(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else value[0].numpy()


def onnxruntime_us(path: str, inputs: list[np.ndarray], target, runs: int = 50) -> float | None:
    """onnxruntime's median latency on the same device kind, or None where it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    providers = ["CUDAExecutionProvider"] if target.kind.name == "cuda" else ["CPUExecutionProvider"]
    if not set(providers) <= set(onnxruntime.get_available_providers()):
        return None
    session = onnxruntime.InferenceSession(path, providers=providers)
    feed = dict(zip([i.name for i in session.get_inputs()], inputs))
    session.run(None, feed)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e6


def table(result: BenchResult, onnxruntime: float | None = None, top: int = 8, width: int = 120) -> str:
    """End-to-end figures, the split by kind of call, and the slowest calls of each build."""
    import io

    from rich.console import Console
    from rich.table import Table

    dense, sparse = result.dense, result.sparse
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, no_color=True, highlight=False)
    console.print(f"sparse output against the dense build: max error {result.max_rel_error:.1e} of the output's scale")
    summary = Table(title="end to end (Relax VM time evaluator, median)", title_justify="left")
    for column in ("build", "latency", "vs dense TVM", "compile"):
        summary.add_column(column, justify="left" if column == "build" else "right")
    for build_times in (dense, sparse):
        speedup = dense.end_to_end_us / build_times.end_to_end_us
        summary.add_row(build_times.label, f"{build_times.end_to_end_us:,.1f} us", f"{speedup:.2f}x",
                        f"{build_times.compile_s:.1f} s")
    if onnxruntime is not None:
        summary.add_row("onnxruntime", f"{onnxruntime:,.1f} us", f"{dense.end_to_end_us / onnxruntime:.2f}x", "-")
    console.print(summary)
    split = Table(title="kernel time split (each call timed between two device syncs)", title_justify="left")
    for column in ("kind", *(b.label for b in (dense, sparse))):
        split.add_column(column, justify="left" if column == "kind" else "right")
    kinds = {**dense.by_kind(), **sparse.by_kind()}
    for kind in sorted(kinds):
        split.add_row(kind, *(f"{b.by_kind().get(kind, 0.0):,.1f} us" for b in (dense, sparse)))
    console.print(split)
    for build_times in (dense, sparse):
        calls = Table(title=f"slowest calls, {build_times.label}", title_justify="left")
        for column in ("call", "kind", "calls per run", "time per run"):
            calls.add_column(column, justify="left" if column in ("call", "kind") else "right")
        for call in build_times.top(top):
            calls.add_row(call.name, call.kind, str(call.calls), f"{call.us:,.1f} us")
        console.print(calls)
    return buffer.getvalue()


def plot(dense: BuildTimes, sparse: BuildTimes, path: str) -> None:
    """Stacked bars of each build's time by kind of call."""
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError("--plot needs matplotlib: pip install 'sparsert-tvm[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    builds = (dense, sparse)
    kinds = sorted({k for b in builds for k in b.by_kind()})
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(builds))
    for kind in kinds:
        values = np.array([b.by_kind().get(kind, 0.0) for b in builds])
        ax.bar([b.label for b in builds], values, bottom=bottom, label=kind)
        bottom += values
    ax.set_ylabel("us per run (instrumented)")
    ax.set_title(" vs ".join(f"{b.label}: {b.end_to_end_us:,.0f} us" for b in builds), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
