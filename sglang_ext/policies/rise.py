"""How much each pooled candidate would lift the envelope on each open rank, summed
over the scoring points: the hot loop of bfio's pool rule.

    rise[r, j] = sum_p w[p] * max(L[p, r] + (X[p, j] - E[p]), 0)      (float32)

At scale almost every term is 0: a candidate lifts the envelope only on the ranks
that are close to it, and only at the points where the candidate is large (at
G=256, B=72 with the online tail, 1-8% of the terms of a release's first round). `EnvelopeRise` sums the terms
that can be non-zero, those where X[p, j] is above the rank's room E[p] - L[p, r]
at that point, and skips the others, which round to exactly 0. It adds them with
the same float32 operations in the same order (points ascending) as the dense sum,
so the result is the dense one to the last bit (tests/test_policies.py).
"""
from __future__ import annotations

import numpy as np

from .sums import weighted_sum


def _terms(L32, A, w):
    """w * max(L + A, 0), float32, broadcast: the terms as the dense sum weighs them."""
    term = L32 + A
    np.maximum(term, 0.0, out=term)
    term *= w
    return term


def dense_rise(w32: np.ndarray, L32: np.ndarray, A: np.ndarray) -> np.ndarray:
    """(k, n) rise of k ranks' loads L32 (P, k) for n candidates, A = X - E (P, n),
    all float32: every term computed."""
    gap = L32[:, :, None] + A[:, None, :]  # (points, k, n)
    np.maximum(gap, 0.0, out=gap)
    return weighted_sum(w32, gap).reshape(L32.shape[1], A.shape[1])


class EnvelopeRise:
    """The rise for one call's candidates X32 (P, n) float32 at points weighted w32,
    against an envelope E32 (P,) that may rise between rounds (`set_envelope`) and
    loads that change (`__call__`). The candidates are sorted by size at each point
    once (at the first round large enough to read it), so the terms that may be
    non-zero at a point are, for each rank, a suffix of that order."""

    #: below this many terms (points x ranks x candidates) the dense sum is as quick
    dense_below = 1 << 20
    #: with more of a call's terms possibly non-zero than this fraction, the dense sum
    #: is as quick (paper mode, 12 points: 10-20% of them in most rounds at G=256)
    sparse_below = 0.1
    #: and a point with more of its own than this is summed densely (at far points
    #: every rank may be as empty as the envelope)
    point_sparse_below = 0.15

    def __init__(self, X32: np.ndarray, w32: np.ndarray, E32: np.ndarray):
        self.X32, self.w32 = X32, w32
        self.order = self.sorted = None  # (sorted on the first call that reads them)
        self.set_envelope(E32)

    def set_envelope(self, E32: np.ndarray) -> None:
        self.E32 = E32
        self.A = self.X32 - E32[:, None]  # candidate minus envelope: what the sum adds to the loads

    def __call__(self, L32: np.ndarray) -> np.ndarray:
        """(k, n) rise of k ranks' loads L32 (P, k) float32."""
        E32, A = self.E32, self.A
        P, k = L32.shape
        n = A.shape[1]
        if P * k * n < self.dense_below:
            return dense_rise(self.w32, L32, A)
        # A term is 0 where x <= e - l exactly: then x - e rounds to at most -l and the
        # gap to at most 0. The room e - l is taken in float64 less a margin above its
        # rounding (|e - l| <= 2 spread: at most 2^-52 spread each way), so a term
        # skipped is one that is 0.
        spread = max(float(np.abs(E32).max(initial=0.0)), -float(L32.min(initial=0.0)))
        room = (E32.astype(np.float64)[:, None] - L32) - 2.0 ** -49 * spread  # (P, k)
        if self.order is None:
            self.order = np.argsort(self.X32, axis=1, kind="stable")  # (P, n)
            self.sorted = np.take_along_axis(self.X32, self.order, axis=1).astype(np.float64)
        firsts = np.stack([np.searchsorted(self.sorted[p], room[p], side="right") for p in range(P)])
        if n * firsts.size - int(firsts.sum()) > self.sparse_below * P * k * n:
            return dense_rise(self.w32, L32, A)
        rise = np.zeros((k, n), np.float32)
        flat = rise.reshape(-1)
        ranks = np.arange(k)
        # point by point, in ascending order: each sum adds its terms as the dense one does
        for p in range(P):
            counts = n - firsts[p]  # (k,)
            total = int(counts.sum())
            if total == 0:
                continue
            if total > self.point_sparse_below * k * n:
                rise += _terms(L32[p][:, None], A[p][None, :], self.w32[p])
                continue
            r = np.repeat(ranks, counts)
            # each rank's terms: the last counts[r] candidates of the point's order
            j = self.order[p][np.arange(total) + np.repeat(firsts[p] - (np.cumsum(counts) - counts), counts)]
            flat[r * n + j] += _terms(L32[p][r], A[p][j], self.w32[p])  # (a pair at most once per point)
        return rise
