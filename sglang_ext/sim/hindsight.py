"""A replay's drain, and what hindsight could do with it.

After the last placement of a replay nothing is left to choose: the requests
the ranks hold decode to the end, each rank's load growing one KV token per
request per step and dropping as requests finish, and every step lasts as long
as the most loaded rank. Given the held requests (rank, KV tokens, decode
steps left), the drain's barrier wait follows exactly (`drain`), and the same
requests can be re-placed knowing every length (`replace`: largest first onto
the rank they overlap least, then swaps that shorten the stragglers). That is
a placement no online policy can make (requests cannot move, and it knows the
future), so its drain shows how much of a run's idle is in reach of placement
at all; the per-step floor (CostModel.wait_floor) bounds it from below.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cost import CostModel
from ..triton_kernels import project_cost


@dataclass
class Drain:
    wait_s: float  # summed barrier wait over ranks and steps
    time_s: float  # decode time (steps x the slowest rank, plus sync)
    steps: int

    def idle(self, ranks: int) -> float:
        return self.wait_s / (ranks * self.time_s) if self.time_s > 0 else 0.0


def rank_loads(rank: np.ndarray, kv: np.ndarray, steps_left: np.ndarray, ranks: int, cost: CostModel) -> np.ndarray:
    """(steps, G) each rank's local step time above `a` at each drain step:
    b * running + c * KV tokens, a request with s steps left running at steps
    0..s-1 with KV kv + h: the projection kernel's cost (its torch reference)
    over the whole drain."""
    left = np.asarray(steps_left, dtype=np.int64)
    H = int(left.max()) if left.size else 0
    if H == 0:
        return np.zeros((0, ranks))
    proj = project_cost(np.asarray(rank, dtype=np.int64), np.asarray(kv, dtype=np.int64), left, ranks, H - 1,
                        a=0.0, b=cost.b, c=cost.c, growth=True, backend="torch")
    return proj.cost.numpy()


def drain(loads: np.ndarray, cost: CostModel) -> Drain:
    """Barrier wait and decode time of the steps `loads` (rank_loads) covers:
    an empty rank still joins and costs `a`, so the wait is G * max - sum of
    the loads above `a`."""
    if loads.size == 0:
        return Drain(0.0, 0.0, 0)
    top = loads.max(axis=1)
    wait = float((loads.shape[1] * top - loads.sum(axis=1)).sum())
    return Drain(wait, float((cost.a + top + cost.sync).sum()), loads.shape[0])


def replace(kv: np.ndarray, steps_left: np.ndarray, ranks: int, slots: int, cost: CostModel,
            swaps: int = 20000, seed: int = 0, start: np.ndarray | None = None) -> np.ndarray:
    """Ranks for the held requests, chosen knowing every length: largest total
    load first, each onto the open rank (fewer than `slots` held) its profile
    overlaps least (the gradient of the summed squared loads: water-filling at
    every step), or `start` (e.g. where a run put them) if its drain waits
    less; then `swaps` random swaps of two requests on different ranks, each
    kept when it lowers the drain's wait (slot counts are unchanged)."""
    kv, left = np.asarray(kv, dtype=np.int64), np.asarray(steps_left, dtype=np.int64)
    n = kv.size
    if n > ranks * slots:
        raise ValueError(f"{n} requests do not fit {ranks} ranks x {slots} slots")
    # Each request's own load at each drain step, (n, H): the rank loads of n
    # one-request ranks.
    X = rank_loads(np.arange(n), kv, left, n, cost).T
    H = X.shape[1]
    L = np.zeros((H, ranks))
    held = np.zeros(ranks, np.int64)
    out = np.zeros(n, np.int64)
    largest = np.argsort(-X.sum(axis=1), kind="stable")
    for j in largest:
        live = np.flatnonzero(held < slots)
        g = int(live[np.argmin(X[j] @ L[:, live])])
        out[j] = g
        L[:, g] += X[j]
        held[g] += 1
    if start is not None:
        S = rank_loads(start, kv, left, ranks, cost)
        if drain(S, cost).wait_s < drain(L, cost).wait_s:
            out, L = np.asarray(start, dtype=np.int64).copy(), S
    # Swaps: only steps before the longer of the two requests' ends change, and
    # a swap keeps each step's total, so the wait changes by G * (new max - old max).
    if n < 2 or ranks < 2:
        return out
    rng = np.random.default_rng(seed)
    # One of each pair from the longer half (the short ones alone hardly move
    # the maxima), the other from all.
    longer = largest[:max(1, n // 2)]
    for i, j in zip(rng.choice(longer, swaps), rng.integers(0, n, swaps)):
        gi, gj = out[i], out[j]
        if gi == gj:
            continue
        m = int(max(left[i], left[j]))
        d = X[i, :m] - X[j, :m]
        before = L[:m].max(axis=1)
        L[:m, gi] -= d
        L[:m, gj] += d
        if (L[:m].max(axis=1) - before).sum() < -1e-9 * before.sum():
            out[i], out[j] = gj, gi
        else:
            L[:m, gi] += d
            L[:m, gj] -= d
    return out
