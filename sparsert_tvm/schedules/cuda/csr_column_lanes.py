"""The CSR kernel with lanes over columns: for 16-128 columns that are neighbours in memory
(and a transposed X of symbolic N).

The arrays are one of (float32 value bits, byte offset of X's row ``k``) pairs, rows padded
to whole trips of ``unroll`` pairs; where X's rows are a run-time count apart (X transposed,
N symbolic), the pairs hold ``k`` and each trip multiplies it by the row's bytes. Every lane
of the warp loads the same pairs (one broadcast 16-byte load per two nonzeros), then its own
``columns_per_lane`` neighbouring activations of each row (one vector load, the warp's
together one contiguous run), and keeps one accumulator per column. With ``warps_per_row`` >
1 the row's warps take every W-th trip and leave their sums in shared memory, which the
row's first warp adds up after one barrier; otherwise the epilogue follows the loop directly.
"""

from __future__ import annotations

import numpy as np

from .csr_emitter import CsrEmitter, initialised_array


class ColumnLanes(CsrEmitter):
    """Further registers: ``%wn<u>``/``%on<u>`` value bits and X row offset of nonzero ``u`` of
    this warp's next trip (loaded a trip ahead, so that their latency hides behind the
    activations'), ``%w<u>`` the current trip's values, ``%pk<u>`` this lane's address in the
    row, ``%x<u*V+c>`` its activations; with several warps per row, ``%part`` this warp's
    share, ``%pout`` whether the lane has no column to store, ``%ps`` its partial sums."""

    def __init__(self, problem, config, layout, name):
        super().__init__(problem, config, layout, name)
        self.width = config.columns_per_lane
        self.trip_bytes = 8 * config.unroll

    def _data_arrays(self) -> list[str]:
        values = self.layout.values.astype(np.float32).view(np.uint32)
        pairs = np.stack([values, self._offsets().astype(np.uint32)], axis=1).reshape(-1)
        # Zero pairs after the last row: what a warp's loads of its next trip (and the one
        # after, pipelined) read there.
        ahead = 2 if self.config.pipelined else 1
        pairs = np.concatenate([pairs, np.zeros(2 * ahead * self.warps * self.config.unroll, np.uint32)])
        lines = initialised_array("global", "b32", f"{self.name}_pairs", pairs, align=16)
        return lines + self._partials_array()

    def _offsets(self) -> np.ndarray:
        """Byte offset of each nonzero's row of X, or with rows a run-time count apart its row
        number (the trip multiplies it by ``%xrow``)."""
        rows = self.layout.indices.astype(np.uint64)
        return rows if self.problem.runtime_row_stride else rows * np.uint64(self.xs.k * self.es)

    def _row_bytes(self) -> str:
        """What a pair's offset is multiplied by: 1, or the bytes of a row of X at run time."""
        return "%xrow" if self.problem.runtime_row_stride else "1"

    def _declarations(self) -> list[str]:
        unroll, width = self.config.unroll, self.width
        pipelined = [
            f".reg .f32 %xa<{unroll * width}>, %xb<{unroll * width}>;",
            f".reg .b32 %wa<{unroll}>, %wb<{unroll}>;",
            f".reg .b16 %ha<{unroll * width}>, %hb<{unroll * width}>;",
        ]
        return (pipelined if self.config.pipelined else []) + [
            ".reg .pred %pout;",
            ".reg .b32 %part, %xrow;",
            f".reg .b32 %w<{unroll}>, %wn<{unroll}>, %on<{unroll}>;",
            ".reg .b64 %ps;",
            f".reg .b64 %pk<{unroll}>;",
            f".reg .f32 %x<{unroll * width}>;",
            f".reg .f32 %acc<{width}>;",
            f".reg .b16 %h<{unroll * width}>;",
        ]

    def _body(self) -> list[str]:
        width, warps = self.width, self.warps
        lines = [f"mul.lo.u32 %xrow, %ncols, {self.es};"] if self.problem.runtime_row_stride else []
        lines += [f"mad.lo.u32 %col, %lane, {width}, %col0;", "setp.ge.u32 %pout, %col, %ncols;"]
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
        lines += self._pipelined_trips() if self.config.pipelined else self._loop("TRIP", "%q", self._trip())
        accs = [f"%acc{c}" for c in range(width)]
        if warps > 1:
            lines += self._add_partials(accs, "@%pout bra DONE;")
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
        return self._issue("", convert=True) + self._consume("", converted=True)

    def _pipelined_trips(self) -> list[str]:
        """``%q`` trips, each loading the next trip's activations before its own FMAs, which
        wait on loads issued a trip earlier: two trips in flight per warp instead of one. The
        loop body is two trips, buffer ``a`` then ``b``, so that no register a load is still
        filling is ever copied. The last trip loads a trip that does not exist (the next
        row's pairs or the zero pairs after the last row: addresses inside X, values unused)."""
        lines = self._issue("a")
        lines += ["setp.eq.u32 %p0, %q, 0;", "@%p0 bra PIPE_END;", "PIPE:"]
        lines += self._issue("b") + self._consume("a")
        lines += ["sub.u32 %q, %q, 1;", "setp.eq.u32 %p0, %q, 0;", "@%p0 bra.uni PIPE_END;"]
        lines += self._issue("a") + self._consume("b")
        lines += ["sub.u32 %q, %q, 1;", "setp.ne.u32 %p0, %q, 0;", "@%p0 bra.uni PIPE;", "PIPE_END:"]
        return lines

    def _issue(self, buffer: str, convert: bool = False) -> list[str]:
        """A trip's activation loads into ``buffer`` (float16 converted right away only with
        ``convert``: pipelined, nothing must wait on them yet) and its values kept; then the
        pairs of the trip after."""
        unroll, width = self.config.unroll, self.width
        lines = [f"mov.b32 %w{buffer}{u}, %wn{u};" for u in range(unroll)]
        lines += [f"mad.wide.u32 %pk{u}, %on{u}, {self._row_bytes()}, %px;" for u in range(unroll)]
        for u in range(unroll):
            columns = range(u * width, (u + 1) * width)
            halves = [f"%h{buffer}{i}" for i in columns]
            lines += self._load_row(f"%pk{u}", [f"%x{buffer}{i}" for i in columns], 1, halves=halves, convert=convert)
        lines.append(f"add.s64 %pv, %pv, {self.trip_bytes * self.warps};")
        return lines + self._load_pairs("%wn", "%on")

    def _consume(self, buffer: str, converted: bool = False) -> list[str]:
        """The FMAs of the trip whose activations ``buffer`` holds."""
        unroll, width = self.config.unroll, self.width
        lines = []
        if self.es == 2 and not converted:
            lines += [f"cvt.f32.f16 %x{buffer}{i}, %h{buffer}{i};" for i in range(unroll * width)]
        return lines + [
            f"fma.rn.f32 %acc{c}, %w{buffer}{u}, %x{buffer}{u * width + c}, %acc{c};"
            for u in range(unroll)
            for c in range(width)
        ]
