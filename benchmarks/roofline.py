"""What no kernel of a suite can beat on this GPU, timed the way the suites time kernels
(``harness.graph_time_us``: CUDA graphs, ``ROTATE`` buffers in turn, warm L2).

    python benchmarks/roofline.py --out benchmarks/results/roofline-h100.json

* ``launch_us``: a launch that writes one element, the least a kernel node costs;
* ``copy``: ``dst.copy_(src)`` (torch's vectorised copy) for working sets from 64 KB to
  256 MB read plus written: the time a kernel needs just to read X and write Y of that many
  bytes, from L2 while ``ROTATE`` copies of them fit, from device memory beyond.

``summarize.py --roofline`` bounds each case of SparseRT's targets by these and the FMA peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from harness import ROTATE, graph_time_us

SIZES_MB = (0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def copy_us(total_bytes: int) -> float:
    """Time per copy of ``total_bytes / 2`` bytes into another buffer, buffers rotated."""
    half = total_bytes // 2 // 16 * 16
    sources = [torch.rand(half // 4, device="cuda") for _ in range(ROTATE)]
    targets = [torch.empty_like(s) for s in sources]
    return graph_time_us(lambda i: targets[i % ROTATE].copy_(sources[i % ROTATE]), sources)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cells = [torch.zeros(1, device="cuda") for _ in range(ROTATE)]
    launch = graph_time_us(lambda i: cells[i % ROTATE].fill_(1.0), cells)
    copies = []
    for size in SIZES_MB:
        total = int(size * 2**20)
        us = copy_us(total)
        copies.append({"bytes": total, "us": round(us, 4)})
        print(f"{size:>8g} MB read + written: {us:8.2f} us, {total / us / 1e3:7.0f} GB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "launch_us": round(launch, 4), "copy": copies}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"launch: {launch:.2f} us; wrote {args.out}")


if __name__ == "__main__":
    main()
