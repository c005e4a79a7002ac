"""What the pass saw and decided for every candidate operator.

The pass stores its report in the IRModule it returns (attribute ``sparsert.report``, JSON),
so it travels with the module through any pipeline; ``report_of(mod)`` reads it back.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

REPORT_ATTR = "sparsert.report"


@dataclass
class LayerReport:
    function: str  # Relax function holding the operator
    name: str  # variable the operator's (fused) result is bound to
    op: str  # e.g. "matmul", "conv2d 1x1 NCHW"
    decision: str  # "sparse" or "dense"
    reason: str
    weight_shape: tuple = ()
    input_shape: str = ""
    M: int = 0  # noqa: N815 - rows of A: output features or channels
    K: int = 0  # noqa: N815 - columns of A: input features or channels
    N: str = ""  # noqa: N815 - columns of the product (may be symbolic)
    nnz: int = 0
    density: float = float("nan")
    dtype: str = ""  # of the weight and activations, where the operator was understood
    epilogue: list = field(default_factory=list)
    kernel: str | None = None  # name of the generated PrimFunc
    params: dict = field(default_factory=dict)
    code_bytes: int | None = None
    compile_s: float = 0.0  # wall seconds of its build; layers are built side by side (``build_s``)

    @property
    def sparse(self) -> bool:
        return self.decision == "sparse"


@dataclass
class SparsityReport:
    layers: list[LayerReport] = field(default_factory=list)
    # Wall seconds the pass spent building its kernels. Layers are built side by side, so
    # their own ``compile_s`` overlap and add up to more.
    build_s: float = 0.0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def extend(self, other: SparsityReport) -> None:
        """Adds ``other``'s layers and build time (another run of the pass)."""
        self.layers.extend(other.layers)
        self.build_s += other.build_s

    @property
    def sparse_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.sparse]

    def to_json(self) -> str:
        return json.dumps({"layers": [dataclasses.asdict(layer) for layer in self.layers], "build_s": self.build_s})

    @classmethod
    def from_json(cls, text: str) -> SparsityReport:
        data = json.loads(text)
        if isinstance(data, list):  # reports written before build_s: the layers alone
            data = {"layers": data}
        return cls([LayerReport(**entry) for entry in data["layers"]], data.get("build_s", 0.0))

    def table(self, width: int = 160) -> str:
        """The report as a text table, one row per candidate operator."""
        table = Table(title="sparsert: candidate operators", title_justify="left")
        for column, justify in [
            ("layer", "left"), ("op", "left"), ("A (MxK)", "right"), ("N", "right"),
            ("nnz", "right"), ("density", "right"), ("epilogue", "left"), ("decision", "left"),
            ("kernel params", "left"), ("code", "right"), ("compile", "right"), ("reason", "left"),
        ]:
            table.add_column(column, justify=justify, overflow="fold")
        for layer in self.layers:
            table.add_row(
                layer.name, layer.op + (f" {layer.dtype}" if layer.dtype not in ("", "float32") else ""),
                f"{layer.M}x{layer.K}" if layer.M else "-", layer.N or "-",
                f"{layer.nnz:,}" if layer.M else "-",
                f"{layer.density:.3f}" if layer.M else "-",
                "+".join(layer.epilogue) or "-", layer.decision, _format_params(layer.params),
                _format_bytes(layer.code_bytes), f"{layer.compile_s:.2f}s" if layer.sparse else "-",
                layer.reason,
            )
        buffer = io.StringIO()
        Console(file=buffer, width=width, no_color=True, highlight=False).print(table)
        buffer.write(self.summary() + "\n")
        return buffer.getvalue()

    def summary(self) -> str:
        sparse = self.sparse_layers
        unrolled = sum(layer.nnz for layer in sparse if layer.params.get("kernel", "unrolled") == "unrolled")
        read = sum(layer.nnz for layer in sparse) - unrolled
        return (
            f"{len(sparse)} of {len(self.layers)} candidates sparse, "
            f"{unrolled:,} nonzeros unrolled, "
            + (f"{read:,} read from arrays (CSR and depthwise kernels), " if read else "")
            + self._build_time(sparse)
        )

    def _build_time(self, sparse: list[LayerReport]) -> str:
        summed = sum(layer.compile_s for layer in sparse)
        if not self.build_s:  # nothing built (a dry run), or a report from before build_s
            return f"{summed:.1f}s kernel generation"
        return f"kernels built in {self.build_s:.1f}s ({summed:.1f}s summed over layers built side by side)"


def report_of(mod) -> SparsityReport:
    """The report ``SparsifyWeights`` left in ``mod`` (empty if it never ran)."""
    attrs = mod.attrs
    if attrs is None or REPORT_ATTR not in attrs:
        return SparsityReport()
    return SparsityReport.from_json(str(attrs[REPORT_ATTR]))


_SHOWN_PARAMS = {
    "kernel": "kernel",
    "rows_per_block": "rows",
    "threads_per_block": "threads",
    "columns_per_thread": "cols/thread",
    "columns_per_block": "cols/block",
    "unroll": "unroll",
    "lanes": "lanes",  # the CSR kernel's: over nonzeros or over columns
    "warps_per_row": "warps/row",
    "vector_width": "vec",
    "row_groups": "blocks.y",
    "segments": "segments",
    "x_transposed": "xT",
    "vector_lanes": "lanes",
    "config_source": "config",
}


def _format_params(params: dict) -> str:
    return " ".join(f"{short}={params[key]}" for key, short in _SHOWN_PARAMS.items() if key in params) or "-"


def _format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1024:
        return f"{size}B"
    if size < 1024**2:
        return f"{size / 1024:.1f}KB"
    return f"{size / 1024**2:.1f}MB"
