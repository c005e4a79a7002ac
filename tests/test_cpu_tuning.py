"""The CPU tuner: its candidates, its choice (with a fake timer) and the module it builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conv_cases import make_conv
from helpers import CPU_TARGET, Compiled, assert_close, make_case

import sparsert_tvm as sp
from sparsert_tvm.passes.candidates import find_candidates
from sparsert_tvm.problem import Layout, SpmmProblem
from sparsert_tvm.schedules.config import CpuCsrConfig, CpuDepthwiseConfig, CpuSpmmConfig
from sparsert_tvm.schedules.cpu.rule import CpuSpmmRule
from sparsert_tvm.tuning import default_cpu_config
from sparsert_tvm.tuning.cpu_tuner import cpu_candidates, run_on_cpu, time_on_cpu
from sparsert_tvm.tuning.measure import OutputCheck
from sparsert_tvm.weights import SparseMatrix


def fc_problem(rng, m, k, density, n=16):
    dense = np.where(rng.random((m, k)) < density, rng.standard_normal((m, k)), 0).astype("float32")
    return SpmmProblem(SparseMatrix.from_dense(dense), Layout.ROWS, "float32", (n, k), (n, m))


def test_candidates_start_with_the_default_and_bound_the_unrolled_kernel():
    rng = np.random.default_rng(0)
    small, large = fc_problem(rng, 64, 128, 0.2), fc_problem(rng, 512, 1024, 0.1)  # 1.6k and 52k nonzeros
    for problem in (small, large):
        configs = cpu_candidates(problem, CPU_TARGET, sp.TuneOptions())
        assert configs[0] == default_cpu_config(problem, CPU_TARGET) and len(set(configs)) == len(configs)
        assert any(isinstance(c, CpuCsrConfig) for c in configs) and any(isinstance(c, CpuSpmmConfig) for c in configs)
        for config in configs:
            CpuSpmmRule().check(problem, config)
    # Past the bound only the data-driven kernel is tried (the default above 16k nonzeros).
    bounded = cpu_candidates(large, CPU_TARGET, sp.TuneOptions(cpu_unrolled_max_nnz=10_000))
    assert bounded and all(isinstance(c, CpuCsrConfig) for c in bounded)


def test_depthwise_layers_try_their_output_rows():
    (candidate,) = find_candidates("main", make_conv(np.random.default_rng(1), 16, 16, (3, 3), (10, 10), 1.0,
                                                     groups=16).module()["main"])
    problem = candidate.problem
    configs = cpu_candidates(problem, CPU_TARGET, sp.TuneOptions())
    assert all(isinstance(c, CpuDepthwiseConfig) for c in configs)
    assert sorted(c.output_rows for c in configs) == [1, 2, 4]


def test_the_cpu_timer_and_runner_run_the_kernel():
    rng = np.random.default_rng(2)
    problem = fc_problem(rng, 48, 64, 0.3)
    rule = CpuSpmmRule()
    built = rule.build(problem, default_cpu_config(problem, CPU_TARGET), CPU_TARGET, "timed")
    check = OutputCheck(problem)
    assert check.error(built, CPU_TARGET, run_on_cpu) < 1e-5
    assert 0 < time_on_cpu(built, calls=3) < 1e6


def test_the_pass_tunes_on_the_cpu_then_reuses_the_database(tmp_path):
    """Timing is faked so that the choice is known: four chains of the data-driven kernel."""
    timed = []

    def timer(built, target):
        timed.append(built.params)
        return 1.0 if built.params["kernel"] == "csr" and built.params["chains"] == 4 else 2.0

    rng = np.random.default_rng(3)
    case = make_case(rng, "matmul", 96, 128, 0.2, (8, 128), ("bias", "relu"))
    database = tmp_path / "tuning.json"
    options = sp.TuneOptions(timer=timer, progress=False, database=database)
    compiled = Compiled(case.module(), CPU_TARGET, tune=options)
    (layer,) = compiled.report.layers
    assert layer.params["config_source"] == "tuned" and layer.params["chains"] == 4
    problem = SpmmProblem(SparseMatrix.from_dense(case.weight), Layout.ROWS, "float32", (8, 128), (8, 96))
    assert len(timed) == len(cpu_candidates(problem, CPU_TARGET, options)) >= 3
    x = case.inputs(rng, 8)
    assert_close(compiled(*x), case.reference(x))
    (record,) = json.loads(database.read_text())["records"].values()
    assert record["timing"] == "custom" and record["us"] == 1.0 and record["default_us"] == 2.0

    timed.clear()
    again = Compiled(case.module(), CPU_TARGET, tune=options)
    assert not timed and again.report.layers[0].params["config_source"] == "database"
    plain = Compiled(case.module(), CPU_TARGET, tuning_database=database)
    assert plain.report.layers[0].params["chains"] == 4
    assert_close(plain(*x), case.reference(x))


def test_a_wrong_candidate_is_dropped_on_the_cpu(tmp_path):
    """A candidate whose output is wrong never wins, however fast it is timed."""

    def wrong_unless_default(built, target, arrays):
        out = run_on_cpu(built, target, arrays)
        return out if built.params["kernel"] == "unrolled" else out + 1.0

    rng = np.random.default_rng(4)
    case = make_case(rng, "matmul", 32, 64, 0.2, (4, 64))
    fast_csr = sp.TuneOptions(timer=lambda built, target: 1.0 if built.params["kernel"] == "csr" else 5.0,
                              runner=wrong_unless_default, progress=False, database=tmp_path / "t.json")
    compiled = Compiled(case.module(), CPU_TARGET, tune=fast_csr)
    assert compiled.report.layers[0].params["kernel"] == "unrolled"


def test_tuning_on_the_cpu_times_real_kernels_and_builds_a_correct_module(tmp_path):
    rng = np.random.default_rng(5)
    case = make_case(rng, "conv_nchw", 64, 48, 0.1, (1, 48, 6, 6), ("bias", "relu"))
    options = sp.TuneOptions(progress=False, database=tmp_path / "tuning.json", budget_s=60)
    compiled = Compiled(case.module(), CPU_TARGET, tune=options)
    (layer,) = compiled.report.layers
    assert layer.params["config_source"] == "tuned" and 0 < layer.params["tuned_us"] <= layer.params["default_us"]
    x = case.inputs(rng, 1)
    assert_close(compiled(*x), case.reference(x))


def test_a_negative_unrolled_bound_is_rejected():
    with pytest.raises(ValueError, match="cpu_unrolled_max_nnz"):
        sp.TuneOptions(cpu_unrolled_max_nnz=-1)
