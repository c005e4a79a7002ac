"""A constant weight seen as the sparse matrix ``A[M, K]`` that the kernels multiply by.

Rows of ``A`` are output features (or output channels), columns are input features (or
input channels). Everything a kernel generator needs to know about the weight is computed
here once: the CSR structure, per-row nonzero counts, density, finiteness and a content
digest used to name and cache kernels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True, eq=False)
class SparseMatrix:
    """An immutable dense ``[M, K]`` weight and its CSR view."""

    dense: np.ndarray

    @classmethod
    def from_dense(cls, array: np.ndarray) -> SparseMatrix:
        array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {array.shape}")
        frozen = np.ascontiguousarray(array).copy()
        frozen.setflags(write=False)
        return cls(frozen)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dense.shape

    @property
    def dtype(self) -> str:
        return str(self.dense.dtype)

    @cached_property
    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indptr, column indices, values)``."""
        # Only true nonzeros reach the kernels; NaN counts as nonzero. Row-major order
        # gives each row's columns in increasing order.
        mask = self.dense != 0
        rows, cols = np.nonzero(mask)
        indptr = np.zeros(self.shape[0] + 1, dtype=np.int64)
        np.cumsum(mask.sum(axis=1), out=indptr[1:])
        return indptr, cols, self.dense[rows, cols]

    @property
    def nnz(self) -> int:
        return int(self.csr[0][-1])

    @property
    def density(self) -> float:
        size = self.dense.size
        return self.nnz / size if size else 0.0

    @property
    def row_nnz(self) -> np.ndarray:
        return np.diff(self.csr[0])

    def row(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Column indices and values of the nonzeros of row ``m``, in column order."""
        indptr, indices, values = self.csr
        lo, hi = indptr[m], indptr[m + 1]
        return indices[lo:hi], values[lo:hi]

    @cached_property
    def is_finite(self) -> bool:
        return bool(np.isfinite(self.dense).all())

    @cached_property
    def digest(self) -> str:
        """Hash of dtype, shape and bytes: two weights share kernels only if this matches."""
        h = hashlib.sha256()
        h.update(f"{self.dtype}:{self.shape}".encode())
        h.update(self.dense.tobytes())
        return h.hexdigest()


def ungrouped_filters(filters: np.ndarray, groups: int) -> np.ndarray:
    """A grouped convolution's OIHW filters as the ungrouped filters they equal: output
    channel ``o`` of group ``g`` reads input channels ``g * C/groups ...`` through its own
    filter and has zeros elsewhere. The kernels then treat it as any sparse convolution."""
    if groups == 1:
        return filters
    out_channels, group_channels = filters.shape[:2]
    full = np.zeros((out_channels, group_channels * groups, *filters.shape[2:]), filters.dtype)
    per_group = out_channels // groups
    for g in range(groups):
        outputs = slice(g * per_group, (g + 1) * per_group)
        full[outputs, g * group_channels : (g + 1) * group_channels] = filters[outputs]
    return full


def dilated_size(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of input a dilated kernel spans: the size of its spread kernel."""
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))


def spread_dilated(filters: np.ndarray, dilation: tuple[int, int]) -> np.ndarray:
    """A dilated convolution's OIHW filters as the undilated filters they equal: tap ``(y, x)``
    moves to ``(y * dh, x * dw)`` of a ``dilated_size`` kernel and zeros fill the taps between.
    The kernels skip zero weights, so the spread costs no arithmetic and the window kernels
    need no notion of dilation."""
    spread = np.zeros((*filters.shape[:2], *dilated_size(filters.shape[2:], dilation)), filters.dtype)
    spread[:, :, :: dilation[0], :: dilation[1]] = filters
    return spread


def phase_filters(
    filters: np.ndarray, groups: int, stride: tuple[int, int], dilation: tuple[int, int], crop: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]]:
    """A transposed convolution's IOHW filters as the OIHW filters of one stride-1 convolution
    of its input that computes all its output phases at once, and that convolution's top and
    left padding.

    With ``crop`` rows cut from the top of the full output (the transposed convolution's
    padding), output row ``s * q + r`` sums the taps ``ky`` with ``(ky * d - crop) % s == r``,
    each reading input row ``q - t``, ``t = (ky * d - crop) // s``: so phase ``r`` is a
    convolution of the input with those taps, flipped into a window that spans every phase's
    offsets (``max(t, 0) - min(t) + 1`` rows, padded by ``max(t, 0)`` on top), and row ``q``
    of every phase is the model's, nothing to crop at the top. Each output channel becomes
    ``sh * sw`` channels, one per phase (channel ``c * sh * sw + ry * sw + rx``, so groups stay
    contiguous), to be interleaved into rows and columns again. Every tap lands in exactly one
    phase, so the nonzeros are the model's; the zeros the other taps leave are skipped like
    any other."""
    as_conv = _as_conv_filters(filters, groups)
    outputs, group_inputs, kh, kw = as_conv.shape
    # Per axis and tap: (phase, offset t); the window's top padding and size.
    taps = [[divmod(k * d - c, s)[::-1] for k in range(size)]
            for size, s, d, c in zip((kh, kw), stride, dilation, crop)]
    top = [max(0, max(t for _, t in axis)) for axis in taps]
    window = [p - min(t for _, t in axis) + 1 for p, axis in zip(top, taps)]
    (sh, sw) = stride
    phased = np.zeros((outputs, sh, sw, group_inputs, *window), filters.dtype)
    for ky, (ry, ty) in enumerate(taps[0]):
        for kx, (rx, tx) in enumerate(taps[1]):
            phased[:, ry, rx, :, top[0] - ty, top[1] - tx] = as_conv[:, :, ky, kx]
    return phased.reshape(outputs * sh * sw, group_inputs, *window), tuple(top)


def one_pixel_rows(
    filters: np.ndarray,
    groups: int,
    dilation: tuple[int, int],
    crop: tuple[int, int],
    out_size: tuple[int, int],
    channels_last: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """A transposed convolution of a one-pixel input (a generator's projection of its latent
    vector) as a matmul of the input's channels: output pixel ``(y, x)`` holds only the tap
    with ``ky * dh - crop_top == y`` and ``kx * dw - crop_left == x``, so each output element
    is one row of weights over the input channels (zero where no tap lands there; a grouped
    kernel's rows zero outside their group). Returns the rows ``[outputs * oh * ow, inputs]``
    in the order the output lies in memory (NCHW: channel, y, x; NHWC: y, x, channel) and
    each row's output channel."""
    full = ungrouped_filters(_as_conv_filters(filters, groups), groups)  # [outputs, inputs, kh, kw]
    outputs, inputs, kh, kw = full.shape
    (oh, ow), (dh, dw), (top, left) = out_size, dilation, crop
    rows = np.zeros((outputs, oh, ow, inputs), filters.dtype)
    for ky in range(kh):
        for kx in range(kw):
            y, x = ky * dh - top, kx * dw - left
            if 0 <= y < oh and 0 <= x < ow:
                rows[:, y, x] = full[:, :, ky, kx]
    channels = np.arange(outputs)
    if channels_last:
        return rows.transpose(1, 2, 0, 3).reshape(-1, inputs), np.tile(channels, oh * ow)
    return rows.reshape(-1, inputs), np.repeat(channels, oh * ow)


def _as_conv_filters(filters: np.ndarray, groups: int) -> np.ndarray:
    """A transposed convolution's IOHW filters as a grouped convolution's OIHW ones: [out
    channel, its group's input channel, ky, kx], out channels numbered group by group."""
    inputs, group_outputs, kh, kw = filters.shape
    as_conv = filters.reshape(groups, inputs // groups, group_outputs, kh, kw).transpose(0, 2, 1, 3, 4)
    return as_conv.reshape(groups * group_outputs, inputs // groups, kh, kw)
