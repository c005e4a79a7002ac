"""The autotuner: its search space, its database, and the pass using both."""

import dataclasses
import json

import numpy as np
import pytest
import tvm

import sparsert_tvm as sp
from helpers import CPU_TARGET, Compiled, assert_close, make_case, sparse_matrix
from sparsert_tvm.errors import WrongOutput
from sparsert_tvm.problem import Layout, ResidualAdd, SpmmProblem
from sparsert_tvm.schedules.config import CUDA_CONFIGS, CudaCsrConfig, CudaSpmmConfig
from sparsert_tvm.schedules.cuda import rule as cuda_rule
from sparsert_tvm import tuning
from sparsert_tvm.tuning import default_cuda_config, space
from sparsert_tvm.tuning.database import TuningDatabase, TuningRecord, problem_key
from sparsert_tvm.tuning import tuner
from sparsert_tvm.tuning.measure import OutputCheck
from sparsert_tvm.tuning.tuner import TuneOptions
from sparsert_tvm.weights import SparseMatrix
from test_cuda_codegen import launch_emulated, needs_ptxas

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=CPU_TARGET)


def channels_problem(rng, m=64, k=48, spatial=(6, 8), dtype="float32", images=2):
    weight = SparseMatrix.from_dense(sparse_matrix(rng, (m, k), 0.1).astype(dtype))
    return SpmmProblem(weight, Layout.CHANNELS, dtype, (images, k, *spatial), (images, m, *spatial))


def test_segments_grow_with_the_accumulators_of_a_thread():
    problem = channels_problem(np.random.default_rng(0))
    configs = [c for c in space.candidates(problem, cuda_rule.CudaSpmmRule().check, 64) if isinstance(c, CudaSpmmConfig)]
    configs.append(default_cuda_config(problem, CudaSpmmConfig.KERNEL))
    budgets = {(c.rows_per_block * c.columns_per_thread, c.max_instructions_per_segment) for c in configs}
    assert len({accumulators for accumulators, _ in budgets}) > 2
    for accumulators, budget in budgets:
        assert budget == min(tuning.MAX_SEGMENT_INSTRUCTIONS, tuning.SEGMENT_INSTRUCTIONS_PER_ACCUMULATOR * accumulators)


def test_scalar_half_kernels_get_smaller_segments():
    rng = np.random.default_rng(3)
    rule = cuda_rule.CudaSpmmRule()
    budgets = {}
    for dtype, spatial in (("float16", (7, 7)), ("float16", (6, 8)), ("float32", (7, 7))):
        problem = channels_problem(rng, spatial=spatial, dtype=dtype)
        unrolled = default_cuda_config(problem, CudaSpmmConfig.KERNEL)
        config = rule.with_overrides(problem, unrolled, {"rows_per_block": 16})
        budgets[dtype, config.vector_width] = config.max_instructions_per_segment
        for candidate in space.candidates(problem, rule.check, 64):
            if isinstance(candidate, CudaSpmmConfig) and dtype == "float16" and candidate.vector_width == 1:
                assert candidate.max_instructions_per_segment <= tuning.SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS
    assert budgets == {
        ("float16", 1): tuning.SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS,  # 49 pixels: one half per register
        ("float16", 2): tuning.MAX_SEGMENT_INSTRUCTIONS,
        ("float32", 1): tuning.MAX_SEGMENT_INSTRUCTIONS,
    }


def test_kernel_config_overrides_resize_segments_unless_they_set_them():
    problem = channels_problem(np.random.default_rng(0))
    rule = cuda_rule.CudaSpmmRule()
    default = default_cuda_config(problem, CudaSpmmConfig.KERNEL)
    wide = rule.with_overrides(problem, default, {"rows_per_block": 16})
    assert wide.max_instructions_per_segment == tuning.MAX_SEGMENT_INSTRUCTIONS
    exact = rule.with_overrides(problem, default, {"rows_per_block": 16, "max_instructions_per_segment": 300})
    assert exact.max_instructions_per_segment == 300


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_candidates_start_with_the_default_and_are_all_valid(dtype):
    problem = channels_problem(np.random.default_rng(0), dtype=dtype)
    rule = cuda_rule.CudaSpmmRule()
    configs = space.candidates(problem, rule.check, 12)
    assert configs[0] == default_cuda_config(problem)
    assert len(configs) == len(set(configs)) == 12
    for config in configs:
        rule.check(problem, config)  # raises if the generator would reject it
        if not isinstance(config, CudaSpmmConfig):
            continue
        lanes = config.vector_width // 2 if dtype == "float16" and config.vector_width % 2 == 0 else config.vector_width
        assert config.rows_per_block * config.columns_per_thread * lanes <= space.MAX_ACCUMULATORS
        assert config.columns_per_thread * lanes <= space.MAX_CODE_MULTIPLIER
    everything = space.candidates(problem, rule.check, 1000)
    assert {c.vector_width for c in everything if isinstance(c, CudaSpmmConfig)} != {1}  # vector loads are in the space
    costs = [space.estimated_cost(problem, c) for c in configs[1:]]
    assert costs == sorted(costs)


def test_candidates_respect_what_the_layout_allows():
    rng = np.random.default_rng(1)
    weight = SparseMatrix.from_dense(sparse_matrix(rng, (32, 24), 0.2))
    row_major = SpmmProblem(weight, Layout.ROWS, "float32", (8, 24), (8, 32))  # not transposed
    configs = space.candidates(row_major, cuda_rule.CudaSpmmRule().check, 50)
    configs = [c for c in configs if isinstance(c, CudaSpmmConfig)]
    assert {c.vector_width for c in configs} == {1}
    # Eight columns fill a quarter warp: no block of more than one warp is worth timing.
    assert {c.threads_per_block for c in configs} == {32}


def unrolled(configs):
    return [c for c in configs if isinstance(c, CudaSpmmConfig)]


def test_folding_the_batch_is_in_the_space_where_images_are_apart():
    rng = np.random.default_rng(3)
    check = cuda_rule.CudaSpmmRule().check
    batched = channels_problem(rng, images=8, spatial=(7, 7))
    assert default_cuda_config(batched).fold_batch
    assert {c.fold_batch for c in unrolled(space.candidates(batched, check, 1000))} == {False, True}
    single = channels_problem(rng, images=1)
    assert not default_cuda_config(single).fold_batch
    assert {c.fold_batch for c in unrolled(space.candidates(single, check, 1000))} == {False}
    weight = SparseMatrix.from_dense(sparse_matrix(rng, (32, 24), 0.2))
    rows = SpmmProblem(weight, Layout.ROWS, "float32", (8, 24), (8, 32))  # its rows are the columns already
    assert {c.fold_batch for c in unrolled(space.candidates(rows, check, 1000))} == {False}
    # Eight 7x7 images as grid rows leave lanes idle in every image's last block: folded
    # issues and streams less, never more.
    for threads in (32, 64):
        folded = sp.CudaSpmmConfig(rows_per_block=2, threads_per_block=threads, fold_batch=True)
        unfolded = dataclasses.replace(folded, fold_batch=False)
        assert space.estimated_cost(batched, folded) <= space.estimated_cost(batched, unfolded)


def test_split_k_enters_the_space_only_where_asked():
    rng = np.random.default_rng(14)
    check = cuda_rule.CudaSpmmRule().check
    problem = channels_problem(rng, m=64, k=96, spatial=(14, 14), images=1)
    assert {c.split_k for c in unrolled(space.candidates(problem, check, 1000))} == {1}
    split = unrolled(space.candidates(problem, check, 1000, split_k=(1, 2, 4)))
    assert {c.split_k for c in split} == {1, 2, 4}
    assert all(c.threads_per_block % (32 * c.split_k) == 0 for c in split)
    # Slices issue the same work over more blocks, each streaming the whole group's code.
    base = dataclasses.replace(default_cuda_config(problem), threads_per_block=128)
    costs = [space.estimated_cost(problem, dataclasses.replace(base, split_k=k)) for k in (1, 2, 4)]
    assert costs[0] < costs[1] < costs[2]
    with pytest.raises(ValueError, match="split_k"):
        TuneOptions(split_k=(3,))


def test_the_search_keeps_rows_sharing_columns_where_they_load_less():
    """The default with rows grouped by shared columns is timed beside it, whatever the cost
    model thinks, where it loads at least 5% fewer activations: rows of two patterns,
    interleaved, load about half as much grouped by pattern (balanced grouping gives each
    group heavy and light rows). Where every row has the same columns, no grouping loads
    less, and it is left out."""
    check = cuda_rule.CudaSpmmRule().check
    rng = np.random.default_rng(15)
    patterns = np.zeros((2, 48))
    patterns[0, :6], patterns[1, 24:28] = 1.0, 1.0
    for weight, kept in ((np.tile(patterns, (32, 1)), True), (np.ones((64, 48)), False)):
        weight = SparseMatrix.from_dense(weight * rng.standard_normal(weight.shape))
        problem = SpmmProblem(weight, Layout.CHANNELS, "float32", (1, 48, 56, 56), (1, 64, 56, 56))
        default = default_cuda_config(problem)
        assert default.rows_per_block == 4
        sharing = dataclasses.replace(default, share_columns=True)
        assert (sharing in space.candidates(problem, check, 2)) is kept
        assert sharing in space.candidates(problem, check, 1000) or not kept


def test_cost_model_prefers_filling_the_machine():
    problem = channels_problem(np.random.default_rng(2), m=256, k=256, spatial=(7, 7), images=1)
    few_blocks = default_cuda_config(problem).__class__(rows_per_block=8, threads_per_block=64)
    many_blocks = default_cuda_config(problem).__class__(rows_per_block=2, threads_per_block=64)
    assert space.estimated_cost(problem, many_blocks) < space.estimated_cost(problem, few_blocks)


def test_default_1x1_configs_cap_registers_only_for_16_rows_and_more():
    rng = np.random.default_rng(13)
    medium = channels_problem(rng, m=512, k=128, spatial=(14, 14), images=8)
    config = default_cuda_config(medium)
    assert (config.rows_per_block, config.registers) == (16, 64)
    small = default_cuda_config(channels_problem(rng))
    assert small.rows_per_block < 16 and small.registers == 0


def test_float32_1x1_layers_with_a_large_grid_take_32_rows():
    rng = np.random.default_rng(14)
    large = channels_problem(rng, m=512, k=128, spatial=(28, 28), images=8)
    config = default_cuda_config(large)
    assert (config.rows_per_block, config.registers, config.segment_registers) == (32, 96, 96)
    # Not in float16 (not measured), nor for 16 output channels, nor for FC layers.
    half = channels_problem(rng, m=512, k=128, spatial=(28, 28), images=8, dtype="float16")
    assert default_cuda_config(half).rows_per_block == 16
    assert default_cuda_config(channels_problem(rng, m=16, k=32, spatial=(112, 112), images=8)).rows_per_block == 16
    weight = SparseMatrix.from_dense(sparse_matrix(rng, (3072, 768), 0.1))
    fc = SpmmProblem(weight, Layout.ROWS, "float32", (512, 768), (512, 3072), x_transposed=True)
    assert default_cuda_config(fc).rows_per_block == 16


def test_symbolic_dimensions_take_the_tuning_size():
    from tvm import tirx

    from sparsert_tvm.tuning.measure import static_shape

    n = tirx.Var("n", "int64")
    assert static_shape([n, tirx.IntImm("int64", 5), n * 3], 4) == (4, 5, 12)


def record(us=1.0):
    return TuningRecord(config={"rows_per_block": 2}, us=us, default_us=2.0, candidates=3, tune_s=0.5)


def test_database_round_trip_and_merge(tmp_path):
    path = tmp_path / "db" / "tuning.json"
    first, second = TuningDatabase(path), TuningDatabase(path)
    first.put("a", record(1.0))
    second.put("b", record(3.0))  # written after first: keeps first's record
    reread = TuningDatabase(path)
    assert set(reread.records) == {"a", "b"} and reread.get("a").us == 1.0
    assert reread.get("a").speedup == 2.0
    assert not list(path.parent.glob(".tuning-*"))  # no temporary files left


def test_corrupt_database_is_a_clear_error(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        TuningDatabase(path)
    path.write_text(json.dumps({"format": 99, "records": {}}))
    with pytest.raises(ValueError, match="unknown format"):
        TuningDatabase(path)


def test_keys_change_with_weight_shape_dtype_and_target():
    rng = np.random.default_rng(3)
    problem = channels_problem(rng)
    key = problem_key(problem, "sm_90")
    assert key == problem_key(channels_problem(np.random.default_rng(3)), "sm_90")
    assert key != problem_key(problem, "sm_80")
    assert key != problem_key(channels_problem(np.random.default_rng(4)), "sm_90")
    assert key != problem_key(channels_problem(np.random.default_rng(3), spatial=(6, 9)), "sm_90")
    assert key != problem_key(channels_problem(np.random.default_rng(3), dtype="float16"), "sm_90")


def test_bad_tune_options():
    with pytest.raises(ValueError, match="CUDA"):
        sp.SparsifyWeights(CPU_TARGET, tune=True)
    with pytest.raises(TypeError, match="tune must be"):
        sp.SparsifyWeights(CUDA, tune="yes")
    with pytest.raises(ValueError, match="budget_s"):
        TuneOptions(budget_s=0)


@needs_ptxas
def test_pass_tunes_once_then_reuses_the_database(tmp_path, monkeypatch):
    """Timing is faked (no GPU here): the fake prefers one row per block."""
    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    timed = []

    def fake_us(params):
        return 1.0 + params["rows_per_block"] + params["threads_per_block"] / 1000

    def timer(built, target):
        timed.append(built.params)
        return fake_us(built.params)

    rng = np.random.default_rng(5)
    case = make_case(rng, "conv_nchw", 48, 32, 0.2, (2, 32, 4, 8), ("bias", "relu"))
    options = TuneOptions(max_candidates=5, timer=timer, progress=False, database=tmp_path / "tuning.json",
                          runner=emulated_runner)
    out = sp.SparsifyWeights(CUDA, 1.0, tune=options)(case.module())
    (layer,) = sp.report_of(out).layers
    assert len(timed) == 5 + 1 and layer.params["config_source"] == "tuned"  # + the winner's other register cap
    best = min(timed, key=fake_us)
    assert layer.params["rows_per_block"] == best["rows_per_block"] == 1
    assert layer.params["tuned_us"] <= layer.params["default_us"]

    timed.clear()
    again = sp.SparsifyWeights(CUDA, 1.0, tune=options)(case.module())
    (layer,) = sp.report_of(again).layers
    assert not timed and layer.params["config_source"] == "database"
    plain = sp.SparsifyWeights(CUDA, 1.0, tuning_database=tmp_path / "tuning.json")(case.module())
    assert sp.report_of(plain).layers[0].params["rows_per_block"] == 1
    overridden = sp.SparsifyWeights(CUDA, 1.0, kernel_config={"rows_per_block": 4}, tune=options)(case.module())
    assert sp.report_of(overridden).layers[0].params["config_source"] == "kernel_config" and not timed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tuned_module_is_correct_on_the_gpu(gpu_target, tmp_path, dtype):
    rng = np.random.default_rng(6)
    case = make_case(rng, "conv_nchw", 96, 64, 0.1, (2, 64, 8, 8), ("bias", "residual", "relu"), dtype=dtype)
    options = TuneOptions(max_candidates=4, progress=False, database=tmp_path / "tuning.json")
    compiled = Compiled(case.module(), gpu_target, tune=options)
    (layer,) = compiled.report.layers
    assert layer.params["config_source"] == "tuned" and layer.params["tuned_us"] > 0
    arrays = case.inputs(rng, None)
    assert_close(compiled(*arrays), case.reference(arrays), dtype)
    assert len(TuningDatabase(tmp_path / "tuning.json")) == 1


@pytest.mark.gpu
def test_the_tuner_builds_one_launcher_per_candidate(gpu_target, tmp_path, monkeypatch):
    """The output check and the timer of a candidate share its compiled launch wrapper."""
    from sparsert_tvm.tuning import measure

    compiled = []
    compile_launcher = measure._compile_launcher
    monkeypatch.setattr(measure, "_compile_launcher", lambda *args: compiled.append(1) or compile_launcher(*args))
    problem = channels_problem(np.random.default_rng(12))
    options = TuneOptions(max_candidates=3, registers=(), progress=False, database=tmp_path / "tuning.json")
    record = tuner.Tuner(cuda_rule.CudaSpmmRule(), gpu_target, options).tune(problem, "k")
    assert record.candidates >= 2 and len(compiled) == record.candidates


@pytest.mark.gpu
def test_cold_and_warm_timers_time_a_kernel(gpu_target):
    """Both timers give microseconds of one launch; a cold launch (code and weights from device
    memory, and launched alone) is not faster than a tenth of a warm one, nor a thousand times slower."""
    from sparsert_tvm.tuning import measure

    problem = channels_problem(np.random.default_rng(13))
    built = cuda_rule.CudaSpmmRule().build(problem, default_cuda_config(problem), gpu_target, "k")
    warm, cold = measure.time_warm(built, gpu_target), measure.time_cold(built, gpu_target, launches=10)
    assert 0 < warm < 1000 and 0.1 * warm < cold < 1000 * warm


def emulated_runner(built, target, arrays):
    """A tuner's runner without a GPU: the candidate's PTX in the emulator."""
    problem = built.problem
    kernel_class = CUDA_CONFIGS[built.params["kernel"]]
    config = kernel_class(**{f.name: built.params[f.name] for f in dataclasses.fields(kernel_class)})
    kernel = cuda_rule.emit_ptx(problem, config, "k", "sm_90")
    y = arrays[-1].copy()
    launch_emulated(kernel, problem, arrays[0], arrays[1] if problem.has_residual else None, y)
    return y


def _tuner_with(monkeypatch, tmp_path, timer, **options):
    """A Tuner whose builds skip the CUDA runtime (no GPU here); outputs are checked only
    where asked (``runner=emulated_runner``)."""
    from sparsert_tvm.tuning.tuner import Tuner

    monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
    options.setdefault("check_outputs", "runner" in options)
    options = TuneOptions(timer=timer, progress=False, database=tmp_path / "tuning.json", **options)
    return Tuner(cuda_rule.CudaSpmmRule(), CUDA, options)


@needs_ptxas
def test_the_tuner_drops_a_faster_candidate_whose_output_is_wrong(monkeypatch, tmp_path):
    """Each candidate runs once (here in the emulator) before it is timed; one whose output
    is off never wins, however fast, and a wrong default keeps the layer dense."""
    problem = channels_problem(np.random.default_rng(11))
    default = default_cuda_config(problem)

    def corrupting(wrong):
        def run(built, target, arrays):
            out = emulated_runner(built, target, arrays)
            return out + 1.0 if wrong(built.params) else out

        return run

    def is_default(params):
        return all(params.get(key) == value for key, value in default.as_dict().items())

    def fake_us(built, target):  # every other candidate faster than the default
        return 5.0 if is_default(built.params) else 1.0

    tuner = _tuner_with(monkeypatch, tmp_path, fake_us, max_candidates=4, registers=(),
                        runner=corrupting(lambda params: not is_default(params)))
    record = tuner.tune(problem, "k")
    assert record.config == default.as_dict() and record.candidates == 1
    tuner = _tuner_with(monkeypatch, tmp_path, fake_us, max_candidates=4, registers=(), runner=emulated_runner)
    record = tuner.tune(problem, "k")  # all correct: one of the faster ones wins
    assert record.config != default.as_dict() and record.candidates == 4
    tuner = _tuner_with(monkeypatch, tmp_path, fake_us, max_candidates=4, runner=corrupting(lambda params: True))
    with pytest.raises(WrongOutput, match="output off by"):
        tuner.tune(problem, "k")
    assert issubclass(WrongOutput, sp.UnsupportedProblem)  # the pass keeps such a layer dense


@needs_ptxas
def test_staging_enters_the_search_only_where_asked_and_its_outputs_are_checked(monkeypatch, tmp_path):
    """Staged configs are tried only with ``TuneOptions.stage_channels`` and only for NCHW
    windows; here the fake timer prefers them, and they win after the emulator checked them."""
    from conv_cases import make_conv
    from test_conv import problem_of

    rng = np.random.default_rng(13)
    nchw = problem_of(make_conv(rng, 24, 8, (3, 3), (6, 6), 0.3, padding=(1, 1, 1, 1), batch=2))
    nhwc = problem_of(make_conv(rng, 24, 8, (3, 3), (6, 6), 0.3, padding=(1, 1, 1, 1), batch=2, layout="NHWC"))
    check = cuda_rule.CudaSpmmRule().check

    def staged(problem, **options):
        return {getattr(c, "stage_channels", 0) for c in space.candidates(problem, check, 6, **options)}

    assert staged(nchw) == staged(nhwc, stage_channels=(0, 4)) == {0}
    assert staged(nchw, stage_channels=(0, 2, 4)) == {0, 2, 4}
    tuner = _tuner_with(monkeypatch, tmp_path, lambda built, target: 1.0 if built.params.get("stage_channels") else 5.0,
                        max_candidates=4, stage_channels=(0, 4), runner=emulated_runner)
    assert tuner.tune(nchw, "k").config["stage_channels"] == 4
    with pytest.raises(ValueError, match="stage_channels"):
        TuneOptions(stage_channels=(-1,))


def test_output_error_is_relative_to_the_output_and_rejects_non_finite_values(monkeypatch):
    """``OutputCheck`` compares with numpy's float64 answer, X^T read back as X."""
    rng = np.random.default_rng(12)
    problem = dataclasses.replace(channels_problem(rng), epilogue=(ResidualAdd(),))
    transposed = SpmmProblem(problem.weight, Layout.ROWS, "float32", (20, 48), (20, 64), x_transposed=True)
    for case in (problem, transposed):
        built = cuda_rule.CudaSpmmRule()
        monkeypatch.setattr(cuda_rule, "create_cuda_module", lambda cubin, kernel: None)
        kernel = built.build(case, default_cuda_config(case), CUDA, "k")
        check = OutputCheck(case)
        assert check.error(kernel, CUDA, emulated_runner) < 1e-5
        assert check.error(kernel, CUDA, lambda b, t, a: emulated_runner(b, t, a) * 1.01) > 1e-3
        assert np.isnan(check.error(kernel, CUDA, lambda b, t, a: emulated_runner(b, t, a) * np.nan))


@needs_ptxas
def test_the_budget_stops_tuning_after_the_default(monkeypatch, tmp_path):
    timed = []
    tuner = _tuner_with(monkeypatch, tmp_path, lambda built, target: timed.append(1) or 5.0, budget_s=1e-9)
    record = tuner.tune(channels_problem(np.random.default_rng(7)), "k")
    assert len(timed) == 1 and record.candidates == 1 and record.us == record.default_us == 5.0


@needs_ptxas
def test_a_failing_candidate_is_skipped_but_a_failing_default_is_an_error(monkeypatch, tmp_path):
    problem = channels_problem(np.random.default_rng(8))
    default = default_cuda_config(problem)

    def flaky(built, target):
        if built.params["rows_per_block"] != default.rows_per_block:
            raise sp.ToolchainError("ptxas failed")
        return 3.0

    record = _tuner_with(monkeypatch, tmp_path, flaky, max_candidates=4).tune(problem, "k")
    assert record.config["rows_per_block"] == default.rows_per_block and record.candidates >= 1

    def broken(built, target):
        raise sp.ToolchainError("ptxas failed")

    with pytest.raises(sp.ToolchainError):
        _tuner_with(monkeypatch, tmp_path, broken, max_candidates=3).tune(problem, "k")


def test_a_record_of_other_config_fields_counts_as_missing(monkeypatch, tmp_path):
    """Records written before a config field was renamed must not break compiles."""
    problem = channels_problem(np.random.default_rng(9))
    tuner = _tuner_with(monkeypatch, tmp_path, lambda built, target: 1.0)
    stale = default_cuda_config(problem).as_dict()
    stale["max_nnz_per_segment"] = stale.pop("max_instructions_per_segment")
    record = TuningRecord(config=stale, us=1.0, default_us=1.0, candidates=1, tune_s=0.0, problem="", target="sm_90",
                          timing="custom")
    tuner.database.put(problem_key(problem, tuner.arch), record)
    assert tuner.lookup(problem) is None
    record.config = default_cuda_config(problem).as_dict()
    tuner.database.put(problem_key(problem, tuner.arch), record)
    assert tuner.lookup(problem) == default_cuda_config(problem)


def test_a_record_timed_another_way_is_tuned_again_but_reused_without_tuning(tmp_path):
    """Tuning with one timing (here the default, cold) re-tunes records timed another way;
    a compile that only reuses the database takes them as they are."""
    from sparsert_tvm.tuning import measure

    problem = channels_problem(np.random.default_rng(14))
    config = default_cuda_config(problem).as_dict()
    path = tmp_path / "tuning.json"
    record = TuningRecord(config=config, us=1.0, default_us=1.0, candidates=1, tune_s=0.0)  # written before timing was kept
    TuningDatabase(path).put(problem_key(problem, "sm_90"), record)
    assert json.loads(path.read_text())["records"].popitem()[1]["timing"] == "warm"
    rule = cuda_rule.CudaSpmmRule()
    tuning_cold = tuner.Tuner(rule, CUDA, TuneOptions(progress=False, database=path))
    tuning_warm = tuner.Tuner(rule, CUDA, TuneOptions(timer=measure.time_warm, progress=False, database=path))
    reusing = tuner.Tuner(rule, CUDA, None, database=path)
    assert tuning_cold.lookup(problem) is None
    assert tuning_warm.lookup(problem) == reusing.lookup(problem) == default_cuda_config(problem)
    assert tuner.timing_of(TuneOptions(timer=lambda built, target: 1.0)) == "custom"


@needs_ptxas
def test_a_segmented_winner_is_also_timed_with_other_register_caps(monkeypatch, tmp_path):
    """The cost model cannot rank segment_registers: the fake timer prefers segmented
    kernels, and among them a cap of 96, which only the variants of the winner have."""
    timed = []

    def fake_us(params):
        bonus = 5.0 * (params["segments"] > 1) + 2.0 * (params.get("segment_registers") == 96)
        return 10.0 - bonus + params["rows_per_block"] / 100

    problem = channels_problem(np.random.default_rng(10), m=256, k=384, spatial=(8, 8), images=1)
    timer = lambda built, target: timed.append(built.params) or fake_us(built.params)  # noqa: E731
    record = _tuner_with(monkeypatch, tmp_path, timer, max_candidates=3, registers=()).tune(problem, "k")
    ranked, variants = timed[:3], timed[3:]
    winner = min(ranked, key=fake_us)
    assert winner["segments"] > 1, "the test needs a segmented candidate"
    assert sorted(params["segment_registers"] for params in variants) == [48, 96]
    for params in variants:  # the winner but for the cap
        assert {**params, "segment_registers": 64} == winner
    assert record.candidates == 5 and record.config["segment_registers"] == 96
    assert record.us == min(us for _, us in record.timings)


@needs_ptxas
def test_an_unrolled_winner_is_also_timed_with_the_other_entry_register_cap(monkeypatch, tmp_path):
    """The fake timer prefers a cap of 64, which only the winner's variant has; an
    unsegmented winner gets no segment_registers variants."""
    timed = []

    def fake_us(params):
        return 5.0 - 2.0 * (params.get("registers") == 64) + params["rows_per_block"] / 100

    problem = channels_problem(np.random.default_rng(11))
    timer = lambda built, target: timed.append(built.params) or fake_us(built.params)  # noqa: E731
    record = _tuner_with(monkeypatch, tmp_path, timer, max_candidates=3).tune(problem, "k")
    ranked, (variant,) = timed[:3], timed[3:]
    winner = min(ranked, key=fake_us)
    assert winner["registers"] == 0 and all(params["segments"] == 1 for params in timed)
    assert {**variant, "registers": 0} == winner
    assert record.candidates == 4 and record.config["registers"] == 64 and record.us == 3.0 + winner["rows_per_block"] / 100


def test_winner_variants_fit_the_block_and_skip_csr_winners():
    options = TuneOptions(registers=(0, 64, 255), segment_registers=(48,))
    wide = CudaSpmmConfig(threads_per_block=512)
    problem = channels_problem(np.random.default_rng(19))  # no window: padding is not varied
    assert [v.registers for v in tuner.winner_variants(problem, wide, False, options)] == [64]  # 255 x 512 does not fit
    segmented = [(v.registers, v.segment_registers) for v in tuner.winner_variants(problem, wide, True, options)]
    assert segmented == [(64, 64), (0, 48)]
    assert tuner.winner_variants(problem, CudaCsrConfig(), True, options) == []  # lanes over nonzeros
    lanes = CudaCsrConfig(lanes="columns", columns_per_block=32)
    assert tuner.winner_variants(problem, lanes, False, options) == [dataclasses.replace(lanes, pipelined=True)]
    assert tuner.winner_variants(problem, lanes, False, dataclasses.replace(options, pipeline_variants=False)) == []
    with pytest.raises(ValueError, match="registers"):
        TuneOptions(registers=(300,))
    with pytest.raises(ValueError, match="segment_registers"):
        TuneOptions(segment_registers=(300,))
    assert TuneOptions(registers=(), segment_registers=()).segment_registers == ()


@needs_ptxas
def test_the_tuner_times_split_candidates_where_asked(monkeypatch, tmp_path):
    """The fake timer prefers two slices; they are only in the space with ``split_k``."""
    problem = channels_problem(np.random.default_rng(15), m=32, k=64, spatial=(8, 8), images=1)

    def fake_us(built, target):
        return 2.0 - (built.params.get("split_k") == 2)

    plain = _tuner_with(monkeypatch, tmp_path, fake_us, max_candidates=40).tune(problem, "k")
    assert plain.config["split_k"] == 1
    split = _tuner_with(monkeypatch, tmp_path / "split", fake_us, max_candidates=40, split_k=(1, 2)).tune(problem, "k")
    assert split.config["split_k"] == 2 and split.us == 1.0
