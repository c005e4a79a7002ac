"""Schedules for the operators the pass leaves to TVM on the CPU.

TVM's CPU pipeline (``relax.backend.cpu_generic``) schedules none of the PrimFuncs it lowers:
each runs on one thread as scalar loops. Once the sparse kernels have taken a model's weights,
what is left can be most of its time: in two 90%-pruned BERT-base layers on 2 cores, attention's
two products, GELU, softmax and the layer norms took 38 of 48 ms. ``sparsert_tvm.compile``
schedules them with these rules, the first that applies to a PrimFunc winning (dlight's
``ApplyDefaultSchedule``): a product of two activations, TVM's own CPU rule for
matrix-vector products, reductions along rows (softmax, norms; kept off convolutions), then
operators of injective blocks only. Convolutions and pools TVM keeps stay as TVM lowers them.
"""

from tvm.s_tir import dlight

from .elementwise import Elementwise
from .matmul import ActivationMatmul
from .reduction import AxisReduction


def schedule_rules() -> list:
    return [ActivationMatmul(), dlight.cpu.GEMV(), AxisReduction(), Elementwise()]


__all__ = ["ActivationMatmul", "AxisReduction", "Elementwise", "schedule_rules"]
