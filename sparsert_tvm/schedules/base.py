"""The common interface of the per-target kernel generators."""

from __future__ import annotations

import abc
import dataclasses
import os
from dataclasses import dataclass, field

import tvm
from tvm import tirx

from ..errors import UnsupportedProblem
from ..problem import Layout, SpmmProblem, columns_and_batch
from .config import KernelConfig

# relax's OpPatternKind::kOpaque: keeps FuseOps from merging our kernels with neighbours.
OPAQUE_PATTERN = 8
# Function attribute that routes a generated kernel through the lean lowering pipeline ...
KERNEL_ATTR = "sparsert.kernel"
# ... and one that leaves StmtSimplify out of it (straight-line kernels, see cpu/lowering.py).
UNSIMPLIFIED_ATTR = "sparsert.unsimplified"


@dataclass
class BuiltKernel:
    """A generated kernel ready to be called from Relax: a PrimFunc for ``call_tir``, or
    (``func`` None) the packed function ``extern`` of one of ``external_modules``, for
    ``call_dps_packed``."""

    func: tirx.PrimFunc | None
    problem: SpmmProblem
    # Compiled modules the IRModule must carry in its ``external_mods`` attribute.
    external_modules: list = field(default_factory=list)
    # Arrays the kernel takes after its operands (before the output), passed as constants.
    constants: tuple = ()
    # Tiling and derived choices, for the report.
    params: dict = field(default_factory=dict)
    code_bytes: int | None = None
    compile_seconds: float = 0.0
    extern: str | None = None
    # Launch wrappers compiled to time or run it alone, by target (``tuning.measure``).
    launchers: dict = field(default_factory=dict, repr=False, compare=False)


class SparseKernelRule(abc.ABC):
    """Generates the kernel of one ``SpmmProblem`` for one kind of target."""

    #: Element types the generated kernels compute in.
    dtypes: tuple[str, ...] = ()
    #: The config dataclass of this rule's kernels ...
    config_class: type = object
    #: ... and every config dataclass it takes (some rules generate several kinds of kernel).
    config_classes: tuple[type, ...] = ()

    def check(self, problem: SpmmProblem, config) -> None:
        """Raises ``UnsupportedProblem`` if the rule will not generate ``problem``'s kernel."""
        require_dtype(problem, self.dtypes, self.__class__.__name__)
        require_nnz_at_most(
            problem, config.max_layer_nnz, "the unrolled-code cap", "compile time and code size grow with every nonzero"
        )

    def accepts(self, config) -> bool:
        return isinstance(config, self.config_classes or (self.config_class,))

    def config_from_dict(self, fields: dict):
        """The config that ``config.as_dict()`` wrote (tuning records)."""
        return self.config_class(**fields)

    def with_overrides(self, problem: SpmmProblem, config, overrides: dict, target=None):
        """``config`` (the layer's default for ``target``) with the fields of a
        ``kernel_config`` dict."""
        return dataclasses.replace(config, **overrides)

    def transposes_input(self, problem: SpmmProblem, config=None) -> bool:
        """Whether the kernel wants ``X`` transposed to ``[K, N]`` (done in Relax, before it):
        for any kernel, or (with ``config``) for that one."""
        return False

    @abc.abstractmethod
    def is_target(self, target: tvm.target.Target) -> bool:
        """Whether this rule generates code for ``target``."""

    @abc.abstractmethod
    def default_config(self, problem: SpmmProblem, target: tvm.target.Target) -> KernelConfig:
        """A good untuned config for ``problem``."""

    @abc.abstractmethod
    def build(self, problem: SpmmProblem, config: KernelConfig, target: tvm.target.Target, name: str) -> BuiltKernel:
        """Generates (and where the target needs it, compiles) the kernel.

        Raises ``UnsupportedProblem`` when the problem is outside what the rule handles.
        """

    def build_all(self, jobs: list[KernelJob], target: tvm.target.Target) -> list[BuiltKernel | UnsupportedProblem]:
        """``build`` for each job, in order; a job the rule does not handle gets its
        ``UnsupportedProblem`` instead of a kernel. One after another unless a rule can do
        better."""
        return [unless_unsupported(self.build, job.problem, job.config, target, job.name) for job in jobs]


@dataclass(frozen=True)
class KernelJob:
    """One kernel to build: what ``SparseKernelRule.build`` takes besides the target."""

    problem: SpmmProblem
    config: KernelConfig
    name: str


def unless_unsupported(step, *args):
    """``step(*args)``, or the ``UnsupportedProblem`` it raised: a kernel that one layer's
    rule turns down must not stop the others' builds."""
    try:
        return step(*args)
    except UnsupportedProblem as unsupported:
        return unsupported


def default_jobs() -> int:
    """Builds (ptxas processes, LLVM's code generation) run at once: one per core."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def require_nnz_at_most(problem: SpmmProblem, cap: int, what: str, why: str) -> None:
    if problem.weight.nnz > cap:
        nnz = problem.weight.nnz
        raise UnsupportedProblem(f"{nnz:,} nonzeros exceed {what} of {cap:,} (kernel_config max_layer_nnz); {why}")


def require_dtype(problem: SpmmProblem, dtypes, generator: str) -> None:
    if problem.dtype not in dtypes:
        raise UnsupportedProblem(f"{generator} generates {', '.join(dtypes)} kernels, not {problem.dtype}")


def operand_shapes(problem: SpmmProblem):
    """Fresh ``tirx`` shapes for the kernel's buffers: ``(x, y)``.

    Symbolic dimensions get new variables local to the PrimFunc; the output's shape is
    written in terms of the input's where it can be, so that ``call_tir`` infers them from
    the input.
    """

    def fresh(dims, prefix):
        return [d if isinstance(d, tirx.IntImm) else tirx.Var(f"{prefix}{i}", d.ty) for i, d in enumerate(dims)]

    rows = tirx.IntImm("int64", problem.M)
    if problem.runtime_row_stride:  # Y as [N, M]: the pass reshapes it
        columns = tirx.Var("n", problem.columns.ty)
        return [tirx.IntImm("int64", problem.K), columns], [columns, rows]
    if problem.x_transposed:
        return [tirx.IntImm("int64", problem.K), problem.columns], list(problem.y_shape[:-1]) + [rows]
    dims = fresh(problem.x_shape, "d")
    if problem.window is not None:
        return dims, [dims[0]] + list(problem.y_shape[1:])  # static but for the batch
    if problem.layout is Layout.ROWS:
        return dims, dims[:-1] + [rows]
    return dims, [dims[0], rows] + dims[2:]


def kernel_columns_and_batch(problem: SpmmProblem, x_dims):
    """Columns of the product and images, as expressions of the kernel's input dims."""
    if problem.x_transposed:
        return x_dims[1], tirx.IntImm("int64", 1)
    return columns_and_batch(problem, x_dims)
