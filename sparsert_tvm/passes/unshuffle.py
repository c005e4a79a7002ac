"""Reading a transposed convolution's output out of the phase convolution that computes it
(``weights.phase_filters``): each output channel's phases interleaved into rows and
columns (as a pixel shuffle does), then cropped to the model's rows and columns (the last
row of phases may hold some beyond them)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, tirx


@dataclass(frozen=True)
class Unshuffle:
    phases: tuple[int, int]  # the transposed convolution's stride: phases per row and column
    size: tuple[int, int]  # rows and columns of the model's output
    channels_last: bool

    @property
    def phase_count(self) -> int:
        return self.phases[0] * self.phases[1]

    def is_identity(self, computed: tuple[int, int]) -> bool:
        """Whether a phase convolution of ``computed`` rows and columns is the output as is."""
        return self.phases == (1, 1) and computed == self.size

    def emit(self, builder, y: relax.Expr, dims: list) -> tuple[relax.Expr, list]:
        """The model's output (unbound) and its 4-D dims, from the phase convolution's ``y``
        of 4-D ``dims`` (NCHW or NHWC, channels ``c * sh * sw + ry * sw + rx``)."""
        (sh, sw), op = self.phases, relax.op
        if self.channels_last:
            n, rows, cols, channels = dims
            channels = channels // (sh * sw)
            split, spatial = [n, rows, cols, channels, sh, sw], [1, 2]  # permuted: n, rows, sh, cols, sw, c
            interleaved = [n, rows * sh, cols * sw, channels]
            out = [n, *self.size, channels]
        else:
            n, channels, rows, cols = dims
            channels = channels // (sh * sw)
            split, spatial = [n, channels, sh, sw, rows, cols], [2, 3]  # permuted: n, c, rows, sh, cols, sw
            interleaved = [n, channels, rows * sh, cols * sw]
            out = [n, channels, *self.size]
        if self.phases != (1, 1):
            permuted = builder.emit(op.permute_dims(builder.emit(op.reshape(y, split)), [0, 1, 4, 2, 5, 3]))
            y = op.reshape(permuted, interleaved)
        if (int(rows) * sh, int(cols) * sw) != self.size:
            y = op.strided_slice(builder.emit(y), axes=spatial, begin=[0, 0], end=list(self.size), assume_inbound=True)
        return y, [tirx.IntImm("int64", d) if isinstance(d, int) else d for d in out]
