"""Building a module: the pass, then ``tvm.compile`` with a TIR pipeline fit for the kernels.

Unrolled kernels hold tens of thousands of statements, and several passes of TVM's default
TIR pipeline (common subexpression elimination, buffer compaction, ...) take minutes on
them while having nothing to improve. PrimFuncs carrying ``KERNEL_ATTR`` go through a
short list of the passes they need; everything else goes through TVM's default pipeline
unchanged. Plain ``tvm.compile`` gives the same module, only more slowly.

On the CPU, LLVM generates the machine code when the module is first loaded (or exported),
and for unrolled kernels two of its machine passes take most of that time while gaining
nothing on straight-line code: machine-level LICM weighs hoisting every one of the
thousands of constant operands out of the parallel loop, and the post-RA scheduler
reorders blocks of thousands of instructions for a core that reorders them itself.
``compile`` turns both off (``KERNEL_LLVM_OPTIONS``) for modules holding kernels: loading
a 512x512 weight at 10% density took 7 s instead of 16, a 95%-pruned ResNet-50 342 s
instead of 473, and TVM's dense operators ran as fast as before (README, "CPU compile time").

On the CPU, ``tvm.compile`` runs Relax's generic pipeline, which fuses nothing: every bias
add and ReLU that TVM keeps (after dense depthwise convolutions, say) is a pass over memory
of its own. ``compile`` runs TVM's CPU pipeline instead (``relax.get_default_pipeline``,
with ``FuseOps``/``FuseTIR``), as ``tvm.compile`` already does on GPUs.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.tirx import compilation_pipeline

from .passes import SparsifyWeights
from .report import SparsityReport, report_of
from .schedules.base import KERNEL_ATTR

PIPELINE_NAME = "sparsert"
KERNEL_LLVM_OPTIONS = ("-disable-machine-licm", "-disable-post-ra")


def compile(  # noqa: A001 - mirrors tvm.compile
    mod: tvm.IRModule,
    target=None,
    density_threshold: float | None = None,
    *,
    report: SparsityReport | None = None,
    **options,
):
    """``SparsifyWeights`` followed by ``tvm.compile``; returns what ``tvm.compile`` returns.

    ``target`` defaults to ``default_target()``. If ``report`` is given, the layers of the
    pass's report are appended to it. Other options go to ``SparsifyWeights``. On the CPU,
    modules holding kernels are built with ``KERNEL_LLVM_OPTIONS`` added to the target.
    """
    target = default_target() if target is None else tvm.target.Target(target)
    mod = SparsifyWeights(target, density_threshold, **options)(mod)
    if report is not None:
        report.layers.extend(report_of(mod).layers)
    if target.kind.name == "llvm" and any(_is_kernel(func) for func in mod.functions.values()):
        target = with_llvm_options(target, KERNEL_LLVM_OPTIONS)
    return tvm.compile(mod, target, relax_pipeline=relax_pipeline(mod, target), tir_pipeline=register_pipeline())


def relax_pipeline(mod: tvm.IRModule, target: tvm.target.Target):
    """TVM's fusing CPU pipeline on the CPU; elsewhere, and for modules calling packed
    functions, what ``tvm.compile`` picks itself (TVM keeps its CPU pipeline off by default
    because its fusion can drop a ``call_pure_packed`` whose result is unused but whose
    side effect is not)."""
    if target.kind.name == "llvm" and not _calls_packed_functions(mod):
        return relax.get_default_pipeline(target)
    return "default"


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


def with_llvm_options(target: tvm.target.Target, options) -> tvm.target.Target:
    """``target`` with LLVM command-line ``options`` added to its ``cl-opt`` (TVM applies
    them while it generates this target's code and restores LLVM's defaults after)."""
    config = dict(target.export())
    present = list(config.get("cl-opt", []))
    config["cl-opt"] = present + [option for option in options if option not in present]
    return tvm.target.Target(config)


def register_pipeline() -> str:
    """Registers the TIR pipeline with TVM (idempotent) and returns its name."""
    compilation_pipeline.register_tir_pipeline(PIPELINE_NAME, _pipeline_factory)
    return PIPELINE_NAME


def _lean_passes():
    return [
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        tirx.transform.VectorizeLoop(True),
        tirx.transform.StmtSimplify(),
        tirx.transform.VerifyMemory(),
        tirx.transform.AnnotateEntryFunc(),
        tirx.transform.SplitHostDevice(),
        tirx.transform.MakePackedAPI(),
    ]


def _is_kernel(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs


def _pipeline_factory():
    default, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="SparsertTIRPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels = {gv: f for gv, f in mod.functions_items() if _is_kernel(f)}
        others = {gv: f for gv, f in mod.functions_items() if gv not in kernels}
        lowered = {}
        if others:
            lowered.update(default(tvm.IRModule(others, attrs=mod.attrs)).functions_items())
        if kernels:
            lean = tvm.ir.transform.Sequential(_lean_passes())
            lowered.update(lean(tvm.IRModule(kernels, attrs=mod.attrs)).functions_items())
        return tvm.IRModule(lowered, attrs=mod.attrs)

    return _pipeline, finalize_host, finalize_device
