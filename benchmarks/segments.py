"""How the size of the separately assembled segments trades build time against code.

    python benchmarks/segments.py [--sizes 16384,8192,4096,2048] [--dtypes float32,float16]
        [--layers REGEX] [--name 2core]

For a few large layers (1x1 convolutions, ResNet-50 3x3 layers of stages 3 and 4, a
BERT-large FC layer at N = 8; 10% density, default tiling), emits the PTX with each
``max_instructions_per_segment`` in each dtype and assembles it with the kernel cache off. Records the
time of each step, the cubin's size and, where ``cuobjdump`` is on PATH, the machine
instructions in it (the code a launch streams through). Needs ptxas and nvlink, no GPU.
Writes ``benchmarks/results/segments-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conv import uniform  # noqa: E402
from harness import ConvCase, SpmmCase  # noqa: E402
from sparsert_tvm.problem import Layout  # noqa: E402
from sparsert_tvm.schedules.cuda.assemble import assemble, default_jobs  # noqa: E402
from sparsert_tvm.schedules.cuda.ptx import emit_spmm_ptx  # noqa: E402
from sparsert_tvm.tuning import default_cuda_config  # noqa: E402
import results_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = {
    "1x1 2048x512, 14x14": lambda dtype: SpmmCase("", "", uniform((2048, 512), 0.1), Layout.CHANNELS, 196, dtype),
    # MobileNet v2's last 1x1 layer at batch 8: 16 rows per block, the images folded into one
    # range of columns. An image's 49 pixels are odd, so float16 gets one column per register
    # and scalar half arithmetic, which ptxas pairs itself (tuning.SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS).
    "1x1 1280x320, 7x7, batch 8": lambda dtype: SpmmCase(
        "", "", uniform((1280, 320), 0.1), Layout.CHANNELS, 49, dtype, 8),
    "3x3 256x256, 14x14": lambda dtype: ConvCase("", "", uniform((256, 256, 3, 3), 0.1), (14, 14), 1, 1, dtype=dtype),
    "3x3 512x512, 7x7": lambda dtype: ConvCase("", "", uniform((512, 512, 3, 3), 0.1), (7, 7), 1, 1, dtype=dtype),
    "FC 1024x4096, N=8": lambda dtype: SpmmCase("", "", uniform((1024, 4096), 0.1), Layout.ROWS, 8, dtype),
}


def machine_instructions(cubin: bytes) -> int | None:
    tool = shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([tool, "--dump-sass", file.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))


def measure(name: str, size: int, dtype: str) -> dict:
    problem = LAYERS[name](dtype).problem()
    config = dataclasses.replace(default_cuda_config(problem, "unrolled"), max_instructions_per_segment=size)
    start = time.perf_counter()
    kernel = emit_spmm_ptx(problem, config, "k", "sm_90")
    emitted = time.perf_counter()
    cubin = assemble(kernel.units, "sm_90", **config.assembler_options())
    return {
        "layer": name, "dtype": dtype, "nnz": problem.weight.nnz, "max_instructions_per_segment": size,
        "segments": max(1, len(kernel.units) - 1), "emit_s": round(emitted - start, 2),
        "assemble_s": round(time.perf_counter() - emitted, 2), "cubin_bytes": len(cubin),
        "machine_instructions": machine_instructions(cubin),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16384,8192,4096,2048")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--layers", default="", help="only the layers whose name matches this regular expression")
    parser.add_argument("--name", default=f"{os.cpu_count()}core")
    args = parser.parse_args()
    os.environ["SPARSERT_CACHE"] = "0"
    rows = []
    for layer in (name for name in LAYERS if re.search(args.layers, name)):
        for dtype, size in itertools.product(args.dtypes.split(","), (int(s) for s in args.sizes.split(","))):
            rows.append(measure(layer, size, dtype))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "ptxas_jobs": default_jobs(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"segments-{args.name}"
    stem.with_suffix(".json").write_text(results_json.dumps(result))
    lines = [
        f"# Segment size: build time and code ({result['machine']}, {result['date']})", "",
        "Kernel cache off, default tiling, 10% density; emit = PTX generation, assemble = ptxas (parallel) + nvlink.", "",
        "| layer | dtype | nnz | instructions per segment | segments | emit | assemble | cubin "
        "| machine instructions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sass = "-" if r["machine_instructions"] is None else f"{r['machine_instructions']:,}"
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['nnz']:,} | {r['max_instructions_per_segment']:,} "
                     f"| {r['segments']} | {r['emit_s']:.1f} s | {r['assemble_s']:.1f} s "
                     f"| {r['cubin_bytes'] / 2**20:.2f} MB | {sass} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
