"""The CSR kernel with lanes over nonzeros: for a few columns (matrix-vector products).

Lane ``l`` of a warp takes nonzeros ``l, l + 32, ...`` of the warp's row (``csr_layout``),
keeps one accumulator per column of the block's tile and, per nonzero, loads the activation
of every column at ``k * x_strides.k + column * x_strides.n``. The loop runs ``unroll``
chunks per trip (their loads in flight together), then single chunks. A butterfly of
``shfl.sync.bfly`` then sums the lanes, halving the accumulators each lane holds at every
step (``_reduce``), so that lane ``c * 32 / P`` ends up with column ``c`` and applies the
epilogue (biases from the table, residual, clip) before the store.

With ``warps_per_row`` W > 1 the row's warps share its chunks (warp ``p`` takes chunks ``p,
p + W, ...``) and, after each warp's butterfly, add up through shared memory: a long row is
a chain of dependent loads (each chunk's values and indices, then the activations they
point at) that one warp would walk alone while few warps fill the machine.
"""

from __future__ import annotations

import numpy as np

from .csr_emitter import CsrEmitter, initialised_array
from .csr_layout import LANES


class NonzeroLanes(CsrEmitter):
    """Further registers: ``%pv``/``%pi`` this lane's next value and index, ``%v<u>``/``%k<u>``
    value and column of chunk ``u`` of a trip, ``%pk<u>`` the address of X at that column,
    ``%x<u*C+c>`` the activation of column ``c``, ``%pc<c>`` whether column ``c`` exists (only
    where the column count is not a multiple of the tile); with several warps per row,
    ``%part`` this warp's share and ``%ps`` its partial sums."""

    def __init__(self, problem, config, layout, name):
        super().__init__(problem, config, layout, name)
        self.value_bytes = layout.values.itemsize
        self.index_bytes = layout.indices.itemsize
        self.padded_cols = 1 << (self.cols - 1).bit_length()  # the reduction halves powers of two
        columns = problem.static_columns
        self.guarded = range(1, self.cols) if columns is None or columns % self.cols else range(0)
        self.chunk_stride = self.warps * LANES  # elements from one of a warp's chunks to its next

    def _data_arrays(self) -> list[str]:
        layout = self.layout
        value_type = "b32" if self.value_bytes == 4 else "b16"
        index_type = "b32" if self.index_bytes == 4 else "b16"
        values = layout.values.view(np.uint32 if self.value_bytes == 4 else np.uint16)
        return initialised_array("global", value_type, f"{self.name}_values", values) + initialised_array(
            "global", index_type, f"{self.name}_indices", layout.indices
        ) + self._partials_array()

    def _declarations(self) -> list[str]:
        unroll = self.config.unroll
        return [
            ".reg .pred %pb;",
            f".reg .pred %pc<{self.cols}>;",
            ".reg .b32 %rem, %colc, %part;",
            ".reg .b64 %ps;",
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
        lines += ["REDUCE:"] + self._reduce()
        if self.warps > 1:
            lines += self._add_partials(["%acc0"])
        return lines + self._store_lane()

    def _lane_pointers(self) -> list[str]:
        """This lane's first value and index; with several warps per row, ``%s1`` becomes
        this warp's share of the row's chunks (``ceil((chunks - part) / W)``)."""
        lines = []
        if self.warps > 1:
            lines += [
                f"and.b32 %part, %warp, {self.warps - 1};",
                f"add.u32 %r5, %s1, {self.warps - 1};",
                "sub.u32 %r5, %r5, %part;",
                f"shr.u32 %s1, %r5, {self.warps.bit_length() - 1};",
                f"mad.lo.u32 %r4, %part, {LANES}, %lane;",
                "add.u32 %r4, %r4, %s0;",
            ]
        else:
            lines.append("add.u32 %r4, %s0, %lane;")
        return lines + [
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
            lines += self._load_row("%pv", [f"%v{u}"], 1, u * self.chunk_stride * vb)
            lines.append(f"ld.global.nc.{index_type} %k{u}, [%pi+{u * self.chunk_stride * ib}];")
        for u in range(chunks):
            lines += [f"mul.wide.u32 %pk{u}, %k{u}, {self.xs.k * self.es};", f"add.s64 %pk{u}, %pk{u}, %px;"]
        for u in range(chunks):
            for c in range(self.cols):
                guard = f"@%pc{c} " if c in self.guarded else ""
                lines += self._load_row(f"%pk{u}", [f"%x{u * self.cols + c}"], 1, c * self.xs.n * self.es, guard)
        for u in range(chunks):
            for c in range(self.cols):
                lines.append(f"fma.rn.f32 %acc{c}, %v{u}, %x{u * self.cols + c}, %acc{c};")
        step = chunks * self.chunk_stride
        return lines + [f"add.s64 %pv, %pv, {step * vb};", f"add.s64 %pi, %pi, {step * ib};"]

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
