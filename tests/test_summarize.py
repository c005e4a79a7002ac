"""The benchmark summary's arithmetic (benchmarks/summarize.py), on hand-made cases."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import summarize  # noqa: E402


def case(ours: float, cublas: float, density: float = 0.1) -> dict:
    return {"case": "c", "group": "g", "kind": "spmm", "M": 64, "K": 64, "N": 8, "density": density,
            "dtype": "float32", "us": {"sparsert": ours, "cublas_fp32": cublas}, "correct": True, "params": {}}


def target_row(lines: list[str], density: str) -> list[str]:
    (row,) = [line for line in lines if line.startswith(f"| float32 | cublas_fp32 | {density} |")]
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_targets_count_floor_bound_cases_and_the_factor_the_others_need():
    # The faster case sets the floor (1 us): the first is held at 2x by it, below 3.4x; the
    # second may reach 4x. gmean(2, f * 2) = 3.4 needs f = 3.4^2 / 4.
    lines = summarize.target_lines([case(1.0, 2.0), case(2.0, 4.0)], "NVIDIA H100 80GB HBM3")
    cells = target_row(lines, "0.1")
    assert cells[3:6] == ["2", "2.00x", "3.4x"]
    assert cells[6] == "2.83x"  # gmean of the bounds 2 and 4
    assert cells[7] == "1 (floor 1.00 us)"
    assert cells[8] == f"{3.4 ** 2 / 4:.2f}x faster"


def test_targets_say_met_and_skip_the_bound_on_an_unknown_device():
    lines = summarize.target_lines([case(1.0, 6.0, 0.05), case(1.0, 6.0, 0.05)], "some other GPU")
    cells = target_row(lines, "0.05")
    assert cells[4] == "6.00x" and cells[6:] == ["-", "-", "met"]


@pytest.mark.parametrize("cases", [[], [case(1.0, 2.0, 0.3)]])
def test_targets_without_matching_cases_say_so(cases):
    assert summarize.target_lines(cases, "NVIDIA H100") == ["No case of the targets' dtypes, densities and libraries."]
