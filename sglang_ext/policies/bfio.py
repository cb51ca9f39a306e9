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
                 overflow: float | None = None, reward: float = 1.0,
                 now_weight: float = 10.0, parallel: bool = True):
        if horizon < 0:
            raise ValueError(f"bfio horizon must be >= 0, got {horizon}")
        self.horizon = int(horizon)
        self.decay = float(decay)
        self.growth = bool(growth)
        self.weights = (float(a), float(b), float(c))
        self.backend = backend
        self.overflow = overflow  # penalty per unit the envelope rises (default G)
        # parallel: a round takes every rank's best proposal even when it lifts the
        # envelope (scored against the envelope at the round's start); False
        # rescores after every such pair (exact greedy, slower).
        self.parallel = parallel
        self.reward = reward  # weight of the load a placement moves out of the queue
        self.w = self.decay ** np.arange(self.horizon + 1)
        # The next step is certain, the rest predicted: now_weight > 1 leans on it.
        self.w[0] *= now_weight
        # Tie-break terms are scaled below the smallest possible growth step.
        self._tie_scale = 1e-3 * float(self.w.min())
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
        for j in np.argsort(-(X @ self.w), kind="stable").tolist():
            g = self._least_growth(L, X[j], free)
            out[j] = g
            L[:, g] += X[j]
            free[g] -= 1
        return out

    def _least_growth(self, L: np.ndarray, x: np.ndarray, free: np.ndarray) -> int:
        ok = free > 0
        if not ok.any():
            ok = np.ones_like(ok)
        live = np.flatnonzero(ok)
        # Envelope over all ranks: a full rank still sets the barrier.
        grow = np.maximum(L[:, live] + (x - L.max(axis=1))[:, None], 0.0)
        primary = self.w @ grow
        shared = (self.w * x) @ L[:, live]
        key = primary + shared * (self._tie_scale / (np.abs(shared).max() + 1.0))
        return int(live[np.argmin(key)])

    def _select(self, L, X, free, out):
        """Pool with more candidates than slots: best (candidate, rank) pairs,
        score = w . (reward * x_j - overflow_penalty * rise of the envelope).

        Rounds: one candidate per rank with a free slot, matched greedily by
        score (`_match_round`); then the changed columns are rescored (all of
        them when the envelope rose)."""
        n, G = X.shape[0], L.shape[1]
        w = self.w
        gain = self.reward * (X @ w)
        pen = G if self.overflow is None else self.overflow
        E = L.max(axis=1)
        S = np.full((n, G), -np.inf)
        over = np.zeros((n, G))
        taken = np.zeros(n, bool)
        stale = np.flatnonzero(free > 0)
        while True:
            live = np.flatnonzero(free > 0)
            if live.size == 0 or taken.all():
                break
            if stale.size:
                rise = np.einsum("nhk,h->nk", np.maximum(L[None, :, stale] + X[:, :, None] - E[None, :, None], 0.0), w)
                over[:, stale] = rise
                S[:, stale] = gain[:, None] - pen * rise
                S[taken] = -np.inf
            js, gs = self._match_round(S[:, live], over[:, live], live)
            if js.size == 0:
                break
            out[js] = gs
            taken[js] = True
            S[js] = -np.inf
            L[:, gs] += X[js].T
            free[gs] -= 1
            newE = np.maximum(E, L[:, gs].max(axis=1))
            if (newE > E).any():
                E = newE
                stale = np.flatnonzero(free > 0)
            else:
                stale = gs[free[gs] > 0]
        return out

    def _match_round(self, S: np.ndarray, over: np.ndarray, live: np.ndarray):
        """Greedy matching of candidates to ranks (at most one each), best
        pair first, in vectorised proposal rounds: every open rank proposes
        its best free candidate and each candidate goes to its best proposer.
        Without `parallel`: only the single best pair (the exact
        sequential greedy, one rescoring per placement)."""
        if not self.parallel:
            flat = int(np.argmax(S))
            j, r = divmod(flat, S.shape[1])
            if not np.isfinite(S[j, r]):
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            return np.array([j], np.int64), live[[r]].astype(np.int64)
        S = S.copy()
        open_rank = np.ones(S.shape[1], bool)
        js, rs = [], []
        while open_rank.any():
            cols = np.flatnonzero(open_rank)
            bj = S[:, cols].argmax(axis=0)
            bs = S[bj, cols]
            ok = np.isfinite(bs)
            open_rank[cols[~ok]] = False
            if not ok.any():
                break
            cols, bj, bs = cols[ok], bj[ok], bs[ok]
            # each proposed candidate goes to its best-scoring proposer
            order = np.argsort(-bs, kind="stable")
            _, first = np.unique(bj[order], return_index=True)
            win = order[first]
            js.extend(bj[win].tolist())
            rs.extend(cols[win].tolist())
            S[bj[win], :] = -np.inf
            open_rank[cols[win]] = False
        if not js:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.asarray(js, np.int64), live[np.asarray(rs, np.int64)]
