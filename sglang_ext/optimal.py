"""The finite-horizon assignment problem of design.md section 3, solved exactly.

Given the projected loads of what the ranks already hold, L (H+1, G), the
profiles of the waiting candidates, X (n, H+1) (X_j(h): load candidate j adds
h steps from now), and the free slots per rank, free (G,), choose x_jg in {0,1}:

    minimise   sum_h w_h [ G * M_h - sum_g L_g(h) - sum_j sum_g x_jg X_j(h) ]
    subject to M_h >= L_g(h) + sum_j x_jg X_j(h)        for all g, h
               sum_g x_jg <= 1                          (each candidate at most once)
               sum_j x_jg <= free_g                     (slots per rank)
               sum_jg x_jg  = min(n, sum_g free_g)      (work-conserving, optional)

i.e. the summed (weighted) imbalance G * max_g - sum_g of the loads over the
horizon. `solve_exact` solves it with scipy.optimize.milp (HiGHS) to a zero
relative gap; `objective` evaluates any assignment; `brute_force` enumerates
every assignment (tiny instances, for tests).

Assignments are int64 arrays with one rank per candidate, -1 for "stays
waiting" (the convention of `Policy.assign`). Weights default to 1 for every
h; BFIO with decay=1.0, now_weight=1.0 sees the same objective.
"""
from __future__ import annotations

import itertools
import logging
import time

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["objective", "solve_exact", "brute_force", "instance_from_view", "NotOptimalError"]


class NotOptimalError(RuntimeError):
    """The MILP stopped (time limit) without proving optimality."""


def _check(L, X, free, weights):
    L = np.asarray(L, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"L must be (H+1, G), got shape {L.shape}")
    H1, G = L.shape
    X = np.asarray(X, dtype=np.float64).reshape(-1, H1)
    w = np.ones(H1) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (H1,):
        raise ValueError(f"weights must have shape ({H1},), got {w.shape}")
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    if free is not None:
        free = np.maximum(np.asarray(free, dtype=np.int64), 0)
        if free.shape != (G,):
            raise ValueError(f"free must have shape ({G},), got {free.shape}")
    return L, X, free, w


def objective(L, X, assignment, weights=None) -> float:
    """sum_h w_h [G * max_g T_g(h) - sum_g T_g(h)], T = L plus the placed profiles."""
    L, X, _, w = _check(L, X, None, weights)
    G = L.shape[1]
    a = np.asarray(assignment, dtype=np.int64)
    if a.shape != (X.shape[0],):
        raise ValueError(f"assignment must have shape ({X.shape[0]},), got {a.shape}")
    if ((a < -1) | (a >= G)).any():
        raise ValueError("assignment entries must be -1 or a rank in [0, G)")
    T = L.copy()
    placed = a >= 0
    if placed.any():
        np.add.at(T.T, a[placed], X[placed])  # T[:, g] += X[j] for each placed j
    return float(w @ (G * T.max(axis=1) - T.sum(axis=1)))


def _target(n: int, free: np.ndarray, work_conserving: bool) -> int | None:
    return min(n, int(free.sum())) if work_conserving else None


def feasible(assignment, free, work_conserving: bool = True) -> bool:
    a = np.asarray(assignment, dtype=np.int64)
    free = np.maximum(np.asarray(free, dtype=np.int64), 0)
    used = np.bincount(a[a >= 0], minlength=free.shape[0])
    if (used > free).any():
        return False
    return not work_conserving or int((a >= 0).sum()) == min(a.shape[0], int(free.sum()))


def solve_exact(L, X, free, weights=None, time_limit: float = 60.0, work_conserving: bool = True,
                strict: bool = False, return_info: bool = False):
    """Optimal assignment of the finite-horizon integer program (module docstring).

    Returns (assignment (n,) int64 with -1 = not placed, objective value). When
    HiGHS hits `time_limit` the best assignment found is returned (a warning is
    logged; `strict=True` raises NotOptimalError instead). With return_info=True
    a third element is a dict: optimal (bool), bound (a proven lower bound on
    the optimum), seconds, message.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, vstack

    L, X, free, w = _check(L, X, free, weights)
    H1, G = L.shape
    n = X.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or free.sum() == 0:
        v = objective(L, X, out, w)
        info = dict(optimal=True, bound=v, seconds=0.0, message="trivial")
        return (out, v, info) if return_info else (out, v)
    t0 = time.perf_counter()

    # Candidates with identical profiles are interchangeable: one integer
    # variable y[k, g] in [0, count_k] per distinct profile k and rank g (removes
    # the symmetry between duplicates). Then M[h] at nx + h.
    U, inverse, count = np.unique(X, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    K = U.shape[0]
    nx = K * G
    uw = U @ w  # (K,) weighted load each profile moves into the batch
    c = np.concatenate([np.repeat(-uw, G), G * w])
    const = -float(w @ L.sum(axis=1))

    rows = []
    lb, ub = [], []
    k_idx = np.repeat(np.arange(K), G)
    g_idx = np.tile(np.arange(G), K)
    var = np.arange(nx)
    # each candidate at most once: sum_g y[k, g] <= count_k
    rows.append(coo_matrix((np.ones(nx), (k_idx, var)), shape=(K, nx + H1)))
    lb.append(np.zeros(K)); ub.append(count.astype(np.float64))
    # slots per rank
    rows.append(coo_matrix((np.ones(nx), (g_idx, var)), shape=(G, nx + H1)))
    lb.append(np.zeros(G)); ub.append(free.astype(np.float64))
    # work-conserving
    target = _target(n, free, work_conserving)
    if target is not None:
        rows.append(coo_matrix((np.ones(nx), (np.zeros(nx, np.int64), var)), shape=(1, nx + H1)))
        lb.append(np.array([target], float)); ub.append(np.array([target], float))
    # envelope: M_h - sum_k U_k(h) y[k, g] >= L_g(h), row index h*G + g
    hh, kk, gg = np.meshgrid(np.arange(H1), np.arange(K), np.arange(G), indexing="ij")
    keep = U[kk, hh] != 0
    r_x = (hh * G + gg)[keep]
    c_x = (kk * G + gg)[keep]
    v_x = -U[kk, hh][keep]
    r_m = np.arange(H1 * G)
    c_m = nx + np.repeat(np.arange(H1), G)
    rows.append(coo_matrix((np.concatenate([v_x, np.ones(H1 * G)]),
                            (np.concatenate([r_x, r_m]), np.concatenate([c_x, c_m]))),
                           shape=(H1 * G, nx + H1)))
    lb.append(L.reshape(-1)); ub.append(np.full(H1 * G, np.inf))

    A = vstack(rows).tocsr()
    cons = LinearConstraint(A, np.concatenate(lb), np.concatenate(ub))
    integrality = np.concatenate([np.ones(nx), np.zeros(H1)])
    y_ub = np.minimum(count[:, None], free[None, :]).reshape(-1).astype(np.float64)
    bounds = Bounds(np.concatenate([np.zeros(nx), L.max(axis=1)]),
                    np.concatenate([y_ub, np.full(H1, np.inf)]))
    res = milp(c, constraints=cons, integrality=integrality, bounds=bounds,
               options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "presolve": True})
    if res.x is None and res.status != 1:  # 1 = iteration/time limit
        raise RuntimeError(f"MILP failed: {res.message}")
    if res.status != 0:
        msg = f"MILP not proven optimal ({res.message}); returning the best assignment found"
        if strict:
            raise NotOptimalError(msg)
        logger.warning(msg)
    if res.x is None:  # stopped before any incumbent: fill slots in arrival order
        slot_rank = np.repeat(np.arange(G), free)
        m = min(n, slot_rank.size) if work_conserving else 0
        out[:m] = slot_rank[:m]
        y = np.zeros((K, G), np.int64)
    else:
        y = np.rint(res.x[:nx]).astype(np.int64).reshape(K, G)
    for k in range(K):  # hand each profile's slots to its candidates in arrival order
        members = np.flatnonzero(inverse == k)
        ranks = np.repeat(np.arange(G), y[k])
        out[members[:ranks.size]] = ranks
    value = objective(L, X, out, w)
    # The evaluator is the reference; the solver's value should agree (same model).
    if res.status == 0 and abs(value - (res.fun + const)) > 1e-6 * max(1.0, abs(value)):
        logger.warning("MILP objective %.6f differs from evaluated %.6f", res.fun + const, value)
    if not return_info:
        return out, value
    dual = getattr(res, "mip_dual_bound", None)
    bound = value if res.status == 0 else (float(dual) + const if dual is not None and np.isfinite(dual) else -np.inf)
    info = dict(optimal=res.status == 0, bound=min(bound, value), seconds=time.perf_counter() - t0,
                message=str(res.message))
    return out, value, info


def brute_force(L, X, free, weights=None, work_conserving: bool = True):
    """Exhaustive search over every assignment ((G+1)^n of them): tiny cases only."""
    L, X, free, w = _check(L, X, free, weights)
    G = L.shape[1]
    n = X.shape[0]
    if (G + 1) ** n > 2_000_000:
        raise ValueError(f"brute force over {(G + 1) ** n} assignments is too large")
    best, best_val = np.full(n, -1, np.int64), np.inf
    for combo in itertools.product(range(-1, G), repeat=n):
        a = np.asarray(combo, dtype=np.int64)
        if not feasible(a, free, work_conserving):
            continue
        v = objective(L, X, a, w)
        if v < best_val - 1e-12:
            best, best_val = a, v
    return best, float(best_val)


def instance_from_view(view, cands, horizon: int):
    """(L, X, free) for a policy's view and candidates, with BFIO's projection
    (KV growing one a step, requests dropping out at their predicted finish)."""
    from .policies.bfio import BFIO

    p = BFIO(horizon=horizon, decay=1.0, now_weight=1.0)
    return p.project(view).astype(np.float64), p.profiles(cands).astype(np.float64), \
        np.maximum(view.free_slots, 0)
