"""The CSR kernel with lanes over output pixels, through a convolution's window (NCHW).

The unrolled convolution kernel streams about 16 bytes of instructions per nonzero for
every block of columns; where an image has a few pixels (ResNet-50's stage-4 3x3 layers at
batch 1: 49 pixels, 236k nonzeros at 10%) each block's stream serves one warp, and it is
the kernel's limit. Here, as with ``csr_column_lanes``, the warp
walks its share of a row's nonzeros as (value, offset) pairs read by every lane, and each
lane owns ``columns_per_block / 32`` output pixels, 32 apart, so that each of the warp's
loads of an activation covers 32 neighbouring pixels. The batch is folded into the pixels
(one range of ``images * pixels`` columns), so that 7x7 images still fill whole warps.

A pair's offset is its input channel's; the kernel's loop runs tap by tap (``ky``, ``kx``,
in ``window_csr_layout``'s order), and the tap's shift within the image is an immediate of
its loads. Where a tap may fall into the padding, each lane tests its pixels once per tap
and predicates that tap's loads and FMAs: no branch, no zeroing, nothing per nonzero.
"""

from __future__ import annotations

import numpy as np

from ...problem import BiasAdd
from .csr_column_lanes import ColumnLanes
from .csr_layout import SLOT_FIELDS, window_taps


class WindowLanes(ColumnLanes):
    """Further registers, per owned column ``c``: ``%pc<c>`` whether it exists, ``%iy<c>``
    and ``%ix<c>`` its window's origin in the unpadded image (``oy * stride``, ``ox *
    stride``), ``%pxc<c>`` the address of its window's first element, ``%pyc<c>`` and
    ``%prc<c>`` its place in Y and the residual, ``%pin<c>`` whether it reads the current
    tap; ``%pa<u*V+c>`` the address of nonzero ``u``'s channel in its window."""

    slot_per_warp = True
    folds_batch = True

    def __init__(self, problem, config, layout, name):
        super().__init__(problem, config, layout, name)
        self.window = problem.window
        biases = sum(isinstance(op, BiasAdd) for op in problem.epilogue)
        self.tap_field = SLOT_FIELDS + biases  # the slot's first word of trip counts

    def _offsets(self) -> np.ndarray:
        channels = self.layout.indices.astype(np.uint64) // np.uint64(window_taps(self.problem))
        return channels * np.uint64(self.window.channel_stride * self.es)

    def _declarations(self) -> list[str]:
        width = self.width
        return super()._declarations() + [
            f".reg .pred %pc<{width}>, %pin<{width}>;",
            f".reg .b32 %iy<{width}>, %ix<{width}>;",
            f".reg .b64 %pxc<{width}>, %pyc<{width}>, %prc<{width}>;",
            f".reg .b64 %pa<{self.config.unroll * width}>;",
        ]

    def _body(self) -> list[str]:
        width = self.width
        lines = ["add.u32 %col, %col0, %lane;", "setp.ge.u32 %pout, %col, %ncols;"]
        if self.warps == 1:
            lines.append("@%pout bra DONE;")
        else:
            lines.append(f"and.b32 %part, %warp, {self.warps - 1};")
        for c in range(width):
            lines += self._column_setup(c)
        lines += [f"mov.u64 %pv, {self.name}_pairs;", "mul.wide.u32 %rd7, %s0, 8;", "add.s64 %pv, %pv, %rd7;"]
        lines += self._load_pairs("%wn", "%on")
        lines += [f"mov.f32 %acc{c}, 0f00000000;" for c in range(width)]
        kw = self.window.kernel[1]
        for t in range(window_taps(self.problem)):
            ky, kx = divmod(t, kw)
            guards = self._tap_guards(ky, kx)
            lines += [line for lines_of_column, _ in guards for line in lines_of_column]
            trip = self._tap_trip(ky, kx, [guard for _, guard in guards])
            word = f"%s{self.tap_field + t // 2}"
            lines.append(f"shr.u32 %q, {word}, 16;" if t % 2 else f"and.b32 %q, {word}, 65535;")
            lines += self._loop(f"TAP{t}", "%q", trip)
        accs = [f"%acc{c}" for c in range(width)]
        if self.warps > 1:
            lines += self._add_partials(accs, "@%pout bra DONE;")
        for c in range(width):
            if c:  # columns ascend: the first one missing ends the lane's
                lines += [f"add.u32 %r5, %col, {32 * c};", "setp.ge.u32 %p0, %r5, %ncols;", "@%p0 bra DONE;"]
            lines += self._epilogue([accs[c]], None, f"%pyc{c}", f"%prc{c}")
        return lines

    def _column_setup(self, c: int) -> list[str]:
        """Column ``c`` of the lane: its image and pixel, its window and its place in Y."""
        win, es, ys = self.window, self.es, self.ys
        pixels, (sh, sw), out_w = self.problem.static_columns, win.stride, win.output_size[1]
        lines = [
            f"add.u32 %r5, %col, {32 * c};",
            f"setp.lt.u32 %pc{c}, %r5, %ncols;",
            f"div.u32 %r6, %r5, {pixels};",  # image
            f"mul.lo.u32 %r7, %r6, {pixels};",
            "sub.u32 %r7, %r5, %r7;",  # pixel
            f"mul.wide.u32 %rd6, %r6, {win.image_size * es};",
            f"add.s64 %pxc{c}, %px, %rd6;",
            f"mul.wide.u32 %rd7, %r6, {ys.batch * es};",
            f"mul.wide.u32 %rd6, %r7, {ys.n * es};",
            "add.s64 %rd7, %rd7, %rd6;",
            f"add.s64 %pyc{c}, %py, %rd7;",
        ]
        lines += [f"add.s64 %prc{c}, %pr, %rd7;"] if self.problem.has_residual else []
        lines += [
            f"div.u32 %r6, %r7, {out_w};",
            f"rem.u32 %r7, %r7, {out_w};",
            f"mul.lo.u32 %iy{c}, %r6, {sh};",
            f"mul.lo.u32 %ix{c}, %r7, {sw};",
            f"mad.lo.u32 %r6, %iy{c}, {win.row_stride}, %ix{c};",
            f"mul.wide.u32 %rd6, %r6, {es};",
            f"add.s64 %pxc{c}, %pxc{c}, %rd6;",
        ]
        if win.padding_offset:
            lines.append(f"sub.s64 %pxc{c}, %pxc{c}, {win.padding_offset * es};")
        return lines

    def _tap_guards(self, ky: int, kx: int) -> list[tuple[list[str], str]]:
        """Per column: the lines computing whether it reads tap ``(ky, kx)``, and the guard
        of its loads and FMAs (none where the column surely exists and reads inside)."""
        win = self.window
        (h, w), (top, left) = win.input_size, win.padding[:2]
        guards = []
        for c in range(self.width):
            tests = []
            if not win.row_in_image(ky):
                tests.append((f"%iy{c}", ky - top, h))
            if not win.column_in_image(kx):
                tests.append((f"%ix{c}", kx - left, w))
            if not tests:
                always = c == 0 and self.warps == 1  # the lane left where its first column is missing
                guards.append(([], "" if always else f"@%pc{c} "))
                continue
            lines = []
            for i, (position, shift, size) in enumerate(tests):
                # Unsigned: a position before the image wraps around to a huge value.
                op, amount = ("add", shift) if shift >= 0 else ("sub", -shift)
                target = f"%pin{c}" if i == 0 else "%p0"
                lines += [f"{op}.u32 %r5, {position}, {amount};", f"setp.lt.u32 {target}, %r5, {size};"]
                if i:
                    lines.append(f"and.pred %pin{c}, %pin{c}, %p0;")
            lines.append(f"and.pred %pin{c}, %pin{c}, %pc{c};")
            guards.append((lines, f"@%pin{c} "))
        return guards

    def _tap_trip(self, ky: int, kx: int, guards: list[str]) -> list[str]:
        """``unroll`` nonzeros of tap ``(ky, kx)``: each lane's loads of its columns at the
        tap's shift, the next trip's pairs, the FMAs."""
        unroll, width, win = self.config.unroll, self.width, self.window
        shift = (ky * win.row_stride + kx * win.pixel_stride) * self.es
        lines = [f"mov.b32 %w{u}, %wn{u};" for u in range(unroll)]
        for u in range(unroll):
            for c, guard in enumerate(guards):
                address = f"%pa{u * width + c}"
                lines.append(f"{guard}mad.wide.u32 {address}, %on{u}, 1, %pxc{c};")
                lines += self._load_row(address, [f"%x{u * width + c}"], 1, shift, guard)
        lines.append(f"add.s64 %pv, %pv, {self.trip_bytes};")
        lines += self._load_pairs("%wn", "%on")
        return lines + [
            f"{guard}fma.rn.f32 %acc{c}, %w{u}, %x{u * width + c}, %acc{c};"
            for u in range(unroll)
            for c, guard in enumerate(guards)
        ]
