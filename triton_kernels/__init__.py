"""Triton kernels of sglang-ext (installed as `sglang_ext.triton_kernels`).

Importing this package never imports Triton: the kernels are built on first use,
and the Triton backend raises RuntimeError when Triton cannot be imported.
"""
from .projection import Projection, project_cost, project_cost_reference, project_cost_triton

__all__ = ["Projection", "project_cost", "project_cost_reference", "project_cost_triton"]
