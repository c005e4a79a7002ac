"""Choosing kernel configs.

Untuned compiles use the heuristics of ``tuning.cuda_defaults`` and ``tuning.cpu_defaults``
(their public names are re-exported here). The autotuner (``tuning.tuner``) searches a
pruned space of configs (``tuning.space``) by compiling and timing candidates on the device
(``tuning.measure``) and keeps the winners in a tuning database (``tuning.database``).
"""

from .cpu_defaults import (  # noqa: F401
    CPU_UNROLLED_MAX_NNZ,
    cpu_config,
    cpu_row_blocks,
    cpu_vector_lanes,
    cpu_vector_registers,
    default_cpu_config,
    default_cpu_kernel,
)
from .cuda_defaults import (  # noqa: F401
    CSR_COLUMN_LANES_COLUMNS,
    CSR_COLUMN_LANES_MIN_NNZ,
    CSR_DEFAULT_MAX_COLUMNS,
    CSR_DEFAULT_MIN_NNZ,
    GRID_SPLIT_MAX_DENSITY,
    GRID_SPLIT_MIN_INPUT_RATIO,
    MAX_SEGMENT_INSTRUCTIONS,
    SCALAR_HALF_MAX_SEGMENT_INSTRUCTIONS,
    SEGMENT_INSTRUCTIONS_PER_ACCUMULATOR,
    WINDOW_LANES_MAX_PIXELS,
    WINDOW_LANES_MIN_NNZ,
    column_vectors,
    default_column_lanes_config,
    default_csr_config,
    default_cuda_config,
    default_registers,
    default_unrolled_config,
    default_vector_width,
    folds_batch_by_default,
    prefers_column_lanes,
    prefers_csr,
    prefers_window_lanes,
    register_caps,
    trimmed_threads,
    with_segment_budget,
)
