"""The tuning database: the best config found for each (weight, shapes, dtype, target).

One JSON file mapping a key to a record. The key hashes everything that makes a kernel
different: the weight's content digest, the layout and shapes, the dtype, the fused
epilogue, whether X arrives transposed, and the GPU architecture. Later compiles look their
layers up here and skip tuning. Writes are atomic (temporary file, then rename); two
processes tuning at once may each keep only their own new records, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import cache
from ..problem import SpmmProblem

FORMAT = 2  # 2: convolution windows in the key


@dataclass
class TuningRecord:
    config: dict  # fields of the kernel's config dataclass
    us: float  # measured time of the best config
    default_us: float  # measured time of the untuned default
    candidates: int  # configs timed
    tune_s: float  # wall time spent tuning this layer
    problem: str = ""  # human-readable summary of what was tuned
    target: str = ""
    timings: list = field(default_factory=list)  # (config, us) of every candidate timed
    # How candidates were timed (``tuner.timing_of``); records written before it was kept
    # were timed warm (or by a custom timer).
    timing: str = "warm"

    @property
    def speedup(self) -> float:
        return self.default_us / self.us if self.us else float("nan")


def problem_key(problem: SpmmProblem, target_id: str) -> str:
    return cache.cache_key(
        f"format={FORMAT}",
        problem.weight.digest,
        problem.layout.value,
        problem.dtype,
        str(problem.x_shape),
        str(problem.y_shape),
        repr(problem.epilogue),
        str(problem.x_transposed),
        repr(problem.window),
        target_id,
    )


def default_path() -> Path | None:
    root = cache.cache_dir()
    return None if root is None else root / "tuning.json"


class TuningDatabase:
    """Records by key, read from and written through to ``path`` (memory only if None)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.records: dict[str, TuningRecord] = {}
        if self.path is not None and self.path.exists():
            self.records = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict[str, TuningRecord]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"tuning database {path} is unreadable: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"tuning database {path} has an unknown format")
        return {key: TuningRecord(**record) for key, record in data["records"].items()}

    def get(self, key: str) -> TuningRecord | None:
        return self.records.get(key)

    def put(self, key: str, record: TuningRecord) -> None:
        self.records[key] = record
        if self.path is None:
            return
        # Merge with what other processes wrote since we read the file.
        merged = self._read(self.path) if self.path.exists() else {}
        merged.update(self.records)
        self.records = merged
        payload = json.dumps({"format": FORMAT, "records": {k: asdict(r) for k, r in merged.items()}}, indent=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def __len__(self):
        return len(self.records)
