"""Building a module: the pass, then ``tvm.compile``.

The kernels come out of the pass compiled (cubins for CUDA, LLVM modules for the CPU, in the
module's ``external_mods``), so plain ``tvm.compile`` builds a rewritten module as fast as
``compile`` does.

On the CPU, ``tvm.compile`` runs Relax's generic pipeline, which fuses nothing: every bias
add and ReLU that TVM keeps (after dense depthwise convolutions, say) is a pass over memory
of its own. ``compile`` runs TVM's CPU pipeline instead (``relax.backend.cpu_generic``, with
``FuseOps``/``FuseTIR``), as ``tvm.compile`` already does on GPUs, and schedules the
operators it lowers (``schedules.cpu.tvm_operators``): TVM's CPU pipeline leaves each to one
thread of scalar loops.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax import dpl
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic_pipeline
from tvm.s_tir import dlight

from .errors import UnbuildableByTvm
from .passes import SparsifyWeights
from .passes.sparsify import TVM_BUILDS_ONLY, tvm_cannot_build
from .report import SparsityReport, report_of
from .schedules.cpu import tvm_operators
from .schedules.cpu.lowering import KERNEL_LLVM_OPTIONS, register_pipeline, with_llvm_options

__all__ = [
    "KERNEL_LLVM_OPTIONS", "compile", "cpu_operator_passes", "cuda_target", "default_target", "host_cpu_target",
    "register_pipeline", "relax_pipeline", "with_llvm_options",
]


def compile(  # noqa: A001 - mirrors tvm.compile
    mod: tvm.IRModule,
    target=None,
    density_threshold: float | None = None,
    *,
    report: SparsityReport | None = None,
    **options,
):
    """``SparsifyWeights`` followed by ``tvm.compile``; returns what ``tvm.compile`` returns.

    ``target`` defaults to ``default_target()``. If ``report`` is given, the pass's report
    (layers and build time) is added to it. Other options go to ``SparsifyWeights``.
    """
    target = default_target() if target is None else tvm.target.Target(target)
    mod = SparsifyWeights(target, density_threshold, **options)(mod)
    if report is not None:
        report.extend(report_of(mod))
    _check_tvm_builds(mod)
    return _runnable_as_built(tvm.compile(mod, target, relax_pipeline=relax_pipeline(mod, target)))


def _check_tvm_builds(mod: tvm.IRModule) -> None:
    """Raises ``UnbuildableByTvm`` where the pass left TVM an operator it cannot build,
    naming the layers and why the pass declined them."""
    left = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: left.append(e) if _unbuildable(e) else None)
    if not left:
        return
    layouts = sorted({f"{call.op.name.split('.')[-1]} in {call.attrs.data_layout}" for call in left})
    layers = report_of(mod).layers
    declined = [f"{layer.name} ({layer.op}): {layer.reason}" for layer in layers
                if layer.decision == "dense" and tvm_cannot_build(layer.op)]
    raise UnbuildableByTvm(
        f"TVM {tvm.__version__} cannot build {', '.join(layouts)}, and the pass left {len(left)} to TVM: "
        f"{'; '.join(declined)}. Have them rewritten (a higher density_threshold, or a kernel_config that takes "
        "them) or give the model NCHW inputs."
    )


def _unbuildable(expr) -> bool:
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
        return False
    supported = TVM_BUILDS_ONLY.get(expr.op.name)
    return supported is not None and str(expr.attrs.data_layout) != supported


def _runnable_as_built(executable):
    """``executable``, run as it is rather than exported and loaded again.

    Where kernels took every operator (no TIR left for TVM to build), TVM links the VM to an
    empty C source module, and ``Executable.jit`` (which ``relax.VirtualMachine`` calls)
    then exports the whole library, generating the CPU kernels' machine code a second
    time, one after another. The empty module has nothing to run, so the modules as built
    serve."""
    placeholders = [m for m in executable.mod.imports if m.kind == "c" and not m.inspect_source().strip(" ;\n")]
    others = [m for m in executable.mod.imports if m not in placeholders]
    if placeholders and all(m.kind != "c" for m in others):
        executable._jitted_mod = executable.mod  # what jit() would return if it knew
    return executable


def relax_pipeline(mod: tvm.IRModule, target: tvm.target.Target):
    """TVM's fusing CPU pipeline on the CPU; elsewhere, and for modules calling packed
    functions, what ``tvm.compile`` picks itself (TVM keeps its CPU pipeline off by default
    because its fusion can drop a ``call_pure_packed`` whose result is unused but whose
    side effect is not)."""
    if target.kind.name == "llvm" and not _calls_packed_functions(mod):
        return _scheduled_cpu_pipeline(target)
    return "default"


def _scheduled_cpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with the operators it lowers scheduled after fusion, and exp, erf
    and tanh computed by TVM's polynomial approximations (``FastMathTransform``): within
    3.3e-7 of the exact values relative, where LLVM calls libm once per element for
    them (erf: 112 against 5,867 us for 393k elements on 2 cores, GELU's share of BERT).
    Sigmoids are first written as ``1 / (1 + exp(-x))`` so that their exp is one too."""
    cpu = cpu_generic_pipeline
    schedule = dlight.ApplyDefaultSchedule(*tvm_operators.schedule_rules())

    @tvm.transform.module_pass(opt_level=0, name="SparsertCpuPipeline")
    def pipeline(mod: tvm.IRModule, _context) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                cpu_operator_passes(target) + [schedule] + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )(mod)

    return pipeline


def cpu_operator_passes(target: tvm.target.Target) -> list:
    """The CPU pipeline's passes up to the fused PrimFuncs that the schedule rules take."""
    cpu = cpu_generic_pipeline
    return (cpu.library_dispatch_passes(target) + [_sigmoid_through_exp, relax.transform.FastMathTransform()]
            + cpu.legalize_passes(target))


@tvm.transform.module_pass(opt_level=0, name="SigmoidThroughExp")
def _sigmoid_through_exp(mod: tvm.IRModule, _context) -> tvm.IRModule:
    x = dpl.wildcard()
    sigmoid = dpl.is_op("relax.sigmoid")(x)

    def through_exp(call, matches):
        one = relax.const(1.0, call.ty.dtype)
        return relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(matches[x]))))

    mod = mod.clone()
    for var, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[var] = dpl.rewrite_call(sigmoid, through_exp, func)
    return mod


def _calls_packed_functions(mod: tvm.IRModule) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_pure_packed":
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def default_target() -> tvm.target.Target:
    """The GPU if TVM sees one (with the host CPU as its host), else the host CPU."""
    return cuda_target() if tvm.cuda(0).exist else host_cpu_target()


def cuda_target() -> tvm.target.Target:
    """CUDA for the GPU TVM sees, or for sm_90 (the H100) where there is none, hosted by this CPU."""
    host = host_cpu_target()
    if tvm.cuda(0).exist:
        return tvm.target.Target(tvm.target.Target.from_device(tvm.cuda(0)), host=host)
    return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=host)


def host_cpu_target() -> tvm.target.Target:
    """LLVM for this machine's CPU, with its vector extensions."""
    get = tvm_ffi.get_global_func
    return tvm.target.Target(
        {"kind": "llvm", "mtriple": get("target.llvm_get_system_triple")(), "mcpu": get("target.llvm_get_system_cpu")()}
    )
