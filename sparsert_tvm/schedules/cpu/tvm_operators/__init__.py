"""Schedules for the operators the pass leaves to TVM on the CPU.

TVM's CPU pipeline (``relax.backend.cpu_generic``) schedules none of the PrimFuncs it lowers:
each runs on one thread as scalar loops. Once the sparse kernels have taken a model's weights,
what is left can be most of its time: in a 90%-pruned BERT-base layer on 2 cores, attention's
two products, GELU, softmax and the layer norms took 38 of 48 ms. ``sparsert_tvm.compile``
schedules them with these rules, the first that applies to a PrimFunc winning (dlight's
``ApplyDefaultSchedule``): a product of two activations, TVM's own CPU rules for reductions
(softmax, norms) and matrix-vector products, then operators of injective blocks only.
"""

from tvm.s_tir import dlight

from .elementwise import Elementwise
from .matmul import ActivationMatmul


def schedule_rules() -> list:
    return [ActivationMatmul(), dlight.cpu.GEMV(), dlight.cpu.Reduction(), Elementwise()]


__all__ = ["ActivationMatmul", "Elementwise", "schedule_rules"]
