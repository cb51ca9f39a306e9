"""Local search over a pool placement: which waiting requests take the free
slots, and on which rank.

The greedy of `bfio` places one request at a time against today's envelope.
On a rich pool the best placement often lifts every rank to a common, higher
level at once, a move no single greedy step sees. This search starts from the
greedy's placement and improves the summed imbalance

    f = sum_h w_h [ G * max_g T_g(h) - sum_g T_g(h) ]

with three kinds of move, each evaluated for *all* pairs at once as array
operations (no Python loop over requests):

- replace: a placed request gives its slot to a waiting one;
- swap: two placed requests on different ranks trade ranks;
- move: a placed request moves to a rank with a slot still open.

Where no move lowers f, moves that keep f and lower the spread of the loads,
sum_h w_h sum_g (T_g(h) - mean_h)^2, are taken: they break the ties at the
envelope (two ranks sharing the maximum) that block single moves. At a local
optimum the search kicks the placement (a few random replaces and swaps) and
descends again, keeping the best placement seen (iterated local search). The
number of placements is never changed, so a work-conserving placement stays
work-conserving. Runs are deterministic for a given seed.
"""
from __future__ import annotations

import time

import numpy as np

from .sums import weighted_rows, weighted_sum

__all__ = ["imbalance", "improve"]


def imbalance(T: np.ndarray, w: np.ndarray) -> float:
    """sum_h w_h [G * max_g T_g(h) - sum_g T_g(h)] of loads T (H+1, G)."""
    return float(weighted_sum(w, T.shape[1] * T.max(axis=1) - T.sum(axis=1)))


def _spread(T: np.ndarray, w: np.ndarray) -> float:
    return float(weighted_sum(w, (T * T).sum(axis=1) - T.sum(axis=1) ** 2 / T.shape[1]))


class _Moves:
    """The moves of one kind from a placement: `f` (their objective values, all at once),
    `q()` their load spreads, `where(i)` the (j, o) pair `_State.apply` takes for the i-th."""

    __slots__ = ("kind", "f", "q", "where")

    def __init__(self, kind: str, f: np.ndarray, q, where):
        self.kind, self.f, self.q, self.where = kind, f, q, where


class _State:
    """A placement and the loads it produces, kept in step."""

    def __init__(self, L, X, free, a, w):
        self.L, self.X, self.w = L, X, w
        self.G = L.shape[1]
        self.a = a.copy()
        self.T = L.copy()
        placed = self.a >= 0
        np.add.at(self.T.T, self.a[placed], X[placed])
        self.left = free - np.bincount(self.a[placed], minlength=self.G)
        self._pairs_of, self._pairs_jk = -1, None

    def value(self) -> tuple[float, float]:
        return imbalance(self.T, self.w), _spread(self.T, self.w)

    # -- the moves --------------------------------------------------------
    def apply(self, kind: str, j: int, o: int) -> None:
        a, T, X = self.a, self.T, self.X
        g = a[j]
        if kind == "replace":  # waiting o takes j's slot
            T[:, g] += X[o] - X[j]
            a[o], a[j] = g, -1
        elif kind == "swap":  # j and o trade ranks
            h = a[o]
            T[:, g] += X[o] - X[j]
            T[:, h] += X[j] - X[o]
            a[j], a[o] = h, g
        else:  # "move": j to rank o
            T[:, g] -= X[j]
            T[:, o] += X[j]
            self.left[g] += 1
            self.left[o] -= 1
            a[j] = o

    def _pairs(self, P: int) -> tuple[np.ndarray, np.ndarray]:
        """Index pairs j < k of the P placed requests (P never changes during a search:
        every move keeps the number placed), built once."""
        if self._pairs_of != P:
            self._pairs_of, self._pairs_jk = P, np.triu_indices(P, 1)
        return self._pairs_jk

    def candidates(self) -> list["_Moves"]:
        """Every move, one `_Moves` group per kind (replace, swap, move), its f values
        evaluated at once; its spreads and its (j, o) pairs only when asked for (a
        step that finds a move lowering f needs neither). The closures read arrays
        that each kind names for itself (none is rebound after its group is made)."""
        T, X, w, G = self.T, self.X, self.w, self.G
        a = self.a
        placed = np.flatnonzero(a >= 0)
        if placed.size == 0:
            return []
        waiting = np.flatnonzero(a < 0)
        S = T.sum(axis=1)  # (H1,)
        Q = (T * T).sum(axis=1)
        # The envelope without one rank, ex1 (H1, G), and without two ranks A and B
        # (`ex2`, for the pairs a move empties or fills), from the three largest
        # loads of each step: the largest of those on another rank.
        k = min(3, G)
        top_i = np.argsort(-T, axis=1, kind="stable")[:, :k]
        top_v = np.take_along_axis(T, top_i, axis=1)
        if k < 3:  # (fewer than 3 ranks: the missing ones -inf, on no rank)
            top_i = np.concatenate([top_i, np.full((T.shape[0], 3 - k), -1)], axis=1)
            top_v = np.concatenate([top_v, np.full((T.shape[0], 3 - k), -np.inf)], axis=1)
        ex1 = np.where(top_i[:, :1] != np.arange(G), top_v[:, :1], top_v[:, 1:2])

        def ex2(A: np.ndarray, B: np.ndarray) -> np.ndarray:  # (n, H1) for the rank pairs (A[i], B[i])
            i0, i1, i2 = (top_i[:, c, None] for c in range(3))
            v0, v1, v2 = (top_v[:, c, None] for c in range(3))
            return np.where((i0 != A) & (i0 != B), v0, np.where((i1 != A) & (i1 != B), v1, v2)).T

        gp = a[placed]
        Tp = T[:, gp].T  # (P, H1) load of each placed request's rank
        Xp = X[placed]
        out = []
        if waiting.size:  # replace placed j by waiting i: (P, W, H1)
            rD = X[waiting][None, :, :] - Xp[:, None, :]
            col = Tp[:, None, :] + rD
            m = np.maximum(ex1[:, gp].T[:, None, :], col)
            W = waiting.size
            out.append(_Moves(
                "replace", weighted_rows(G * m - (S + rD), w).ravel(),
                lambda: weighted_rows(Q - Tp[:, None, :] ** 2 + col ** 2 - (S + rD) ** 2 / G, w).ravel(),
                lambda i: (int(placed[i // W]), int(waiting[i % W]))))
        if G > 1 and placed.size > 1:  # swap placed j (rank g) and k (rank g' != g)
            jj, kk = self._pairs(placed.size)
            keep = gp[jj] != gp[kk]
            jj, kk = jj[keep], kk[keep]
            if jj.size:
                sD = Xp[kk] - Xp[jj]  # (pairs, H1)
                cj, ck = Tp[jj] + sD, Tp[kk] - sD
                m = np.maximum(np.maximum(ex2(gp[jj], gp[kk]), cj), ck)
                out.append(_Moves(
                    "swap", weighted_rows(G * m - S, w),
                    lambda: weighted_rows(Q - Tp[jj] ** 2 - Tp[kk] ** 2 + cj ** 2 + ck ** 2 - S ** 2 / G, w),
                    lambda i: (int(placed[jj[i]]), int(placed[kk[i]]))))
        open_ranks = np.flatnonzero(self.left > 0)
        if open_ranks.size:  # move placed j to an open rank r != its own
            mj = np.repeat(np.arange(placed.size), open_ranks.size)
            rr = np.tile(open_ranks, placed.size)
            keep = gp[mj] != rr
            mj, rr = mj[keep], rr[keep]
            if mj.size:
                Tr = T[:, rr].T
                mcj, cr = Tp[mj] - Xp[mj], Tr + Xp[mj]
                m = np.maximum(np.maximum(ex2(gp[mj], rr), mcj), cr)
                out.append(_Moves(
                    "move", weighted_rows(G * m - S, w),
                    lambda: weighted_rows(Q - Tp[mj] ** 2 - Tr ** 2 + mcj ** 2 + cr ** 2 - S ** 2 / G, w),
                    lambda i: (int(placed[mj[i]]), int(rr[i]))))
        return out

    def descend(self, max_steps: int, deadline: float) -> None:
        """Best-improvement descent on (f, then spread) until no move helps."""
        f_cur, q_cur = self.value()
        for _ in range(max_steps):
            if time.perf_counter() > deadline:
                return
            groups = self.candidates()
            if not groups:
                return
            f = np.concatenate([g.f for g in groups])
            better = f < f_cur - 1e-9 * max(1.0, abs(f_cur))
            if better.any():
                i = int(np.argmin(np.where(better, f, np.inf)))
            else:  # a plateau: keep f, lower the spread
                q = np.concatenate([g.q() for g in groups])
                flat = (f <= f_cur + 1e-9 * max(1.0, abs(f_cur))) & (q < q_cur - 1e-9 * max(1.0, abs(q_cur)))
                if not flat.any():
                    return
                i = int(np.argmin(np.where(flat, q, np.inf)))
            for g in groups:  # (the group the i-th move is in)
                if i < g.f.size:
                    break
                i -= g.f.size
            self.apply(g.kind, *g.where(i))
            f_cur, q_cur = self.value()

    def kick(self, rng: np.random.Generator, strength: int) -> None:
        """A few random replaces and swaps."""
        for _ in range(strength):
            placed = np.flatnonzero(self.a >= 0)
            waiting = np.flatnonzero(self.a < 0)
            if placed.size == 0:
                return
            j = int(rng.choice(placed))
            if waiting.size and rng.random() < 0.5:
                self.apply("replace", j, int(rng.choice(waiting)))
            else:
                others = placed[self.a[placed] != self.a[j]]
                if others.size:
                    self.apply("swap", j, int(rng.choice(others)))


def improve(L, X, free, assignment, weights=None, kicks: int = 60, strength: int = 3,
            max_steps: int = 200, budget_s: float | None = None, seed: int = 0):
    """Improve a feasible pool placement (see the module docstring).

    L (H+1, G): projected loads of what the ranks hold; X (n, H+1): candidate
    profiles; free (G,): open slots; assignment (n,): a rank per candidate or
    -1. `kicks` perturb-and-descend rounds after the first descent,
    `budget_s` caps the wall time. Returns (assignment, objective)."""
    L = np.asarray(L, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64).reshape(-1, L.shape[0])
    w = np.ones(L.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    free = np.maximum(np.asarray(free, dtype=np.int64), 0)
    deadline = time.perf_counter() + (np.inf if budget_s is None else budget_s)
    st = _State(L, X, free, np.asarray(assignment, dtype=np.int64), w)
    st.descend(max_steps, deadline)
    best_a, best_f = st.a.copy(), st.value()[0]
    rng = np.random.default_rng(seed)
    for _ in range(kicks):
        if time.perf_counter() > deadline:
            break
        base_a = st.a.copy()
        base_f = st.value()[0]
        st.kick(rng, strength)
        st.descend(max_steps, deadline)
        f = st.value()[0]
        if f < best_f - 1e-9 * max(1.0, abs(best_f)):
            best_a, best_f = st.a.copy(), f
        if f > base_f + 1e-9 * max(1.0, abs(base_f)):  # worse: go back (ties walk on)
            st = _State(L, X, free, base_a, w)
    return best_a, best_f
