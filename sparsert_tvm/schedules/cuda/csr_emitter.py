"""What the CSR kernel's two lane mappings share: the per-warp slot table, the batch offset,
the trip loop, the epilogue and the module's initialised arrays (``csr_ptx`` says how the
kernel works)."""

from __future__ import annotations

import numpy as np

from ...problem import BiasAdd, Clip, Layout, ResidualAdd, SpmmProblem
from ..config import CudaCsrConfig
from .csr_layout import NO_ROW, SLOT_FIELDS, CsrLayout
from .ptx_common import clip_bounds, entry_declaration, f32_immediate, load_operands

# Slot tables up to this size go to the constant bank (64 KB a module); every warp reads
# its own slot with one uniform load.
MAX_CONST_TABLE_BYTES = 32 * 1024
_VALUES_PER_LINE = 32


def element_bytes(problem: SpmmProblem) -> int:
    return 4 if problem.dtype == "float32" else 2


class CsrEmitter:
    """What both lane mappings share: the slot table, the batch offset, the loop, the
    epilogue. Register names: ``%s<i>`` the warp's slot (first element, chunks, row, biases),
    ``%col0`` the block's first column, ``%acc<c>`` the accumulators, ``%t<c>`` residual
    values, ``%h<i>`` float16 bits."""

    # Whether each warp has a slot of its own (rather than a row's warps sharing one) and
    # whether the batch is folded into the columns (rather than the grid's z dimension).
    slot_per_warp = False
    folds_batch = False

    def __init__(self, problem: SpmmProblem, config: CudaCsrConfig, layout: CsrLayout, name: str):
        self.problem, self.config, self.layout, self.name = problem, config, layout, name
        self.es = element_bytes(problem)
        self.cols = config.columns_per_block
        self.warps = config.warps_per_row  # warps sharing a row
        self.xs, self.ys = problem.x_strides(), problem.y_strides()
        table_bytes = layout.slots.nbytes
        self.table_space = "const" if table_bytes <= MAX_CONST_TABLE_BYTES else "global"

    def arrays(self) -> list[str]:
        return self._data_arrays() + initialised_array(
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
        if p.layout is Layout.CHANNELS and not self.folds_batch:
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
        """Loads this warp's slot (``warps_per_row`` neighbouring warps share one, unless
        ``slot_per_warp``); warps without a row leave, unless their block meets at a barrier
        later."""
        words = self.layout.slots.shape[1]
        shift = 0 if self.slot_per_warp else self.config.warps_per_row.bit_length() - 1
        row = "%r4" if shift else "%warp"
        slots_per_block = self.config.threads_per_block // 32 >> shift
        lines = ["mov.u32 %r2, %tid.x;", "shr.u32 %warp, %r2, 5;", "and.b32 %lane, %r2, 31;"]
        lines += [f"shr.u32 %r4, %warp, {shift};"] if shift else []
        lines += [
            "mov.u32 %r3, %ctaid.y;",
            f"mad.lo.u32 %slot, %r3, {slots_per_block}, {row};",
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

    def _partials_array(self) -> list[str]:
        """Shared memory where the warps of a row leave their sums (none for one warp)."""
        if self.warps == 1:
            return []
        return [f".shared .align 16 .b8 {self.name}_partials[{partial_bytes(self.config)}];", ""]

    def _add_partials(self, accs: list[str], leave: str = "") -> list[str]:
        """Each warp leaves its sums ``accs`` in shared memory; the row's first warp adds the
        others' (a warp's slots are consecutive: ``(warp * 32 + lane) * len(accs) + c``).
        Every warp of the block meets at the barrier first; ``leave`` then sends lanes
        without a column to store to ``DONE``."""
        width = len(accs)
        stride = 32 * width * 4
        lines = [
            "mov.u32 %r5, %tid.x;",
            f"mul.wide.u32 %rd7, %r5, {4 * width};",
            f"mov.u64 %ps, {self.name}_partials;",
            "add.s64 %ps, %ps, %rd7;",
        ]
        lines += _shared_row("st", accs, 0)
        lines += ["bar.sync 0;", "setp.ne.u32 %p0, %part, 0;", "@%p0 bra DONE;"]
        lines += [f"setp.eq.u32 %p0, %s2, {NO_ROW};", "@%p0 bra DONE;"] + ([leave] if leave else [])
        for w in range(1, self.warps):
            partial = [f"%t{c}" for c in range(width)]
            lines += _shared_row("ld", partial, w * stride)
            lines += [f"add.f32 {acc}, {acc}, {t};" for acc, t in zip(accs, partial)]
        return lines

    def _epilogue(self, accs: list[str], column: str | None, y: str = "%py", residual_base: str = "%pr") -> list[str]:
        """Biases from the slot, the residual and clips applied to ``accs`` (columns
        ``column``, ``column + 1``, ... of the warp's row), then the store; without a
        ``column``, ``y`` and ``residual_base`` point at the column already."""
        lines = [f"mul.wide.u32 %rd8, %s2, {self.ys.k * self.es};"]
        if column is not None:
            lines += [f"mul.wide.u32 %rd9, {column}, {self.ys.n * self.es};", "add.s64 %rd8, %rd8, %rd9;"]
        biases = SLOT_FIELDS
        for op in self.problem.epilogue:
            if isinstance(op, BiasAdd):
                lines += [f"add.f32 {acc}, {acc}, %s{biases};" for acc in accs]
                biases += 1
            elif isinstance(op, ResidualAdd):
                residual = [f"%t{c}" for c in range(len(accs))]
                lines.append(f"add.s64 %rd10, {residual_base}, %rd8;")
                lines += self._load_row("%rd10", residual, self.ys.n)
                lines += [f"add.f32 {acc}, {acc}, {t};" for acc, t in zip(accs, residual)]
            elif isinstance(op, Clip):
                for name, bound in clip_bounds(op):
                    lines += [f"{name}.f32 {acc}, {acc}, {f32_immediate(bound)};" for acc in accs]
        lines.append(f"add.s64 %rd10, {y}, %rd8;")
        return lines + self._store_row("%rd10", accs, self.ys.n)

    def _load_row(
        self, base: str, dests: list[str], stride: int, offset: int = 0, guard: str = "",
        halves: list[str] | None = None, convert: bool = True,
    ) -> list[str]:
        """Loads ``len(dests)`` elements ``stride`` apart from ``[base+offset]`` as float32
        (float16 goes through ``halves`` and is converted unless ``convert`` is False): one
        vector load where they are neighbours."""
        es, count = self.es, len(dests)
        halves = halves or [f"%h{i}" for i in range(count)]
        kind, registers = ("f32", dests) if es == 4 else ("b16", halves)
        if count > 1 and stride == 1:
            lines = [f"{guard}ld.global.nc.v{count}.{kind} {{{', '.join(registers)}}}, [{base}+{offset}];"]
        else:
            lines = [
                f"{guard}ld.global.nc.{kind} {r}, [{base}+{offset + c * stride * es}];" for c, r in enumerate(registers)
            ]
        if es == 2 and convert:
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


def partial_bytes(config: CudaCsrConfig) -> int:
    """Shared memory of a block whose rows are shared by several warps: one float32 sum per
    accumulator of each lane (a column-lane's columns; one after the lanes' reduction)."""
    return config.threads_per_block * config.columns_per_lane * 4


def _shared_row(op: str, registers: list[str], offset: int) -> list[str]:
    vector = f".v{len(registers)}" if len(registers) > 1 else ""
    operands = f"{{{', '.join(registers)}}}" if len(registers) > 1 else registers[0]
    if op == "st":
        return [f"st.shared{vector}.f32 [%ps+{offset}], {operands};"]
    return [f"ld.shared{vector}.f32 {operands}, [%ps+{offset}];"]


def initialised_array(space: str, kind: str, name: str, data: np.ndarray, align: int | None = None) -> list[str]:
    """An initialised array (at least one element: PTX has no empty arrays)."""
    items = data.tolist() or [0]
    align = align or int(kind[1:]) // 8
    lines = [f".{space} .align {align} .{kind} {name}[{len(items)}] = {{"]
    for i in range(0, len(items), _VALUES_PER_LINE):
        end = "" if i + _VALUES_PER_LINE >= len(items) else ","
        lines.append(",".join(map(str, items[i : i + _VALUES_PER_LINE])) + end)
    return lines + ["};", ""]
