"""Sparse matrix products against dense and sparse libraries on the GPU, one JSON per run.

    python benchmarks/spmm.py --suite paper --dtype float32 --out benchmarks/results/spmm-paper-fp32-h100.json

Contenders: sparsert, cuBLAS fp32 / TF32 / fp16 and cuSPARSE CSR (torch), TVM's dense
kernel. How cases run and what the options do: suite.py. ``--suite csr`` puts the unrolled
and the data-driven (CSR) kernel side by side on fully connected layers at small N.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import layers  # noqa: E402
import suite  # noqa: E402
from harness import SpmmCase, real_weights, sparse_problem  # noqa: E402

from sparsert_tvm.problem import Layout  # noqa: E402
from sparsert_tvm.schedules.config import CudaSpmmConfig  # noqa: E402
from sparsert_tvm.tuning import default_cuda_config  # noqa: E402



def uniform(m, k, density, seed=0):
    """A uniform random mask; seeded by shape so that a shape shared by networks is one weight."""
    rng = np.random.default_rng([m, k, int(density * 1000), seed])
    return ((rng.random((m, k)) < density) * rng.standard_normal((m, k))).astype("float32")


def threshold_suite(dtype):
    """Where does dense win? A few FC and 1x1-conv shapes over a range of densities."""
    cases = []
    for density in (0.05, 0.1, 0.2, 0.3):
        for m, k in ((768, 768), (3072, 768)):
            for n in (1, 8, 128):
                weight = uniform(m, k, density)
                cases.append((SpmmCase(f"fc{m}x{k}-n{n}-d{density}", "bert-fc", weight, Layout.ROWS, n, dtype), None))
        for m, k, s in ((256, 256, 196), (512, 512, 49), (128, 128, 784)):
            weight = uniform(m, k, density)
            case = SpmmCase(f"conv{m}x{k}-s{s}-d{density}", "resnet50-1x1", weight, Layout.CHANNELS, s, dtype)
            cases.append((case, None))
    return cases


def rows_suite(dtype):
    """Rows per block for fully connected layers at small N (code streaming)."""
    cases = []
    for m, k in ((768, 768), (3072, 768)):
        weight = uniform(m, k, 0.1)
        for n in (1, 8):
            for rows in (1, 2, 4):
                config = CudaSpmmConfig(rows_per_block=rows, threads_per_block=32)
                cases.append((SpmmCase(f"fc{m}x{k}-n{n}-r{rows}", "bert-fc", weight, Layout.ROWS, n, dtype), config))
    return cases


def csr_suite(dtype):
    """Both CUDA kernels' untuned defaults on BERT / GPT-2 / BERT-large FC shapes at N = 1..32:
    where does reading the nonzeros from memory beat streaming them as code?"""
    cases = []
    for density in (0.05, 0.1, 0.2):
        for m, k in ((768, 768), (3072, 768), (768, 3072), (4096, 1024), (1024, 4096)):
            weight = uniform(m, k, density)
            for n in (1, 2, 4, 8, 32):
                case = SpmmCase(f"fc{m}x{k}-n{n}-d{density}", "bert-fc", weight, Layout.ROWS, n, dtype)
                for kernel in ("unrolled", "csr"):
                    config = default_cuda_config(sparse_problem(case), kernel)
                    cases.append((dataclasses.replace(case, name=f"{case.name}-{kernel}"), config))
    return cases


def paper_suite(dtype):
    """The SparseRT paper's kind of suite: 1x1 convolutions of four CNNs at batch 1 and 8, the
    FC layers of three transformers at five N, DeepBench GEMMs, and real pruned weights; at
    densities 0.1 and 0.05, plus 0.2 and 0.3 on a subset to see where dense wins."""
    cases = []

    def add(name, group, weight, layout, columns, images=1):
        cases.append((SpmmCase(name, group, weight, layout, columns, dtype, images), None))

    for density in (0.1, 0.05):
        for group, shapes in layers.CONV_NETWORKS.items():
            for m, k, s in shapes:
                for batch in (1, 8):
                    add(f"{group}-{m}x{k}-s{s}-b{batch}-d{density}", group, uniform(m, k, density), Layout.CHANNELS, s, batch)
        for group, shapes in layers.FC_NETWORKS.items():
            for m, k in shapes:
                for n in layers.FC_COLUMNS:
                    add(f"{group}-{m}x{k}-n{n}-d{density}", group, uniform(m, k, density), Layout.ROWS, n)
        for m, k, n in layers.DEEPBENCH:
            add(f"deepbench-{m}x{k}-n{n}-d{density}", "deepbench", uniform(m, k, density), Layout.ROWS, n)
    for density in (0.2, 0.3):
        for m, k, s in layers.RESNET50_1X1[::3]:
            add(f"resnet50-1x1-{m}x{k}-s{s}-b1-d{density}", "resnet50-1x1", uniform(m, k, density), Layout.CHANNELS, s)
        for m, k in layers.FC_NETWORKS["bert_base-fc"]:
            for n in (8, 128):
                add(f"bert_base-fc-{m}x{k}-n{n}-d{density}", "bert_base-fc", uniform(m, k, density), Layout.ROWS, n)
    for key, weight in real_weights().items():
        weight = weight.reshape(weight.shape[0], -1)  # im2col form [out, in * 3 * 3]
        s = layers.REAL_3X3[key.split("_")[1]]
        for batch in (1, 8):
            add(f"real-{key}-im2col-s{s}-b{batch}", "resnet50-3x3-real-im2col", weight, Layout.CHANNELS, s, batch)
    return sorted(cases, key=lambda case: _priority(case[0]))


def _priority(case: SpmmCase) -> int:
    """Run order, so that a run cut short by its deadline has covered every family first:
    batch 1 at densities 0.1 and 0.05, then batch 8, then DeepBench, then the dense-wins subset."""
    if case.name.endswith(("d0.2", "d0.3")):
        return 3
    if case.group == "deepbench":
        return 2
    return 1 if case.images > 1 else 0


SUITES = {"threshold": threshold_suite, "rows": rows_suite, "paper": paper_suite, "csr": csr_suite}


if __name__ == "__main__":
    suite.main(SUITES, __doc__.split("\n\n")[0], "paper")
