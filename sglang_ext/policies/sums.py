"""Weighted sums that come out the same on every CPU.

Placement scores are weighted sums over the horizon, and near-tied scores
decide placements. A BLAS product picks its kernel by CPU, and the last bits
of its sums differ between kernels (in float32 above all): enough to flip a
near tie and move a whole run on another machine (paper mode, burstgpt: idle
0.0796, 0.0807 or 0.0814 under OpenBLAS's Haswell, Sandybridge or SkylakeX
kernels). numpy's einsum sums in one fixed order whatever the CPU, so every
weighted sum of the policies' scores goes through here.
"""
from __future__ import annotations

import numpy as np


def weighted_sum(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """sum_h w[h] * rows[h] over the first axis (rows: (len(w), ...))."""
    return np.einsum("h,h...->...", w, rows)


def weighted_rows(M: np.ndarray, w: np.ndarray) -> np.ndarray:
    """M @ w: the weights along M's last axis."""
    return np.einsum("...h,h->...", M, w)


def weighted_cross(A: np.ndarray, B: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(A * w) @ B.T: sum_h w[h] A[i, h] B[j, h] for every row pair (i, j)."""
    return np.einsum("ih,jh->ij", A * w, B)
