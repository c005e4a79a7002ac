"""Reading a transposed convolution's output out of the phase convolution that computes it
(``weights.phase_filters``): each output channel's phases interleaved into rows and
columns (as a pixel shuffle does), then the model's window cropped."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, tirx


@dataclass(frozen=True)
class Unshuffle:
    phases: tuple[int, int]  # the transposed convolution's stride: phases per row and column
    begin: tuple[int, int]  # first row and column of the model's output in the interleaved one
    size: tuple[int, int]  # rows and columns of the model's output
    channels_last: bool

    @property
    def phase_count(self) -> int:
        return self.phases[0] * self.phases[1]

    def is_identity(self, computed: tuple[int, int]) -> bool:
        """Whether a phase convolution of ``computed`` rows and columns is the output as is."""
        return self.phases == (1, 1) and self.begin == (0, 0) and computed == self.size

    def emit(self, builder, y: relax.Expr, dims: list) -> tuple[relax.Expr, list]:
        """The model's output (and its 4-D dims) from the phase convolution's ``y`` of 4-D
        ``dims`` (NCHW or NHWC, channels ``c * sh * sw + ry * sw + rx``)."""
        (sh, sw), op = self.phases, relax.op
        if self.channels_last:
            n, rows, cols, channels = dims
            spatial = [1, 2]
            if self.phases != (1, 1):
                y = builder.emit(op.reshape(y, [n, rows, cols, channels // (sh * sw), sh, sw]))
                y = builder.emit(op.permute_dims(y, [0, 1, 4, 2, 5, 3]))  # n, rows, sh, cols, sw, c
                y = builder.emit(op.reshape(y, [n, rows * sh, cols * sw, channels // (sh * sw)]))
        else:
            n, channels, rows, cols = dims
            spatial = [2, 3]
            if self.phases != (1, 1):
                y = builder.emit(op.reshape(y, [n, channels // (sh * sw), sh, sw, rows, cols]))
                y = builder.emit(op.permute_dims(y, [0, 1, 4, 2, 5, 3]))  # n, c, rows, sh, cols, sw
                y = builder.emit(op.reshape(y, [n, channels // (sh * sw), rows * sh, cols * sw]))
        end = [b + s for b, s in zip(self.begin, self.size)]
        size = [tirx.IntImm("int64", s) for s in self.size]
        out = [n, *size, channels // (sh * sw)] if self.channels_last else [n, channels // (sh * sw), *size]
        return op.strided_slice(y, axes=spatial, begin=list(self.begin), end=end, assume_inbound=True), out
