"""How a CPU kernel's TIR becomes machine code: a short TIR pipeline and two LLVM options.

Unrolled kernels hold tens of thousands of statements, and several passes of TVM's default
TIR pipeline (common subexpression elimination, buffer compaction, ...) take minutes on
them while having nothing to improve. PrimFuncs carrying ``KERNEL_ATTR`` go through a
short list of the passes they need (without the simplifier where they also carry
``UNSIMPLIFIED_ATTR``: the unrolled kernel's bound sums, on which its time grows faster than
their number, while the data-driven kernels ran 10x slower without it); everything else goes
through TVM's default pipeline unchanged.

For unrolled kernels two of LLVM's machine passes take most of the code generation while
gaining nothing on straight-line code: machine-level LICM weighs hoisting every one of the
thousands of constant operands out of the parallel loop, and the post-RA scheduler
reorders blocks of thousands of instructions for a core that reorders them itself.
``KERNEL_LLVM_OPTIONS`` turns both off: a 512x512 weight at 10% density took 7 s instead of
16, a 95%-pruned ResNet-50 342 s instead of 473 (README, "CPU compile time").
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.tirx import compilation_pipeline

from ..base import KERNEL_ATTR, UNSIMPLIFIED_ATTR

PIPELINE_NAME = "sparsert"
KERNEL_LLVM_OPTIONS = ("-disable-machine-licm", "-disable-post-ra")


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


def _lean_passes(simplify: bool = True):
    return [
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        tirx.transform.VectorizeLoop(True),
        *([tirx.transform.StmtSimplify()] if simplify else []),
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
        for simplify in (True, False):
            group = {gv: f for gv, f in kernels.items() if (UNSIMPLIFIED_ATTR not in f.attrs) == simplify}
            if group:
                lean = tvm.ir.transform.Sequential(_lean_passes(simplify))
                lowered.update(lean(tvm.IRModule(group, attrs=mod.attrs)).functions_items())
        return tvm.IRModule(lowered, attrs=mod.attrs)

    return _pipeline, finalize_host, finalize_device
