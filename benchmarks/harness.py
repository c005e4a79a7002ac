"""Timing and contenders for the kernel benchmarks (GPU machine with torch).

Every contender is timed the same way: a CUDA graph of ``calls`` launches over rotating
input buffers, replayed and timed with CUDA events; the median per launch is reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import tvm
import tvm_ffi

from sparsert_tvm.build import cuda_target
from sparsert_tvm.problem import Layout, SpmmProblem
from sparsert_tvm.schedules.cuda.rule import CudaSpmmRule
from sparsert_tvm.weights import SparseMatrix

ROTATE = 4  # distinct input/output buffers cycled through inside a graph


def graph_time_us(step, calls: int = 20, replays: int = 30) -> float:
    """Median time per call of ``step(i)`` captured ``calls`` times in a CUDA graph."""
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
        for i in range(calls):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


@dataclass
class SpmmCase:
    """``Y = A @ X`` in one of the two layouts, with torch operands on the GPU."""

    name: str
    group: str
    weight: np.ndarray  # A[M, K]
    layout: Layout
    columns: int  # N: rows of X (ROWS) or spatial positions (CHANNELS)

    @property
    def shape(self):
        m, k = self.weight.shape
        return m, k, self.columns

    def x_shape(self):
        m, k = self.weight.shape
        return (self.columns, k) if self.layout is Layout.ROWS else (1, k, self.columns)

    def y_shape(self):
        m, k = self.weight.shape
        return (self.columns, m) if self.layout is Layout.ROWS else (1, m, self.columns)

    def problem(self) -> SpmmProblem:
        return SpmmProblem(SparseMatrix.from_dense(self.weight), self.layout, "float32", self.x_shape(), self.y_shape())

    def inputs(self, dtype=torch.float32):
        gen = torch.Generator(device="cuda").manual_seed(0)
        return [torch.randn(self.x_shape(), device="cuda", dtype=dtype, generator=gen) for _ in range(ROTATE)]

    def dense_product(self, w, x):
        """The same product with a dense (or torch sparse) weight ``w``."""
        if self.layout is Layout.ROWS:
            return x @ w.t() if w.layout == torch.strided else (w @ x.t()).t()
        return w @ x[0]


def time_sparsert(case: SpmmCase, config=None):
    """Our kernel as the pass would use it: with the transpose of X it may ask for (done here
    by torch, inside the timed graph). Returns (us, output, info)."""
    rule = CudaSpmmRule()
    problem = case.problem()
    if rule.transposes_input(problem):
        problem = dataclasses.replace(problem, x_transposed=True)
    target = cuda_target()
    config = config or rule.default_config(problem, target)
    start = time.perf_counter()
    built = rule.build(problem, config, target, "bench")
    lib = tvm.tirx.build(tvm.IRModule({"bench": built.func}), target=target)
    for module in built.external_modules:
        lib.import_module(module)
    compile_s = time.perf_counter() - start
    xs = case.inputs()
    ys = [torch.empty(case.y_shape(), device="cuda") for _ in xs]
    operands = [x.t().contiguous() if problem.x_transposed else x for x in xs]
    tx = [tvm.runtime.from_dlpack(x) for x in operands]
    ty = [tvm.runtime.from_dlpack(y) for y in ys]
    fn = lib["bench"]

    def step(i):
        j = i % ROTATE
        if problem.x_transposed:
            operands[j].copy_(xs[j].t())
        fn(tx[j], ty[j])

    us = graph_time_us(step)
    step(0)
    torch.cuda.synchronize()
    info = {"compile_s": compile_s, "code_bytes": built.code_bytes, "params": built.params}
    return us, ys[0].clone(), info


def time_torch(case: SpmmCase, mode: str):
    """cuBLAS (fp32, tf32, fp16) or cuSPARSE CSR (fp32) through torch. Returns (us, output)."""
    dtype = torch.float16 if mode == "fp16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    weight = torch.tensor(case.weight, device="cuda", dtype=dtype)
    if mode == "csr":
        weight = weight.to_sparse_csr()
    xs = case.inputs(dtype)
    try:
        us = graph_time_us(lambda i: case.dense_product(weight, xs[i % ROTATE]))
        out = case.dense_product(weight, xs[0]).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return us, out


def time_tvm_dense(case: SpmmCase):
    """TVM's own dense kernel for the product (LegalizeOps + dlight, as tvm.compile's CUDA
    pipeline builds it), with the weight as an input. Returns (us, output)."""
    from tvm import relax
    from tvm.relax.backend.cuda.pipeline import legalize_passes

    target = cuda_target()
    m, k = case.weight.shape
    rows = case.layout is Layout.ROWS
    x = relax.Var("x", relax.TensorType((case.columns, k) if rows else (k, case.columns), "float32"))
    w = relax.Var("w", relax.TensorType((k, m) if rows else (m, k), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x, w]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(x, w) if rows else relax.op.matmul(w, x))
        builder.emit_func_output(out)
    with target:
        lowered = tvm.ir.transform.Sequential(legalize_passes(target))(builder.get())
    ((gv, func),) = [(gv, f) for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    func = func.with_attr("global_symbol", gv.name_hint)
    fn = tvm.tirx.build(tvm.IRModule({gv.name_hint: func}), target=target)[gv.name_hint]
    weight = torch.tensor(case.weight.T.copy() if rows else case.weight, device="cuda")
    xs = [x if rows else x[0] for x in case.inputs()]
    ys = [torch.empty((case.columns, m) if rows else (m, case.columns), device="cuda") for _ in xs]
    tw = tvm.runtime.from_dlpack(weight)
    tx = [tvm.runtime.from_dlpack(x) for x in xs]
    ty = [tvm.runtime.from_dlpack(y) for y in ys]
    order = (lambda j: (tx[j], tw, ty[j])) if rows else (lambda j: (tw, tx[j], ty[j]))
    us = graph_time_us(lambda i: fn(*order(i % ROTATE)))
    fn(*order(0))
    torch.cuda.synchronize()
    return us, ys[0]


def reference(case: SpmmCase) -> torch.Tensor:
    """The product in float64 on the first input set, as every contender sees it."""
    x = case.inputs()[0].double()
    return case.dense_product(torch.tensor(case.weight, device="cuda", dtype=torch.float64), x)
