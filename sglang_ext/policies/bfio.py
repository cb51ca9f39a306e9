"""BF-IO: balance the future, not the present (design.md section 3).

At each decision the Triton kernel projects every rank's decode cost over the
next H steps from its running requests (KV lengths growing one token a step,
requests dropping out at their predicted finish). A new request j adds the
profile x_j(h) = c * (p_j + h) (+ b) while h < o_j. The objective is the summed
imbalance over the horizon,

    sum_h w_h [ G * max_g L_g(h) - sum_g L_g(h) ],   w_h = decay^h,

so placing j on rank g changes it by  w . (G * overflow_g(j) - x_j), where
overflow is how far j lifts g above the current envelope E(h) = max_g L_g(h).

- pool (late binding): candidates outnumber slots, so *which* requests go
  matters: repeatedly take the (candidate, rank) pair with the best change,
  i.e. the largest request that still fits under a rank's future deficit;
  when every slot can be filled with all candidates, place them largest first
  (LPT) on the rank whose envelope grows least.
- immediate (one arriving request): the rank whose envelope grows least; ties
  (nothing overflows, the common case) go to the rank with the least projected
  load along the request's lifetime, which at H=0 is exactly SGLang's
  total_tokens rule: with nothing to choose from it never drops below the best
  myopic rule.
"""
from __future__ import annotations

import numpy as np

from ..triton_kernels import project_cost
from .base import Candidates, ClusterView, Policy


class BFIO(Policy):
    name = "bfio"
    needs_requests = True

    def __init__(self, horizon: int = 20, decay: float = 0.86, growth: bool = True,
                 a: float = 0.0, b: float = 0.0, c: float = 1.0, backend: str = "auto",
                 overflow: float | None = None, fit: float = 0.0, reward: float = 1.0,
                 now_weight: float = 10.0):
        if horizon < 0:
            raise ValueError(f"bfio horizon must be >= 0, got {horizon}")
        self.horizon = int(horizon)
        self.decay = float(decay)
        self.growth = bool(growth)
        self.weights = (float(a), float(b), float(c))
        self.backend = backend
        self.overflow = overflow  # penalty per unit the envelope rises (default G)
        self.reward = reward  # weight of the load a placement moves out of the queue
        self.fit = fit  # >0 prefers the tightest fit among ranks (best-fit), <0 the loosest
        self.w = self.decay ** np.arange(self.horizon + 1)
        # The next step is certain, the rest predicted: now_weight > 1 leans on it.
        self.w[0] *= now_weight
        self._h = np.arange(self.horizon + 1)

    # -- projection -------------------------------------------------------
    def project(self, view: ClusterView) -> np.ndarray:
        """(H+1, G) projected cost of what each rank already holds."""
        G, H = view.num_ranks, self.horizon
        a, b, c = self.weights
        if view.req_rank.size or not view.kv_tokens.any():
            proj = project_cost(view.req_rank, view.req_kv, view.req_remaining, G, H,
                                a=0.0, b=b, c=c, growth=self.growth, backend=self.backend)
            return proj.cost.numpy()
        # No per-request detail (e.g. a coarse load report): hold today's load flat.
        return np.broadcast_to(b * view.num_requests + c * view.kv_tokens, (H + 1, G)).astype(np.float64)

    def profiles(self, cands: Candidates) -> np.ndarray:
        """(n, H+1) cost each candidate adds at each horizon step."""
        _, b, c = self.weights
        h = self._h[None, :]
        grow = h if self.growth else 0
        alive = h < cands.output_est[:, None]
        return np.where(alive, b + c * (cands.prompt_len[:, None] + grow), 0.0)

    # -- placement --------------------------------------------------------
    def assign(self, view, cands, must_place=False):
        n, G = len(cands), view.num_ranks
        out = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return out
        L = self.project(view).copy()  # (H+1, G)
        X = self.profiles(cands)  # (n, H+1)
        free = view.free_slots.copy()
        if must_place:
            for j in range(n):
                g = self._least_growth(L, X[j], free)
                out[j] = g
                L[:, g] += X[j]
                free[g] -= 1
            return out
        slots = int(np.maximum(free, 0).sum())
        if slots == 0:
            return out
        if n <= slots:
            return self._place_all(L, X, free, out)
        return self._select(L, X, free, out)

    def _place_all(self, L, X, free, out):
        """Every candidate gets a slot: largest first (LPT), each on the rank
        whose future envelope grows least."""
        for j in np.argsort(-(X @ self.w), kind="stable"):
            g = self._least_growth(L, X[j], free)
            out[j] = g
            L[:, g] += X[j]
            free[g] -= 1
        return out

    def _least_growth(self, L: np.ndarray, x: np.ndarray, free: np.ndarray) -> int:
        ok = free > 0
        if not ok.any():
            ok = np.ones_like(ok)
        grow = L + (x - L.max(axis=1))[:, None]  # (H+1, G): > 0 where the envelope rises
        np.maximum(grow, 0.0, out=grow)
        primary = self.w @ grow
        # Secondary: the projected load this request would share a rank with.
        secondary = (self.w * x) @ L
        key = np.where(ok, primary, np.inf)
        best = np.flatnonzero(key <= key.min() + 1e-9 * max(1.0, abs(key.min())))
        return int(best[np.argmin(secondary[best])])

    def _select(self, L, X, free, out):
        """Pool with more candidates than slots: best (candidate, rank) pairs."""
        G = L.shape[1]
        w = self.w
        ranks = np.flatnonzero(free > 0)
        E = L.max(axis=1)
        gain = self.reward * (X @ w)  # reward: load moved from the queue into the batch
        # score[j, r] = w . (x_j - G * max(L_r + x_j - E, 0))
        pen = G if self.overflow is None else self.overflow

        def column(g):
            gap = L[:, g][None, :] + X - E[None, :]  # > 0: overflow, < 0: slack left
            return gain - pen * (np.maximum(gap, 0.0) @ w) + self.fit * (np.minimum(gap, 0.0) @ w)

        def all_columns(cols):
            gap = L[None, :, cols] + X[:, :, None] - E[None, :, None]  # (n, H+1, k)
            return (gain[:, None] - pen * np.einsum("nhk,h->nk", np.maximum(gap, 0.0), w)
                    + self.fit * np.einsum("nhk,h->nk", np.minimum(gap, 0.0), w))

        S = np.full((X.shape[0], G), -np.inf)
        S[:, ranks] = all_columns(ranks)
        left = int(free[ranks].sum())
        while left:
            flat = int(np.argmax(S))
            j, g = divmod(flat, G)
            if not np.isfinite(S[j, g]):
                break
            out[j] = g
            L[:, g] += X[j]
            free[g] -= 1
            left -= 1
            S[j, :] = -np.inf
            newE = np.maximum(E, L[:, g])
            if (newE > E).any():  # the envelope moved: every rank's deficit changed
                E = newE
                live = np.flatnonzero(free > 0)
                S[:, live] = all_columns(live)
                S[out >= 0, :] = -np.inf
            elif free[g] > 0:
                S[:, g] = np.where(out >= 0, -np.inf, column(g))
            if free[g] == 0:
                S[:, g] = -np.inf
        return out
