"""What every PTX kernel of this package shares: the launch signature ``(x, [residual], y,
ncols)`` and its loads, the header, the spelling of constants, and the kernel's description
for the launcher (``PtxKernel``)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from ...problem import Clip, SpmmProblem

PTX_VERSION = "8.0"
SUPPORTED_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class PtxKernel:
    """Generated PTX and what the launcher needs to know about it."""

    name: str
    units: tuple[str, ...]  # units[0] holds the entry; more than one must be linked
    row_groups: int  # gridDim.y
    threads: int  # blockDim.x
    columns_per_block: int
    param_types: tuple[str, ...]  # TVM argument types of the kernel parameters
    # The batch is folded into the columns (``p_ncols`` = images x columns per image, one
    # launch row) rather than the grid's z dimension.
    folds_batch: bool = False

    @property
    def ptx_bytes(self) -> int:
        return sum(len(u) for u in self.units)


def f32_immediate(value: float) -> str:
    """PTX's exact hexadecimal spelling of a float32 constant."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def clip_bounds(op: Clip) -> list[tuple[str, float]]:
    """The ``max`` / ``min`` instructions (and their operand) that ``op`` needs."""
    return [(name, bound) for name, bound in (("max", op.lo), ("min", op.hi)) if math.isfinite(bound)]


# -- what every kernel of this package starts with: the launch signature of the wrapper
def ptx_header(arch: str) -> list[str]:
    return [f".version {PTX_VERSION}", f".target {arch}", ".address_size 64", ""]


def param_types(problem: SpmmProblem) -> tuple[str, ...]:
    """TVM argument types of ``(x, [residual], y, ncols)``."""
    return ("handle",) * (3 if problem.has_residual else 2) + ("int32",)


def entry_declaration(name: str, has_residual: bool, threads: int, registers: int = 0) -> list[str]:
    params = ["p_x"] + (["p_r"] if has_residual else []) + ["p_y"]
    decl = ", ".join(f".param .u64 {q}" for q in params) + ", .param .u32 p_ncols"
    return [f".visible .entry {name}({decl})", f".maxntid {threads}, 1, 1"] + ([f".maxnreg {registers}"] if registers else []) + ["{"]


def load_operands(has_residual: bool) -> list[str]:
    """``%px``, ``%py``, ``%pr`` (global addresses of X, Y, the residual) and ``%ncols``."""
    lines = [
        "ld.param.u64 %rd1, [p_x];",
        "ld.param.u64 %rd2, [p_y];",
        "cvta.to.global.u64 %px, %rd1;",
        "cvta.to.global.u64 %py, %rd2;",
    ]
    if has_residual:
        lines += ["ld.param.u64 %rd3, [p_r];", "cvta.to.global.u64 %pr, %rd3;"]
    return lines + ["ld.param.u32 %ncols, [p_ncols];"]


def vector_suffix(registers: list[str]) -> str:
    """The ``.v<n>`` of a vector access to ``registers`` (none for one register)."""
    return "" if len(registers) == 1 else f".v{len(registers)}"


def vector_operand(registers: list[str]) -> str:
    """``registers`` as the operand of one access: a register, or a brace list."""
    return registers[0] if len(registers) == 1 else "{" + ", ".join(registers) + "}"
