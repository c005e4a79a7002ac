"""PTX of the data-driven (CSR) kernel: nonzeros read from arrays, one warp per row.

Unrolled code costs about 16 bytes of instructions per nonzero, streamed once per column
tile; at a few columns (fully connected layers at batch 1-8) that stream is the whole time.
Here the values and column indices are data (4-8 bytes per nonzero: f32 or f16 values,
u16 or u32 indices) in initialised ``.global`` arrays of the module itself, so the kernel
keeps the unrolled kernel's launch signature ``(x, [residual], y, ncols)`` and grid
``(ceil(columns / columns_per_block), row_groups, batch)``; only the structure (which row
each warp owns, where its nonzeros start, how many chunks it has) is fixed at compile time,
in a per-warp table (``.const`` where it is small).

With lanes over nonzeros (``_NonzeroLanes``), lane ``l`` of a warp takes nonzeros ``l, l +
32, ...`` of the warp's row (``csr_layout``), keeps one accumulator per column of the block's
tile and, per nonzero, loads the activation of every column at ``k * x_strides.k + column *
x_strides.n``. The loop runs ``unroll`` chunks per trip (their loads in flight together),
then single chunks. A butterfly of ``shfl.sync.bfly`` then sums the lanes, halving the
accumulators each lane holds at every step (``_reduce``), so that lane ``c * 32 / P`` ends
up with column ``c`` and applies the epilogue (biases from the table, residual, clip) before
the store.

With lanes over columns (``_ColumnLanes``), the arrays are one of (float32 value bits, byte
offset of X's row ``k``) pairs, rows padded to whole trips of ``unroll`` pairs. Every lane of
the warp loads the same pairs (one broadcast 16-byte load per two nonzeros), then its own
``columns_per_lane`` neighbouring activations of each row (one vector load, the warp's
together one contiguous run), and keeps one accumulator per column: the epilogue follows
the loop directly.

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
    if config.column_lanes:
        _check_column_lanes(problem, config)


def _check_column_lanes(problem: SpmmProblem, config: CudaCsrConfig) -> None:
    es, xs, ys = _element_bytes(problem), problem.x_strides(), problem.y_strides()
    if xs.n != 1:
        raise UnsupportedProblem(
            "CSR column lanes need X's columns to be neighbours in memory (NCHW, or X transposed)"
        )
    width, columns = config.columns_per_lane, problem.static_columns
    if width > 1 and (columns is None or columns % width):
        raise UnsupportedProblem(f"{width} columns per lane need a static column count divisible by {width}")
    if (problem.K - 1) * xs.k * es > _MAX_U32 or (width - 1) * ys.n * es > _MAX_IMMEDIATE:
        raise UnsupportedProblem("tensor too large for the CSR kernel's 32-bit row offsets")


def emit_csr_ptx(problem: SpmmProblem, config: CudaCsrConfig, name: str, arch: str) -> PtxKernel:
    check_csr(problem, config)
    chunk = config.unroll if config.column_lanes else LANES
    layout = csr_layout(problem, config.rows_per_block, config.sort_rows, chunk)
    emitter = (_ColumnLanes if config.column_lanes else _NonzeroLanes)(problem, config, layout, name)
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
    """What both lane mappings share: the slot table, the batch offset, the loop, the
    epilogue. Register names: ``%s<i>`` the warp's slot (first element, chunks, row, biases),
    ``%col0`` the block's first column, ``%acc<c>`` the accumulators, ``%t<c>`` residual
    values, ``%h<i>`` float16 bits."""

    def __init__(self, problem: SpmmProblem, config: CudaCsrConfig, layout: CsrLayout, name: str):
        self.problem, self.config, self.layout, self.name = problem, config, layout, name
        self.es = _element_bytes(problem)
        self.cols = config.columns_per_block
        self.xs, self.ys = problem.x_strides(), problem.y_strides()
        table_bytes = layout.slots.nbytes
        self.table_space = "const" if table_bytes <= MAX_CONST_TABLE_BYTES else "global"

    def arrays(self) -> list[str]:
        return self._data_arrays() + _array(
            self.table_space, "b32", f"{self.name}_slots", self.layout.slots.reshape(-1), align=16
        )

    def entry(self) -> list[str]:
        p, cfg = self.problem, self.config
        lines = entry_declaration(self.name, p.has_residual, cfg.threads_per_block)
        lines += self._common_declarations() + self._declarations()
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
        return lines + self._body() + ["DONE:", "ret;", "}"]

    def _common_declarations(self) -> list[str]:
        words = self.layout.slots.shape[1]
        return [
            ".reg .pred %p0;",
            ".reg .b32 %r<8>;",
            ".reg .b32 %col0, %ncols, %warp, %lane, %slot, %q, %col;",
            f".reg .b32 %s<{words}>;",
            ".reg .b64 %rd<12>;",
            ".reg .b64 %px, %py, %pr, %pv;",
            f".reg .f32 %t<{self.config.columns_per_lane}>;",
        ]

    def _slot(self) -> list[str]:
        """Loads this warp's slot (``warps_per_row`` neighbouring warps share one); warps
        without a row leave, unless their block meets at a barrier later."""
        words = self.layout.slots.shape[1]
        shift = self.config.warps_per_row.bit_length() - 1
        row = "%r4" if shift else "%warp"
        lines = ["mov.u32 %r2, %tid.x;", "shr.u32 %warp, %r2, 5;", "and.b32 %lane, %r2, 31;"]
        lines += [f"shr.u32 %r4, %warp, {shift};"] if shift else []
        lines += [
            "mov.u32 %r3, %ctaid.y;",
            f"mad.lo.u32 %slot, %r3, {self.config.rows_per_block}, {row};",
            f"mov.u64 %rd4, {self.name}_slots;",
            f"mul.wide.u32 %rd5, %slot, {words * 4};",
            "add.s64 %rd4, %rd4, %rd5;",
        ]
        load = "ld.const" if self.table_space == "const" else "ld.global.nc"
        for i in range(0, words, 4):
            registers = ", ".join(f"%s{i + j}" for j in range(4))
            lines.append(f"{load}.v4.u32 {{{registers}}}, [%rd4+{i * 4}];")
        if self.config.warps_per_row > 1:
            return lines
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

    @staticmethod
    def _loop(label: str, counter: str, trip: list[str]) -> list[str]:
        """``counter`` trips of ``trip``; the count is uniform in the warp (``bra.uni``)."""
        lines = [f"setp.eq.u32 %p0, {counter}, 0;", f"@%p0 bra {label}_END;", f"{label}:"]
        lines += trip
        lines += [
            f"sub.u32 {counter}, {counter}, 1;",
            f"setp.ne.u32 %p0, {counter}, 0;",
            f"@%p0 bra.uni {label};",
            f"{label}_END:",
        ]
        return lines

    def _epilogue(self, accs: list[str], column: str) -> list[str]:
        """Biases from the slot, the residual and clips applied to ``accs`` (columns
        ``column``, ``column + 1``, ... of the warp's row), then the store."""
        lines = [
            f"mul.wide.u32 %rd8, %s2, {self.ys.k * self.es};",
            f"mul.wide.u32 %rd9, {column}, {self.ys.n * self.es};",
            "add.s64 %rd8, %rd8, %rd9;",
        ]
        biases = SLOT_FIELDS
        for op in self.problem.epilogue:
            if isinstance(op, BiasAdd):
                lines += [f"add.f32 {acc}, {acc}, %s{biases};" for acc in accs]
                biases += 1
            elif isinstance(op, ResidualAdd):
                residual = [f"%t{c}" for c in range(len(accs))]
                lines.append("add.s64 %rd10, %pr, %rd8;")
                lines += self._load_row("%rd10", residual, self.ys.n)
                lines += [f"add.f32 {acc}, {acc}, {t};" for acc, t in zip(accs, residual)]
            elif isinstance(op, Clip):
                for name, bound in clip_bounds(op):
                    lines += [f"{name}.f32 {acc}, {acc}, {f32_immediate(bound)};" for acc in accs]
        lines.append("add.s64 %rd10, %py, %rd8;")
        return lines + self._store_row("%rd10", accs, self.ys.n)

    def _load_row(self, base: str, dests: list[str], stride: int, offset: int = 0, guard: str = "") -> list[str]:
        """Loads ``len(dests)`` elements ``stride`` apart from ``[base+offset]`` as float32
        (float16 is converted): one vector load where they are neighbours."""
        es, count = self.es, len(dests)
        halves = [f"%h{i}" for i in range(count)]
        kind, registers = ("f32", dests) if es == 4 else ("b16", halves)
        if count > 1 and stride == 1:
            lines = [f"{guard}ld.global.nc.v{count}.{kind} {{{', '.join(registers)}}}, [{base}+{offset}];"]
        else:
            lines = [
                f"{guard}ld.global.nc.{kind} {r}, [{base}+{offset + c * stride * es}];" for c, r in enumerate(registers)
            ]
        if es == 2:
            lines += [f"{guard}cvt.f32.f16 {d}, {h};" for d, h in zip(dests, halves)]
        return lines

    def _store_row(self, base: str, sources: list[str], stride: int) -> list[str]:
        es, count = self.es, len(sources)
        registers = sources
        lines = []
        if es == 2:
            registers = [f"%h{i}" for i in range(count)]
            lines += [f"cvt.rn.f16.f32 {h}, {s};" for h, s in zip(registers, sources)]
        kind = "f32" if es == 4 else "b16"
        if count > 1 and stride == 1:
            return lines + [f"st.global.v{count}.{kind} [{base}+0], {{{', '.join(registers)}}};"]
        return lines + [f"st.global.{kind} [{base}+{c * stride * es}], {r};" for c, r in enumerate(registers)]


class _NonzeroLanes(_CsrEmitter):
    """Further registers: ``%pv``/``%pi`` this lane's next value and index, ``%v<u>``/``%k<u>``
    value and column of chunk ``u`` of a trip, ``%pk<u>`` the address of X at that column,
    ``%x<u*C+c>`` the activation of column ``c``, ``%pc<c>`` whether column ``c`` exists (only
    where the column count is not a multiple of the tile)."""

    def __init__(self, problem, config, layout, name):
        super().__init__(problem, config, layout, name)
        self.value_bytes = layout.values.itemsize
        self.index_bytes = layout.indices.itemsize
        self.padded_cols = 1 << (self.cols - 1).bit_length()  # the reduction halves powers of two
        columns = problem.static_columns
        self.guarded = range(1, self.cols) if columns is None or columns % self.cols else range(0)

    def _data_arrays(self) -> list[str]:
        layout = self.layout
        value_type = "b32" if self.value_bytes == 4 else "b16"
        index_type = "b32" if self.index_bytes == 4 else "b16"
        values = layout.values.view(np.uint32 if self.value_bytes == 4 else np.uint16)
        return _array("global", value_type, f"{self.name}_values", values) + _array(
            "global", index_type, f"{self.name}_indices", layout.indices
        )

    def _declarations(self) -> list[str]:
        unroll = self.config.unroll
        return [
            ".reg .pred %pb;",
            f".reg .pred %pc<{self.cols}>;",
            ".reg .b32 %rem, %colc;",
            f".reg .b32 %k<{unroll}>;",
            ".reg .b64 %pi;",
            f".reg .b64 %pk<{unroll}>;",
            f".reg .f32 %v<{unroll}>;",
            f".reg .f32 %x<{unroll * self.cols}>;",
            f".reg .f32 %acc<{self.padded_cols}>;",
            ".reg .f32 %snd, %kept, %rcv;",
            ".reg .b16 %h<1>;",
        ]

    def _body(self) -> list[str]:
        lines = [f"mul.wide.u32 %rd6, %col0, {self.xs.n * self.es};", "add.s64 %px, %px, %rd6;"]
        lines += self._lane_pointers()
        for c in self.guarded:
            lines += [f"add.u32 %r4, %col0, {c};", f"setp.lt.u32 %pc{c}, %r4, %ncols;"]
        lines += [f"mov.f32 %acc{c}, 0f00000000;" for c in range(self.padded_cols)]
        lines += self._loops()
        return lines + ["REDUCE:"] + self._reduce() + self._store_lane()

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
        """``chunks // unroll`` trips of ``unroll`` chunks, then the rest one by one."""
        unroll = self.config.unroll
        if unroll == 1:
            return ["mov.u32 %rem, %s1;"] + self._loop("ONE", "%rem", self._chunks(1))
        lines = [f"shr.u32 %q, %s1, {unroll.bit_length() - 1};", f"and.b32 %rem, %s1, {unroll - 1};"]
        return lines + self._loop("MANY", "%q", self._chunks(unroll)) + self._loop("ONE", "%rem", self._chunks(1))

    def _chunks(self, chunks: int) -> list[str]:
        """One trip over ``chunks`` chunks: all loads first, so they are in flight together."""
        vb, ib, index_type = self.value_bytes, self.index_bytes, "u32" if self.index_bytes == 4 else "u16"
        lines = []
        for u in range(chunks):
            lines += self._load_row("%pv", [f"%v{u}"], 1, u * LANES * vb)
            lines.append(f"ld.global.nc.{index_type} %k{u}, [%pi+{u * LANES * ib}];")
        for u in range(chunks):
            lines += [f"mul.wide.u32 %pk{u}, %k{u}, {self.xs.k * self.es};", f"add.s64 %pk{u}, %pk{u}, %px;"]
        for u in range(chunks):
            for c in range(self.cols):
                guard = f"@%pc{c} " if c in self.guarded else ""
                lines += self._load_row(f"%pk{u}", [f"%x{u * self.cols + c}"], 1, c * self.xs.n * self.es, guard)
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

    def _store_lane(self) -> list[str]:
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
        return lines + self._epilogue(["%acc0"], "%col")


class _ColumnLanes(_CsrEmitter):
    """Further registers: ``%wn<u>``/``%on<u>`` value bits and X row offset of nonzero ``u`` of
    this warp's next trip (loaded a trip ahead, so that their latency hides behind the
    activations'), ``%w<u>`` the current trip's values, ``%pk<u>`` this lane's address in the
    row, ``%x<u*V+c>`` its activations; with several warps per row, ``%part`` this warp's
    share, ``%pout`` whether the lane has no column to store, ``%ps`` its partial sums."""

    def __init__(self, problem, config, layout, name):
        super().__init__(problem, config, layout, name)
        self.width = config.columns_per_lane
        self.warps = config.warps_per_row
        self.trip_bytes = 8 * config.unroll

    def _data_arrays(self) -> list[str]:
        layout = self.layout
        offsets = layout.indices.astype(np.uint64) * np.uint64(self.xs.k * self.es)
        values = layout.values.astype(np.float32).view(np.uint32)
        pairs = np.stack([values, offsets.astype(np.uint32)], axis=1).reshape(-1)
        # Zero pairs after the last row: what a warp's load of its next trip reads there.
        pairs = np.concatenate([pairs, np.zeros(2 * self.warps * self.config.unroll, np.uint32)])
        lines = _array("global", "b32", f"{self.name}_pairs", pairs, align=16)
        if self.warps > 1:
            lines += [f".shared .align 16 .b8 {self.name}_partials[{partial_bytes(self.config)}];", ""]
        return lines

    def _declarations(self) -> list[str]:
        unroll, width = self.config.unroll, self.width
        return [
            ".reg .pred %pout;",
            ".reg .b32 %part;",
            f".reg .b32 %w<{unroll}>, %wn<{unroll}>, %on<{unroll}>;",
            ".reg .b64 %ps;",
            f".reg .b64 %pk<{unroll}>;",
            f".reg .f32 %x<{unroll * width}>;",
            f".reg .f32 %acc<{width}>;",
            f".reg .b16 %h<{unroll * width}>;",
        ]

    def _body(self) -> list[str]:
        width, warps = self.width, self.warps
        lines = [f"mad.lo.u32 %col, %lane, {width}, %col0;", "setp.ge.u32 %pout, %col, %ncols;"]
        if warps == 1:
            lines += ["@%pout bra DONE;", "mov.u32 %part, 0;", "mov.u32 %q, %s1;"]
        else:
            # Every warp of the block meets at the barrier: a lane past the columns reads the
            # last vector instead and stores nothing; warp p of a row takes trips p, p + W, ...
            lines += [
                f"sub.u32 %r5, %ncols, {width};",
                "selp.b32 %col, %r5, %col, %pout;",
                f"and.b32 %part, %warp, {warps - 1};",
                f"add.u32 %r5, %s1, {warps - 1};",
                "sub.u32 %r5, %r5, %part;",
                f"shr.u32 %q, %r5, {warps.bit_length() - 1};",
            ]
        lines += [
            f"mul.wide.u32 %rd6, %col, {self.xs.n * self.es};",
            "add.s64 %px, %px, %rd6;",
            f"mad.lo.u32 %r5, %part, {self.config.unroll}, %s0;",
            f"mov.u64 %pv, {self.name}_pairs;",
            "mul.wide.u32 %rd7, %r5, 8;",
            "add.s64 %pv, %pv, %rd7;",
        ]
        lines += self._load_pairs("%wn", "%on")
        lines += [f"mov.f32 %acc{c}, 0f00000000;" for c in range(width)]
        lines += self._loop("TRIP", "%q", self._trip())
        accs = [f"%acc{c}" for c in range(width)]
        if warps > 1:
            lines += self._add_partials(accs)
        return lines + self._epilogue(accs, "%col")

    def _load_pairs(self, values: str, offsets: str) -> list[str]:
        """The pairs of the trip at ``%pv``: broadcast loads of two nonzeros each."""
        if self.config.unroll == 1:
            return [f"ld.global.nc.v2.u32 {{{values}0, {offsets}0}}, [%pv+0];"]
        return [
            f"ld.global.nc.v4.u32 {{{values}{u}, {offsets}{u}, {values}{u + 1}, {offsets}{u + 1}}}, [%pv+{8 * u}];"
            for u in range(0, self.config.unroll, 2)
        ]

    def _trip(self) -> list[str]:
        """``unroll`` nonzeros: the activation loads, the next trip's pairs, the FMAs."""
        unroll, width = self.config.unroll, self.width
        lines = [f"mov.b32 %w{u}, %wn{u};" for u in range(unroll)]
        lines += [f"mad.wide.u32 %pk{u}, %on{u}, 1, %px;" for u in range(unroll)]
        for u in range(unroll):
            lines += self._load_row(f"%pk{u}", [f"%x{u * width + c}" for c in range(width)], 1)
        lines.append(f"add.s64 %pv, %pv, {self.trip_bytes * self.warps};")
        lines += self._load_pairs("%wn", "%on")
        return lines + [
            f"fma.rn.f32 %acc{c}, %w{u}, %x{u * width + c}, %acc{c};" for u in range(unroll) for c in range(width)
        ]

    def _add_partials(self, accs: list[str]) -> list[str]:
        """Each warp leaves its sums in shared memory; the row's first warp adds the others'
        (a warp's slots are consecutive: ``(warp * 32 + lane) * V + c``)."""
        width, stride = self.width, 32 * self.width * 4
        lines = [
            "mov.u32 %r5, %tid.x;",
            f"mul.wide.u32 %rd7, %r5, {4 * width};",
            f"mov.u64 %ps, {self.name}_partials;",
            "add.s64 %ps, %ps, %rd7;",
        ]
        lines += self._shared_row("st", accs, 0)
        lines += ["bar.sync 0;", "setp.ne.u32 %p0, %part, 0;", "@%p0 bra DONE;"]
        lines += [f"setp.eq.u32 %p0, %s2, {NO_ROW};", "@%p0 bra DONE;", "@%pout bra DONE;"]
        for w in range(1, self.warps):
            partial = [f"%t{c}" for c in range(width)]
            lines += self._shared_row("ld", partial, w * stride)
            lines += [f"add.f32 {acc}, {acc}, {t};" for acc, t in zip(accs, partial)]
        return lines

    def _shared_row(self, op: str, registers: list[str], offset: int) -> list[str]:
        vector = f".v{len(registers)}" if len(registers) > 1 else ""
        operands = f"{{{', '.join(registers)}}}" if len(registers) > 1 else registers[0]
        if op == "st":
            return [f"st.shared{vector}.f32 [%ps+{offset}], {operands};"]
        return [f"ld.shared{vector}.f32 {operands}, [%ps+{offset}];"]


def partial_bytes(config: CudaCsrConfig) -> int:
    """Shared memory of a block whose rows are shared by several warps."""
    return config.threads_per_block * config.columns_per_lane * 4


def _array(space: str, kind: str, name: str, data: np.ndarray, align: int | None = None) -> list[str]:
    """An initialised array (at least one element: PTX has no empty arrays)."""
    items = data.tolist() or [0]
    align = align or int(kind[1:]) // 8
    lines = [f".{space} .align {align} .{kind} {name}[{len(items)}] = {{"]
    for i in range(0, len(items), _VALUES_PER_LINE):
        end = "" if i + _VALUES_PER_LINE >= len(items) else ","
        lines.append(",".join(map(str, items[i : i + _VALUES_PER_LINE])) + end)
    return lines + ["};", ""]
