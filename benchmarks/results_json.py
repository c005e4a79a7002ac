"""How the benchmarks write their JSON results: one entry of each top-level list per line.

Indented JSON doubled the size of the results (and of the working tree that travels to a GPU
machine, which has a size limit); a single line makes every rerun's diff one line. One case
per line keeps both small and readable. Floats keep 5 significant digits: timings vary by a
percent from run to run, and the 17 digits of a double made up a tenth of the results' bytes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

_COMPACT = (",", ":")


def rounded(value):
    """``value`` with every float in it cut to 5 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def dumps(result: dict) -> str:
    lines = ["{"]
    items = list(rounded(result).items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value:
            entries = [json.dumps(entry, separators=_COMPACT) for entry in value]
            lines += [f"{json.dumps(key)}: [", ",\n".join(entries), f"]{comma}"]
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=_COMPACT)}{comma}")
    return "\n".join(lines + ["}"]) + "\n"


def load(path) -> dict:
    """A results JSON, plain or gzipped (``X.json.gz``: the largest runs are kept compressed)."""
    path = Path(path)
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


def stem(path) -> Path:
    """``path`` without ``.json`` or ``.json.gz``: where the summary and the plot go."""
    path = Path(path)
    return path.with_suffix("").with_suffix("") if path.suffix == ".gz" else path.with_suffix("")
