"""Convolutions as candidates: 2-D and 1-D (a 2-D one of an image one row high), plain or
transposed (one stride-1 convolution of the kernel's phase filters), grouped and dilated,
each seen as ``[M, K]`` filters read through a window (``ConvWindow``)."""

from __future__ import annotations

import numpy as np
from tvm import tirx

from ..problem import ConvWindow, Layout
from ..weights import SparseMatrix, dilated_size, one_pixel_rows, phase_filters, spread_dilated, ungrouped_filters
from .analysis import Candidate, Rejected, check_operands, set_problem, tensor_dims
from .constants import constant_value
from .unshuffle import Unshuffle

# A dilated kernel is spread (zeros between its taps) into a dense [M, K] array; beyond this
# many elements (128 MB of float32) the analysis would cost more memory than it is worth.
MAX_SPREAD_WEIGHTS = 1 << 25


def analyse_conv2d(candidate: Candidate, call, var2val):
    _analyse_conv(candidate, call, *_geometry(candidate, call, "OIHW", var2val))


def analyse_conv1d(candidate: Candidate, call, var2val):
    _analyse_conv(candidate, call, *_geometry(candidate, call, "OIW", var2val))


def analyse_conv2d_transpose(candidate: Candidate, call, var2val):
    _analyse_transposed(candidate, call, *_geometry(candidate, call, "IOHW", var2val))


def analyse_conv1d_transpose(candidate: Candidate, call, var2val):
    _analyse_transposed(candidate, call, *_geometry(candidate, call, "IOW", var2val))


def _geometry(candidate: Candidate, call, kernel_layout: str, var2val) -> tuple:
    """``(data, dims, dtype, kernel, layout, stride, dilation, padding, kind)`` of a
    convolution whose constant kernel comes in ``kernel_layout``'s order (OIHW, OIW, IOHW or
    IOW), as the 2-D kernels see it: a 1-D convolution is a 2-D one of a kernel one row high
    over an image one row high, its input ``[N, C, L]`` (``[N, L, C]``) seen as
    ``[N, C, 1, L]`` (``[N, 1, L, C]``), a view."""
    data, weight = call.args
    attrs = call.attrs
    w = _conv_weight(candidate, weight, attrs, kernel_layout, var2val)
    dims, dtype = tensor_dims(data, "input")
    layout = str(attrs.data_layout)
    stride, dilation = tuple(int(s) for s in attrs.strides), tuple(int(d) for d in attrs.dilation)
    padding = tuple(int(p) for p in attrs.padding)
    if len(kernel_layout) == 4:
        return data, dims, dtype, w, layout, stride, dilation, padding, "conv2d"
    layout = {"NCW": "NCHW", "NWC": "NHWC"}.get(layout, layout)
    (left, right) = padding
    return (data, _one_row(dims, layout), dtype, w[:, :, None, :], layout, (1, *stride), (1, *dilation),
            (0, left, 0, right), "conv1d")


def _one_row(dims: list, layout: str) -> list:
    """3-D dims of a 1-D convolution with the image's one row added: before the length (NCW)
    or the length and channels (NWC)."""
    if len(dims) != 3:
        return dims
    row = 2 if layout == "NCHW" else 1
    return dims[:row] + [tirx.IntImm("int64", 1)] + dims[row:]


def _conv_weight(candidate: Candidate, weight, attrs, layout: str, var2val) -> np.ndarray:
    """The constant kernel in ``layout`` (OIHW, OIW, IOHW or IOW), or rejected."""
    kind = "conv2d" if len(layout) == 4 else "conv1d"
    candidate.op = f"{kind}{'_transpose' if layout.startswith('I') else ''} {attrs.data_layout}"
    w = constant_value(weight, var2val)
    if w is None:
        raise Rejected("weight is not a constant")
    kernel_layout = str(attrs.kernel_layout)
    if sorted(kernel_layout) != sorted(layout):
        raise Rejected(f"kernel layout {kernel_layout}")
    candidate.groups = int(attrs.groups)
    return np.transpose(w, [kernel_layout.index(axis) for axis in layout])


def _analyse_conv(candidate: Candidate, call, data, dims, dtype, w, layout, stride, dilation, padding, kind):
    """A convolution of kernel ``w`` (OIHW) over ``data``, seen as the 4-D ``dims`` in
    ``layout`` (NCHW or NHWC)."""
    groups = candidate.groups
    _name_conv(candidate, call, kind, w.shape[2:], stride, dilation, group_inputs=w.shape[1])
    if groups < 1 or w.shape[0] % groups:
        raise Rejected(f"{w.shape[0]} output channels do not split into {groups} groups")
    w = _spread_kernel(candidate, ungrouped_filters(w, groups), kind, dilation)
    _conv_problem(candidate, call, data, dims, dtype, w, layout, stride, padding)


def _analyse_transposed(candidate: Candidate, call, data, dims, dtype, w, layout, stride, dilation, padding, kind):
    """A transposed convolution of kernel ``w`` (IOHW) over ``data`` (4-D ``dims`` in
    ``layout``), padded by ``padding`` (top, left, bottom, right: rows and columns cropped
    from the full output), as one stride-1 convolution of ``phase_filters`` whose output
    channels ``unshuffle`` interleaves (and crops at the end) into the model's output."""
    groups = candidate.groups
    inputs, _, kh, kw = w.shape
    _name_conv(candidate, call, f"{kind}_transpose", (kh, kw), stride, dilation, group_inputs=inputs // max(groups, 1))
    if groups < 1 or inputs % groups:
        raise Rejected(f"{inputs} input channels do not split into {groups} groups")
    if layout not in ("NCHW", "NHWC"):
        raise Rejected(f"data layout {call.attrs.data_layout}")
    channels_last = layout == "NHWC"
    out_dims = _one_row(tensor_dims(candidate.root, "output")[0], layout)
    spatial = (dims[1:3], out_dims[1:3]) if channels_last else (dims[2:], out_dims[2:])
    if not all(isinstance(d, tirx.IntImm) for d in spatial[0] + spatial[1]):
        raise Rejected("transposed convolution of a dynamic spatial size")
    if all(int(d) == 1 for d in spatial[0]):
        _one_pixel(candidate, call, data, dims, dtype, w, channels_last, dilation, padding[:2], spatial[1])
        return
    filters, top = phase_filters(w, groups, stride, dilation, crop=padding[:2])
    ungrouped = ungrouped_filters(filters, groups)
    if ungrouped.size > MAX_SPREAD_WEIGHTS:
        raise Rejected(f"its phase filters hold {ungrouped.size:,} weights, more than {MAX_SPREAD_WEIGHTS:,}")
    candidate.taps = (kh * kw, filters.shape[2] * filters.shape[3])
    candidate.weight = SparseMatrix.from_dense(ungrouped.reshape(ungrouped.shape[0], -1))
    # Per axis: ceil(out / s) rows of each phase hold the model's output (bottom padding to
    # reach them); where the window's own padding gives more, the interleave crops the excess.
    conv_padding, computed = [0] * 4, []
    for axis, (window, s, pad, size, out) in enumerate(zip(filters.shape[2:], stride, top, spatial[0], spatial[1])):
        unpadded = int(size) + pad - window + 1
        rows = max(-(-int(out) // s), unpadded)
        conv_padding[axis], conv_padding[axis + 2] = pad, rows - unpadded
        computed.append(rows)
    unshuffle = Unshuffle(tuple(stride), tuple(int(d) for d in spatial[1]), channels_last)
    if not unshuffle.is_identity(tuple(computed)):
        candidate.unshuffle = unshuffle
        candidate.row_channels = np.repeat(np.arange(filters.shape[0] // unshuffle.phase_count), unshuffle.phase_count)
    _conv_problem(candidate, call, data, dims, dtype, ungrouped, layout, (1, 1), tuple(conv_padding))


def _one_pixel(candidate: Candidate, call, data, dims, dtype, w, channels_last: bool, dilation, crop, out_spatial):
    """A transposed convolution of a one-pixel input as the matmul ``one_pixel_rows`` gives:
    its input seen as ``[N, channels]``, its output as ``[N, rows]``, both views, so no window
    and no interleave."""
    inputs, group_outputs, kh, kw = w.shape
    out_size = tuple(int(d) for d in out_spatial)
    weights = candidate.groups * group_outputs * out_size[0] * out_size[1] * inputs
    if weights > MAX_SPREAD_WEIGHTS:
        raise Rejected(f"as a matmul over its one input pixel it holds {weights:,} weights, more than "
                       f"{MAX_SPREAD_WEIGHTS:,}")
    rows, candidate.row_channels = one_pixel_rows(w, candidate.groups, dilation, crop, out_size, channels_last)
    candidate.taps = (kh * kw, 1)
    candidate.weight = SparseMatrix.from_dense(rows)
    candidate.channel_axis = -1 if channels_last else 1
    check_operands(candidate, dtype, dims[3] if channels_last else dims[1], call)
    set_problem(candidate, Layout.ROWS, data, [dims[0], inputs], [dims[0], rows.shape[0]], dtype)


def _name_conv(candidate: Candidate, call, kind: str, kernel, stride, dilation, group_inputs: int) -> None:
    """The report's name of a convolution, e.g. ``conv2d 3x3 /2 depthwise NCHW``."""
    groups = candidate.groups
    strided = "" if tuple(stride) == (1, 1) else f" /{_pair(kind, stride)}"
    dilated = "" if tuple(dilation) == (1, 1) else f" dilation {_pair(kind, dilation)}"
    grouping = "" if groups == 1 else " depthwise" if group_inputs == 1 else f" groups={groups}"
    size = _pair(kind, tuple(kernel), compact=False)
    candidate.op = f"{kind} {size}{strided}{dilated}{grouping} {call.attrs.data_layout}"


def _conv_problem(candidate: Candidate, call, data, dims, dtype, w, layout, stride, padding) -> None:
    """The problem of the stride ``stride`` convolution of the ungrouped kernel ``w`` (OIHW,
    the candidate's weight) over ``data``."""
    kh, kw = w.shape[2:]
    attrs = call.attrs
    if layout not in ("NCHW", "NHWC"):
        raise Rejected(f"data layout {attrs.data_layout}")
    if str(attrs.out_layout) not in ("", str(attrs.data_layout)):
        raise Rejected(f"output layout {attrs.out_layout} differs from the input's {attrs.data_layout}")
    channels_last = layout == "NHWC"
    channels = dims[3] if channels_last else dims[1]
    taps = tirx.IntImm("int64", int(channels) * kh * kw) if isinstance(channels, tirx.IntImm) else None
    check_operands(candidate, dtype, taps, call)
    m = w.shape[0]
    rows = Layout.ROWS if channels_last else Layout.CHANNELS
    spatial = dims[1:3] if channels_last else dims[2:]
    candidate.channel_axis = -1 if channels_last else 1
    if (kh, kw) == (1, 1) and stride == (1, 1) and not any(padding):
        if not channels_last and not all(isinstance(d, tirx.IntImm) for d in spatial):
            raise Rejected("NCHW input with a dynamic spatial size")
        y_dims = dims[:3] + [m] if channels_last else [dims[0], m] + dims[2:]
        set_problem(candidate, rows, data, dims, y_dims, dtype)
        return
    if not all(isinstance(d, tirx.IntImm) for d in spatial):
        raise Rejected(f"{kh}x{kw} convolution of a dynamic spatial size")
    window = ConvWindow(
        channels=w.shape[1],  # ungrouped
        kernel=(kh, kw),
        stride=stride,
        padding=padding,
        input_size=tuple(int(d) for d in spatial),
        channels_last=channels_last,
    )
    oh, ow = window.output_size
    if oh < 1 or ow < 1:
        raise Rejected(f"empty output ({oh}x{ow})")
    y_dims = [dims[0], oh, ow, m] if channels_last else [dims[0], m, oh, ow]
    set_problem(candidate, rows, data, dims, y_dims, dtype, window)


def _spread_kernel(candidate: Candidate, w: np.ndarray, kind: str, dilation) -> np.ndarray:
    """The ungrouped kernel ``w`` (OIHW) spread over its dilation, recorded as the candidate's
    weight; rejected where the spread kernel is too large (the weight as held still recorded,
    for the report)."""
    kh, kw = w.shape[2:]
    spread = dilated_size((kh, kw), dilation)
    weights = w.shape[0] * w.shape[1] * spread[0] * spread[1]
    too_large = spread != (kh, kw) and weights > MAX_SPREAD_WEIGHTS
    if spread != (kh, kw) and not too_large:
        candidate.taps = (kh * kw, spread[0] * spread[1])
        w = spread_dilated(w, dilation)
    candidate.weight = SparseMatrix.from_dense(w.reshape(w.shape[0], -1))
    if too_large:
        taps = _pair(kind, spread, compact=False)
        raise Rejected(f"dilation {_pair(kind, dilation)} spreads the kernel over {taps} taps: {weights:,} weights, "
                        f"more than {MAX_SPREAD_WEIGHTS:,}")
    return w


def _pair(kind: str, pair: tuple[int, int], compact: bool = True) -> str:
    """A kernel's size, stride or dilation as the report names it: ``3`` (of a 1-D
    convolution), ``2`` (a square stride or dilation, where ``compact``) or ``5x3``."""
    return f"{pair[1]}" if kind.startswith("conv1d") or compact and pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"
