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

    def candidates(self):
        """[(f, spread, kind, j, o)] arrays of every move, evaluated at once
        (kind: 0 replace, 1 swap, 2 move)."""
        T, X, w, G = self.T, self.X, self.w, self.G
        a = self.a
        placed = np.flatnonzero(a >= 0)
        if placed.size == 0:
            return []
        waiting = np.flatnonzero(a < 0)
        S = T.sum(axis=1)  # (H1,)
        Q = (T * T).sum(axis=1)
        # The envelope without one rank, ex1 (H1, G), and without two,
        # ex2 (H1, G, G), from the three largest loads of each step.
        k = min(3, G)
        top_i = np.argsort(-T, axis=1, kind="stable")[:, :k]
        top_v = np.take_along_axis(T, top_i, axis=1)
        ranks = np.arange(G)
        ex1 = np.full(T.shape, -np.inf)
        ex2 = np.full(T.shape + (G,), -np.inf)
        for c in range(k - 1, -1, -1):  # the largest admissible one is written last
            ic = top_i[:, c, None]
            ex1 = np.where(ic != ranks, top_v[:, c, None], ex1)
            ok = (ic[:, :, None] != ranks[:, None]) & (ic[:, :, None] != ranks)
            ex2 = np.where(ok, top_v[:, c, None, None], ex2)
        gp = a[placed]
        Tp = T[:, gp].T  # (P, H1) load of each placed request's rank
        Xp = X[placed]
        out = []
        if waiting.size:  # replace placed j by waiting i: (P, W, H1)
            D = X[waiting][None, :, :] - Xp[:, None, :]
            col = Tp[:, None, :] + D
            m = np.maximum(ex1[:, gp].T[:, None, :], col)
            f = weighted_rows(G * m - (S + D), w)
            q = weighted_rows(Q - Tp[:, None, :] ** 2 + col ** 2 - (S + D) ** 2 / G, w)
            out.append((f.ravel(), q.ravel(), np.zeros(f.size, np.int64), np.repeat(placed, waiting.size), np.tile(waiting, placed.size)))
        if G > 1 and placed.size > 1:  # swap placed j (rank g) and k (rank g' != g)
            jj, kk = np.triu_indices(placed.size, 1)
            keep = gp[jj] != gp[kk]
            jj, kk = jj[keep], kk[keep]
            if jj.size:
                D = Xp[kk] - Xp[jj]  # (pairs, H1)
                cj, ck = Tp[jj] + D, Tp[kk] - D
                m = np.maximum(np.maximum(ex2[:, gp[jj], gp[kk]].T, cj), ck)
                f = weighted_rows(G * m - S, w)
                q = weighted_rows(Q - Tp[jj] ** 2 - Tp[kk] ** 2 + cj ** 2 + ck ** 2 - S ** 2 / G, w)
                out.append((f, q, np.ones(f.size, np.int64), placed[jj], placed[kk]))
        open_ranks = np.flatnonzero(self.left > 0)
        if open_ranks.size:  # move placed j to an open rank r != its own
            jj = np.repeat(np.arange(placed.size), open_ranks.size)
            rr = np.tile(open_ranks, placed.size)
            keep = gp[jj] != rr
            jj, rr = jj[keep], rr[keep]
            if jj.size:
                Tr = T[:, rr].T
                cj, cr = Tp[jj] - Xp[jj], Tr + Xp[jj]
                m = np.maximum(np.maximum(ex2[:, gp[jj], rr].T, cj), cr)
                f = weighted_rows(G * m - S, w)
                q = weighted_rows(Q - Tp[jj] ** 2 - Tr ** 2 + cj ** 2 + cr ** 2 - S ** 2 / G, w)
                out.append((f, q, np.full(f.size, 2), placed[jj], rr))
        return out

    def descend(self, max_steps: int, deadline: float) -> None:
        """Best-improvement descent on (f, then spread) until no move helps."""
        kinds = ("replace", "swap", "move")
        f_cur, q_cur = self.value()
        for _ in range(max_steps):
            if time.perf_counter() > deadline:
                return
            moves = self.candidates()
            if not moves:
                return
            f, q, kind, j, o = (np.concatenate(parts) for parts in zip(*moves))
            better = f < f_cur - 1e-9 * max(1.0, abs(f_cur))
            if better.any():
                i = int(np.argmin(np.where(better, f, np.inf)))
            else:  # a plateau: keep f, lower the spread
                flat = (f <= f_cur + 1e-9 * max(1.0, abs(f_cur))) & (q < q_cur - 1e-9 * max(1.0, abs(q_cur)))
                if not flat.any():
                    return
                i = int(np.argmin(np.where(flat, q, np.inf)))
            self.apply(kinds[kind[i]], int(j[i]), int(o[i]))
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
