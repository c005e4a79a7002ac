"""Test models built in code, their numpy references, and running them through the pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

import sparsert_tvm as sp
from sparsert_tvm import build
from sparsert_tvm.build import host_cpu_target

KINDS = ("matmul", "matmul_t", "conv_nchw", "conv_nhwc")


def sparse_matrix(rng, shape, density, *, empty_rows=0, empty_cols=0, dtype="float32") -> np.ndarray:
    """Random values on a uniform random mask, with the first rows / last columns emptied."""
    mask = rng.random(shape) < density
    values = rng.standard_normal(shape) * mask
    values[:empty_rows, :] = 0
    if empty_cols:
        values[:, shape[1] - empty_cols :] = 0
    return values.astype(dtype)


def pruned_matrix(rng, shape, density, dtype="float32") -> np.ndarray:
    """Magnitude pruning with uneven rows, as in trained networks: row scales vary 10x."""
    scale = np.exp(rng.uniform(-1.2, 1.2, size=(shape[0], 1)))
    dense = rng.standard_normal(shape) * scale
    threshold = np.quantile(np.abs(dense), 1 - density) if density > 0 else np.inf
    return (dense * (np.abs(dense) >= threshold)).astype(dtype)


@dataclass
class Case:
    """One rewritable operator with its epilogue: ``act(x @ A^T + bias [+ residual])``.

    ``kind`` picks how it appears in Relax: ``matmul`` (``x @ W`` with ``W = A^T``),
    ``matmul_t`` (``x @ permute_dims(A)``, ONNX Gemm's form), ``conv_nchw`` / ``conv_nhwc``
    (1x1 convolutions). ``x_shape`` has ``None`` for a symbolic batch dimension.
    """

    kind: str
    weight: np.ndarray  # A[M, K]
    x_shape: tuple
    epilogue: tuple[str, ...] = ()
    bias: np.ndarray | None = None
    dtype: str = "float32"
    batch_name: str = "n"

    @property
    def M(self):  # noqa: N802
        return self.weight.shape[0]

    @property
    def channel_axis(self):
        return 1 if self.kind == "conv_nchw" else -1

    def out_shape(self, x_shape):
        shape = list(x_shape)
        shape[self.channel_axis] = self.M
        return tuple(shape)

    def module(self) -> tvm.IRModule:
        dims = [tirx.Var(self.batch_name, "int64") if d is None else d for d in self.x_shape]
        x = relax.Var("x", relax.TensorType(dims, self.dtype))
        params = [x]
        if "residual" in self.epilogue:
            params.append(relax.Var("residual", relax.TensorType(self.out_shape(dims), self.dtype)))
        builder = relax.BlockBuilder()
        with builder.function("main", params):
            with builder.dataflow():
                value = builder.emit(self._root(x))
                for op in self.epilogue:
                    value = builder.emit(self._epilogue(op, value, params))
                out = builder.emit_output(value)
            builder.emit_func_output(out)
        return builder.get()

    def _root(self, x):
        a = self.weight
        if self.kind == "matmul":
            return relax.op.matmul(x, relax.const(np.ascontiguousarray(a.T)))
        if self.kind == "matmul_t":
            return relax.op.matmul(x, relax.op.permute_dims(relax.const(a)))
        if self.kind == "conv_nchw":
            return relax.op.nn.conv2d(x, relax.const(a[:, :, None, None]))
        # NHWC data with an HWIO kernel, as TFLite models come in.
        return relax.op.nn.conv2d(
            x, relax.const(np.ascontiguousarray(a.T[None, None])), data_layout="NHWC", kernel_layout="HWIO"
        )

    def _epilogue(self, op, value, params):
        if op == "bias":
            shape = [1, self.M, 1, 1] if self.kind == "conv_nchw" else [self.M]
            return relax.op.add(value, relax.op.reshape(relax.const(self.bias), shape))
        if op == "relu":
            return relax.op.nn.relu(value)
        if op == "relu6":
            return relax.op.nn.relu6(value)
        if op == "clip":
            lo, hi = relax.prim_value(tirx.FloatImm("float64", -0.5)), relax.prim_value(tirx.FloatImm("float64", 0.5))
            return relax.op.clip(value, lo, hi)
        if op == "residual":
            return relax.op.add(params[1], value)  # residual first: operand order must not matter
        raise ValueError(op)

    def inputs(self, rng, batch: int) -> list[np.ndarray]:
        x_shape = tuple(batch if d is None else d for d in self.x_shape)
        arrays = [rng.standard_normal(x_shape).astype(self.dtype)]
        if "residual" in self.epilogue:
            arrays.append(rng.standard_normal(self.out_shape(x_shape)).astype(self.dtype))
        return arrays

    def reference(self, arrays) -> np.ndarray:
        x = arrays[0].astype(np.float64)
        a = self.weight.astype(np.float64)
        if self.kind == "conv_nchw":
            acc = np.einsum("mk,bkhw->bmhw", a, x)
        else:
            acc = x @ a.T
        bias_shape = [1] * acc.ndim
        bias_shape[self.channel_axis] = self.M
        for op in self.epilogue:
            if op == "bias":
                acc = acc + self.bias.astype(np.float64).reshape(bias_shape)
            elif op == "relu":
                acc = np.maximum(acc, 0)
            elif op == "relu6":
                acc = np.clip(acc, 0, 6)
            elif op == "clip":
                acc = np.clip(acc, -0.5, 0.5)
            elif op == "residual":
                acc = acc + arrays[1]
        return acc


def make_case(rng, kind, m, k, density, x_shape, epilogue=(), dtype="float32", **matrix_options) -> Case:
    bias = rng.standard_normal(m).astype(dtype) if "bias" in epilogue else None
    weight = sparse_matrix(rng, (m, k), density, dtype=dtype, **matrix_options)
    return Case(kind, weight, x_shape, tuple(epilogue), bias, dtype)


def device_of(target) -> tvm.runtime.Device:
    return tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)


class Compiled:
    """A module built through ``sparsert_tvm.compile``, ready to run on the target's device."""

    def __init__(self, mod, target, density_threshold=1.0, **options):
        self.report = sp.SparsityReport()
        self.executable = sp.compile(mod, target, density_threshold, report=self.report, **options)
        self.device = device_of(target)
        self.vm = relax.VirtualMachine(self.executable, self.device)

    def __call__(self, *arrays):
        """The output as numpy, or a list of them for a tuple output."""
        out = self.vm["main"](*[tvm.runtime.tensor(a, self.device) for a in arrays])
        return out.numpy() if hasattr(out, "numpy") else [o.numpy() for o in out]


# Relative tolerances against a float64 reference. float16 kernels accumulate in float16:
# each FMA rounds to 11 bits, so a sum of a few dozen products is good to about 1e-2.
TOLERANCE = {"float32": 2e-5, "float16": 2e-2}


def assert_close(actual, expected, dtype="float32"):
    """Differences of rounding and accumulation order, relative to the output's scale."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tolerance / 2, atol=tolerance * scale)


CPU_TARGET = host_cpu_target()


def cuda_target():
    return build.cuda_target()
