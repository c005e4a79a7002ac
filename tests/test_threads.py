"""How many threads TVM's CPU runtime is given: physical cores, unless the user said."""

import os
import subprocess
import sys

from sparsert_tvm.threads import VARIABLE, physical_cores, use_physical_cores


def topology(tmp_path, siblings: dict):
    for cpu, group in siblings.items():
        path = tmp_path / f"cpu{cpu}" / "topology"
        path.mkdir(parents=True)
        (path / "thread_siblings_list").write_text(group + "\n")
    return tmp_path


def test_hardware_threads_of_one_core_count_once(tmp_path):
    smt = topology(tmp_path / "smt", {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert physical_cores({0, 1, 2, 3}, smt) == 2
    assert physical_cores({0, 2}, smt) == 1  # an affinity of one core's two threads
    one_thread_per_core = topology(tmp_path / "vm", {0: "0", 1: "1"})
    assert physical_cores({0, 1}, one_thread_per_core) == 2  # where TVM's own guess gives 1
    assert physical_cores({0, 5}, one_thread_per_core) is None  # unreadable: TVM decides


def test_an_explicit_setting_wins(monkeypatch):
    monkeypatch.setenv(VARIABLE, "3")
    use_physical_cores()
    assert os.environ[VARIABLE] == "3"
    monkeypatch.delenv(VARIABLE)
    use_physical_cores()
    assert os.environ.get(VARIABLE) == (str(physical_cores()) if physical_cores() else None)


def test_tvm_runs_on_the_physical_cores_after_import():
    """In a fresh process: importing sparsert_tvm before any TVM CPU work gives TVM's thread
    pool every physical core."""
    code = ("import sparsert_tvm, tvm_ffi; from sparsert_tvm.threads import physical_cores; "
            "print(tvm_ffi.get_global_func('runtime.NumThreads')(), physical_cores())")
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    threads, cores = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert cores == "None" or threads == cores
