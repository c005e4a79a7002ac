"""A small interpreter for the PTX subset the kernel generator emits.

CI has no GPU, so this runs generated kernels on the CPU: every thread of a block executes
in lock step (registers are numpy arrays over the block's threads), predicates mask
individual threads, and a divergent forward branch parks the threads that take it until
execution reaches the label, and a divergent backward branch (a loop whose trip count
differs between warps) parks the threads leaving the loop until the others leave it too.
Module arrays (``.global`` / ``.const``, initialised or zero-filled) are memory like the buffers given, and
``shfl.sync`` exchanges registers within each warp of 32 threads (all lanes must take part).
Threads run smallest position first: where all the running threads jump forward past
threads parked on the way, they park too and the parked ones run, so that code split into
per-warp sections meets again before a ``bar.sync`` (which every thread of the block must
reach together, or the emulator raises); a guarded ``bra.uni`` must not diverge within a
warp. ``.shared`` arrays are memory of their own for
each block, filled with NaN bits, so that reading a slot no thread wrote shows up.
Memory accesses outside the given buffers raise, so addressing bugs fail loudly. It checks
the generators' logic (addresses, dispatch, loops, reductions, epilogue, segments), not
ptxas or the hardware: the GPU tests do that.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import numpy as np

_TOKEN = re.compile(r"\s*,\s*")
_BRACES = re.compile(r"\{([^}]*)\}")
# Register and memory types: numpy dtype of the bits a register holds.
_TYPES = {"f32": np.float32, "b32": np.uint32, "b16": np.uint16, "u16": np.uint16, "u32": np.uint32, "u64": np.uint64}
_ARRAY = re.compile(r"\.(?:global|const) \.align \d+ \.(\w+) (\w+)\[(\d+)\] = \{(.*)$")
_SHARED = re.compile(r"\.shared \.align \d+ \.b8 (\w+)\[(\d+)\];$")
_ZEROS = re.compile(r"\.global \.align \d+ \.b8 (\w+)\[(\d+)\];$")  # no initialiser: zero-filled
_WARP = 32


@dataclass
class _Function:
    name: str
    params: list[str]
    body: list[tuple[str | None, str, list[str]]] = field(default_factory=list)  # (guard, opcode, operands)
    labels: dict[str, int] = field(default_factory=dict)
    tables: dict[str, list[str]] = field(default_factory=dict)


class PtxProgram:
    def __init__(self, *units: str):
        self.functions: dict[str, _Function] = {}
        self.arrays: dict[str, np.ndarray] = {}  # initialised module arrays, by name
        self.shared: dict[str, int] = {}  # shared arrays: bytes, by name
        for unit in units:
            self._parse(unit)

    # -- parsing ---------------------------------------------------------------------
    def _parse(self, text: str):
        current = None
        array = None  # (name, type, size, initialiser text so far) while one is being read
        for raw in text.splitlines():
            line = raw.split("//")[0].strip()
            if not line:
                continue
            shared = _SHARED.match(line)
            if shared:
                self.shared[shared.group(1)] = int(shared.group(2))
                continue
            zeros = _ZEROS.match(line)
            if zeros:
                self.arrays[zeros.group(1)] = np.zeros(int(zeros.group(2)), np.uint8)
                continue
            if array is None:
                declared = _ARRAY.match(line)
                if declared:
                    kind, name, size, rest = declared.groups()
                    array = (name, kind, int(size), [rest])
            else:
                array[3].append(line)
            if array is not None:
                if line.endswith("};"):
                    self._add_array(*array)
                    array = None
                continue
            header = re.match(r"\.visible \.(entry|func) (\w+)\((.*)\)$", line)
            if header:
                params = [p.split()[-1] for p in header.group(3).split(",")]
                current = self.functions[header.group(2)] = _Function(header.group(2), params)
                continue
            if current is None or line.startswith((".", "{", "}")):
                continue  # declarations and scopes; st.param creates call arguments
            table = re.match(r"(\w+): \.branchtargets (.*);$", line)
            if table:
                current.tables[table.group(1)] = _TOKEN.split(table.group(2))
                continue
            label = re.match(r"(\w+):$", line)
            if label:
                current.labels[label.group(1)] = len(current.body)
                continue
            guard = None
            if line.startswith("@"):
                guard, line = line.split(None, 1)
                guard = guard[1:]
            line = line.rstrip(";")
            opcode, _, rest = line.partition(" ")
            # A register list "{%a, %b}" stays one operand, its names joined by ";".
            rest = _BRACES.sub(lambda m: "{" + ";".join(_TOKEN.split(m.group(1).strip())) + "}", rest)
            current.body.append((guard, opcode, _TOKEN.split(rest.strip()) if rest else []))

    def _add_array(self, name: str, kind: str, size: int, parts: list[str]):
        items = "".join(parts).rstrip("};").strip().rstrip(",")
        data = np.array([int(v, 0) for v in items.split(",")], dtype=_TYPES[kind])
        assert len(data) == size, f"array {name}: {len(data)} initialisers for {size} elements"
        self.arrays[name] = data

    # -- execution -------------------------------------------------------------------
    def launch(self, entry: str, grid, block: int, args: list, buffers: dict[str, np.ndarray], order: str = "forward"):
        """Runs ``entry`` over ``grid`` with ``args`` (buffer names or ints), one block after
        another: in launch order, or ``"reverse"``, or ``"shuffle"`` (a fixed random order),
        for kernels whose blocks meet through memory."""
        clash = set(buffers) & set(self.arrays)
        assert not clash, f"buffers named like module arrays: {clash}"
        shared = {name: np.empty(size, np.uint8) for name, size in self.shared.items()}
        memory = _Memory(buffers | self.arrays | shared)  # module arrays live on across launches
        values = [memory.address(a) if isinstance(a, str) else a for a in args]
        gx, gy, gz = grid
        blocks = [(x, y, z) for z in range(gz) for y in range(gy) for x in range(gx)]
        if order == "reverse":
            blocks.reverse()
        elif order == "shuffle":
            np.random.default_rng(0).shuffle(blocks)
        for x, y, z in blocks:
            for data in shared.values():
                data.fill(0xFF)
            special = {
                "%ctaid.x": x, "%ctaid.y": y, "%ctaid.z": z, "%nctaid.x": gx,
                "%tid.x": np.arange(block, dtype=np.uint64), "%ntid.x": block,
            }
            params = dict(zip(self.functions[entry].params, values))
            self._run(self.functions[entry], params, special, memory, np.ones(block, bool))

    def _run(self, fn: _Function, params, special, memory, active):
        threads = len(active)
        active = active.copy()
        regs: dict[str, np.ndarray] = {}
        parked: dict[int, np.ndarray] = {}
        call_params: dict[str, np.ndarray] = {}
        pc = 0

        def value(operand, dtype=np.uint64):
            if operand in regs:
                return regs[operand]
            if operand in special:
                return np.broadcast_to(np.asarray(special[operand], np.uint64), (threads,))
            if operand.startswith("0f"):
                return np.full(threads, struct.unpack("<f", bytes.fromhex(operand[2:])[::-1])[0], np.float32)
            if operand in memory.bases:  # a module array: its address
                return np.full(threads, memory.address(operand), np.uint64)
            if operand.startswith("%"):
                # Never written (a load no thread executed): undefined on hardware. NaN here,
                # so a store of it shows up in the comparison with numpy.
                return np.full(threads, np.nan, np.float32)
            return np.full(threads, int(operand, 0), dtype)

        def write(dest, result, mask):
            old = regs.get(dest)
            regs[dest] = result if old is None or mask.all() else np.where(mask, result, old)

        while pc < len(fn.body):
            if pc in parked:
                active |= parked.pop(pc)
            if not active.any():
                if not parked:
                    return
                pc = min(parked)
                continue
            guard, op, ops = fn.body[pc]
            pc += 1
            mask = active & (regs[guard] if guard else True)
            if not mask.any() and op not in ("bra", "bra.uni", "ret"):
                continue
            if op in ("ld.param.u64", "ld.param.u32", "ld.param.b64", "ld.param.b32"):
                name = ops[1].strip("[]")
                source = call_params.get(name, params.get(name))
                write(ops[0], np.broadcast_to(np.asarray(source, np.uint64), (threads,)).copy(), mask)
            elif op in ("cvta.to.global.u64", "mov.u32", "mov.u64", "cvt.u64.u32", "mov.f32"):
                write(ops[0], value(ops[1]).copy(), mask)
            elif op in ("mov.b32", "mov.b16"):
                if ops[0].startswith("{"):  # unpack two halves
                    bits = value(ops[1]).astype(np.uint32)
                    lo, hi = _names(ops[0])
                    write(lo, (bits & 0xFFFF).astype(np.uint16), mask)
                    write(hi, (bits >> 16).astype(np.uint16), mask)
                elif ops[1].startswith("{"):  # pack two halves
                    lo, hi = (_bits(value(n)) for n in _names(ops[1]))
                    write(ops[0], (lo | hi << 16).astype(np.uint32), mask)
                else:
                    write(ops[0], value(ops[1]).astype(_TYPES[op[-3:]]), mask)
            elif op == "mul.lo.u32":
                write(ops[0], (value(ops[1]) * value(ops[2])) & 0xFFFFFFFF, mask)
            elif op == "mad.lo.u32":
                write(ops[0], (value(ops[1]) * value(ops[2]) + value(ops[3])) & 0xFFFFFFFF, mask)
            elif op in ("div.u32", "rem.u32"):
                a, b = value(ops[1]), value(ops[2])
                write(ops[0], a // b if op == "div.u32" else a % b, mask)
            elif op == "mul.wide.u32":
                write(ops[0], value(ops[1]) * value(ops[2]), mask)
            elif op == "mad.wide.u32":
                write(ops[0], value(ops[1]) * value(ops[2]) + value(ops[3]), mask)
            elif op == "and.pred":
                write(ops[0], value(ops[1]) & value(ops[2]), mask)
            elif op in ("mul.lo.u64", "add.s64", "sub.s64", "add.u32", "sub.u32"):
                a, b = value(ops[1]), value(ops[2])
                result = a * b if op.startswith("mul") else (a - b if op.startswith("sub") else a + b)
                write(ops[0], result & (0xFFFFFFFF if op.endswith("32") else 0xFFFFFFFFFFFFFFFF), mask)
            elif op in _COMPARISONS:
                write(ops[0], _COMPARISONS[op](value(ops[1]), value(ops[2])), mask)
            elif op in ("shr.u32", "and.b32"):
                a, b = value(ops[1]).astype(np.uint64), value(ops[2]).astype(np.uint64)
                write(ops[0], (a >> b if op == "shr.u32" else a & b) & 0xFFFFFFFF, mask)
            elif op in ("selp.f32", "selp.b32", "selp.b64"):
                write(ops[0], np.where(value(ops[3]), value(ops[1]), value(ops[2])), mask)
            elif op == "shfl.sync.bfly.b32":
                assert ops[3:] == ["31", "-1"], "only whole-warp butterflies are emulated"
                write(ops[0], _butterfly(value(ops[1]), int(ops[2], 0), mask), mask)
            elif op == "cvt.f32.f16":
                write(ops[0], value(ops[1]).astype(np.uint16).view(np.float16).astype(np.float32), mask)
            elif op == "cvt.rn.f16.f32":
                write(ops[0], _as_f32(value(ops[1])).astype(np.float16).view(np.uint16), mask)
            elif op in ("bra", "bra.uni"):
                target = fn.labels[ops[0]]
                if op == "bra.uni" and guard:  # promised not to diverge within a warp
                    for w in range(0, threads, _WARP):
                        taken = np.unique(mask[w : w + _WARP][active[w : w + _WARP]])
                        assert len(taken) <= 1, f"bra.uni diverges in warp {w // _WARP}"
                if guard is None or (mask == active).all():
                    if any(pc <= waiting < target for waiting in parked):  # they run first
                        parked[target] = parked.get(target, np.zeros(threads, bool)) | active
                        active = np.zeros(threads, bool)
                    else:
                        pc = target
                    continue
                if not mask.any():
                    continue
                if target > pc:  # the takers wait at the target
                    parked[target] = parked.get(target, np.zeros(threads, bool)) | mask
                    active = active & ~mask
                else:  # a loop some threads leave: they wait right after it
                    parked[pc] = parked.get(pc, np.zeros(threads, bool)) | (active & ~mask)
                    active = mask.copy()
                    pc = target
            elif op == "brx.idx":
                index = np.unique(value(ops[0])[active])
                assert len(index) == 1, "brx.idx index must be uniform"
                targets = fn.tables[ops[1]]
                assert index[0] < len(targets), "brx.idx index out of range"
                pc = fn.labels[targets[int(index[0])]]
            elif op == "bar.sync":
                assert active.all() and not parked, "bar.sync not reached by every thread of the block together"
            elif op == "bar.red.and.pred":
                assert active.all() and not parked, "bar.red not reached by every thread of the block together"
                assert ops[1] == "0"
                write(ops[0], np.full(threads, bool(value(ops[2]).all())), active)
            elif op == "membar.gl":  # blocks run one after another: nothing to order
                continue
            elif op == "atom.global.add.u32":  # one thread after another
                address = _address(ops[1], value)
                old = np.zeros(threads, np.uint32)
                for t in np.nonzero(mask)[0]:
                    one = np.arange(threads) == t
                    old[t] = memory.load(address, one, np.uint32)[t]
                    memory.store(address, np.full(threads, old[t] + int(value(ops[2])[t]), np.uint32), one)
                write(ops[0], old, mask)
            elif op.startswith(("ld.global.nc.", "ld.global.cg.", "ld.const.", "ld.shared.")):
                kind, names = _TYPES[op[-3:]], _names(ops[0])
                memory.check_alignment(_address(ops[1], value), mask, len(names) * kind().itemsize)
                for i, dest in enumerate(names):
                    write(dest, memory.load(_address(ops[1], value, i * kind().itemsize), mask, kind), mask)
            elif op.startswith(("st.global.", "st.shared.")):
                kind, names = _TYPES[op[-3:]], _names(ops[1])
                memory.check_alignment(_address(ops[0], value), mask, len(names) * kind().itemsize)
                for i, source in enumerate(names):
                    memory.store(_address(ops[0], value, i * kind().itemsize), value(source).astype(kind), mask)
            elif op.split(".")[0] in ("fma", "add", "max", "min") and op.endswith(("f32", "f16", "f16x2")):
                write(ops[0], _arithmetic(op, [value(o) for o in ops[1:]]), mask)
            elif op.startswith("st.param"):
                call_params[ops[0].strip("[]")] = value(ops[1]).copy()
            elif op == "call":
                callee = self.functions[ops[0]]
                names = [n.strip("()") for n in ops[1:]]
                arguments = {p: call_params[n] for p, n in zip(callee.params, names)}
                self._run(callee, arguments, special, memory, active)
            elif op == "ret":
                return
            else:
                raise NotImplementedError(f"PTX emulator: {op}")


_COMPARISONS = {
    "setp.ge.u32": np.greater_equal,
    "setp.lt.u32": np.less,
    "setp.eq.u32": np.equal,
    "setp.ne.u32": np.not_equal,
}


def _butterfly(source: np.ndarray, lane_mask: int, mask: np.ndarray) -> np.ndarray:
    """``shfl.sync.bfly`` with every lane of the warp taking part: lane ``l`` reads lane
    ``l ^ lane_mask`` of its own warp."""
    threads = len(source)
    warps = np.unique(np.nonzero(mask)[0] // _WARP)
    for w in warps:
        lanes = mask[w * _WARP : (w + 1) * _WARP]
        if len(lanes) != _WARP or not lanes.all():
            raise AssertionError(f"shfl.sync in warp {w} with {int(lanes.sum())} of {_WARP} lanes active")
    partner = np.arange(threads) ^ lane_mask
    return source[partner]


def _as_f32(bits_or_floats: np.ndarray) -> np.ndarray:
    """A register as float32: 32-bit integer registers hold float bits (``.b32`` operands of
    float instructions), float registers their value."""
    if bits_or_floats.dtype == np.uint32:
        return bits_or_floats.view(np.float32)
    return bits_or_floats.astype(np.float32)


def _bits(register: np.ndarray) -> np.ndarray:
    """A 16-bit register's bits; a never-written one (NaN) gives NaN's bits."""
    return register.view(np.uint32) if register.dtype == np.float32 else register.astype(np.uint32)


def _names(operand: str) -> list[str]:
    return operand.strip("{}").split(";")


def _address(operand: str, value, extra: int = 0):
    base, _, offset = operand.strip("[]").partition("+")  # offsets may be negative: "+-8"
    return value(base) + np.uint64((int(offset or 0) + extra) % 2**64)


_FLOAT_OPS = {"add": np.add, "max": np.fmax, "min": np.fmin}


def _arithmetic(op: str, operands: list[np.ndarray]) -> np.ndarray:
    """f32, f16 and f16x2 (two halves per 32-bit register) arithmetic, rounded once."""
    kind = op.split(".")[-1]

    def compute(args):
        wide = [a.astype(np.float64) for a in args]
        if op.startswith("fma"):
            return wide[0] * wide[1] + wide[2]
        return _FLOAT_OPS[op.split(".")[0]](wide[0], wide[1])

    if kind == "f32":
        return compute([_as_f32(o) for o in operands]).astype(np.float32)

    def halves(bits, shift):
        if bits.dtype == np.float32:  # a never-written register (NaN): NaN halves
            bits = np.full(bits.shape, 0x7E007E00, np.uint32)
        return ((bits.astype(np.uint32) >> shift) & 0xFFFF).astype(np.uint16).view(np.float16)

    if kind == "f16":
        return compute([halves(o, 0) for o in operands]).astype(np.float16).view(np.uint16)
    lo = compute([halves(o, 0) for o in operands]).astype(np.float16).view(np.uint16).astype(np.uint32)
    hi = compute([halves(o, 16) for o in operands]).astype(np.float16).view(np.uint16).astype(np.uint32)
    return lo | hi << 16


class _Memory:
    """Named buffers at distinct, widely spaced addresses, accessed as bytes."""

    _SPACING = 1 << 32

    def __init__(self, buffers: dict[str, np.ndarray]):
        self.buffers = buffers
        self.bases = {name: (i + 1) * self._SPACING for i, name in enumerate(buffers)}

    def address(self, name: str) -> int:
        return self.bases[name]

    def _locate(self, addresses, mask, itemsize):
        """``(raw bytes, threads, byte indices)`` of each buffer the masked threads access (a
        load's threads may read different buffers, e.g. an input and a zero array)."""
        parts, covered = [], np.zeros_like(mask)
        for name, base in self.bases.items():
            threads = mask & (addresses >= base) & (addresses < base + self._SPACING)
            if not threads.any():
                continue
            raw = self.buffers[name].reshape(-1).view(np.uint8)
            offsets = (addresses[threads] - np.uint64(base)).astype(np.int64)
            if (offsets % itemsize).any():
                raise IndexError("misaligned access")
            if (offsets + itemsize > raw.size).any():
                raise IndexError(f"access past the end of {name}")
            parts.append((raw, threads, offsets[:, None] + np.arange(itemsize)))
            covered |= threads
        if (mask & ~covered).any():
            raise IndexError("access outside every buffer")
        return parts

    def check_alignment(self, addresses, mask, size):
        """A vector access must be aligned to its whole size (the buffers' bases are)."""
        if (addresses[mask] % np.uint64(size)).any():
            raise IndexError(f"access of {size} bytes misaligned")

    def load(self, addresses, mask, kind):
        out = np.zeros(len(addresses), kind)
        for raw, threads, index in self._locate(addresses, mask, out.itemsize):
            out[threads] = raw[index].copy().view(kind).reshape(-1)
        return out

    def store(self, addresses, values, mask):
        for raw, threads, index in self._locate(addresses, mask, values.itemsize):
            raw[index] = np.ascontiguousarray(values[threads]).view(np.uint8).reshape(index.shape)
