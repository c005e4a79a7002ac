"""Which input elements a vector of output pixels reads along one kernel row.

A thread's vector is ``pixels`` neighbouring output pixels of one output row. Along kernel
row ``(channel, ky)``, pixel ``j`` reads tap ``kx`` at input column ``ix0 + position(j,
kx)``, where ``ix0 = ox0 * stride`` belongs to the vector's first pixel and ``position(j,
kx) = j * stride + kx - pad_left`` is fixed per (pixel, tap). Neighbouring taps and pixels
overlap (at stride 1, pixel ``j + 1`` at tap ``kx`` reads what pixel ``j`` reads at ``kx +
1``), so the kernel loads the positions a row group needs once, into registers that all the
row's taps share, instead of one load per pixel and tap.

Positions are loaded in *chunks* of ``chunk`` elements starting at multiples of ``chunk``:
one vector load each. Where the input is NCHW and ``chunk`` divides the vector's step
``pixels * stride`` and the input width, every chunk is aligned in memory (``ix0`` and the
row, channel and image strides are multiples of it) and lies wholly inside or wholly
outside its input row, so one predicate per chunk covers the padding. NHWC inputs have
their pixels ``channels`` apart and use chunks of one element.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from ...problem import ConvWindow

# Elements per load, widest first: up to 128 bits of float32 (PTX has no .v8.b16 for float16).
_CHUNKS = (4, 2, 1)


@dataclass(frozen=True)
class RowSpan:
    window: ConvWindow
    pixels: int  # output pixels per vector (the config's vector_width)
    chunk: int  # elements per load
    # ``loads`` of each set of taps asked for, kept.
    _loads_of_taps: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, window: ConvWindow, pixels: int) -> RowSpan:
        """The widest aligned chunks for vectors of ``pixels`` pixels."""
        step, width = pixels * window.stride[1], window.input_size[1]
        chunk = 1
        if not window.channels_last:
            chunk = next(v for v in _CHUNKS if step % v == 0 and width % v == 0)
        return cls(window, pixels, chunk)

    def position(self, j: int, kx: int) -> int:
        """Input column read by pixel ``j`` at tap ``kx``, relative to ``ix0``."""
        return j * self.window.stride[1] + kx - self.window.padding[1]

    @cached_property
    def first(self) -> int:
        """Relative column where the first chunk that any tap reads starts."""
        return self.position(0, 0) // self.chunk * self.chunk

    @cached_property
    def chunks(self) -> int:
        """Chunks between the first and the last position any tap reads."""
        return (self.position(self.pixels - 1, self.window.kernel[1] - 1) - self.first) // self.chunk + 1

    @cached_property
    def length(self) -> int:
        """Registers holding one row's chunks."""
        return self.chunks * self.chunk

    def register(self, j: int, kx: int) -> int:
        """Index (among the row's ``length`` registers) of what pixel ``j`` reads at tap ``kx``."""
        return self.position(j, kx) - self.first

    def loads(self, taps: Iterable[int]) -> tuple[tuple[int, int, int], ...]:
        """``(chunk, first register, registers)`` of each load that taps ``kx`` of one
        kernel row need: of each chunk they read, the narrowest aligned part holding every
        element they read (at the borders of the span, often one element). Kept per set of
        taps: a layer's row groups ask for the same few sets hundreds of thousands of times."""
        taps = tuple(taps)
        loads = self._loads_of_taps.get(taps)
        if loads is None:
            loads = self._loads_of_taps[taps] = self._narrowest_loads(taps)
        return loads

    def _narrowest_loads(self, taps: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
        by_chunk: dict[int, list[int]] = {}
        for r in {self.register(j, kx) for kx in taps for j in range(self.pixels)}:
            by_chunk.setdefault(r // self.chunk, []).append(r % self.chunk)
        loads = []
        for q, elements in sorted(by_chunk.items()):
            lo, hi, size = min(elements), max(elements), 1
            while lo // size != hi // size:
                size *= 2
            loads.append((q, q * self.chunk + lo // size * size, size))
        return tuple(loads)

    def chunk_start(self, q: int) -> int:
        """Relative input column of chunk ``q``'s first element."""
        return self.first + q * self.chunk

    def chunk_in_image(self, q: int) -> bool:
        """Whether chunk ``q`` lies inside the input row for every vector of the output."""
        last_origin = (self.window.output_size[1] - self.pixels) * self.window.stride[1]
        start = self.chunk_start(q)
        return start >= 0 and last_origin + start + self.chunk <= self.window.input_size[1]

    def offset(self, channel: int, ky: int, register: int) -> int:
        """Element offset of what ``register`` holds for kernel row ``(channel, ky)`` from
        the vector's window origin (its first pixel's tap (0, 0), padding included)."""
        win = self.window
        column = self.first + register + win.padding[1]
        return channel * win.channel_stride + ky * win.row_stride + column * win.pixel_stride
