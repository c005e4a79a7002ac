"""How the benchmarks write their JSON results: one entry of each top-level list per line.

Indented JSON doubled the size of the results (and of the working tree that travels to a GPU
machine, which has a size limit); a single line makes every rerun's diff one line. One case
per line keeps both small and readable.
"""

from __future__ import annotations

import json

_COMPACT = (",", ":")


def dumps(result: dict) -> str:
    lines = ["{"]
    items = list(result.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value:
            entries = [json.dumps(entry, separators=_COMPACT) for entry in value]
            lines += [f"{json.dumps(key)}: [", ",\n".join(entries), f"]{comma}"]
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=_COMPACT)}{comma}")
    return "\n".join(lines + ["}"]) + "\n"
