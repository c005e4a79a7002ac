import os

# xdist runs a worker per core: one TVM thread each (set before sparsert_tvm's import, which
# would give each worker every core).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("TVM_NUM_THREADS", "1")

import pytest  # noqa: E402
import tvm  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from helpers import CPU_TARGET, cuda_target  # noqa: E402
from sparsert_tvm import tuning  # noqa: E402


settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def has_gpu() -> bool:
    return tvm.cuda(0).exist


@pytest.fixture(scope="session", autouse=True)
def _private_kernel_cache(tmp_path_factory):
    """Tests compile into a cache of their own unless the caller chose one."""
    if "SPARSERT_CACHE_DIR" not in os.environ:
        os.environ["SPARSERT_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield


@pytest.fixture(params=["llvm-csr", "llvm-unrolled", pytest.param("cuda", marks=pytest.mark.gpu)])
def target(request, monkeypatch):
    """Every numerical test runs on the CPU with each of its kernels by default (the
    data-driven one, then the unrolled one), and on the GPU where there is one."""
    if request.param == "cuda":
        if not has_gpu():
            pytest.skip("needs an NVIDIA GPU and TVM's CUDA runtime")
        return cuda_target()
    unrolled_max_nnz = 0 if request.param == "llvm-csr" else 10**9
    monkeypatch.setattr(tuning.cpu_defaults, "CPU_UNROLLED_MAX_NNZ", unrolled_max_nnz)
    return CPU_TARGET


@pytest.fixture
def gpu_target():
    if not has_gpu():
        pytest.skip("needs an NVIDIA GPU and TVM's CUDA runtime")
    return cuda_target()
