"""PTX of the data-driven (CSR) kernel: nonzeros read from arrays, one warp per row.

Unrolled code costs about 16 bytes of instructions per nonzero, streamed once per column
tile; at a few columns (fully connected layers at batch 1-8) that stream is the whole time.
Here the values and column indices are data (4-8 bytes per nonzero: f32 or f16 values,
u16 or u32 indices) in initialised ``.global`` arrays of the module itself, so the kernel
keeps the unrolled kernel's launch signature ``(x, [residual], y, ncols)`` and grid
``(ceil(columns / columns_per_block), row_groups, batch)``; only the structure (which row
each warp owns, where its nonzeros start, how many chunks it has) is fixed at compile time,
in a per-warp table (``.const`` where it is small).

Lane ``l`` of a warp takes nonzeros ``l, l + 32, ...`` of the warp's row (``csr_layout``),
keeps one accumulator per column of the block's tile and, per nonzero, loads the
activation of every column at ``k * x_strides.k + column * x_strides.n``. The loop runs
``unroll`` chunks per trip (their loads in flight together), then single chunks. A butterfly
of ``shfl.sync.bfly`` then sums the lanes, halving the accumulators each lane holds at every
step (``_reduce``), so that lane ``c * 32 / P`` ends up with column ``c`` and applies the
epilogue (biases from the table, residual, clip) before the store.

float16 loads are converted to float32 and accumulated in float32 (unlike the unrolled
float16 kernels, which accumulate in float16); the result is rounded once, at the store.
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedProblem
from ...problem import BiasAdd, Clip, Layout, ResidualAdd, SpmmProblem
from ..base import require_dtype, require_nnz_at_most
from ..config import CudaCsrConfig
from .csr_layout import LANES, NO_ROW, SLOT_FIELDS, CsrLayout, csr_layout
from .ptx import (
    SUPPORTED_DTYPES,
    PtxKernel,
    clip_bounds,
    entry_declaration,
    f32_immediate,
    load_operands,
    param_types,
    ptx_header,
)

# Slot tables up to this size go to the constant bank (64 KB a module); every warp reads
# its own slot with one uniform load.
MAX_CONST_TABLE_BYTES = 32 * 1024
_MAX_IMMEDIATE = 2**31 - 1
_MAX_U32 = 2**32 - 1
_VALUES_PER_LINE = 32


def check_csr(problem: SpmmProblem, config: CudaCsrConfig) -> None:
    """Raises ``UnsupportedProblem`` where the CSR kernel cannot compute ``problem``."""
    require_dtype(problem, SUPPORTED_DTYPES, "the CUDA generator")
    require_nnz_at_most(problem, config.max_layer_nnz, "the CSR kernel's cap", "its arrays are PTX text and cubin data")
    if problem.window is not None:
        raise UnsupportedProblem(
            "the CSR kernel reads X by column offsets: convolutions through a window need the unrolled kernel"
        )
    es = _element_bytes(problem)
    xs, ys = problem.x_strides(), problem.y_strides()
    # Products of a 32-bit index with these are 64-bit (mul.wide.u32), the column offsets
    # within a tile are immediates.
    if max(xs.k, xs.n, ys.k, ys.n) * es > _MAX_U32 or (config.columns_per_block - 1) * xs.n * es > _MAX_IMMEDIATE:
        raise UnsupportedProblem("tensor too large for the CSR kernel's 32-bit strides")
    if problem.weight.nnz + (LANES - 1) * problem.M > _MAX_U32:
        raise UnsupportedProblem("too many nonzeros for the CSR kernel's 32-bit element indices")


def emit_csr_ptx(problem: SpmmProblem, config: CudaCsrConfig, name: str, arch: str) -> PtxKernel:
    check_csr(problem, config)
    layout = csr_layout(problem, config.rows_per_block, config.sort_rows)
    emitter = _CsrEmitter(problem, config, layout, name)
    text = "\n".join(ptx_header(arch) + emitter.arrays() + emitter.entry()) + "\n"
    return PtxKernel(
        name=name,
        units=(text,),
        row_groups=len(layout.groups),
        threads=config.threads_per_block,
        columns_per_block=config.columns_per_block,
        param_types=param_types(problem),
    )


def _element_bytes(problem: SpmmProblem) -> int:
    return 4 if problem.dtype == "float32" else 2


class _CsrEmitter:
    """Register names: ``%s<i>`` the warp's slot (first element, chunks, row, biases),
    ``%pv``/``%pi`` this lane's next value and index, ``%v<u>``/``%k<u>`` value and column of
    chunk ``u`` of a trip, ``%pk<u>`` the address of X at that column, ``%x<u*C+c>`` the
    activation of column ``c``, ``%acc<c>`` the accumulators, ``%pc<c>`` whether column ``c``
    exists (only where the column count is not a multiple of the tile)."""

    def __init__(self, problem: SpmmProblem, config: CudaCsrConfig, layout: CsrLayout, name: str):
        self.problem, self.config, self.layout, self.name = problem, config, layout, name
        self.es = _element_bytes(problem)
        self.value_bytes = layout.values.itemsize
        self.index_bytes = layout.indices.itemsize
        self.cols = config.columns_per_block
        self.padded_cols = 1 << (self.cols - 1).bit_length()  # the reduction halves powers of two
        self.xs, self.ys = problem.x_strides(), problem.y_strides()
        columns = problem.static_columns
        self.guarded = range(1, self.cols) if columns is None or columns % self.cols else range(0)
        table_bytes = layout.slots.nbytes
        self.table_space = "const" if table_bytes <= MAX_CONST_TABLE_BYTES else "global"

    # -- data ------------------------------------------------------------------------
    def arrays(self) -> list[str]:
        layout = self.layout
        value_type = "b32" if self.value_bytes == 4 else "b16"
        index_type = "b32" if self.index_bytes == 4 else "b16"
        values = layout.values.view(np.uint32 if self.value_bytes == 4 else np.uint16)
        return (
            _array("global", value_type, f"{self.name}_values", values)
            + _array("global", index_type, f"{self.name}_indices", layout.indices)
            + _array(self.table_space, "b32", f"{self.name}_slots", layout.slots.reshape(-1), align=16)
        )

    # -- code ------------------------------------------------------------------------
    def entry(self) -> list[str]:
        p, cfg = self.problem, self.config
        lines = entry_declaration(self.name, p.has_residual, cfg.threads_per_block)
        lines += self._declarations()
        lines += load_operands(p.has_residual)
        lines += [
            "mov.u32 %r1, %ctaid.x;",
            f"mul.lo.u32 %col0, %r1, {self.cols};",
            "setp.ge.u32 %p0, %col0, %ncols;",
            "@%p0 bra DONE;",
        ]
        lines += self._slot()
        if p.layout is Layout.CHANNELS:
            lines += self._batch()
        lines += [f"mul.wide.u32 %rd6, %col0, {self.xs.n * self.es};", "add.s64 %px, %px, %rd6;"]
        lines += self._lane_pointers()
        for c in self.guarded:
            lines += [f"add.u32 %r4, %col0, {c};", f"setp.lt.u32 %pc{c}, %r4, %ncols;"]
        lines += [f"mov.f32 %acc{c}, 0f00000000;" for c in range(self.padded_cols)]
        lines += self._loops()
        lines += ["REDUCE:"] + self._reduce() + self._epilogue()
        lines += ["DONE:", "ret;", "}"]
        return lines

    def _declarations(self) -> list[str]:
        unroll, slot_words = self.config.unroll, self.layout.slots.shape[1]
        return [
            ".reg .pred %p0, %pb;",
            f".reg .pred %pc<{self.cols}>;",
            ".reg .b32 %r<8>;",
            ".reg .b32 %col0, %ncols, %warp, %lane, %slot, %q, %rem, %colc, %col;",
            f".reg .b32 %s<{slot_words}>;",
            f".reg .b32 %k<{unroll}>;",
            ".reg .b64 %rd<12>;",
            ".reg .b64 %px, %py, %pr, %pv, %pi;",
            f".reg .b64 %pk<{unroll}>;",
            f".reg .f32 %v<{unroll}>;",
            f".reg .f32 %x<{unroll * self.cols}>;",
            f".reg .f32 %acc<{self.padded_cols}>;",
            ".reg .f32 %snd, %kept, %rcv, %t;",
            ".reg .b16 %h;",
        ]

    def _slot(self) -> list[str]:
        """Loads this warp's slot; warps without a row leave."""
        words = self.layout.slots.shape[1]
        lines = [
            "mov.u32 %r2, %tid.x;",
            "shr.u32 %warp, %r2, 5;",
            "and.b32 %lane, %r2, 31;",
            "mov.u32 %r3, %ctaid.y;",
            f"mad.lo.u32 %slot, %r3, {self.config.rows_per_block}, %warp;",
            f"mov.u64 %rd4, {self.name}_slots;",
            f"mul.wide.u32 %rd5, %slot, {words * 4};",
            "add.s64 %rd4, %rd4, %rd5;",
        ]
        load = "ld.const" if self.table_space == "const" else "ld.global.nc"
        for i in range(0, words, 4):
            registers = ", ".join(f"%s{i + j}" for j in range(4))
            lines.append(f"{load}.v4.u32 {{{registers}}}, [%rd4+{i * 4}];")
        return lines + [f"setp.eq.u32 %p0, %s2, {NO_ROW};", "@%p0 bra DONE;"]

    def _batch(self) -> list[str]:
        lines = [
            "mov.u32 %r3, %ctaid.z;",
            "cvt.u64.u32 %rd5, %r3;",
            f"mul.lo.u64 %rd6, %rd5, {self.xs.batch * self.es};",
            "add.s64 %px, %px, %rd6;",
            f"mul.lo.u64 %rd6, %rd5, {self.ys.batch * self.es};",
            "add.s64 %py, %py, %rd6;",
        ]
        return lines + (["add.s64 %pr, %pr, %rd6;"] if self.problem.has_residual else [])

    def _lane_pointers(self) -> list[str]:
        return [
            "add.u32 %r4, %s0, %lane;",
            f"mov.u64 %pv, {self.name}_values;",
            f"mul.wide.u32 %rd7, %r4, {self.value_bytes};",
            "add.s64 %pv, %pv, %rd7;",
            f"mov.u64 %pi, {self.name}_indices;",
            f"mul.wide.u32 %rd7, %r4, {self.index_bytes};",
            "add.s64 %pi, %pi, %rd7;",
        ]

    def _loops(self) -> list[str]:
        """``chunks // unroll`` trips of ``unroll`` chunks, then the rest one by one; both
        counts are uniform in the warp (``bra.uni``)."""
        unroll = self.config.unroll
        if unroll == 1:
            return ["mov.u32 %rem, %s1;"] + self._loop("ONE", "%rem", 1)
        lines = [f"shr.u32 %q, %s1, {unroll.bit_length() - 1};", f"and.b32 %rem, %s1, {unroll - 1};"]
        return lines + self._loop("MANY", "%q", unroll) + self._loop("ONE", "%rem", 1)

    def _loop(self, label: str, counter: str, chunks: int) -> list[str]:
        lines = [f"setp.eq.u32 %p0, {counter}, 0;", f"@%p0 bra {label}_END;", f"{label}:"]
        lines += self._chunks(chunks)
        lines += [
            f"sub.u32 {counter}, {counter}, 1;",
            f"setp.ne.u32 %p0, {counter}, 0;",
            f"@%p0 bra.uni {label};",
            f"{label}_END:",
        ]
        return lines

    def _chunks(self, chunks: int) -> list[str]:
        """One trip over ``chunks`` chunks: all loads first, so they are in flight together."""
        vb, ib, index_type = self.value_bytes, self.index_bytes, "u32" if self.index_bytes == 4 else "u16"
        lines = []
        for u in range(chunks):
            lines += self._load_f32(f"%v{u}", f"[%pv+{u * LANES * vb}]")
            lines.append(f"ld.global.nc.{index_type} %k{u}, [%pi+{u * LANES * ib}];")
        for u in range(chunks):
            lines += [f"mul.wide.u32 %pk{u}, %k{u}, {self.xs.k * self.es};", f"add.s64 %pk{u}, %pk{u}, %px;"]
        for u in range(chunks):
            for c in range(self.cols):
                guard = f"@%pc{c} " if c in self.guarded else ""
                lines += self._load_f32(f"%x{u * self.cols + c}", f"[%pk{u}+{c * self.xs.n * self.es}]", guard)
        for u in range(chunks):
            for c in range(self.cols):
                lines.append(f"fma.rn.f32 %acc{c}, %v{u}, %x{u * self.cols + c}, %acc{c};")
        return lines + [f"add.s64 %pv, %pv, {chunks * LANES * vb};", f"add.s64 %pi, %pi, {chunks * LANES * ib};"]

    def _reduce(self) -> list[str]:
        """Sums the 32 lanes' accumulators. While a lane holds more than one, each exchange
        step sends half of them to the partner and keeps the other half (lanes with the
        step's bit set keep the upper half), so ``P`` columns take ``P - 1`` shuffles before
        the last steps of a plain butterfly instead of ``5 P``."""
        values = [f"%acc{c}" for c in range(self.padded_cols)]
        lines, step = [], LANES // 2
        while len(values) > 1:
            half = len(values) // 2
            lines += [f"and.b32 %r5, %lane, {step};", "setp.ne.u32 %pb, %r5, 0;"]
            for low, high in zip(values[:half], values[half:]):
                lines += [
                    f"selp.f32 %snd, {low}, {high}, %pb;",
                    f"selp.f32 %kept, {high}, {low}, %pb;",
                    f"shfl.sync.bfly.b32 %rcv, %snd, {step}, 31, -1;",
                    f"add.f32 {low}, %kept, %rcv;",
                ]
            values, step = values[:half], step // 2
        while step:
            lines += [f"shfl.sync.bfly.b32 %rcv, %acc0, {step}, 31, -1;", "add.f32 %acc0, %acc0, %rcv;"]
            step //= 2
        return lines

    def _epilogue(self) -> list[str]:
        """Lane ``c * spread`` holds column ``c`` of the tile in ``%acc0``."""
        bits = self.padded_cols.bit_length() - 1
        spread = LANES >> bits
        lines = []
        if spread > 1:
            lines += [f"and.b32 %r5, %lane, {spread - 1};", "setp.ne.u32 %p0, %r5, 0;", "@%p0 bra DONE;"]
        lines.append(f"shr.u32 %colc, %lane, {5 - bits};")
        if self.cols < self.padded_cols:
            lines += [f"setp.ge.u32 %p0, %colc, {self.cols};", "@%p0 bra DONE;"]
        lines.append("add.u32 %col, %col0, %colc;")
        if self.guarded:
            lines += ["setp.ge.u32 %p0, %col, %ncols;", "@%p0 bra DONE;"]
        lines += [
            f"mul.wide.u32 %rd8, %s2, {self.ys.k * self.es};",
            f"mul.wide.u32 %rd9, %col, {self.ys.n * self.es};",
            "add.s64 %rd8, %rd8, %rd9;",
        ]
        biases = SLOT_FIELDS
        for op in self.problem.epilogue:
            if isinstance(op, BiasAdd):
                lines.append(f"add.f32 %acc0, %acc0, %s{biases};")
                biases += 1
            elif isinstance(op, ResidualAdd):
                lines.append("add.s64 %rd10, %pr, %rd8;")
                lines += self._load_f32("%t", "[%rd10]")
                lines.append("add.f32 %acc0, %acc0, %t;")
            elif isinstance(op, Clip):
                lines += [f"{name}.f32 %acc0, %acc0, {f32_immediate(bound)};" for name, bound in clip_bounds(op)]
        lines.append("add.s64 %rd10, %py, %rd8;")
        if self.es == 4:
            return lines + ["st.global.f32 [%rd10], %acc0;"]
        return lines + ["cvt.rn.f16.f32 %h, %acc0;", "st.global.b16 [%rd10], %h;"]

    def _load_f32(self, dest: str, address: str, guard: str = "") -> list[str]:
        """A load of one element as float32 (float16 is converted)."""
        if self.es == 4:
            return [f"{guard}ld.global.nc.f32 {dest}, {address};"]
        return [f"{guard}ld.global.nc.b16 %h, {address};", f"{guard}cvt.f32.f16 {dest}, %h;"]


def _array(space: str, kind: str, name: str, data: np.ndarray, align: int | None = None) -> list[str]:
    """An initialised array (at least one element: PTX has no empty arrays)."""
    items = data.tolist() or [0]
    align = align or int(kind[1:]) // 8
    lines = [f".{space} .align {align} .{kind} {name}[{len(items)}] = {{"]
    for i in range(0, len(items), _VALUES_PER_LINE):
        end = "" if i + _VALUES_PER_LINE >= len(items) else ","
        lines.append(",".join(map(str, items[i : i + _VALUES_PER_LINE])) + end)
    return lines + ["};", ""]
