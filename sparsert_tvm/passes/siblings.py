"""Sibling layers: candidates that multiply one input by weights of their own, as attention's
query, key and value projections do.

Apart, each is a kernel launch of its own that reads the input again (on CUDA, through a
transpose it shares with the others). Combined, one kernel computes the product with their
weights stacked row on row, and each sibling takes its slice of the output, which TVM fuses
into whatever reads it. Only candidates the pass rewrites anyway are combined, and only
where their epilogues differ in bias values alone: a residual add or a clip of one of them
would have to be applied to the others' rows too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..problem import BiasAdd, Layout, ResidualAdd
from ..weights import SparseMatrix
from .candidates import Candidate

_ASTYPE = tvm.ir.Op.get("relax.astype")


def combine_siblings(func: relax.Function, candidates: list[Candidate], rewritten) -> list[Candidate]:
    """``candidates`` with each set of siblings that ``rewritten(candidate)`` accepts replaced
    by one candidate (``parts`` holds them, in the order of their tails in ``func``), placed
    where its first part was."""
    position = {b.var: i for i, b in enumerate(b for block in func.body.blocks for b in block.bindings)}
    block_of = {b.var: i for i, block in enumerate(func.body.blocks) for b in block.bindings}
    var2val = relax.analysis.get_var2val(func)
    families: dict = {}
    for candidate in candidates:
        family = _family(candidate, var2val) if rewritten(candidate) else None
        if family is not None:
            # One binding block: the first sibling's place binds them all, and a dataflow
            # block's values do not outlive it.
            families.setdefault((block_of[candidate.tail], family), []).append(candidate)
    combined = {}
    for parts in families.values():
        if len(parts) > 1:
            parts.sort(key=lambda part: position[part.tail])
            combined[id(parts[0])] = _combine(parts)
    taken = {id(part) for whole in combined.values() for part in whole.parts}
    result = []
    for candidate in sorted(candidates, key=lambda c: position[c.tail]):
        if id(candidate) in combined:
            result.append(combined[id(candidate)])
        elif id(candidate) not in taken:
            result.append(candidate)
    return result


def _family(candidate: Candidate, var2val):
    """What siblings have in common, or None where the candidate has no siblings."""
    problem = candidate.problem
    if (
        candidate.reason is not None
        or problem.window is not None
        or candidate.groups != 1
        or candidate.unshuffle is not None  # its output is read out of the kernel's
        or not isinstance(candidate.x, relax.Var)
        or any(isinstance(op, ResidualAdd) for op in problem.epilogue)
        # An operand seen through a view (a weight on the left, a 1-D convolution): slices
        # of the combined output would not have the layers' shapes.
        or not tvm_ffi.structural_equal(list(candidate.x.ty.shape.values), list(problem.x_shape))
    ):
        return None
    epilogue = tuple(BiasAdd if isinstance(op, BiasAdd) else op for op in problem.epilogue)
    shape = tuple(str(d) for d in problem.x_shape)
    return _input(candidate.x, var2val), problem.layout, problem.dtype, shape, epilogue


def _input(x: relax.Var, var2val):
    """``x`` seen through casts: ``ToMixedPrecision`` casts an input once per reader."""
    value = var2val.get(x)
    if isinstance(value, relax.Call) and value.op.same_as(_ASTYPE):
        return _input(value.args[0], var2val), str(value.attrs.dtype)
    return x


def _combine(parts: list[Candidate]) -> Candidate:
    first = parts[0]
    weight = SparseMatrix.from_dense(np.concatenate([part.weight.dense for part in parts]))
    epilogue = tuple(
        BiasAdd(tuple(v for part in parts for v in part.problem.epilogue[i].values)) if isinstance(op, BiasAdd) else op
        for i, op in enumerate(first.problem.epilogue)
    )
    y_shape = list(first.problem.y_shape)
    y_shape[output_channel_axis(first)] = weight.shape[0]
    problem = dataclasses.replace(first.problem, weight=weight, y_shape=tuple(y_shape), epilogue=epilogue)
    members = [member for part in parts for member in part.members]
    return Candidate(
        function=first.function, root=first.root, op=first.op, members=members, x=first.x,
        weight=weight, problem=problem, parts=tuple(parts), channel_axis=first.channel_axis,
    )


def output_channel_axis(candidate: Candidate) -> int:
    """The axis of the output that holds the weight's rows."""
    return len(candidate.problem.y_shape) - 1 if candidate.problem.layout is Layout.ROWS else 1
