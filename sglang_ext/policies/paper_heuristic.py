"""The paper's BF-IO heuristic (arXiv 2601.17855), for comparison: `bfio:variant=paper`.

It follows the outline of the paper's released heuristic in design.md section 3:

- projection without growth: a running request holds its KV length until its
  predicted finish, then leaves (the kernel with growth off, cost = KV tokens);
  a candidate j adds x_j(h) = p_j (its prompt) while h < o_j;
- a score per rank and candidate, weights w_h = 0.86^h over h = 0..H: the part
  of x_j(h) that fits under the envelope E(h) = max_g L_g(h) is rewarded
  (alpha = 1), the part above it penalised heavily (beta = 43);
- greedy phase while more than 7 slots are free: the rank with the most free
  slots (ties: the least load now, then the lowest index) takes the candidate
  with the best score;
- fine phase: the ranks with free slots, lowest blend of current and
  end-of-horizon load first, each filled by a subset-sum dynamic program over
  the candidates' prompt lengths;
- candidates: the first 4*G waiting requests.

Where the outline is silent, the choices are these: the blend is the mean of
the load now and at step H; a rank in the fine phase takes exactly as many
candidates as it has free slots (or as are left), those whose prompts (what
it adds now) have the largest sum not above its deficit to the envelope now
(the classic subset-sum fill; the smallest ones when none fits), the sums
resolved to 1/DP_BINS of that deficit plus the longest prompt. The released
simulator's figures (data/reference/paper_mode_baselines.json) are the
yardstick: docs/benchmarks.md section 1 shows how close this reading comes
to them, and how close the other readings tried came.

An arriving request under immediate binding (which the paper does not treat)
goes to the rank with the best score among those with a free slot (every
active rank when none has one).
"""
from __future__ import annotations

import numpy as np

from .base import pick_order
from .sums import weighted_rows

ALPHA, BETA, DECAY = 1.0, 43.0, 0.86
GREEDY_ABOVE = 7  # free slots in all above which the greedy phase runs
WINDOW_PER_RANK = 4  # candidates considered: the first 4*G
BLEND = 0.5  # fine-phase key: BLEND * load now + (1 - BLEND) * load at step H
DP_BINS = 512  # resolution of the subset-sum program

__all__ = ["assign", "candidate_profiles", "scores", "fill_up_to"]


def candidate_profiles(prompt: np.ndarray, est: np.ndarray, H: int) -> np.ndarray:
    """(n, H+1): the prompt's KV while the candidate runs (h < o_j), no growth."""
    if est.ndim == 2:  # scenarios: the paper takes one length per request
        est = np.median(est, axis=1)
    h = np.arange(H + 1)
    return np.where(h[None, :] < np.asarray(est)[:, None], np.asarray(prompt, np.float64)[:, None], 0.0)


def scores(load: np.ndarray, X: np.ndarray, envelope: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_h w_h [alpha * fit - beta * overflow] of adding the profiles X to the
    projected loads `load` (rows, (k, H+1), broadcast: one rank's load and many
    candidates, or one candidate and many ranks' loads)."""
    over = np.maximum(load + X - envelope, 0.0)
    return weighted_rows(ALPHA * (X - over) - BETA * over, w)


def fill_up_to(sizes: np.ndarray, count: int, capacity: float) -> np.ndarray:
    """Indices of exactly `count` of `sizes` with the largest sum not above
    `capacity` (the `count` smallest when none fits): a 0/1 subset-sum program
    over (items taken, sum), sums in bins of 1/DP_BINS of capacity plus the
    largest size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if count >= sizes.size:
        return np.arange(sizes.size)
    top = max(float(capacity), 0.0) + float(sizes.max())
    q = max(1.0, np.ceil(top / DP_BINS))
    sq = np.rint(sizes / q).astype(np.int64)
    S = int(np.ceil(top / q))
    reach = np.zeros((count + 1, S + 1), bool)
    first = np.full((count + 1, S + 1), -1, np.int64)  # the item that first reached a state
    reach[0, 0] = True
    for i, p in enumerate(sq):
        if p > S:
            continue
        new = reach[:-1, :S + 1 - p] & ~reach[1:, p:]
        first[1:, p:][new] = i
        reach[1:, p:] |= new
    ok = np.flatnonzero(reach[count])
    ok = ok[ok * q <= capacity]
    if ok.size == 0:
        return np.argsort(sizes, kind="stable")[:count]
    s = int(ok.max())
    picked = []
    for k in range(count, 0, -1):
        # (the state one item back was reachable before item i: its first item is earlier)
        i = int(first[k, s])
        picked.append(i)
        s -= int(sq[i])
    return np.array(picked[::-1], dtype=np.int64)


def assign(L: np.ndarray, prompt: np.ndarray, est: np.ndarray, free: np.ndarray, H: int,
           must_place: bool, active: np.ndarray | None = None) -> np.ndarray:
    """Ranks for the candidates (-1: stays waiting). L (H+1, G): the ranks'
    projected loads without growth; prompt, est (n,): the candidates."""
    n, G = prompt.shape[0], L.shape[1]
    out = np.full(n, -1, dtype=np.int64)
    L, free = L.copy(), np.maximum(np.asarray(free, np.int64), 0).copy()
    X = candidate_profiles(prompt, est, H)
    w = DECAY ** np.arange(H + 1, dtype=np.float64)
    if must_place:
        for j in range(n):
            ok = np.flatnonzero(pick_order(free, True, active))
            g = int(ok[np.argmax(scores(L[:, ok].T, X[j:j + 1], L.max(axis=1), w))])
            out[j], free[g] = g, free[g] - 1
            L[:, g] += X[j]
        return out
    left = np.zeros(n, bool)
    left[:min(n, WINDOW_PER_RANK * G)] = True
    while free.sum() > GREEDY_ABOVE and left.any():
        open_ = np.flatnonzero(free > 0)
        most = open_[free[open_] == free[open_].max()]
        g = int(most[np.argmin(L[0, most])])
        js = np.flatnonzero(left)
        j = int(js[np.argmax(scores(L[:, g][None, :], X[js], L.max(axis=1), w))])
        out[j], left[j] = g, False
        free[g] -= 1
        L[:, g] += X[j]
    while left.any() and free.sum():
        key = BLEND * L[0] + (1.0 - BLEND) * L[-1]
        open_ = np.flatnonzero(free > 0)
        g = int(open_[np.argmin(key[open_])])
        js = np.flatnonzero(left)
        take = js[fill_up_to(prompt[js], int(free[g]), L[0].max() - L[0, g])]
        out[take], left[take] = g, False
        free[g] -= take.size
        L[:, g] += X[take].sum(axis=0)
    return out
