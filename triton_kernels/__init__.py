"""Triton kernels of sglang-ext (installed as `sglang_ext.triton_kernels`).

Importing this package never imports Triton: the kernels are built on first use,
and the Triton backend raises RuntimeError when Triton cannot be imported.
"""
from .projection import (Projection, combine_counts, few_counts, project_cost,
                         project_cost_reference, project_cost_triton, project_counts)

__all__ = ["Projection", "combine_counts", "few_counts", "project_cost",
           "project_cost_reference", "project_cost_triton", "project_counts"]
