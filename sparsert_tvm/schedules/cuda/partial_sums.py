"""Where several threads or blocks of the unrolled kernel compute one row group, their
partial sums meet here: the split-K slices of a block through shared memory (``split_k``),
the shares of a grid split through a module array and a count per tile (``grid_split``).

Registers these pieces use (declared by the kernel): ``%slice``, the thread's slice;
``%smem``, the block's partial sums; ``%sps``, where this thread's slice stores its own;
``%spr``, where the first slice reads them; ``%wsb``, this thread's first slot of the grid
split's sums; ``%cnt``, its tile's first count; ``%x``, free once the products are done.
"""

from __future__ import annotations

from .unrolled_checks import ElementType


class PartialSums:
    def __init__(self, element: ElementType, accumulators: int, temporaries: int, slice_threads: int,
                 threads: int, group_slots: int, grid_split: int):
        self.element = element
        self.accumulators = accumulators  # registers of a thread's sums
        self.temporaries = temporaries  # ``%x`` registers to add through
        self.slice_threads = slice_threads  # threads owning distinct columns
        self.threads = threads
        self.group_slots = group_slots  # row groups: counts per tile
        self.grid_split = grid_split
        # Bytes between neighbouring slots of the slices' sums (one per column thread).
        self.partial_stride = slice_threads * element.register_bytes

    # -- split-K slices of one block -----------------------------------------------
    def slice_index(self) -> list[str]:
        """``%slice`` (and ``%r3``, the thread's index)."""
        return ["mov.u32 %r3, %tid.x;", f"div.u32 %slice, %r3, {self.slice_threads};"]

    def slice_setup(self) -> list[str]:
        """``%slice`` and the partial sums' bases: slot ``a`` of slice ``s`` for the thread
        owning column thread ``t`` lies at ``(s * A + a) * slice_threads + t`` (``A``
        accumulators), so that a warp's accesses are consecutive."""
        return self.slice_index() + [
            f"rem.u32 %r3, %r3, {self.slice_threads};",
            f"mul.wide.u32 %rd6, %r3, {self.element.register_bytes};",
            "add.s64 %spr, %smem, %rd6;",
            f"mul.wide.u32 %rd6, %slice, {self.accumulators * self.partial_stride};",
            "add.s64 %sps, %spr, %rd6;",
        ]

    @staticmethod
    def by_slice(label: str, sections: list[list[str]]) -> list[str]:
        """Section ``t`` of ``sections`` run by slice ``t`` alone, the others jumping past it;
        all meet at ``<label>_SUM``, after the last."""
        lines = []
        for t, section in enumerate(sections):
            after = f"{label}_S{t + 1}" if t + 1 < len(sections) else f"{label}_SUM"
            lines += [f"{label}_S{t}:", f"setp.ne.u32 %p0, %slice, {t};", f"@%p0 bra.uni {after};"] + section
            if t + 1 < len(sections):
                lines.append(f"bra.uni {label}_SUM;")
        return lines + [f"{label}_SUM:"]

    def store_partials(self, count: int, guard: str) -> list[str]:
        """This thread's ``count`` accumulators into its slice's partial sums."""
        stride = self.partial_stride
        return [f"{guard}st.shared.{self.element.reg} [%sps+{a * stride}], %a{a};" for a in range(count)]

    def add_partials(self, count: int, slices) -> list[str]:
        """Adds the partial sums of ``slices`` to the accumulators (through ``%x``)."""
        reg, arith, lines = self.element.reg, self.element.arith, []
        for s in slices:
            for a in range(count):
                t = f"%x{a % self.temporaries}"
                offset = (s * self.accumulators + a) * self.partial_stride
                lines += [f"ld.shared.{reg} {t}, [%spr+{offset}];", f"add.{arith} %a{a}, %a{a}, {t};"]
        return lines

    # -- shares of a grid split, across blocks ---------------------------------------
    def sums_setup(self, name: str) -> list[str]:
        """``%cnt`` and ``%wsb``: the counts of this block's tile and this thread's first slot
        of its partial sums (the tile: ``ctaid.z * nctaid.x + ctaid.x``)."""
        per_tile = self.group_slots * self.grid_split * self.accumulators * self.threads
        return [
            "mov.u32 %r0, %ctaid.z;",
            "mov.u32 %r1, %ctaid.x;",
            "mov.u32 %r3, %nctaid.x;",
            "mad.lo.u32 %r3, %r0, %r3, %r1;",
            f"mul.wide.u32 %rd6, %r3, {4 * self.group_slots};",
            f"mov.u64 %cnt, {name}_counts;",
            "add.s64 %cnt, %cnt, %rd6;",
            "mov.u32 %r0, %tid.x;",
            f"mad.lo.u32 %r3, %r3, {per_tile}, %r0;",
            f"mul.wide.u32 %rd6, %r3, {self.element.register_bytes};",
            f"mov.u64 %wsb, {name}_sums;",
            "add.s64 %wsb, %wsb, %rd6;",
        ]

    def add_across_blocks(self, group: int, own_share: int, count: int, exit_label: str) -> list[str]:
        """Stores this share's ``count`` accumulators and counts the block in; all but the
        last block of the tile and group to count leave, and the last one loads every share's
        sums (its own back too) and adds them in share order."""
        reg, arith, shares = self.element.reg, self.element.arith, self.grid_split
        count_at = f"[%cnt+{4 * group}]"

        def slot(share: int, a: int) -> str:
            index = ((group * shares + share) * self.accumulators + a) * self.threads
            return f"[%wsb+{index * self.element.register_bytes}]"

        lines = [f"st.global.{reg} {slot(own_share, a)}, %a{a};" for a in range(count)]
        # The block's stores are ordered before its first thread's fence by the barrier, and
        # that fence orders them before the count (as a grid-wide barrier does): one fence
        # per block, not one per thread. The second fence orders the other blocks' sums,
        # seen through the count, before this block's loads.
        lines += [
            "bar.sync 0;",
            "mov.u32 %r3, %tid.x;",
            "setp.eq.u32 %p0, %r3, 0;",
            "mov.u32 %r3, 0;",
            "@%p0 membar.gl;",
            f"@%p0 atom.global.add.u32 %r3, {count_at}, 1;",
            "@%p0 membar.gl;",
            f"setp.ne.u32 %p0, %r3, {shares - 1};",
            "bar.red.and.pred %p0, 0, %p0;",  # true unless the first thread counted last
            f"@%p0 bra.uni {exit_label};",
            "mov.u32 %r3, %tid.x;",
            "setp.eq.u32 %p0, %r3, 0;",
            f"@%p0 st.global.u32 {count_at}, 0;",  # ready for the next launch
        ]
        # From L2 (.cg): this SM's L1 may hold none of it, but must not serve a stale copy.
        lines += [f"ld.global.cg.{reg} %a{a}, {slot(0, a)};" for a in range(count)]
        for other in range(1, shares):
            for a in range(count):
                t = f"%x{a % self.temporaries}"
                lines += [f"ld.global.cg.{reg} {t}, {slot(other, a)};", f"add.{arith} %a{a}, %a{a}, {t};"]
        return lines
