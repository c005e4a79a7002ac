"""PTX to cubin with ptxas (and nvlink for segmented kernels), cached by content."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ... import cache
from ...errors import ToolchainError
from ..base import default_jobs


def find_tool(name: str) -> str:
    """Locates a CUDA tool on PATH or under CUDA_HOME / the default install."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    raise ToolchainError(
        f"{name} not found: the CUDA path assembles PTX with the CUDA toolkit's {name}; "
        "install the toolkit or set CUDA_HOME"
    )


@functools.cache
def _tool_version(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout


# Tool processes at once across all threads (layers assembled side by side, each with its
# segments side by side): one per core.
_PROCESS_SLOTS = threading.BoundedSemaphore(default_jobs())


def assemble(
    units: tuple[str, ...], arch: str, opt_level: int = 3, jobs: int | None = None, function_registers: int | None = None
) -> bytes:
    """Returns the cubin for ``units`` (``units[0]`` holds the entry point). Where there are
    several, ``function_registers`` caps the registers of the functions they define (else
    ptxas keeps them to the call ABI's scratch registers)."""
    ptxas = find_tool("ptxas")
    tools = [ptxas] + ([find_tool("nvlink")] if len(units) > 1 else [])
    flags = [f"-O{opt_level}"]
    if function_registers is not None and len(units) > 1:
        flags.append(f"--device-function-maxrregcount={function_registers}")
    key = cache.cache_key(arch, *flags, *(_tool_version(t) for t in tools), *units)
    cached = cache.load("cubin", key)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="sparsert-") as tmp:
        cubin = _assemble_in(Path(tmp), units, arch, flags, jobs or default_jobs(), tools)
    cache.store("cubin", key, cubin)
    return cubin


def _assemble_in(tmp: Path, units, arch, flags, jobs, tools) -> bytes:
    ptxas = tools[0]
    sources = []
    for i, text in enumerate(units):
        path = tmp / f"unit{i}.ptx"
        path.write_text(text)
        sources.append(path)
    out = tmp / "kernel.cubin"
    if len(sources) == 1:
        _run([ptxas, f"-arch={arch}", *flags, str(sources[0]), "-o", str(out)])
        return out.read_bytes()
    # Relocatable objects assembled side by side, then one link.
    objects = [src.with_suffix(".o") for src in sources]
    commands = [[ptxas, "-c", f"-arch={arch}", *flags, str(s), "-o", str(o)] for s, o in zip(sources, objects)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(_run, commands))
    _run([tools[1], f"-arch={arch}", "-o", str(out)] + [str(o) for o in objects])
    return out.read_bytes()


def _run(command: list[str]) -> None:
    with _PROCESS_SLOTS:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tool = os.path.basename(command[0])
        raise ToolchainError(f"{tool} failed ({result.returncode}): {result.stderr.strip()[:2000]}")
