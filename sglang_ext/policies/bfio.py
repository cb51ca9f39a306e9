"""BF-IO: balance the future, not the present (placeholder, being written)."""
from __future__ import annotations

import numpy as np

from .base import Policy
from .baselines import TotalTokens


class BFIO(Policy):
    name = "bfio"
    needs_requests = True

    def __init__(self, horizon: int = 20):
        self.horizon = horizon
        self._fallback = TotalTokens()

    def assign(self, view, cands, must_place=False):
        return self._fallback.assign(view, cands, must_place)
