"""Values of expressions that are constants up to a few layout ops.

Frontends rarely hand over a weight as a bare constant: ONNX's Gemm arrives as
``permute_dims(W)``, a convolution bias as ``reshape(b, [1, C, 1, 1])``, ONNX's Clip bounds
as ``where(isnan(c), -inf, c)``, a weight pruned with ``torch.nn.utils.prune`` as
``multiply(weight_orig, weight_mask)``, all bound to variables of their own.
``constant_value`` follows such chains through the bindings and evaluates them with numpy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def constant_value(expr, var2val) -> np.ndarray | None:
    """``expr``'s value if it is a constant up to layout ops, else None."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op) or not expr.args:
        return None
    elementwise = _ELEMENTWISE_OPS.get(expr.op.name)
    if elementwise is not None:
        values = [constant_value(arg, var2val) for arg in expr.args]
        return None if any(v is None for v in values) else np.asarray(elementwise(*values))
    evaluate = _LAYOUT_OPS.get(expr.op.name)
    if evaluate is None:
        return None
    value = constant_value(expr.args[0], var2val)
    if value is None:
        return None
    try:
        return evaluate(value, expr)
    except (ValueError, TypeError):
        return None


def _static_shape(shape_expr) -> list[int]:
    if not isinstance(shape_expr, relax.ShapeExpr):
        raise ValueError("symbolic shape")
    return [int(d) for d in shape_expr.values]


def _permute(value, call):
    axes = call.attrs.axes
    return np.transpose(value, None if axes is None else [int(a) for a in axes])


def _reshape(value, call):
    return np.reshape(value, _static_shape(call.args[1]))


def _expand_dims(value, call):
    return np.expand_dims(value, tuple(int(a) for a in call.attrs.axis))


def _squeeze(value, call):
    axis = call.attrs.axis
    return np.squeeze(value, None if axis is None else tuple(int(a) for a in axis))


def _astype(value, call):
    return value.astype(str(call.attrs.dtype))


# Ops over constant operands, all of them evaluated (numpy broadcasts and keeps float32 as
# Relax does). ``multiply``: PyTorch's pruning (``torch.nn.utils.prune``) leaves each weight
# as ``weight_orig * weight_mask``, which ``torch.export`` keeps as a product.
_ELEMENTWISE_OPS = {
    "relax.isnan": np.isnan,
    "relax.where": np.where,
    "relax.multiply": np.multiply,
    "relax.add": np.add,
    "relax.subtract": np.subtract,
}

_LAYOUT_OPS = {
    "relax.permute_dims": _permute,
    "relax.reshape": _reshape,
    "relax.expand_dims": _expand_dims,
    "relax.squeeze": _squeeze,
    "relax.astype": _astype,
}
