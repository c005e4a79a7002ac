"""``SparsifyWeights``: the Relax pass that replaces sparse-weight operators with kernels
generated for their weights."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import UnsupportedProblem
from ..problem import Layout
from ..report import REPORT_ATTR, LayerReport, report_of
from ..schedules import KernelConfig, rule_for
from ..schedules.base import BuiltKernel, KernelJob
from ..schedules.config import CudaCsrConfig
from ..schedules.cpu.depthwise_kernel import input_channels
from .candidates import Candidate, find_candidates
from .siblings import combine_siblings, output_channel_axis

# Densities at or below which a weight is rewritten when the caller gives no threshold, by
# activation layout. Measured on an H100 (fp32, benchmarks/results/spmm-threshold-h100.md):
# against TVM's own dense kernels, 1x1 convolutions in NCHW gain up to 30% density (2.6x
# there), matmuls / fully connected layers up to about 15% (1.5x at 10%, 0.84x at 20%).
DEFAULT_DENSITY_THRESHOLD = {Layout.CHANNELS: 0.3, Layout.ROWS: 0.15}

# On CUDA, convolutions through a window with at most this many weights (stems, depthwise
# layers) are rewritten at any density when the caller gives no threshold (the CPU's rule is
# below; there the unrolled kernel ran dense stems 3.4x (MobileNet) and 36x (ResNet-50) faster
# than TVM's build, the depthwise kernel MobileNet's depthwise layers 1.3-3.5x,
# benchmarks/results/small-conv-cpu-2core.md). On CUDA, TVM's dense MobileNet ran 4.5x
# slower than PyTorch (1.8 ms against 0.4 ms on the H100, see issue [e2e]); with our kernels
# for its stem and depthwise layers too, it ran in 87 us on the H200 at batch 1 (PyTorch fp32:
# 298 us; benchmarks/results/e2e-h200.md). Layer by layer they are not yet timed against cuDNN.
SMALL_CONVOLUTION_NNZ = 32768

# Operators TVM 0.27 has no legalization for outside these layouts (its VM code generator then
# fails with "CodeGenVM cannot emit this Relax operator directly"). Under the default
# threshold such layers are rewritten at any density: left to TVM, the model cannot be built.
TVM_BUILDS_ONLY = {"relax.nn.conv2d_transpose": "NCHW", "relax.nn.conv1d_transpose": "NCW"}


def tvm_cannot_build(op: str) -> bool:
    """Whether TVM cannot build the layer the report names ``op`` (the operator and its data
    layout, e.g. ``conv2d_transpose 4x4 /2 NHWC``)."""
    words = op.split()
    layout = TVM_BUILDS_ONLY.get(f"relax.nn.{words[0]}")
    return layout is not None and words[-1] != layout


# On CUDA, transposed convolutions whose default kernel is this data-driven one are rewritten
# at any density when the caller gives no threshold: TVM's CUDA conv2d_transpose ran DCGAN's
# dense 100->512 4x4 projection of its latent vector in 80 us, 0.02 TFLOP/s
# (benchmarks/results/e2e-dcgan-before-one-pixel-h100.md); so rewritten, the pruned DCGAN ran
# 3.2x faster at batch 1, the dense one 4.2x faster than TVM's build (e2e-dcgan-h100.md). The
# unrolled kernel is left to the threshold: its code, and build time, grow with the nonzeros.
CUDA_TRANSPOSED_ANY_DENSITY = CudaCsrConfig.KERNEL

# On the CPU every convolution is rewritten at any density under the default threshold: TVM's
# CPU pipeline leaves its own convolutions unscheduled, one thread of scalar loops. On the
# 2-core machine a dense 3x3 convolution of 128 channels at 28x28 took 120 ms there and 5.6 ms
# in the CSR kernel, a dense 1x1 one of 256 channels at 14x14 10.8 ms against 0.43. Grouped
# convolutions of fewer input channels per group than this, other than those the depthwise
# kernel takes (NHWC depthwise layers, whose loop over channels LLVM vectorises: 0.2 ms for
# 128 channels at 56x56), stay with TVM.
CPU_MIN_GROUP_CHANNELS = 8

_OPTIONS = ("kernel_config", "dry_run", "tune", "tuning_database", "combine_siblings")


def SparsifyWeights(target, density_threshold: float | None = None, **options) -> tvm.ir.transform.Pass:  # noqa: N802
    """The pass rewriting sparse-weight matmuls and convolutions for ``target``.

    Parameters
    ----------
    target : str, dict or tvm.target.Target
        What the kernels are generated for: a ``cuda`` or ``llvm`` target.
    density_threshold : float in [0, 1], optional
        Weights with this density (nonzeros / size) or less are rewritten. By default,
        ``DEFAULT_DENSITY_THRESHOLD[layout]``: 0.3 for NCHW convolutions, 0.15 for
        matmuls and NHWC convolutions; and at any density, on CUDA convolutions through a
        window with at most ``SMALL_CONVOLUTION_NNZ`` weights (stems, depthwise layers), on
        the CPU every convolution but grouped ones of fewer than ``CPU_MIN_GROUP_CHANNELS``
        channels per group that its depthwise kernel does not take.
    kernel_config : dict or config object, optional
        Overrides of the kernel tiling applied to every rewritten layer (fields of
        ``CudaSpmmConfig`` or ``CpuSpmmConfig``), or a whole config. A ``CudaCsrConfig`` or
        ``CpuCsrConfig``, or a dict with ``"kernel": "csr"`` and its fields, selects the
        data-driven kernel (the CPU's default above 16,384 nonzeros); on the CPU
        ``"kernel": "depthwise"`` (``CpuDepthwiseConfig``) the depthwise one. A dict without
        ``"kernel"`` holds fields of the unrolled one (``{"kernel": "unrolled"}`` alone: its
        default tiling).
    dry_run : bool, optional
        Decide and report, but generate nothing and leave the module's functions as they
        are (what ``sparsert inspect`` shows).
    tune : bool or TuneOptions, optional
        CUDA only: time candidate configs of every layer missing from the tuning database
        on this machine's GPU, and record the fastest (see ``sparsert_tvm.tuning``).
    tuning_database : path or TuningDatabase, optional
        Where tuned configs are looked up and stored. Layers found there use their tuned
        config, with or without ``tune``. Default: ``tuning.json`` in the kernel cache.
    combine_siblings : bool, optional
        Layers below the threshold that multiply one input, with epilogues differing only in
        their biases (attention's query, key and value projections), become one kernel over
        their stacked weights, reported as one layer named after theirs (``a+b+c``).
        Default: True.
    """
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; accepted: {list(_OPTIONS)}")
    target = tvm.target.Target(target)
    rule = rule_for(target)
    if rule is None:
        raise ValueError(f"no sparse kernels for target kind {target.kind.name!r}; use cuda or llvm")
    threshold = _check_threshold(density_threshold)
    kernel_config = _check_kernel_config(options.get("kernel_config"), rule)
    tuner = _tuner(rule, target, options.get("tune", False), options.get("tuning_database"))
    dry_run, combine = bool(options.get("dry_run", False)), bool(options.get("combine_siblings", True))
    return _SparsifyWeights(target, rule, threshold, kernel_config, tuner, dry_run, combine)


def _tuner(rule, target, tune, database):
    """The CUDA rule's config chooser, or None where the target has no tuner."""
    from ..tuning.tuner import TuneOptions, Tuner  # imports the CUDA toolchain wrappers

    if tune is True:
        tune = TuneOptions()
    elif tune is False or tune is None:
        tune = None
    elif not isinstance(tune, TuneOptions):
        raise TypeError(f"tune must be a bool or TuneOptions, got {type(tune).__name__}")
    if target.kind.name != "cuda":
        if tune is not None or database is not None:
            raise ValueError("tuning is implemented for CUDA targets only")
        return None
    return Tuner(rule, target, tune, database)


def _check_threshold(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"density_threshold must be a number in [0, 1], got {value!r}")
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"density_threshold must be in [0, 1], got {value}")
    return float(value)


def _check_kernel_config(config, rule):
    """Validates overrides up front, rather than failing inside the pass."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        if not rule.accepts(config):
            takes = " or ".join(c.__name__ for c in rule.config_classes or (rule.config_class,))
            raise TypeError(f"kernel_config is a {type(config).__name__}; this target takes {takes}")
        return config
    # A CUDA dict may name its kernel ({"kernel": "csr", ...}); the fields are that config's.
    kind = {"kernel": config["kernel"]} if "kernel" in config else {}
    try:
        config_class = type(rule.config_from_dict(kind))
    except TypeError:  # a rule with one kind of kernel: "kernel" is just an unknown field
        config_class, kind = rule.config_class, {}
    fields = {f.name for f in dataclasses.fields(config_class)} | set(kind)
    unknown = set(config) - fields
    if unknown:
        raise TypeError(f"unknown kernel_config field(s) {sorted(unknown)} for {config_class.__name__}: {sorted(fields)}")
    rule.config_from_dict(config)  # raises ValueError on bad values
    return dict(config)


@tvm.transform.module_pass(opt_level=0, name="SparsifyWeights")
class _SparsifyWeights:
    def __init__(
        self, target, rule, threshold: float | None, kernel_config, tuner, dry_run: bool, combine_siblings: bool
    ):
        self.target = target
        self.rule = rule
        self.threshold = threshold
        self.kernel_config = kernel_config
        self.tuner = tuner
        self.dry_run = dry_run
        self.combine_siblings = combine_siblings

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        report = report_of(mod)
        external = list(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else []
        rewriter = _Rewriter(mod)
        taken = {gv.name_hint for gv in mod.get_global_vars()}
        # Decided layer by layer (tuning, if asked, times each layer alone), then built
        # together: the rule may build kernels side by side.
        functions, jobs = [], []
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            functions.append((gv, func))
            candidates = find_candidates(gv.name_hint, func, mod)
            if self.combine_siblings:
                candidates = combine_siblings(func, candidates, self._below_threshold)
            for candidate in candidates:
                layer = _layer_report(candidate)
                report.layers.append(layer)
                job = self._job_for(gv, candidate, layer, taken)
                if job is not None:
                    jobs.append(job)
        plans = {gv: {} for gv, _ in functions}
        built_all = []
        if jobs:  # a report without build time (a dry run) says so
            start = time.perf_counter()
            built_all = self.rule.build_all([j.kernel for j in jobs], self.target)
            report.build_s += time.perf_counter() - start
        for job, built in zip(jobs, built_all):
            if isinstance(built, UnsupportedProblem):
                job.layer.reason = str(built)
                continue
            job.record(built)
            if built.func is None:
                callee = relax.ExternFunc(built.extern)
            else:
                callee = rewriter.builder_.add_func(built.func, job.kernel.name)
            external += built.external_modules
            # Candidates own disjoint bindings (find_candidates shares out the epilogues).
            plan = plans[job.function]
            assert job.candidate.tail not in plan, f"two kernels would replace {job.candidate.name}"
            plan[job.candidate.tail] = _Planned(callee, job.candidate, built.problem.x_transposed, built.constants)
        for gv, func in functions:
            if plans[gv]:
                rewriter.builder_.update_func(gv, rewriter.rewrite(func, plans[gv]))
        out = rewriter.builder_.get()
        for key, value in (mod.attrs or {}).items():
            out = out.with_attr(key, value)
        if external:
            out = out.with_attr("external_mods", external)
        return out.with_attr(REPORT_ATTR, report.to_json())

    def _job_for(
        self, function: tvm.ir.GlobalVar, candidate: Candidate, layer: LayerReport, taken: set
    ) -> _LayerJob | None:
        """Decides on ``candidate`` (recorded in ``layer``): the kernel to build if it is
        rewritten, tuned first where tuning is asked for and the layer has no tuned config."""
        if candidate.reason is not None:
            return None
        problem = candidate.problem
        any_density = self.threshold is None and _at_any_density(candidate, self.target, self.rule)
        below = self._below_threshold(candidate)
        if not below and not any_density:
            layer.reason = f"density {candidate.density:.3f} above threshold {self._threshold(problem):g}"
            return None
        rewritten = "rewritten" if below else f"rewritten as {any_density} (any density)"
        if candidate.parts:
            rewritten += f" (one kernel for {len(candidate.parts)} layers reading one input)"
        if self.rule.transposes_input(problem):
            problem = dataclasses.replace(problem, x_transposed=True)
        config, source = self._config(problem)
        if problem.x_transposed != self.rule.transposes_input(problem, config):  # a symbolic N's kernel_config
            problem = dataclasses.replace(problem, x_transposed=not problem.x_transposed)
        tuning = {}
        try:
            self.rule.check(problem, config)
            if self.dry_run:
                layer.decision, layer.reason = "sparse", f"would be {rewritten} (dry run)"
                return None
            name = _unique_name(candidate, taken)
            if source == "default" and self.tuner is not None and self.tuner.options is not None:
                record = self.tuner.tune(problem, name)
                config, source = self.rule.config_from_dict(record.config), "tuned"
                tuning = {"tune_s": round(record.tune_s, 3), "tuned_us": record.us, "default_us": record.default_us}
        except UnsupportedProblem as unsupported:
            layer.reason = str(unsupported)
            return None
        finally:
            layer.params = config.as_dict()  # what was decided on, until the kernel is built
        taken.add(name)
        origin = {"config_source": source} | tuning
        return _LayerJob(function, candidate, layer, KernelJob(problem, config, name), rewritten, origin)

    def _threshold(self, problem) -> float:
        return DEFAULT_DENSITY_THRESHOLD[problem.layout] if self.threshold is None else self.threshold

    def _below_threshold(self, candidate: Candidate) -> bool:
        return candidate.reason is None and candidate.density <= self._threshold(candidate.problem)

    def _config(self, problem) -> tuple[KernelConfig, str]:
        """The layer's config and where it came from: overrides, the database or defaults."""
        config = self.rule.default_config(problem, self.target)
        overrides = self.kernel_config
        if overrides is not None:
            if dataclasses.is_dataclass(overrides):
                return overrides, "kernel_config"
            return self.rule.with_overrides(problem, config, overrides, self.target), "kernel_config"
        tuned = self.tuner.lookup(problem) if self.tuner is not None else None
        return (tuned, "database") if tuned is not None else (config, "default")


def _at_any_density(candidate: Candidate, target, rule) -> str | None:
    """What the layer is rewritten as whatever its density, under the default threshold:
    "a layer TVM cannot build" (see ``TVM_BUILDS_ONLY``); on CUDA "a small convolution" (see
    ``SMALL_CONVOLUTION_NNZ``) or "a transposed convolution" (see
    ``CUDA_TRANSPOSED_ANY_DENSITY``); on the CPU "a convolution" (see
    ``CPU_MIN_GROUP_CHANNELS``); None for other layers."""
    problem = candidate.problem
    grouped = candidate.groups > 1
    if tvm_cannot_build(candidate.op):
        return "a layer TVM cannot build"
    if target.kind.name == "cuda":
        if (problem.window is not None or grouped) and candidate.weight.nnz <= SMALL_CONVOLUTION_NNZ:
            return "a small convolution"
        transposed = candidate.op.startswith(("conv1d_transpose", "conv2d_transpose"))
        data_driven = transposed and rule.default_config(problem, target).KERNEL == CUDA_TRANSPOSED_ANY_DENSITY
        return "a transposed convolution" if data_driven else None
    if not candidate.op.startswith(("conv1d", "conv2d")):
        return None
    group_channels = problem.K // problem.taps // candidate.groups  # the weight is held block-diagonal
    narrow_groups = grouped and group_channels < CPU_MIN_GROUP_CHANNELS and input_channels(problem) is None
    return None if narrow_groups else "a convolution"


def _layer_report(candidate: Candidate) -> LayerReport:
    layer = LayerReport(
        function=candidate.function,
        name=candidate.name,
        op=candidate.op,
        decision="dense",
        reason=candidate.reason or "",
    )
    if candidate.weight is not None:
        weight = candidate.weight
        layer.weight_shape = candidate.weight_shape
        layer.M, layer.K = layer.weight_shape
        layer.nnz, layer.density = weight.nnz, candidate.density
    if candidate.problem is not None:
        problem = candidate.problem
        layer.input_shape = "x".join(_format_dim(d) for d in problem.x_shape)
        layer.N, layer.dtype = _format_dim(problem.columns), problem.dtype
        if problem.static_batch != 1:
            layer.N = f"{_format_dim(problem.x_shape[0])}*{layer.N}"
        layer.epilogue = [op.describe() for op in problem.epilogue]
    return layer


def _format_dim(expr) -> str:
    """``n * 16`` rather than TVMScript's ``n * T.int64(16)``."""
    return re.sub(r"T\.int(?:32|64)\((-?\d+)\)", r"\1", str(expr))


def _unique_name(candidate: Candidate, taken: set) -> str:
    stem = re.sub(r"\W", "_", f"sparsert_{candidate.name}_{candidate.weight.digest[:8]}")
    name, suffix = stem, 1
    while name in taken:
        suffix += 1
        name = f"{stem}_{suffix}"
    return name


@dataclasses.dataclass
class _LayerJob:
    """A layer whose kernel is to be built: where it is, what the rule gets, and what its
    report says once the kernel is built."""

    function: tvm.ir.GlobalVar
    candidate: Candidate
    layer: LayerReport
    kernel: KernelJob
    rewritten: str  # the report's reason
    origin: dict  # where the config came from, and the tuning figures

    def record(self, built: BuiltKernel) -> None:
        layer = self.layer
        layer.decision, layer.reason, layer.kernel = "sparse", self.rewritten, self.kernel.name
        layer.params = built.params | self.origin
        layer.code_bytes, layer.compile_s = built.code_bytes, built.compile_seconds


@dataclasses.dataclass
class _Planned:
    kernel: tvm.ir.GlobalVar | relax.ExternFunc  # a PrimFunc of the module, or a compiled one
    candidate: Candidate
    transpose_x: bool
    constants: tuple = ()

    def bind(self, builder, visit, transposed: dict) -> None:
        """Binds the candidate's tail (or each sibling's) to the kernel's output."""
        candidate = self.candidate
        call = self._call(builder, visit, transposed)
        if not candidate.parts:
            builder.emit_normalized(relax.VarBinding(candidate.tail, builder.normalize(call)))
            return
        whole, axis, start = builder.emit(call), output_channel_axis(candidate), 0
        for part in candidate.parts:
            end = start + part.weight.shape[0]
            share = relax.op.strided_slice(whole, axes=[axis], begin=[start], end=[end], assume_inbound=True)
            builder.emit_normalized(relax.VarBinding(part.tail, builder.normalize(share)))
            start = end

    def _call(self, builder, visit, transposed: dict) -> relax.Call:
        """The call replacing the candidate, preceded by the transpose it may need, unless
        ``transposed`` (input -> its transpose, in this binding block) has it already: the
        layers reading one input that ``combine_siblings`` left apart."""
        candidate, problem = self.candidate, self.candidate.problem
        x = _viewed(builder, visit(candidate.x), problem.x_shape)  # as the problem sees it
        if self.transpose_x:
            if x not in transposed:
                rows = x
                if len(problem.x_shape) != 2:
                    rows = builder.emit(relax.op.reshape(x, relax.ShapeExpr([problem.columns, problem.K])))
                transposed[x] = builder.emit(relax.op.permute_dims(rows))
            x = transposed[x]
        residual = visit(candidate.residual) if candidate.residual is not None else None
        # With a symbolic N the kernel takes and writes [N, M] (its buffers cannot name the
        # leading dimensions N was made of); reshapes are views.
        flat = self.transpose_x and problem.static_columns is None and len(problem.y_shape) != 2
        y_dims = [problem.columns, problem.M] if flat else problem.y_shape
        if residual is not None:
            residual = _viewed(builder, residual, y_dims)
        args = [x] + ([residual] if residual is not None else [])
        args += [relax.const(array) for array in self.constants]
        call = (relax.call_dps_packed if isinstance(self.kernel, relax.ExternFunc) else relax.call_tir)(
            self.kernel, args, relax.TensorType(y_dims, problem.dtype)
        )
        if candidate.unshuffle is not None:  # a transposed convolution's phases
            phases = _viewed(builder, builder.emit(call), problem.y_shape)
            call, y_dims = candidate.unshuffle.emit(builder, phases, problem.y_shape)
        # Siblings slice the problem's output; a single layer gives its binding's shape.
        dims = problem.y_shape if candidate.parts else list(candidate.tail.ty.shape.values)
        return call if _same_dims(y_dims, dims) else relax.op.reshape(builder.emit(call), relax.ShapeExpr(list(dims)))


def _same_dims(a, b) -> bool:
    return tvm_ffi.structural_equal(list(a), list(b))


def _viewed(builder, expr, dims):
    """``expr`` reshaped to ``dims`` where its shape differs (a weight on the left sees its
    operand as images, a 1-D convolution its input as images one row high; a symbolic N's
    kernel reads and writes ``[N, M]``); reshapes are views."""
    if _same_dims(expr.ty.shape.values, dims):
        return expr
    return builder.emit(relax.op.reshape(expr, relax.ShapeExpr(list(dims))))


@mutator
class _Rewriter(PyExprMutator):
    """Replaces each planned tail binding with ``call_tir`` and drops the bindings it fused."""

    def __init__(self, mod):
        super().__init__(mod)
        self.plan = {}
        self.dropped = set()
        self.transposed = {}  # of the binding block being rewritten

    def visit_binding_block_(self, block):
        self.transposed = {}
        return super().visit_binding_block_(block)

    def visit_dataflow_block_(self, block):
        self.transposed = {}
        return super().visit_dataflow_block_(block)

    def rewrite(self, func: relax.Function, plan: dict) -> relax.Function:
        self.plan = plan
        self.dropped = {var for planned in plan.values() for var in planned.candidate.members} - set(plan)
        # Weight transposes and bias reshapes the kernels baked in are now unused.
        return relax.analysis.remove_all_unused(self.visit_expr(func))

    def visit_var_binding_(self, binding):
        if binding.var in self.dropped:
            return
        planned = self.plan.get(binding.var)
        if planned is None:
            super().visit_var_binding_(binding)
            return
        planned.bind(self.builder_, self.visit_expr, self.transposed)
