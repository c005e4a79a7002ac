"""PTX for one weight: nonzeros unrolled, values as immediates, columns as fixed offsets.

Launch: ``gridDim = (ceil(columns / (threads * columns_per_thread)), row_groups, batch)``,
``blockDim = threads``. Block ``(bx, g, b)`` computes the rows of group ``g`` (selected with
one indirect branch, ``brx.idx``) for its tile of columns of image ``b``. A thread keeps one
accumulator per (row of the group, owned column), walks the group's nonzero columns ``k``
in order, loads ``X[b, k, n]`` once per owned column and issues the FMA of every row of the
group that has a nonzero at ``k``. The epilogue runs in registers before the only store.

PTX goes straight to ptxas: the CUDA C route spends minutes in NVVM on such kernels. Large
weights are split into *segments*, functions of bounded size that ptxas assembles
separately (and in parallel) and nvlink joins, because ptxas time grows faster than
linearly with the size of a function.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from ...errors import UnsupportedProblem
from ...problem import BiasAdd, Clip, Layout, ResidualAdd, SpmmProblem
from ..base import require_dtype
from ..config import CudaSpmmConfig
from ..row_groups import group_rows, split_by_nnz

PTX_VERSION = "8.0"
_ELEMENT_BYTES = {"float32": 4}
SUPPORTED_DTYPES = tuple(_ELEMENT_BYTES)
_MAX_IMMEDIATE_OFFSET = 2**31 - 1


@dataclass(frozen=True)
class PtxKernel:
    """Generated PTX and what the launcher needs to know about it."""

    name: str
    units: tuple[str, ...]  # units[0] holds the entry; more than one must be linked
    row_groups: int  # gridDim.y
    threads: int  # blockDim.x
    columns_per_block: int
    param_types: tuple[str, ...]  # TVM argument types of the kernel parameters

    @property
    def ptx_bytes(self) -> int:
        return sum(len(u) for u in self.units)


def f32_immediate(value: float) -> str:
    """PTX's exact hexadecimal spelling of a float32 constant."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def emit_spmm_ptx(problem: SpmmProblem, config: CudaSpmmConfig, name: str, arch: str) -> PtxKernel:
    require_dtype(problem, SUPPORTED_DTYPES, "the CUDA generator")
    groups = group_rows(problem.weight.row_nnz, config.rows_per_block, config.balance_rows)
    segments = split_by_nnz(groups, problem.weight.row_nnz, config.max_nnz_per_segment)
    emitter = _Emitter(problem, config, arch)
    emitter.check_offsets()

    if len(segments) == 1:
        units = (emitter.entry(name, inline_groups=groups),)
    else:
        bounds, first = [], 0
        for segment in segments:
            first += len(segment)
            bounds.append(first)
        units = (emitter.entry(name, segment_bounds=bounds),)
        first = 0
        for s, segment in enumerate(segments):
            units += (emitter.segment(f"{name}_seg{s}", segment, first),)
            first += len(segment)
    return PtxKernel(
        name=name,
        units=units,
        row_groups=len(groups),
        threads=config.threads_per_block,
        columns_per_block=config.threads_per_block * config.columns_per_thread,
        param_types=emitter.param_types,
    )


class _Emitter:
    """Writes the PTX text; register names are fixed so that pieces compose.

    ``%px``, ``%py``, ``%pr``: addresses of ``X``, ``Y`` and the residual at this thread's
    first column; ``%pv<c>``: whether owned column ``c`` exists; ``%a<i*C+c>``: accumulator
    of group row ``i`` and column ``c``; ``%x<c>``, ``%t<c>``: loaded values.
    """

    def __init__(self, problem: SpmmProblem, config: CudaSpmmConfig, arch: str):
        self.problem = problem
        self.config = config
        self.arch = arch
        self.es = _ELEMENT_BYTES[problem.dtype]
        self.cols = config.columns_per_thread
        self.x_strides = problem.x_strides()
        self.y_strides = problem.y_strides()
        self.param_types = ("handle",) * (3 if problem.has_residual else 2) + ("int32",)

    # -- offsets ---------------------------------------------------------------------
    def x_offset(self, k: int, c: int) -> int:
        s = self.x_strides
        return (k * s.k + c * self.config.threads_per_block * s.n) * self.es

    def y_offset(self, m: int, c: int) -> int:
        s = self.y_strides
        return (m * s.k + c * self.config.threads_per_block * s.n) * self.es

    def check_offsets(self):
        last = self.cols - 1
        largest = max(self.x_offset(self.problem.K - 1, last), self.y_offset(self.problem.M - 1, last))
        if largest > _MAX_IMMEDIATE_OFFSET:
            raise UnsupportedProblem("tensor too large for 32-bit immediate load offsets")

    # -- units -----------------------------------------------------------------------
    def header(self) -> list[str]:
        return [f".version {PTX_VERSION}", f".target {self.arch}", ".address_size 64", ""]

    def entry(self, name, inline_groups=None, segment_bounds=None) -> str:
        p, cfg = self.problem, self.config
        lines = self.header()
        if segment_bounds is not None:
            lines += [f".extern .func {name}_seg{s}{self._segment_params()};" for s in range(len(segment_bounds))]
        params = ["p_x"] + (["p_r"] if p.has_residual else []) + ["p_y"]
        decl = ", ".join(f".param .u64 {q}" for q in params) + ", .param .u32 p_ncols"
        lines += [f".visible .entry {name}({decl})", f".maxntid {cfg.threads_per_block}, 1, 1", "{"]
        lines += self._declarations()
        lines += [
            "ld.param.u64 %rd1, [p_x];",
            "ld.param.u64 %rd2, [p_y];",
            "cvta.to.global.u64 %px, %rd1;",
            "cvta.to.global.u64 %py, %rd2;",
        ]
        if p.has_residual:
            lines += ["ld.param.u64 %rd3, [p_r];", "cvta.to.global.u64 %pr, %rd3;"]
        else:
            lines += ["mov.u64 %pr, 0;"]  # segments take it as an argument either way
        lines += [
            "ld.param.u32 %ncols, [p_ncols];",
            "mov.u32 %r1, %ctaid.x;",
            "mov.u32 %r2, %tid.x;",
            f"mad.lo.u32 %col0, %r1, {cfg.threads_per_block * self.cols}, %r2;",
            "setp.ge.u32 %p0, %col0, %ncols;",
            "@%p0 bra DONE;",
        ]
        if p.layout is Layout.CHANNELS:
            lines += ["mov.u32 %r3, %ctaid.z;", "cvt.u64.u32 %rd4, %r3;"]
            lines += self._advance("%rd4", self.x_strides.batch, self.y_strides.batch)
        lines += ["cvt.u64.u32 %rd5, %col0;"]
        lines += self._advance("%rd5", self.x_strides.n, self.y_strides.n)
        lines += ["mov.u32 %g, %ctaid.y;"]
        if inline_groups is not None:
            lines += self._valid_columns()
            lines += self._dispatch(inline_groups, first=0, exit_label="DONE")
        else:
            lines += self._segment_calls(name, segment_bounds)
        lines += ["DONE:", "ret;", "}"]
        return "\n".join(lines) + "\n"

    def segment(self, name, groups, first) -> str:
        lines = self.header()
        lines += [f".visible .func {name}{self._segment_params()}", "{"]
        lines += self._declarations()
        lines += [
            "ld.param.u64 %px, [s_px];",
            "ld.param.u64 %py, [s_py];",
            "ld.param.u64 %pr, [s_pr];",
            "ld.param.u32 %col0, [s_col0];",
            "ld.param.u32 %ncols, [s_ncols];",
            "ld.param.u32 %g, [s_g];",
        ]
        lines += self._valid_columns()
        lines += self._dispatch(groups, first=first, exit_label="DONE")
        lines += ["DONE:", "ret;", "}"]
        return "\n".join(lines) + "\n"

    # -- pieces ----------------------------------------------------------------------
    @staticmethod
    def _segment_params() -> str:
        return (
            "(.param .b64 s_px, .param .b64 s_py, .param .b64 s_pr, "
            ".param .b32 s_col0, .param .b32 s_ncols, .param .b32 s_g)"
        )

    def _declarations(self) -> list[str]:
        accumulators = self.config.rows_per_block * self.cols
        return [
            ".reg .pred %p0;",
            f".reg .pred %pv<{self.cols}>;",
            ".reg .b32 %r<4>;",
            ".reg .b32 %col0, %ncols, %g, %colc;",
            ".reg .b64 %rd<8>;",
            ".reg .b64 %px, %py, %pr;",
            f".reg .f32 %a<{accumulators}>;",
            f".reg .f32 %x<{self.cols}>;",
            f".reg .f32 %t<{self.cols}>;",
        ]

    def _advance(self, index_reg: str, x_stride: int, y_stride: int) -> list[str]:
        """Moves the base addresses by ``index * stride`` elements."""
        lines = [f"mul.lo.u64 %rd6, {index_reg}, {x_stride * self.es};", "add.s64 %px, %px, %rd6;"]
        lines += [f"mul.lo.u64 %rd7, {index_reg}, {y_stride * self.es};", "add.s64 %py, %py, %rd7;"]
        if self.problem.has_residual:
            lines += ["add.s64 %pr, %pr, %rd7;"]
        return lines

    def _valid_columns(self) -> list[str]:
        lines = []
        for c in range(self.cols):
            lines += [
                f"add.u32 %colc, %col0, {c * self.config.threads_per_block};",
                f"setp.lt.u32 %pv{c}, %colc, %ncols;",
            ]
        return lines

    def _guard(self, c: int) -> str:
        # Column 0 exists whenever the thread got this far.
        return "" if c == 0 else f"@%pv{c} "

    def _dispatch(self, groups, first: int, exit_label: str) -> list[str]:
        lines = []
        if first:
            lines.append(f"sub.u32 %g, %g, {first};")
        targets = ", ".join(f"G{j}" for j in range(len(groups)))
        lines += [f"TABLE: .branchtargets {targets};", "brx.idx %g, TABLE;"]
        for j, rows in enumerate(groups):
            lines.append(f"G{j}:")
            lines += self._group(rows)
            lines.append(f"bra.uni {exit_label};")
        return lines

    def _segment_calls(self, name, bounds) -> list[str]:
        lines = []
        for s, bound in enumerate(bounds[:-1]):
            lines += [f"setp.lt.u32 %p0, %g, {bound};", f"@%p0 bra CALL{s};"]
        lines.append(f"bra.uni CALL{len(bounds) - 1};")
        args = [("b64", "%px"), ("b64", "%py"), ("b64", "%pr"), ("b32", "%col0"), ("b32", "%ncols"), ("b32", "%g")]
        for s in range(len(bounds)):
            lines += [f"CALL{s}:", "{"]
            for i, (kind, reg) in enumerate(args):
                lines += [f".param .{kind} c{i};", f"st.param.{kind} [c{i}], {reg};"]
            lines += [f"call {name}_seg{s}, ({', '.join(f'c{i}' for i in range(len(args)))});", "}"]
            lines.append("bra.uni DONE;")
        return lines

    def _group(self, rows) -> list[str]:
        weight, cols = self.problem.weight, self.cols
        lines = [f"mov.f32 %a{i * cols + c}, 0f00000000;" for i in range(len(rows)) for c in range(cols)]
        # Nonzeros of the group by column: each needed activation is loaded once.
        by_column: dict[int, list[tuple[int, float]]] = {}
        for i, m in enumerate(rows):
            indices, values = weight.row(m)
            for k, v in zip(indices.tolist(), values.tolist()):
                by_column.setdefault(k, []).append((i, v))
        for k in sorted(by_column):
            for c in range(cols):
                lines.append(f"{self._guard(c)}ld.global.nc.f32 %x{c}, [%px+{self.x_offset(k, c)}];")
            for i, v in by_column[k]:
                imm = f32_immediate(v)
                for c in range(cols):
                    acc = f"%a{i * cols + c}"
                    lines.append(f"fma.rn.f32 {acc}, %x{c}, {imm}, {acc};")
        for i, m in enumerate(rows):
            for c in range(cols):
                lines += self._epilogue(f"%a{i * cols + c}", m, c)
        return lines

    def _epilogue(self, acc: str, m: int, c: int) -> list[str]:
        guard, offset = self._guard(c), self.y_offset(m, c)
        lines = []
        for op in self.problem.epilogue:
            if isinstance(op, BiasAdd):
                lines.append(f"add.f32 {acc}, {acc}, {f32_immediate(op.values[m])};")
            elif isinstance(op, ResidualAdd):
                lines += [
                    f"{guard}ld.global.nc.f32 %t{c}, [%pr+{offset}];",
                    f"add.f32 {acc}, {acc}, %t{c};",
                ]
            elif isinstance(op, Clip):
                if math.isfinite(op.lo):
                    lines.append(f"max.f32 {acc}, {acc}, {f32_immediate(op.lo)};")
                if math.isfinite(op.hi):
                    lines.append(f"min.f32 {acc}, {acc}, {f32_immediate(op.hi)};")
        lines.append(f"{guard}st.global.f32 [%py+{offset}], {acc};")
        return lines
