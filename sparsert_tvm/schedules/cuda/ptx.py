"""PTX for one weight: nonzeros unrolled, values as immediates, columns as fixed offsets.

Launch: ``gridDim = (ceil(columns / columns_per_block), row_groups, batch)``, ``blockDim =
threads``. Block ``(bx, g, b)`` computes the rows of group ``g`` (selected with one indirect
branch, ``brx.idx``) for its tile of columns of image ``b``. With ``fold_batch`` the
images' columns form one range instead (``gridDim.z = 1``) and each owned vector finds its
image. A thread owns ``columns_per_thread`` *vectors* of ``vector_width`` neighbouring columns, ``threads *
vector_width`` columns apart, and keeps one accumulator per (row of the group, owned
column); it walks the group's nonzero columns ``k`` in order, loads ``X[b, k, vector]`` once
(one vector load) and issues the FMAs of every row of the group that has a nonzero at ``k``.
The epilogue runs in registers before the only store. With ``split_k`` slices, the block's
threads are that many slices owning the same columns; each walks its share of the group's
columns, and the first slice adds the others' partial sums (through shared memory, after
one barrier) before the epilogue; out-of-range threads compute column 0 without storing
it, since every thread must reach the barrier. Cut into segments, each slice's share is a
function of its own that leaves its sums in shared memory, and one more function per
segment adds them up: ptxas adds two instructions to every load of a function whose body
branches apart by warp. With ``grid_split`` shares, launch row ``g * S + s`` computes share
``s`` of group ``g``: its block stores its partial sums in the module array ``<name>_sums``
(slot ``(((tile * G + g) * S + s) * A + a) * threads + thread``), fences them, and its first
thread counts the block in ``<name>_counts`` (one per tile and group); the block that
counts last resets the count, adds every share's sums in share order and runs the epilogue
(both reductions: ``partial_sums``).

Convolutions with a ``ConvWindow`` read their input directly: each owned vector (of
neighbouring output pixels of one row) gets a base address for its first pixel's window
(computed once), and each kernel row ``(channel, ky)`` that the group reads is loaded once
per vector, in aligned chunks at immediate offsets from it, into registers that its taps
``kx`` and the vector's pixels share (``RowSpan``). Chunks that can fall into the padding
are loaded under a predicate computed once per thread, into registers zeroed first: no
branches and no im2col buffer (``window_loads``).

float16 kernels pack two neighbouring columns into one register and use paired
``fma.rn.f16x2``; they accumulate in float16, like the inputs (see ``ElementType``).

PTX goes straight to ptxas: the CUDA C route spends minutes in NVVM on such kernels. Large
weights are split into *segments*, functions of bounded size that ptxas assembles
separately (and in parallel) and nvlink joins, because ptxas time grows faster than
linearly with the size of a function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import UnsupportedProblem
from ...problem import BiasAdd, Clip, ResidualAdd, SpmmProblem
from ..base import require_dtype
from ..config import REGISTERS_PER_BLOCK, CudaSpmmConfig
from ..row_groups import split_by_cost, unrolled_row_groups
from .partial_sums import PartialSums
from .ptx_common import (
    SUPPORTED_DTYPES,
    PtxKernel,
    clip_bounds,
    entry_declaration,
    load_operands,
    param_types,
    ptx_header,
    vector_operand,
    vector_suffix,
)
from .staged_input import StagedInput
from .unrolled_checks import (
    ElementType,
    accumulators_of,
    check_padding,
    check_split,
    check_vectorization,
    launch_tiles,
    partials_bytes,
    sums_bytes,
    zeros_bytes,
)
from .window_loads import WindowLoads

_MAX_IMMEDIATE_OFFSET = 2**31 - 1


def emit_spmm_ptx(problem: SpmmProblem, config: CudaSpmmConfig, name: str, arch: str) -> PtxKernel:
    require_dtype(problem, SUPPORTED_DTYPES, "the CUDA generator")
    check_vectorization(problem, config)
    check_split(problem, config)
    check_padding(problem, config)
    groups = unrolled_row_groups(problem.weight, config.rows_per_block, config.balance_rows, config.share_columns)
    emitter = _Emitter(problem, config, arch)
    emitter.check_offsets()
    work = [_Work(rows, g, share) for g, rows in enumerate(groups) for share in emitter.shares]
    group_costs = [emitter.instructions(rows) // len(emitter.shares) for rows in groups]
    costs = [group_costs[item.group] for item in work]
    segments = split_by_cost(work, costs, config.max_instructions_per_segment)
    most_threads = REGISTERS_PER_BLOCK // config.segment_registers
    if len(segments) > 1 and config.threads_per_block > most_threads:
        # The kernel takes its segments' register count, and nvlink refuses a block of
        # threads whose registers would not fit in one SM's register file.
        raise UnsupportedProblem(
            f"{len(segments)} segments of {config.segment_registers} registers need blocks of at most "
            f"{most_threads} threads, not {config.threads_per_block} (lower segment_registers, or raise "
            "max_instructions_per_segment for one function)"
        )

    if len(segments) == 1:
        units = (emitter.entry(name, inline_work=work),)
    else:
        bounds, first = [], 0
        for segment in segments:
            first += len(segment)
            bounds.append(first)
        units = (emitter.entry(name, segment_bounds=bounds),)
        first = 0
        for s, segment in enumerate(segments):
            units += tuple(emitter.segment(function, segment, first, role) for function, role in emitter.roles(name, s))
            first += len(segment)
    return PtxKernel(
        name=name,
        units=units,
        row_groups=len(work),
        threads=config.threads_per_block,
        columns_per_block=emitter.slice_threads * config.columns_per_thread * config.vector_width,
        param_types=emitter.param_types,
        folds_batch=emitter.folds_batch,
    )


@dataclass(frozen=True)
class _Work:
    """What one launch row computes: the rows of group ``group``, over all of their nonzero
    columns (``share`` None) or over one share of them (a grid split)."""

    rows: tuple[int, ...]
    group: int
    share: int | None = None


class _Emitter:
    """Writes the PTX text; register names are fixed so that pieces compose.

    ``%px``, ``%py``, ``%pr``: addresses of ``X``, ``Y`` and the residual at this thread's
    first column; ``%pv<c>``: whether owned vector ``c`` exists; ``%a<(i*C+c)*R+l>``:
    accumulator register ``l`` of group row ``i`` and vector ``c``; ``%x<c*R+l>``,
    ``%t<c*R+l>``: loaded activations and residuals; ``%h<2>``: halves being (un)packed.
    With the batch folded into the columns, vector ``c`` may lie in another image than the
    thread's first one: it gets its own bases ``%pxw<c>``, ``%pyw<c>``, ``%prw<c>``. Split
    into slices or across the grid: the registers of ``partial_sums``.
    """

    def __init__(self, problem: SpmmProblem, config: CudaSpmmConfig, arch: str):
        self.problem = problem
        self.config = config
        self.arch = arch
        self.element = ElementType(problem.dtype, config.vector_width)
        self.es = self.element.element_bytes
        self.cols = config.columns_per_thread
        self.lanes = self.element.registers
        self.accumulators = accumulators_of(config, self.element)  # registers of a thread's sums
        self.split = config.split_k
        self.grid_split = config.grid_split
        # The share of its group's columns each launch row computes (None: all of them).
        self.shares = list(range(self.grid_split)) if self.grid_split > 1 else [None]
        self.staged = StagedInput.of(problem, config) if config.stage_channels else None
        # Every thread of a block must reach a barrier: none may leave early.
        self.barriers = self.split > 1 or self.grid_split > 1 or self.staged is not None
        self.group_slots = -(-problem.M // config.rows_per_block)  # counts per tile
        self.slice_threads = config.threads_per_block // config.split_k  # threads owning distinct columns
        self.sums = PartialSums(self.element, self.accumulators, self.cols * self.lanes, self.slice_threads,
                                config.threads_per_block, self.group_slots, self.grid_split)
        # Columns between a thread's neighbouring vectors.
        self.vector_stride = self.slice_threads * config.vector_width
        self.x_strides = problem.x_strides()
        self.y_strides = problem.y_strides()
        self.win = WindowLoads(problem, config, self.element, self.staged) if problem.window is not None else None
        self.zeros = self.win is not None and config.padding_from_zeros
        self._constants_of_rows: dict[int, list] = {}  # ``_row_constants``'s
        # Kept because every row group asks again: the registers a column's activations land
        # in (by tap through a window), a column's loads (no window).
        self._x_of_tap: dict[int, list[str]] = {}
        self._column_loads: dict[tuple[int, int], tuple[str, ...]] = {}
        self._accumulator_names: list[str] = []  # "%a<j>", grown as row groups need them
        self.folds_batch = config.fold_batch
        self.param_types = param_types(problem)

    # -- offsets ---------------------------------------------------------------------
    def x_offset(self, k: int, c: int) -> int:
        s = self.x_strides
        return (k * s.k + c * self.vector_stride * s.n) * self.es

    def y_offset(self, m: int, c: int) -> int:
        s = self.y_strides
        return (m * s.k + c * self.vector_stride * s.n) * self.es

    def x_address(self, k: int, c: int) -> tuple[str, int]:
        """Base register and immediate offset of column ``k`` of X for vector ``c``."""
        return ("%pxw" + str(c), self.x_offset(k, 0)) if self.folds_batch else ("%px", self.x_offset(k, c))

    def y_address(self, m: int, c: int, base: str = "%py") -> tuple[str, int]:
        """Base register (of Y, or of the residual with ``base="%pr"``) and offset of row ``m``."""
        return (f"{base}w{c}", self.y_offset(m, 0)) if self.folds_batch else (base, self.y_offset(m, c))

    def check_offsets(self):
        last, width = self.cols - 1, self.config.vector_width
        if self.win is None:
            x_largest = self.x_offset(self.problem.K - 1, last) + width * self.x_strides.n * self.es
        else:
            x_largest = self.win.largest_offset()
        largest = max(x_largest, self.y_offset(self.problem.M - 1, last) + width * self.y_strides.n * self.es)
        if self.folds_batch:  # image offsets come from a 32-bit multiply
            largest = max(largest, self.x_strides.batch * self.es, self.y_strides.batch * self.es)
        if largest > _MAX_IMMEDIATE_OFFSET:
            raise UnsupportedProblem("tensor too large for 32-bit immediate load offsets")

    def instructions(self, rows) -> int:
        """About how many instructions ``_group(rows)`` emits: an FMA per nonzero and owned
        register, and the loads of each needed activation vector (through a window, of each
        chunk of a kernel row read, zeroed first where it may read padding, and the moves
        pairing float16 pixels; staged, of each chunk of channels' copy)."""
        weight = self.problem.weight
        reduction = 3 * (self.split - 1) * len(rows) * self.cols * self.lanes  # store, load, add
        needed = np.unique(np.concatenate([weight.row(m)[0] for m in rows])) if rows else np.empty(0, int)
        nnz = int(sum(weight.row_nnz[m] for m in rows))
        if self.win is None:
            return self.cols * (nnz + len(needed)) * self.lanes + reduction
        loads = self.win.load_count(needed)
        pairs = len(needed) * self.lanes if self.element.columns_per_register == 2 else 0
        return self.cols * (nnz * self.lanes + loads + pairs) + reduction

    # -- units -----------------------------------------------------------------------
    def header(self) -> list[str]:
        return ptx_header(self.arch)

    def entry(self, name, inline_work=None, segment_bounds=None) -> str:
        p, cfg = self.problem, self.config
        lines = self.header()
        if self.split > 1:
            lines += [f".shared .align 16 .b8 {name}_partials[{partials_bytes(p, cfg)}];"]
        if self.staged:
            lines += [
                f".shared .align 16 .b8 {name}_staged[{self.staged.bytes}];",
                f".global .align 16 .b8 {name}_stage_zeros[{self.staged.zeros_bytes}];",
            ]
        if self.zeros:  # no initialiser: zero-filled at load, no bytes in the cubin
            lines += [f".global .align 16 .b8 {name}_zeros[{zeros_bytes(p, cfg.vector_width)}];"]
        if self.grid_split > 1:
            lines += [
                f".global .align 16 .b8 {name}_sums[{sums_bytes(p, cfg)}];",
                f".global .align 4 .b8 {name}_counts[{4 * launch_tiles(p, cfg) * self.group_slots}];",
            ]
        if segment_bounds is not None:
            functions = [function for s in range(len(segment_bounds)) for function, _ in self.roles(name, s)]
            lines += [f".extern .func {function}{self._segment_params()};" for function in functions]
        # Segments may take more registers than the entry itself: the kernel needs them all.
        registers = max(cfg.registers, cfg.segment_registers) if cfg.registers and segment_bounds else cfg.registers
        lines += entry_declaration(name, p.has_residual, cfg.threads_per_block, registers)
        lines += self._declarations()
        lines += load_operands(p.has_residual)
        if not p.has_residual:
            lines += ["mov.u64 %pr, 0;"]  # segments take it as an argument either way
        if self.zeros:
            lines += [f"mov.u64 %pz, {name}_zeros;"]
        if self.staged:
            lines += [f"mov.u64 %stg, {name}_staged;", f"mov.u64 %szr, {name}_stage_zeros;"]
        lines += ["mov.u32 %r1, %ctaid.x;", "mov.u32 %r2, %tid.x;"]
        if self.split > 1:
            lines += [f"rem.u32 %r2, %r2, {self.slice_threads};", f"mov.u64 %smem, {name}_partials;"]
        lines.append(f"mad.lo.u32 %col0, %r1, {self.slice_threads * self.cols}, %r2;")
        if cfg.vector_width > 1:
            lines.append(f"mul.lo.u32 %col0, %col0, {cfg.vector_width};")
        if self.barriers:
            # Every thread must reach the barrier: one past the columns computes column 0,
            # and with no columns (``%ncols`` = 0 for it) owns no vector to store.
            lines += [
                "setp.lt.u32 %p0, %col0, %ncols;",
                "selp.b32 %col0, %col0, 0, %p0;",
                "selp.b32 %ncols, %ncols, 0, %p0;",
            ]
        else:
            lines += ["setp.ge.u32 %p0, %col0, %ncols;", "@%p0 bra DONE;"]
        # Folded, columns are not linear across images: each vector finds its own bases.
        if not self.folds_batch:
            if p.images_apart:
                lines += ["mov.u32 %r3, %ctaid.z;", "cvt.u64.u32 %rd4, %r3;"]
                lines += self._advance("%rd4", self.x_strides.batch, self.y_strides.batch)
            lines += ["cvt.u64.u32 %rd5, %col0;"]
            # A window's columns are not linear in X: segments find the windows from %px and %col0.
            lines += self._advance("%rd5", None if self.win else self.x_strides.n, self.y_strides.n)
        lines += ["mov.u32 %g, %ctaid.y;"]
        if self.grid_split > 1:
            lines += self.sums.sums_setup(name)
        if inline_work is not None:
            lines += self._column_setup()
            lines += self._dispatch(inline_work, first=0, exit_label="DONE")
        else:
            if self.split > 1:
                lines += self.sums.slice_index()
            lines += self._segment_calls(name, segment_bounds)
        lines += ["DONE:", "ret;", "}"]
        return "\n".join(lines) + "\n"

    def roles(self, name: str, s: int) -> list[tuple[str, int | str | None]]:
        """The functions of segment ``s`` and what each does with its groups: all of it
        (None), one slice's share (the slice), or adding the slices' sums up ("sum")."""
        if self.split == 1:
            return [(f"{name}_seg{s}", None)]
        return [(f"{name}_seg{s}_k{t}", t) for t in range(self.split)] + [(f"{name}_seg{s}_sum", "sum")]

    def segment(self, name, work, first, role=None) -> str:
        lines = self.header()
        lines += [f".visible .func {name}{self._segment_params()}", "{"]
        lines += self._declarations()
        lines += [
            "ld.param.u64 %px, [s_px];",
            "ld.param.u64 %py, [s_py];",
            "ld.param.u64 %pr, [s_pr];",
            "ld.param.u32 %col0, [s_col0];",
            "ld.param.u32 %ncols, [s_ncols];",
        ]
        if self.split > 1:
            lines.append("ld.param.u64 %smem, [s_smem];")
        if self.zeros:
            lines.append("ld.param.u64 %pz, [s_pz];")
        if self.grid_split > 1:
            lines += ["ld.param.u64 %wsb, [s_wsb];", "ld.param.u64 %cnt, [s_cnt];"]
        if self.staged:
            lines += ["ld.param.u64 %stg, [s_stg];", "ld.param.u64 %szr, [s_szr];"]
        lines += [
            # Not a parameter: ptxas keeps global-memory descriptors in uniform registers
            # after the dispatch only where the branch index is known uniform; from a
            # parameter it converts one per predicated load (2 extra instructions each).
            "mov.u32 %g, %ctaid.y;",
        ]
        lines += self._column_setup()
        lines += self._dispatch(work, first=first, exit_label="DONE", role=role)
        lines += ["DONE:", "ret;", "}"]
        return "\n".join(lines) + "\n"

    # -- pieces ----------------------------------------------------------------------
    def _segment_params(self) -> str:
        extra = (", .param .b64 s_smem" if self.split > 1 else "") + (", .param .b64 s_pz" if self.zeros else "")
        extra += ", .param .b64 s_wsb, .param .b64 s_cnt" if self.grid_split > 1 else ""
        extra += ", .param .b64 s_stg, .param .b64 s_szr" if self.staged else ""
        return f"(.param .b64 s_px, .param .b64 s_py, .param .b64 s_pr, .param .b32 s_col0, .param .b32 s_ncols{extra})"

    def _declarations(self) -> list[str]:
        reg = self.element.reg
        accumulators = self.accumulators
        values = self.cols * self.lanes
        lines = [
            ".reg .pred %p0;",
            f".reg .pred %pv<{self.cols}>;",
            ".reg .b32 %r<4>;",
            ".reg .b32 %col0, %ncols, %g, %colc;",
            ".reg .b64 %rd<8>;",
            ".reg .b64 %px, %py, %pr;",
            f".reg .{reg} %a<{accumulators}>;",
            f".reg .{reg} %x<{values}>;",
            f".reg .{reg} %t<{values}>;",
        ]
        if self.folds_batch:
            lines += [".reg .b32 %img, %pix;", f".reg .b64 %pyw<{self.cols}>, %prw<{self.cols}>;"]
        if self.folds_batch or self.win is not None:
            lines += [f".reg .b64 %pxw<{self.cols}>;"]
        if self.problem.dtype == "float16":
            lines += [f".reg .{reg} %w;", ".reg .b16 %h<2>;"]
        if self.split > 1:
            lines += [".reg .b32 %slice;", ".reg .b64 %smem, %sps, %spr;"]
        if self.grid_split > 1:
            lines += [".reg .b64 %wsb, %cnt;"]
        if self.staged:
            lines += self.staged.declarations(self.cols, self.win.kind)
        if self.win:
            lines += self.win.declarations()
        return lines

    def _advance(self, index_reg: str, x_stride: int | None, y_stride: int) -> list[str]:
        """Moves the base addresses by ``index * stride`` elements."""
        lines = []
        if x_stride is not None:
            lines += [f"mul.lo.u64 %rd6, {index_reg}, {x_stride * self.es};", "add.s64 %px, %px, %rd6;"]
        lines += [f"mul.lo.u64 %rd7, {index_reg}, {y_stride * self.es};", "add.s64 %py, %py, %rd7;"]
        if self.problem.has_residual:
            lines += ["add.s64 %pr, %pr, %rd7;"]
        return lines

    def _column_setup(self) -> list[str]:
        """Which owned vectors exist (``%pv<c>``) and, for a window, where their windows are;
        split into slices, the thread's slice and places in the partial sums."""
        lines = self.sums.slice_setup() if self.split > 1 else []
        if self.staged:
            lines += self.staged.block_setup()
        for c in range(self.cols):
            lines += [f"add.u32 %colc, %col0, {c * self.vector_stride};", f"setp.lt.u32 %pv{c}, %colc, %ncols;"]
            pixel, x_base = "%colc", "%px"
            if self.folds_batch:
                lines += self._image_setup(c)
                pixel, x_base = "%pix", f"%pxw{c}"
            if self.win is not None:
                lines += self.win.setup(c, pixel, x_base)
            if self.staged:
                lines += self.staged.vector_setup(c, "%img" if self.folds_batch else None)
        return lines

    def _image_setup(self, c: int) -> list[str]:
        """Folded batch: the image ``%img`` and pixel ``%pix`` of vector ``c``'s first column,
        and its bases: ``%pxw<c>`` (the image's X, or the pixel's for a linear layout),
        ``%pyw<c>`` and ``%prw<c>`` (its place in Y and the residual)."""
        xs, ys, es = self.x_strides, self.y_strides, self.es
        lines = [
            f"div.u32 %img, %colc, {self.problem.static_columns};",
            f"mul.lo.u32 %r3, %img, {self.problem.static_columns};",
            "sub.u32 %pix, %colc, %r3;",
            f"mul.wide.u32 %rd6, %img, {xs.batch * es};",
            f"add.s64 %pxw{c}, %px, %rd6;",
            f"mul.wide.u32 %rd7, %img, {ys.batch * es};",
            f"mul.wide.u32 %rd6, %pix, {ys.n * es};",
            "add.s64 %rd7, %rd7, %rd6;",
            f"add.s64 %pyw{c}, %py, %rd7;",
            f"add.s64 %prw{c}, %pr, %rd7;",
        ]
        if self.win is None:
            lines += [f"mul.wide.u32 %rd6, %pix, {xs.n * es};", f"add.s64 %pxw{c}, %pxw{c}, %rd6;"]
        return lines

    def _guard(self, c: int, store: bool = False) -> str:
        # Vector 0 exists whenever the thread got this far, except that a split kernel's
        # threads past the columns compute column 0 (to reach the barrier) and store nothing.
        return "" if c == 0 and not (store and self.barriers) else f"@%pv{c} "

    def _dispatch(self, work: list[_Work], first: int, exit_label: str, role=None) -> list[str]:
        lines = []
        if first:
            lines.append(f"sub.u32 %g, %g, {first};")
        targets = ", ".join(f"G{j}" for j in range(len(work)))
        lines += [f"TABLE: .branchtargets {targets};", "brx.idx %g, TABLE;"]
        for j, item in enumerate(work):
            lines.append(f"G{j}:")
            lines += self._group(item, f"G{j}", exit_label, role)
            lines.append(f"bra.uni {exit_label};")
        return lines

    def _segment_calls(self, name, bounds) -> list[str]:
        lines = []
        for s, bound in enumerate(bounds[:-1]):
            lines += [f"setp.lt.u32 %p0, %g, {bound};", f"@%p0 bra CALL{s};"]
        lines.append(f"bra.uni CALL{len(bounds) - 1};")
        for s in range(len(bounds)):
            lines.append(f"CALL{s}:")
            if self.split == 1:
                lines += self._call(f"{name}_seg{s}") + ["bra.uni DONE;"]
                continue
            # After the slices' shares and the barrier, the first slice adds the sums up.
            lines += self.sums.by_slice(f"CALL{s}", [self._call(f"{name}_seg{s}_k{t}") for t in range(self.split)])
            lines += ["bar.sync 0;", "setp.ne.u32 %p0, %slice, 0;", "@%p0 bra.uni DONE;"]
            lines += self._call(f"{name}_seg{s}_sum") + ["bra.uni DONE;"]
        return lines

    def _call(self, function: str) -> list[str]:
        args = [("b64", "%px"), ("b64", "%py"), ("b64", "%pr"), ("b32", "%col0"), ("b32", "%ncols")]
        if self.split > 1:
            args.append(("b64", "%smem"))
        if self.zeros:
            args.append(("b64", "%pz"))
        if self.grid_split > 1:
            args += [("b64", "%wsb"), ("b64", "%cnt")]
        if self.staged:
            args += [("b64", "%stg"), ("b64", "%szr")]
        lines = ["{"]
        for i, (kind, reg) in enumerate(args):
            lines += [f".param .{kind} c{i};", f"st.param.{kind} [c{i}], {reg};"]
        return lines + [f"call {function}, ({', '.join(f'c{i}' for i in range(len(args)))});", "}"]

    def _registers(self, prefix: str, first: int) -> list[str]:
        return [f"%{prefix}{first + l}" for l in range(self.lanes)]

    def _group(self, item: _Work, label: str, exit_label: str, role=None) -> list[str]:
        """The rows' products and epilogue; of one slice's share, its sums left in shared
        memory (``role``: the slice); or the slices' sums added up and the epilogue
        (``role="sum"``); of one share of a grid split, its sums added up across blocks."""
        cols, lanes, rows = self.cols, self.lanes, item.rows
        count = len(rows) * cols * lanes
        zero = "0f00000000" if self.problem.dtype == "float32" else "0"
        lines = [f"mov.{self.element.reg} %a{j}, {zero};" for j in range(count)]
        if role == "sum":
            return lines + self.sums.add_partials(count, range(self.split)) + self._epilogues(rows)
        # Nonzeros of the group by column: each needed activation is loaded once.
        by_column: dict[int, list[tuple[int, tuple[tuple[str, ...], str]]]] = {}  # (row, its constant)
        for i, m in enumerate(rows):
            for k, constant in self._row_constants(m):
                by_column.setdefault(k, []).append((i, constant))
        columns = sorted(by_column)
        kernel_rows = self.win.kernel_rows(columns) if self.win else {}
        if item.share is not None:
            share = self._column_shares(columns, by_column, self.grid_split)[item.share]
            products = self._products(share, by_column, kernel_rows)
            across = self.sums.add_across_blocks(item.group, item.share, count, exit_label)
            return lines + products + across + self._epilogues(rows)
        shares = self._column_shares(columns, by_column, self.split)
        if role is not None:
            return lines + self._products(shares[role], by_column, kernel_rows) + self.sums.store_partials(count, "")
        products = [self._products(share, by_column, kernel_rows) for share in shares]
        if len(products) == 1:
            return lines + products[0] + self._epilogues(rows)
        # The other slices leave their sums to the first, which keeps its own in registers.
        lines += self.sums.by_slice(label, products)
        lines += ["setp.ne.u32 %p0, %slice, 0;"] + self.sums.store_partials(count, "@%p0 ")
        lines += ["bar.sync 0;", f"@%p0 bra.uni {exit_label};"] + self.sums.add_partials(count, range(1, self.split))
        return lines + self._epilogues(rows)

    def _row_constants(self, m: int) -> list[tuple[int, tuple[tuple[str, ...], str]]]:
        """Row ``m``'s columns and constants, kept: a grid split's shares each walk the rows."""
        found = self._constants_of_rows.get(m)
        if found is None:
            indices, values = self.problem.weight.row(m)
            found = self._constants_of_rows[m] = list(zip(indices.tolist(), self.element.constants(values)))
        return found

    def _products(self, columns, by_column: dict, kernel_rows: dict) -> list[str]:
        """Loads and FMAs of ``columns`` into the accumulators."""
        width, lines = self.cols * self.lanes, []
        fma = f"fma.rn.{self.element.arith}"
        accumulators = self._accumulator_names
        staged_chunk = None
        for k in columns:
            chunk = self.staged.chunk_of(self.win.channel(k)) if self.staged else None
            if chunk != staged_chunk:
                # The block's threads are done with the previous chunk before its band is overwritten.
                lines += ["bar.sync 0;"] if staged_chunk is not None else []
                staged_chunk = chunk
                lines += self.staged.copy(staged_chunk, self.win.kind)
            for c in range(self.cols):
                lines += self._load_x(k, c, kernel_rows)
            x = self._x_registers(k)
            for i, (setup, operand) in by_column[k]:
                lines += setup
                end = (i + 1) * width
                if end > len(accumulators):
                    accumulators += [f"%a{j}" for j in range(len(accumulators), end)]
                row = accumulators[end - width:end]
                lines += [f"{fma} {acc}, {x_j}, {operand}, {acc};" for acc, x_j in zip(row, x)]
        return lines

    def _epilogues(self, rows) -> list[str]:
        cols, lanes, lines = self.cols, self.lanes, []
        for i, m in enumerate(rows):
            for c in range(cols):
                lines += self._epilogue(self._registers("a", (i * cols + c) * lanes), m, c)
        return lines

    def _column_shares(self, columns: list[int], by_column: dict, count: int) -> list[list[int]]:
        """``columns`` cut into ``count`` consecutive shares of about equal work (a load
        and the FMAs of each column); through a window, a kernel row's taps stay together,
        since they share its loads."""
        if count == 1:
            return [columns]
        units: list[list[int]] = []
        for k in columns:
            same_row = self.win is not None and units and self.win.same_kernel_row(units[-1][-1], k)
            if same_row:
                units[-1].append(k)
            else:
                units.append([k])
        work = np.array([sum(1 + len(by_column[k]) for k in unit) for unit in units], dtype=float)
        middles = np.cumsum(work) - work / 2
        total = float(work.sum())
        shares: list[list[int]] = [[] for _ in range(count)]
        for unit, middle in zip(units, middles):
            # The share whose part of the total work this unit's middle falls in.
            shares[min(count - 1, int(count * middle / total))] += unit
        return shares

    def _epilogue(self, accumulators: list[str], m: int, c: int) -> list[str]:
        arith = self.element.arith
        lines = []

        def apply(op: str, value: float):
            setup, operand = self.element.constant(value)
            lines.extend(setup)
            lines.extend(f"{op}.{arith} {acc}, {acc}, {operand};" for acc in accumulators)

        for op in self.problem.epilogue:
            if isinstance(op, BiasAdd):
                apply("add", op.values[m])
            elif isinstance(op, ResidualAdd):
                residual = self._registers("t", c * self.lanes)
                lines += self._load(residual, *self.y_address(m, c, "%pr"), self.y_strides.n, c)
                lines += [f"add.{arith} {acc}, {acc}, {t};" for acc, t in zip(accumulators, residual)]
            elif isinstance(op, Clip):
                for instruction, bound in clip_bounds(op):
                    apply(instruction, bound)
        lines += self._store(accumulators, m, c)
        return lines

    # -- memory ----------------------------------------------------------------------
    def _load_x(self, k: int, c: int, kernel_rows: dict[tuple[int, int], list[int]]) -> Sequence[str]:
        """Puts column ``k`` of ``A`` for owned vector ``c`` where ``_x_registers`` finds it:
        loaded into ``%x``, or through a window as ``WindowLoads.column_loads`` does."""
        if self.win:
            return self.win.column_loads(k, c, kernel_rows)
        key = (k, c)
        loads = self._column_loads.get(key)
        if loads is None:
            registers = self._registers("x", c * self.lanes)
            loads = tuple(self._load(registers, *self.x_address(k, c), self.x_strides.n, c))
            self._column_loads[key] = loads
        return loads

    def _x_registers(self, k: int) -> list[str]:
        """The registers holding column ``k``'s activations, by vector and lane: ``%x`` as
        loaded or paired, or through a float32 window the kernel row's chunk registers of
        tap ``kx``."""
        kx = self.win.chunk_tap(k) if self.win else -1
        found = self._x_of_tap.get(kx)
        if found is None:
            if kx < 0:
                found = [f"%x{c * self.lanes + l}" for c in range(self.cols) for l in range(self.lanes)]
            else:
                found = self.win.chunk_registers(kx)
            self._x_of_tap[kx] = found
        return found

    def _load(self, registers: list[str], base: str, offset: int, stride: int, c: int) -> list[str]:
        return self._access(True, registers, base, offset, stride, c)

    def _store(self, registers: list[str], m: int, c: int) -> list[str]:
        return self._access(False, registers, *self.y_address(m, c), self.y_strides.n, c)

    def _access(self, load: bool, registers: list[str], base: str, offset: int, stride: int, c: int) -> list[str]:
        """Moves one vector between registers and memory: one instruction where its columns
        are adjacent in memory, else one per column (two halves per f16x2 register)."""
        guard, reg = self._guard(c, store=not load), self.element.reg

        def move(suffix: str, operand: str, byte_offset: int) -> str:
            if load:
                return f"{guard}ld.global.nc{suffix} {operand}, [{base}+{byte_offset}];"
            return f"{guard}st.global{suffix} [{base}+{byte_offset}], {operand};"

        if stride == 1 or self.config.vector_width == 1:
            return [move(f"{vector_suffix(registers)}.{reg}", vector_operand(registers), offset)]
        step = stride * self.es
        if self.element.columns_per_register == 1:
            return [move(f".{reg}", r, offset + l * step) for l, r in enumerate(registers)]
        lines = []
        for l, r in enumerate(registers):
            halves = [move(".b16", f"%h{h}", offset + (2 * l + h) * step) for h in (0, 1)]
            if load:
                lines += halves + [f"mov.b32 {r}, {{%h0, %h1}};"]
            else:
                lines += [f"mov.b32 {{%h0, %h1}}, {r};"] + halves
        return lines
