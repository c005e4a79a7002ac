"""End-to-end latency of a model, sparse against dense, with the per-layer time split.

Both builds come from the same Relax module: ``sparsert_tvm.compile`` (the pass, then
``tvm.compile``) and plain ``tvm.compile``. End-to-end times come from the Relax VM's time
evaluator. The split comes from the VM's instrumentation hook: every call the VM makes is
timed between two device synchronisations, so the split's total is a little above the
end-to-end time (each call pays a synchronisation), and the VM's own bookkeeping
(allocations, shape checks) is left out of it; it says where the kernel time goes, the
end-to-end figure says how fast the model is. (TVM 0.27's ``VirtualMachine`` has no
``profile=`` option and its runtime no VM profiler, hence the hook.)

On CUDA each build is also compiled with TVM's CUDA-graph rewrite
(``relax.backend.use_cuda_graph``), which captures the static launch sequence once and
replays it; its latency is reported beside the plain one, or why it could not be used.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from . import build
from .errors import last_line
from .report import SparsityReport
from .tuning.measure import relative_error

CUDA_GRAPH_CONFIG = {"relax.backend.use_cuda_graph": True}


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
    cuda_graph_us: float | None = None  # the same build with TVM's CUDA-graph rewrite
    cuda_graph_note: str = ""  # why there is no CUDA-graph figure

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


def bench(mod: tvm.IRModule, target, inputs: list[np.ndarray], density_threshold=None, progress=None,
          **options) -> BenchResult:
    """Builds ``mod`` dense and sparse for ``target``, compares their outputs and times both
    (on CUDA, with and without CUDA graphs); ``progress(message)`` hears each step."""
    say = progress or (lambda message: None)
    device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    arrays = [tvm.runtime.tensor(a, device) for a in inputs]
    report = SparsityReport()
    builders = {
        "dense (TVM)": lambda report: tvm.compile(mod, target),
        "sparse (sparsert)": lambda report: build.compile(mod, target, density_threshold, report=report, **options),
    }
    results, outputs = [], []
    for label, builder in builders.items():
        say(f"{label}: compiling")
        start = time.perf_counter()
        executable = builder(report)
        compile_s = time.perf_counter() - start
        vm = relax.VirtualMachine(executable, device)
        outputs.append(_first_output(vm["main"](*arrays)))
        say(f"{label}: timing")
        times = BuildTimes(label, compile_s, end_to_end_us(vm, device, arrays))
        times.calls = call_times(executable, device, arrays)  # a VM of its own: it stays instrumented
        if target.kind.name == "cuda":
            say(f"{label}: compiling and timing with CUDA graphs")
            graph_times = with_cuda_graph(functools.partial(builder, None), device, arrays, outputs[-1])
            times.cuda_graph_us, times.cuda_graph_note = graph_times
        results.append(times)
    expected, got = outputs
    return BenchResult(results[0], results[1], report, relative_error(got, expected))


def with_cuda_graph(builder, device, arrays, expected: np.ndarray) -> tuple[float | None, str]:
    """Latency of ``builder()``'s executable built under TVM's CUDA-graph rewrite, or why not.

    Any failure (TVM's rewrite, the capture, a wrong output) is reported rather than raised:
    the plain figures stand without it.
    """
    try:
        with tvm.transform.PassContext(config=CUDA_GRAPH_CONFIG):
            executable = builder()
        vm = relax.VirtualMachine(executable, device)
        error = relative_error(_first_output(vm["main"](*arrays)), expected)
        if not error < 1e-4:
            return None, f"output differs from the plain build (relative error {error:.1e})"
        return end_to_end_us(vm, device, arrays), ""
    except Exception as error:  # noqa: BLE001 - whatever fails, the report says what
        return None, last_line(error)


def _first_output(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else value[0].numpy()


_WARMUP_RUNS = 10
# After a parallel call the worker threads of TVM's CPU runtime spin on sched_yield for a
# while, about 0.2 s on an idle 2-core machine and 0.75 s on a busy one, and OpenMP's (PyTorch)
# spin too: a library timed next shares the cores with them. PyTorch's dense product ran up to
# 4x slower right after one of our kernels, and a kernel of ours 4x slower after PyTorch.
_THREAD_POOL_SPIN_S = 0.5


def wait_for_idle_threads() -> None:
    """Lets the thread pools of the library timed last on the CPU go quiet before another one is timed."""
    time.sleep(_THREAD_POOL_SPIN_S)


def onnxruntime_us(path: str, inputs: list[np.ndarray], target, runs: int = 50) -> tuple[float | None, str]:
    """onnxruntime's median latency on the same device kind, or None and why not."""
    try:
        import onnxruntime
    except ImportError:
        return None, "not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
    providers = ["CUDAExecutionProvider"] if target.kind.name == "cuda" else ["CPUExecutionProvider"]
    if not set(providers) <= set(onnxruntime.get_available_providers()):
        return None, f"this onnxruntime has no {providers[0]}"
    try:  # an older onnxruntime may not read the file (IR version, opset)
        session = onnxruntime.InferenceSession(path, providers=providers)
        feed = dict(zip([i.name for i in session.get_inputs()], inputs))
        if target.kind.name != "cuda":
            wait_for_idle_threads()
        for _ in range(_WARMUP_RUNS):  # its first runs allocate and spin up threads
            session.run(None, feed)
    except Exception as error:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
        return None, f"onnxruntime {onnxruntime.__version__} failed: {last_line(error)}"
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e6, ""


def table(result: BenchResult, onnxruntime: tuple[float | None, str] | None = None, top: int = 8, width: int = 120) -> str:
    """End-to-end figures (with CUDA graphs and onnxruntime where measured), the split by kind
    of call with its total, and the slowest calls of each build."""
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
    notes = []
    for build_times in (dense, sparse):
        rows = [(build_times.label, build_times.end_to_end_us, f"{build_times.compile_s:.1f} s")]
        if build_times.cuda_graph_us is not None:
            rows.append((f"{build_times.label} + CUDA graph", build_times.cuda_graph_us, "-"))
            gain = build_times.end_to_end_us / build_times.cuda_graph_us
            notes.append(f"CUDA graph, {build_times.label}: {gain:.2f}x ({'helped' if gain > 1 else 'did not help'})")
        elif build_times.cuda_graph_note:
            notes.append(f"CUDA graph, {build_times.label}: not used ({build_times.cuda_graph_note})")
        for label, us, compile_time in rows:
            summary.add_row(label, f"{us:,.1f} us", f"{dense.end_to_end_us / us:.2f}x", compile_time)
    if onnxruntime is not None:
        us, note = onnxruntime
        if us is None:
            notes.append(f"onnxruntime: {note}")
        else:
            summary.add_row("onnxruntime", f"{us:,.1f} us", f"{dense.end_to_end_us / us:.2f}x", "-")
    console.print(summary)
    for note in notes:
        console.print(note)
    split = Table(title="kernel time split (each call timed between two device syncs)", title_justify="left")
    for column in ("kind", *(b.label for b in (dense, sparse))):
        split.add_column(column, justify="left" if column == "kind" else "right")
    kinds = {**dense.by_kind(), **sparse.by_kind()}
    for kind in sorted(kinds):
        split.add_row(kind, *(f"{b.by_kind().get(kind, 0.0):,.1f} us" for b in (dense, sparse)))
    split.add_section()
    split.add_row("total", *(f"{sum(b.by_kind().values()):,.1f} us" for b in (dense, sparse)))
    console.print(split)
    for build_times in (dense, sparse):
        calls = Table(title=f"slowest calls, {build_times.label}", title_justify="left")
        for column in ("call", "kind", "calls per run", "time per run"):
            calls.add_column(column, justify="left" if column in ("call", "kind") else "right")
        for call in build_times.top(top):
            calls.add_row(call.name, call.kind, str(call.calls), f"{call.us:,.1f} us")
        console.print(calls)
    return buffer.getvalue()


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError("--plot needs matplotlib: pip install 'sparsert-tvm[plot]'") from error
    return matplotlib


def plot(dense: BuildTimes, sparse: BuildTimes, path: str) -> None:
    """Stacked bars of each build's time by kind of call."""
    require_matplotlib().use("Agg")
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
