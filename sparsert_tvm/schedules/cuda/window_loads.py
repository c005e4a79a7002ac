"""Loads through a convolution's window, for the unrolled CUDA kernel.

Each owned vector ``c`` (neighbouring output pixels of one row) gets ``%pxw<c>``, the address
of its first pixel's window, computed once; each kernel row ``(channel, ky)`` that a group
reads is loaded once per vector, in aligned chunks at immediate offsets from it (``RowSpan``),
into the registers ``%s`` that its taps ``kx`` and the vector's pixels share. Chunks that can
fall into the padding are loaded under a predicate computed once per thread (``%qy`` for a
kernel row, ``%qc`` for a chunk's columns, ``%q`` both), into registers zeroed first, or with
``padding_from_zeros`` through a base switched to the module's zero array (``%pz``, ``%pzc``).
Staged (``StagedInput``), the loads read the block's band in shared memory instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...problem import SpmmProblem
from ..config import CudaSpmmConfig
from .ptx_common import vector_operand, vector_suffix
from .row_span import RowSpan
from .staged_input import StagedInput
from .unrolled_checks import ElementType


def span_type(dtype: str) -> str:
    """Register type of one input element of a window."""
    return "f32" if dtype == "float32" else "b16"


class WindowLoads:
    def __init__(self, problem: SpmmProblem, config: CudaSpmmConfig, element: ElementType,
                 staged: StagedInput | None):
        self.window = window = problem.window
        # Staged, one element per load: the band's columns are not aligned as X's are.
        self.span = RowSpan(window, config.vector_width, 1) if staged else RowSpan.of(window, config.vector_width)
        self.cols = config.columns_per_thread
        self.element = element
        self.es = element.element_bytes
        self.lanes = element.registers
        self.zeros = config.padding_from_zeros
        self.staged = staged
        self.kind = span_type(problem.dtype)
        # Kept because every row group asks again: each column's (channel, ky, kx), and the
        # loads of a kernel row per (row, taps, vector) (``_load_kernel_row``).
        self.taps = [window.tap(k) for k in range(problem.K)]
        self._kernel_row_loads: dict[tuple, tuple[str, ...]] = {}

    def declarations(self) -> list[str]:
        kh, chunks = self.window.kernel[0], self.cols * self.span.chunks
        lines = [
            ".reg .b32 %oy, %ox, %iy, %ix;",
            f".reg .pred %qy<{kh * self.cols}>;",
            f".reg .pred %qc<{chunks}>;",
            f".reg .pred %q<{kh * chunks}>;",
            f".reg .{self.kind} %s<{self.cols * self.span.length}>;",
        ]
        if self.zeros:
            lines += [".reg .b64 %pz;", f".reg .b64 %pzc<{kh * chunks}>;"]
        return lines

    def largest_offset(self) -> int:
        """Bytes past a window's origin that a load may reach (window origins are 32-bit too)."""
        win, span = self.window, self.span
        last_read = span.offset(win.channels - 1, win.kernel[0] - 1, span.length - 1) + 1
        return max(win.image_size, last_read) * self.es

    def load_count(self, columns) -> int:
        """Load instructions of one vector for ``columns`` (each chunk of a kernel row read,
        zeroed first where it may read padding; staged, each chunk of channels' copy)."""
        span, loads = self.span, 0
        kernel_rows = self.kernel_rows(columns)
        for (_, ky), taps in kernel_rows.items():
            for q, _, size in span.loads(taps):
                inside = self.zeros or self.staged or (self.window.row_in_image(ky) and span.chunk_in_image(q))
                loads += 1 if inside else 1 + size
        if self.staged:
            chunks = {self.staged.chunk_of(channel) for channel, _ in kernel_rows}
            loads += len(chunks) * self.staged.copy_instructions()
        return loads

    def column_loads(self, k: int, c: int, kernel_rows: dict[tuple[int, int], list[int]]) -> Sequence[str]:
        """The kernel row's chunks where ``k`` is the first of the row's taps that the group
        reads (``kernel_rows``), then float16 pixels paired into ``%x``."""
        channel, ky, kx = self.taps[k]
        taps = kernel_rows[(channel, ky)]
        loads = self._load_kernel_row(channel, ky, taps, c) if kx == taps[0] else ()
        if self.element.columns_per_register == 1:
            return loads
        lines, first = list(loads), c * self.span.length
        for l in range(self.lanes):
            low, high = (f"%s{first + self.span.register(2 * l + h, kx)}" for h in (0, 1))
            lines.append(f"mov.b32 %x{c * self.lanes + l}, {{{low}, {high}}};")
        return lines

    def chunk_tap(self, k: int) -> int:
        """The tap ``kx`` whose chunk registers hold column ``k``'s activations, or -1 where
        they are paired into ``%x`` (float16)."""
        return self.taps[k][2] if self.element.columns_per_register == 1 else -1

    def chunk_registers(self, kx: int) -> list[str]:
        """Tap ``kx``'s registers, by vector and lane."""
        return [f"%s{c * self.span.length + self.span.register(l, kx)}"
                for c in range(self.cols) for l in range(self.lanes)]

    def same_kernel_row(self, k: int, other: int) -> bool:
        return self.taps[k][:2] == self.taps[other][:2]

    def channel(self, k: int) -> int:
        return self.taps[k][0]

    @staticmethod
    def _guard(c: int) -> str:
        # Vector 0 exists whenever the thread got this far.
        return "" if c == 0 else f"@%pv{c} "

    def setup(self, c: int, pixel: str, x_base: str) -> list[str]:
        """``%pxw<c>``: address of the window of vector ``c``'s first pixel (``pixel``, in the
        image at ``x_base``), and the predicates of the taps that may read padding."""
        win, span = self.window, self.span
        (h, w), kh, (sh, sw) = win.input_size, win.kernel[0], win.stride
        lines = [
            f"div.u32 %oy, {pixel}, {win.output_size[1]};",
            f"rem.u32 %ox, {pixel}, {win.output_size[1]};",
            f"mul.lo.u32 %iy, %oy, {sh};",
            f"mul.lo.u32 %ix, %ox, {sw};",
            f"mul.lo.u32 %r3, %iy, {win.row_stride};",
            f"mad.lo.u32 %r3, %ix, {win.pixel_stride}, %r3;",
            f"mul.wide.u32 %rd6, %r3, {self.es};",
            f"add.s64 %pxw{c}, {x_base}, %rd6;",
        ]
        if win.padding_offset:
            lines.append(f"sub.s64 %pxw{c}, %pxw{c}, {win.padding_offset * self.es};")

        def inside(predicate: str, position: str, shift: int, size: int):
            # Unsigned comparison: a position before the image wraps around to a huge value.
            op, amount = ("add", shift) if shift >= 0 else ("sub", -shift)
            lines.extend([f"{op}.u32 %r3, {position}, {amount};", f"setp.lt.u32 {predicate}, %r3, {size};"])

        for ky in range(kh):
            if not win.row_in_image(ky):
                inside(f"%qy{ky * self.cols + c}", "%iy", ky - win.padding[0], h)
        for q in range(span.chunks):
            if not span.chunk_in_image(q):
                inside(f"%qc{c * span.chunks + q}", "%ix", span.chunk_start(q), w)
        for ky in range(kh):
            for q in range(span.chunks):
                terms = self._chunk_terms(ky, c, q)
                if len(terms) > 1:
                    predicate = self._chunk_predicate(ky, c, q)
                    lines.append(f"and.pred {predicate}, {terms[0]}, {terms[1]};")
                    lines += [f"and.pred {predicate}, {predicate}, {t};" for t in terms[2:]]
                if self.zeros and self._reads_padding(terms, c):
                    # Outside, the chunk's loads land in the zero array: its base less the
                    # offset of the chunk's start in channel 0, which every load adds back.
                    start = span.offset(0, ky, q * span.chunk) * self.es
                    op = "sub" if start >= 0 else "add"
                    lines += [
                        f"{op}.s64 %rd6, %pz, {abs(start)};",
                        f"selp.b64 {self._chunk_base(ky, c, q)}, %pxw{c}, %rd6, {self._chunk_condition(ky, c, q)};",
                    ]
        return lines

    @staticmethod
    def _reads_padding(terms: list[str], c: int) -> bool:
        """Whether a chunk with these predicate ``terms`` may lie in the padding (not only
        belong to a vector past the columns)."""
        return bool(terms) and terms != [f"%pv{c}"]

    def _chunk_condition(self, ky: int, c: int, q: int) -> str:
        """The predicate under which vector ``c`` reads chunk ``q`` of kernel row ``ky``."""
        terms = self._chunk_terms(ky, c, q)
        return terms[0] if len(terms) == 1 else self._chunk_predicate(ky, c, q)

    def _chunk_base(self, ky: int, c: int, q: int) -> str:
        return f"%pzc{(ky * self.cols + c) * self.span.chunks + q}"

    def _chunk_terms(self, ky: int, c: int, q: int) -> list[str]:
        """The predicates that must all hold for vector ``c`` to read chunk ``q`` of kernel
        row ``ky``: inside the image, and an existing vector."""
        terms = [] if c == 0 else [f"%pv{c}"]
        if not self.window.row_in_image(ky):
            terms.append(f"%qy{ky * self.cols + c}")
        if not self.span.chunk_in_image(q):
            terms.append(f"%qc{c * self.span.chunks + q}")
        return terms

    def _chunk_predicate(self, ky: int, c: int, q: int) -> str:
        return f"%q{(ky * self.cols + c) * self.span.chunks + q}"

    def kernel_rows(self, columns) -> dict[tuple[int, int], list[int]]:
        """The taps ``kx`` of each kernel row ``(channel, ky)`` among window ``columns``, in
        the order of the columns."""
        rows: dict[tuple[int, int], list[int]] = {}
        for k in columns:
            channel, ky, kx = self.taps[k]
            rows.setdefault((channel, ky), []).append(kx)
        return rows

    def _load_kernel_row(self, channel: int, ky: int, taps: list[int], c: int) -> tuple[str, ...]:
        """The loads of a kernel row, kept per (row, taps, vector): a layer's row groups load
        the same rows with the same few sets of taps many times over."""
        key = (channel, ky, tuple(taps), c)
        lines = self._kernel_row_loads.get(key)
        if lines is None:
            lines = self._kernel_row_loads[key] = tuple(self._emit_kernel_row_loads(channel, ky, taps, c))
        return lines

    def _emit_kernel_row_loads(self, channel: int, ky: int, taps: list[int], c: int) -> list[str]:
        """Loads what ``taps`` of kernel row ``(channel, ky)`` read for vector ``c``: from the
        staged band, or from X as follows.

        A chunk that may lie in the padding is loaded under its predicate into registers
        zeroed first, or (``padding_from_zeros``) through its switched base. The zeroing
        cannot simply go: skipping the FMAs under the same predicate instead makes the load a
        partial definition of a reused register, and ptxas then issues the loads one at a
        time (2.3x slower on the H200).
        """
        span, kind = self.span, self.kind
        zero = "0f00000000" if kind == "f32" else "0"
        lines = []
        if self.staged:  # the band holds the padding's zeros
            for _, first, _ in span.loads(taps):
                offset = self.staged.offset(channel, ky, span.first + first + self.window.padding[1])
                lines.append(f"ld.shared.{kind} %s{c * span.length + first}, [%sx{c}+{offset}];")
            return lines
        for q, first, size in span.loads(taps):
            registers = [f"%s{c * span.length + r}" for r in range(first, first + size)]
            padded = self._reads_padding(self._chunk_terms(ky, c, q), c)
            base = self._chunk_base(ky, c, q) if padded and self.zeros else f"%pxw{c}"
            offset = span.offset(channel, ky, first) * self.es
            load = f"ld.global.nc{vector_suffix(registers)}.{kind} {vector_operand(registers)}, [{base}+{offset}];"
            if not padded:
                lines.append(self._guard(c) + load)
            elif self.zeros:
                lines.append(load)
            else:  # zero unless inside
                lines += [f"mov.{kind} {r}, {zero};" for r in registers]
                lines.append(f"@{self._chunk_condition(ky, c, q)} {load}")
        return lines
