"""Input staged in shared memory for the unrolled kernel through an NCHW window.

A block's tile of output pixels reads a band of input rows. Before the code of a chunk of
``stage_channels`` input channels, the block copies that band of those channels into
shared memory, padding included as zeros, and the chunk's loads then read shared memory at
immediate offsets, with no predicates. Rows are indexed in *padded* space, ``image *
padded_height + padded_row``, so that a band may run from one image of a folded batch into
the next, and every output pixel's window origin sits at padded row ``oy * stride_h`` and
padded column ``ox * stride_w``.

Copy: thread ``t`` takes column ``t % width`` of the band (a block has at least as many
threads as the band has columns) and channel slot ``t // width``, and for each band row
(unrolled) loads and stores its column of every ``slots``-th channel of the chunk. Each
row's address is computed once per block; where the row or the column lies in the padding
it points into a zero-filled array of the module instead, so the copy's loads need no
predicate (about one image of input in device memory, as ``padding_from_zeros`` takes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UnsupportedProblem
from ...problem import SpmmProblem
from ..config import CudaSpmmConfig

# Static shared memory a block may declare.
MAX_STAGED_BYTES = 48 * 1024


@dataclass(frozen=True)
class StagedInput:
    channels: int  # input channels
    chunk: int  # channels staged at a time
    input_size: tuple[int, int]  # H, W
    padding: tuple[int, int]  # top, left
    padded: tuple[int, int]  # padded H, W
    stride: tuple[int, int]
    output_width: int
    pixels_per_image: int  # output pixels
    images: int  # images one launch row's columns run over (1 unless folded)
    tile: int  # output pixels per block
    rows: int  # band rows: the most any tile reads
    threads: int
    element_bytes: int

    @classmethod
    def of(cls, problem: SpmmProblem, config: CudaSpmmConfig) -> StagedInput:
        """Raises ``UnsupportedProblem`` where the kernel cannot stage its input."""
        window = problem.window
        if window is None or window.channels_last:
            raise UnsupportedProblem("stage_channels: only NCHW convolutions through a window stage their input")
        if problem.static_columns is None or problem.static_batch is None:
            raise UnsupportedProblem("stage_channels: the band is sized for a static batch")
        if config.split_k > 1 or config.padding_from_zeros:
            raise UnsupportedProblem("stage_channels: not with split_k or padding_from_zeros")
        (h, w), (kh, _), (top, left, bottom, right) = window.input_size, window.kernel, window.padding
        (_, ow), pixels = window.output_size, problem.static_columns
        if w + left + right > config.threads_per_block:
            raise UnsupportedProblem("stage_channels: a block needs a thread per padded input column")
        images = problem.static_batch if config.fold_batch else 1
        tile = config.threads_per_block * config.columns_per_thread * config.vector_width
        padded_height = h + top + bottom

        def padded_row(p: int) -> int:
            image, pixel = divmod(p, pixels)
            return image * padded_height + pixel // ow * window.stride[0]

        total = pixels * images
        rows = max(
            padded_row(min(first + tile, total) - 1) + kh - padded_row(first) for first in range(0, total, tile)
        )
        staged = cls(
            channels=window.channels, chunk=min(config.stage_channels, window.channels), input_size=(h, w),
            padding=(top, left), padded=(padded_height, w + left + right), stride=window.stride, output_width=ow,
            pixels_per_image=pixels, images=images, tile=tile, rows=rows, threads=config.threads_per_block,
            element_bytes=4 if problem.dtype == "float32" else 2,
        )
        if staged.bytes > MAX_STAGED_BYTES:
            raise UnsupportedProblem(
                f"stage_channels {config.stage_channels}: {staged.bytes} bytes of staged input exceed "
                f"{MAX_STAGED_BYTES} bytes of shared memory (fewer channels or pixels per block)"
            )
        return staged

    @property
    def band_bytes(self) -> int:
        """One channel's band."""
        return self.rows * self.padded[1] * self.element_bytes

    @property
    def bytes(self) -> int:
        return self.chunk * self.band_bytes

    @property
    def zeros_bytes(self) -> int:
        """What the copy's loads reach from a row's address: every channel's image."""
        return self.channels * self.input_size[0] * self.input_size[1] * self.element_bytes

    @property
    def slots(self) -> int:
        """Channels copied side by side."""
        return self.threads // self.padded[1]

    def chunk_of(self, channel: int) -> int:
        return channel // self.chunk

    def copy_instructions(self) -> int:
        """About how many instructions one chunk's copy issues per thread."""
        return 2 * self.rows * -(-self.chunk // self.slots) + 4

    def declarations(self, vectors: int, kind: str) -> list[str]:
        return [
            f".reg .b64 %stg, %sd, %szr, %cs<{self.rows}>;",
            f".reg .{kind} %cv;",
            f".reg .b64 %sx<{vectors}>;",
            ".reg .b32 %sr0, %sg, %slot, %scol;",
            ".reg .pred %cp, %cx, %cr;",
        ]

    def block_setup(self) -> list[str]:
        """``%sr0``, the band's first padded row, and for the copy: this thread's column
        and channel slot, where it stores (``%sd``), and where it loads each band row from
        (``%cs<r>``, channel 0 of its slot, the chunk's channel added as an immediate; the
        zero array ``%szr`` where the row or the column lies in the padding, or the thread
        has no slot)."""
        (h, w), (top, left), (padded_height, width) = self.input_size, self.padding, self.padded
        es = self.element_bytes
        lines = [
            "mov.u32 %sr0, %ctaid.x;",
            f"mul.lo.u32 %sr0, %sr0, {self.tile};",
            f"div.u32 %sg, %sr0, {self.pixels_per_image};",  # the image of the tile's first pixel
            f"mul.lo.u32 %r3, %sg, {self.pixels_per_image};",
            "sub.u32 %sr0, %sr0, %r3;",
            f"div.u32 %sr0, %sr0, {self.output_width};",
            f"mul.lo.u32 %sr0, %sr0, {self.stride[0]};",
            f"mad.lo.u32 %sr0, %sg, {padded_height}, %sr0;",
            "mov.u32 %r3, %tid.x;",
            f"div.u32 %slot, %r3, {width};",
            f"rem.u32 %scol, %r3, {width};",
            f"mad.lo.u32 %r3, %slot, {self.rows * width}, %scol;",
            f"mul.wide.u32 %rd6, %r3, {es};",
            "add.s64 %sd, %stg, %rd6;",
            f"sub.u32 %r3, %scol, {left};",  # before the image wraps around to a huge value
            f"setp.lt.u32 %cx, %r3, {w};",
            f"setp.lt.u32 %cp, %slot, {self.slots};",  # idle threads past the last slot
            "and.pred %cx, %cx, %cp;",
        ]
        for r in range(self.rows):
            lines += [
                f"add.u32 %sg, %sr0, {r};",
                f"div.u32 %r3, %sg, {padded_height};",  # the row's image
                f"setp.lt.u32 %cp, %r3, {self.images};",
                f"mul.lo.u32 %r2, %r3, {padded_height};",
                "sub.u32 %sg, %sg, %r2;",  # its padded row in the image
                f"sub.u32 %r2, %sg, {top};",
                f"setp.lt.u32 %cr, %r2, {h};",
                "and.pred %cr, %cr, %cp;",
                "and.pred %cr, %cr, %cx;",
                # (image * C + slot) * H * W + padded row * W + column, less the padding's
                # reach (top rows and left columns), in elements: never negative before it.
                f"mad.lo.u32 %r3, %r3, {self.channels}, %slot;",
                f"mul.lo.u32 %r3, %r3, {h * w};",
                f"mad.lo.u32 %r3, %sg, {w}, %r3;",
                "add.u32 %r3, %r3, %scol;",
                f"mul.wide.u32 %rd6, %r3, {es};",
                "add.s64 %rd6, %px, %rd6;",
                f"sub.s64 %rd6, %rd6, {(top * w + left) * es};",
                f"selp.b64 %cs{r}, %rd6, %szr, %cr;",
            ]
        return lines

    def vector_setup(self, c: int, image: str | None) -> list[str]:
        """``%sx<c>``: where vector ``c``'s window origin (``%oy``, ``%ox`` of its first
        pixel, in ``image`` of the band's images, or the first) lies in the band. A thread
        past the columns (``%pv<c>`` false) reads the band's first row."""
        padded_height, width = self.padded
        lines = [f"mul.lo.u32 %r3, %oy, {self.stride[0]};"]
        if image is not None:
            lines.append(f"mad.lo.u32 %r3, {image}, {padded_height}, %r3;")
        lines += [
            "sub.u32 %r3, %r3, %sr0;",
            f"selp.b32 %r3, %r3, 0, %pv{c};",
            f"mul.lo.u32 %r2, %ox, {self.stride[1]};",
            f"mad.lo.u32 %r3, %r3, {width}, %r2;",
            f"mul.wide.u32 %rd6, %r3, {self.element_bytes};",
            f"add.s64 %sx{c}, %stg, %rd6;",
        ]
        return lines

    def copy(self, chunk: int, kind: str) -> list[str]:
        """The block's copy of chunk ``chunk``'s band (its threads meet at a barrier after)."""
        first = chunk * self.chunk
        count = min(self.chunk, self.channels - first)
        es, (h, w), width = self.element_bytes, self.input_size, self.padded[1]
        lines = []
        for i in range(-(-count // self.slots)):
            # Threads past the last slot store nothing (they load from the zero array), and
            # in a last, partial round nor do the slots past the chunk's channels, which would
            # load past the input.
            partial = count - i * self.slots < self.slots
            lines.append(f"setp.lt.u32 %cp, %slot, {min(self.slots, count - i * self.slots)};")
            for r in range(self.rows):
                source = (first + i * self.slots) * h * w * es
                target = (i * self.slots * self.rows + r) * width * es
                lines += [
                    f"{'@%cp ' if partial else ''}ld.global.nc.{kind} %cv, [%cs{r}+{source}];",
                    f"@%cp st.shared.{kind} [%sd+{target}], %cv;",
                ]
        return lines + ["bar.sync 0;"]

    def offset(self, channel: int, ky: int, column: int) -> int:
        """Byte offset from a vector's window origin in the band of kernel row ``(channel,
        ky)``'s padded ``column`` (relative to that origin)."""
        local = channel - self.chunk_of(channel) * self.chunk
        return ((local * self.rows + ky) * self.padded[1] + column) * self.element_bytes
