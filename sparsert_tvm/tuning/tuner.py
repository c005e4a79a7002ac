"""The autotuner: per layer, compile the most promising configs and keep the fastest.

For each sparse layer the tuner first looks in the tuning database; on a miss it ranks the
pruned search space with the cost model (``space``), assembles the top candidates in
parallel (ptxas runs side by side; the cubins land in the kernel cache), then times them
one by one on the device, the untuned default first, until the candidates or the layer's
time budget run out. An unrolled winner is then timed with the other register caps of its
entry function and, where it is cut into segments, of its segments: the cost model cannot
tell them apart.
The winner is written to the database, so the next compile of the same weight, shapes and
target reuses it without timing anything.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .. import cache
from ..errors import SparseRTError, WrongOutput
from ..problem import SpmmProblem
from ..schedules.base import BuiltKernel
from ..schedules.config import CudaConfig, CudaCsrConfig, CudaSpmmConfig
from ..schedules.cuda.assemble import assemble
from ..schedules.cuda.rule import cuda_arch, emit_ptx
from . import space
from .database import TuningDatabase, TuningRecord, default_path, problem_key
from .measure import OUTPUT_TOLERANCE, OutputCheck, Runner, run_on_device, time_cold

Timer = Callable[[BuiltKernel, object], float]


@dataclass(frozen=True)
class TuneOptions:
    """How hard to tune each layer.

    ``max_candidates`` configs at most (the default config included), and no new candidate
    once ``budget_s`` seconds went into the layer. ``database``: a path or a
    ``TuningDatabase``; None means ``tuning.json`` in the kernel cache directory.
    ``timer(built, target)`` returns microseconds per launch (default: ``measure.time_cold``,
    single launches with a cold L2 but their input, as in a whole model;
    ``measure.time_warm`` replays the kernel with its code in L2, which ranked ResNet-50's
    3x3 tilings at batch 8 the other way round); ``symbolic_size`` is what symbolic
    dimensions are set to while timing.
    ``assemble_ahead``: run ptxas for all candidates in parallel before timing (off where
    the caller already did). ``registers``: the entry register caps (``.maxnreg``, 0: none)
    also timed for an unrolled winner; on ResNet-50 and MobileNet 1x1 layers at batch 8 the
    better of 0 and 64 beat the other by up to 2x either way (registers-spmm-h200.md).
    ``segment_registers``: the caps also timed for a winner cut into segments; on ResNet-50's
    3x3 layers and 1x1/FC layers the best cap was 48 or 96 where it was not the default 64,
    by up to 1.14x (benchmarks/results/segment-registers-{conv,spmm}-h200.md).
    ``padding_variants``: through a convolution's window, the winner also timed reading
    padding the other way (``CudaSpmmConfig.padding_from_zeros``), which ran ResNet-50's 3x3
    layers from 1.27x faster to 1.35x slower (padding-zeros-h200.md). ``pipeline_variants``:
    a CSR winner with lanes over columns (not through a window) also timed with its trips
    pipelined the other way (``CudaCsrConfig.pipelined``), which ran FC and 1x1 layers from
    1.09x faster to 1.18x slower (csr-column-lanes-h200.md). Variants come beyond
    ``max_candidates``, within the budget; ``()`` or False: none. ``split_k``: the slices per
    block of the unrolled kernel in the search space; only 1 by default, since split
    kernels lost on every ResNet-50 3x3 layer timed (split-k-h200.md; ``(1, 2, 4)``
    searches them). ``stage_channels``: input channels staged in shared memory at a time
    also tried for window layers (``CudaSpmmConfig.stage_channels``); only 0 (none) by
    default, since staging ran 1.5-4.6x slower than the default on every ResNet-50 3x3
    layer timed (staged-input-h200.md; ``(0, 8, 16)`` tries it).
    ``check_outputs``: each candidate first runs once on random operands (the same for all,
    numpy's answer computed once), through ``runner(built, target, arrays)`` (default: on
    the device), and one whose output
    differs from numpy's by more than ``measure.OUTPUT_TOLERANCE`` of its scale is dropped
    (a wrong default is an error): a faster wrong kernel must never win.
    """

    max_candidates: int = 8
    budget_s: float = 120.0
    database: str | Path | TuningDatabase | None = None
    timer: Timer | None = None
    symbolic_size: int = 1
    progress: bool = True
    assemble_ahead: bool = True
    registers: tuple[int, ...] = (0, 64)
    segment_registers: tuple[int, ...] = (48, 96)
    padding_variants: bool = True
    pipeline_variants: bool = True
    split_k: tuple[int, ...] = space.SPLIT_K
    stage_channels: tuple[int, ...] = space.STAGE_CHANNELS
    check_outputs: bool = True
    runner: Runner | None = None

    def __post_init__(self):
        if self.max_candidates < 1 or self.budget_s <= 0 or self.symbolic_size < 1:
            raise ValueError("max_candidates and symbolic_size must be >= 1 and budget_s > 0")
        for registers in self.registers:
            CudaSpmmConfig(threads_per_block=32, registers=registers)  # raises ValueError outside 0, 24..255
        for registers in self.segment_registers:
            CudaSpmmConfig(segment_registers=registers)  # raises ValueError outside 24..255
        for split in self.split_k:
            CudaSpmmConfig(threads_per_block=256, split_k=split)  # raises ValueError outside 1, 2, 4, 8
        for channels in self.stage_channels:
            CudaSpmmConfig(stage_channels=channels)  # raises ValueError below 0


def timing_of(options: TuneOptions) -> str:
    """How ``options`` time candidates: "cold" (the default timer), or the timer's ``l2``
    attribute ("warm", "cold"), or "custom"."""
    return "cold" if options.timer is None else getattr(options.timer, "l2", "custom")


def open_database(database) -> TuningDatabase:
    if isinstance(database, TuningDatabase):
        return database
    return TuningDatabase(database if database is not None else default_path())


class Tuner:
    """Chooses configs for the CUDA rule: database first, then search when ``tune`` is on."""

    def __init__(self, rule, target, options: TuneOptions | None, database=None):
        self.rule = rule
        self.target = target
        self.options = options
        self.database = open_database(database if database is not None else options and options.database)
        self.arch = cuda_arch(target)

    def lookup(self, problem: SpmmProblem) -> CudaConfig | None:
        """The recorded config, or None; a record written by a version whose config had
        other fields (or an unknown kernel) counts as missing (the layer is tuned again if
        tuning is on), and so does, with tuning on, one whose candidates were timed another
        way (``timing_of``: a warm replay can rank tilings the other way round)."""
        record = self.database.get(problem_key(problem, self.arch))
        if record is None or (self.options is not None and record.timing != timing_of(self.options)):
            return None
        try:
            return self.rule.config_from_dict(record.config)
        except (TypeError, ValueError):
            return None

    def tune(self, problem: SpmmProblem, name: str) -> TuningRecord:
        options = self.options or TuneOptions()
        timer = options.timer or (lambda built, target: time_cold(built, target, options.symbolic_size))
        start = time.perf_counter()
        configs = space.candidates(
            problem, self.rule.check, options.max_candidates, split_k=options.split_k,
            stage_channels=options.stage_channels,
        )
        if options.assemble_ahead:
            self._assemble_ahead(problem, configs, name)
        timings, segments = [], {}
        check = OutputCheck(problem, options.symbolic_size) if options.check_outputs else None

        def measure(config):
            """Times ``config``; False once the layer's budget is spent (the default is always timed)."""
            if timings and time.perf_counter() - start > options.budget_s:
                return False
            try:
                built = self.rule.build(problem, config, self.target, name)
                if check is not None:
                    self._check_output(built, check, options.runner or run_on_device)
                timings.append((config, timer(built, self.target)))
                segments[config] = built.params.get("segments", 1)
            except SparseRTError:
                if not timings:  # the default must work, or tuning means nothing
                    raise
            return True

        with _progress(options.progress) as progress:
            task = progress.add_task(f"tuning {name}", total=len(configs))
            for config in configs:
                if not measure(config):
                    break
                progress.advance(task)
            best = min(timings, key=lambda t: t[1])[0]
            variants = winner_variants(problem, best, segments.get(best, 1) > 1, options)
            progress.update(task, total=len(configs) + len(variants))
            for variant in variants:
                if not measure(variant):
                    break
                progress.advance(task)
        best, best_us = min(timings, key=lambda t: t[1])
        record = TuningRecord(
            config=best.as_dict(),
            us=best_us,
            default_us=timings[0][1],
            candidates=len(timings),
            tune_s=time.perf_counter() - start,
            problem=f"{problem.M}x{problem.K} nnz={problem.weight.nnz} N={problem.columns} {problem.dtype}",
            target=self.arch,
            timings=[(c.as_dict(), us) for c, us in timings],
            timing=timing_of(options),
        )
        self.database.put(problem_key(problem, self.arch), record)
        return record

    def _check_output(self, built: BuiltKernel, check: OutputCheck, run: Runner) -> None:
        """Raises ``WrongOutput`` if ``built`` computes something else than numpy does."""
        error = check.error(built, self.target, run)
        tolerance = OUTPUT_TOLERANCE[built.problem.dtype]
        if not error <= tolerance:  # NaN too
            raise WrongOutput(f"{built.params}: output off by {error:.3g} of its scale (more than {tolerance:g})")

    def _assemble_ahead(self, problem, configs, name):
        """ptxas for all candidates at once; ``rule.build`` then finds them in the cache."""
        if cache.cache_dir() is None or len(configs) < 2:
            return
        with ThreadPoolExecutor(max_workers=len(configs)) as pool:
            list(pool.map(lambda config: assemble_candidate(problem, config, name, self.arch, jobs=2), configs))


def winner_variants(problem: SpmmProblem, best: CudaConfig, segmented: bool, options: TuneOptions) -> list[CudaConfig]:
    """``best`` with each other register cap of ``options`` that fits its block (the entry's
    for an unrolled kernel, and its segments' where it is cut into segments), and through
    a window, with padding read the other way (``padding_from_zeros``); a CSR winner with
    lanes over columns outside a window, pipelined the other way."""
    if isinstance(best, CudaCsrConfig):
        if options.pipeline_variants and best.column_lanes and problem.window is None:
            return [dataclasses.replace(best, pipelined=not best.pipelined)]
        return []
    changes = [{"registers": r} for r in options.registers if r != best.registers]
    if segmented:
        changes += [{"segment_registers": r} for r in options.segment_registers if r != best.segment_registers]
    if options.padding_variants and problem.window is not None:
        changes.append({"padding_from_zeros": not best.padding_from_zeros})
    variants = []
    for change in changes:
        try:
            variants.append(dataclasses.replace(best, **change))
        except ValueError:  # more registers than the block's threads can have
            continue
    return variants


def assemble_candidate(problem: SpmmProblem, config: CudaConfig, name: str, arch: str, jobs: int = 1) -> None:
    """Puts the cubin of one candidate in the kernel cache, where ``rule.build(problem, config,
    target, name)`` will find it. A candidate that fails is left for its own build to report."""
    try:
        kernel = emit_ptx(problem, config, f"{name}_kernel", arch)
        assemble(kernel.units, arch, **config.assembler_options(), jobs=jobs)
    except SparseRTError:
        pass


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} configs"),
        TimeElapsedColumn(),
        transient=True,
        disable=not enabled,
    )

