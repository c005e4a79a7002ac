"""sparsert_tvm: unrolled sparse kernels for pruned models, as an Apache TVM pass.

Data flow: Relax IR in (``passes``), each constant sparse weight analysed (``weights``,
``problem``), a kernel generated for it per target (``schedules``, configs from
``tuning``), a module out (``compile``).
"""

from .build import compile, default_target
from .errors import RuntimeUnavailable, SparseRTError, ToolchainError, UnbuildableByTvm, UnsupportedProblem
from .passes import CPU_MIN_GROUP_CHANNELS, DEFAULT_DENSITY_THRESHOLD, SMALL_CONVOLUTION_NNZ, SparsifyWeights
from .report import LayerReport, SparsityReport, report_of
from .schedules import CpuCsrConfig, CpuDepthwiseConfig, CpuSpmmConfig, CudaCsrConfig, CudaSpmmConfig
from .threads import use_physical_cores
from .tuning.database import TuningDatabase
from .tuning.tuner import TuneOptions

# TVM's CPU thread pool starts at the first parallel loop, after this: see threads.py.
use_physical_cores()

__all__ = [
    "CPU_MIN_GROUP_CHANNELS",
    "DEFAULT_DENSITY_THRESHOLD",
    "SMALL_CONVOLUTION_NNZ",
    "CpuCsrConfig",
    "CpuDepthwiseConfig",
    "CpuSpmmConfig",
    "CudaCsrConfig",
    "CudaSpmmConfig",
    "LayerReport",
    "RuntimeUnavailable",
    "SparseRTError",
    "SparsifyWeights",
    "SparsityReport",
    "ToolchainError",
    "TuneOptions",
    "TuningDatabase",
    "UnbuildableByTvm",
    "UnsupportedProblem",
    "compile",
    "default_target",
    "report_of",
]
