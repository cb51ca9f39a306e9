"""Myopic baselines: the paper's exact FCFS / round robin / JSQ (design.md
section 3) and SGLang's built-in rules (total_requests, total_tokens), plus
power-of-two choices.

The least-loaded rules place a call's candidates one after another (each sees
what the call already sent) from a heap of the eligible ranks: O(log G) per
candidate instead of a scan of all G (a pool release at G=256 places ~1,000).
"""
from __future__ import annotations

import heapq

import numpy as np

from .base import Candidates, ClusterView, Policy, pick_order


class FCFS(Policy):
    """Fill rank 0 until full, then rank 1, ... in arrival order."""

    name = "fcfs"

    def assign(self, view, cands, must_place=False):
        n = len(cands)
        out = np.full(n, -1, dtype=np.int64)
        # Rank of each slot, in rank order: slot k goes to the k-th candidate.
        slot_rank = np.repeat(np.arange(view.num_ranks), np.maximum(view.free_slots, 0))
        k = min(n, slot_rank.shape[0])
        out[:k] = slot_rank[:k]
        if must_place and k < n:  # nowhere free: queue on the least-loaded active ranks
            out[k:] = _least_requests(view, cands, k, out[:k])
        return out


class RoundRobin(Policy):
    """Deal candidates to ranks 0, 1, 2, ... skipping full ranks.

    restart=True restarts at rank 0 at every call (the paper's baseline);
    restart=False keeps the cursor across calls (SGLang's round_robin). Default:
    restart in pool mode, persistent cursor under immediate binding.
    """

    name = "round_robin"

    def __init__(self, restart: bool | None = None):
        self.restart = restart
        self._cursor = 0

    def reset(self):
        self._cursor = 0

    def assign(self, view, cands, must_place=False):
        G, n = view.num_ranks, len(cands)
        restart = (not must_place) if self.restart is None else self.restart
        cursor = 0 if restart else self._cursor
        out = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return out
        # Dealing one request per pass to every rank that still has a slot is a
        # fixed slot order: pass k visits, from the cursor on, the ranks with at
        # least k free slots. Sort the (pass, rank) pairs once instead of looping.
        free = np.maximum(view.free_slots, 0)
        ranks = np.repeat(np.arange(G), free)
        passes = np.arange(ranks.size) - np.repeat(np.cumsum(free) - free, free)
        order = np.lexsort(((ranks - cursor) % G, passes))
        seq = ranks[order][:n]
        out[:seq.size] = seq
        if seq.size:
            cursor = (int(seq[-1]) + 1) % G
        if must_place and seq.size < n:
            # Nowhere free: keep dealing over every active rank (they queue there).
            active = np.flatnonzero(view.active_ranks)
            if active.size:
                start = int(np.searchsorted(active, cursor)) % active.size
                extra = active[(start + np.arange(n - seq.size)) % active.size]
                out[seq.size:] = extra
                cursor = (int(extra[-1]) + 1) % G
        self._cursor = cursor
        return out


class _LeastLoaded(Policy):
    """Each candidate in order to the eligible rank with the smallest load key,
    lowest index on ties; the key counts what this call already sent."""

    def _key(self, view: ClusterView) -> np.ndarray:
        raise NotImplementedError

    def _step(self, prompt: np.ndarray) -> np.ndarray:
        """What each candidate (by prompt length) adds to its rank's key."""
        raise NotImplementedError

    def assign(self, view, cands, must_place=False):
        n = len(cands)
        if n == 1:  # one arriving request (immediate binding): one scan beats building a heap
            ok = pick_order(view.free_slots, must_place, view.active)
            rank = int(np.argmin(np.where(ok, self._key(view), np.inf))) if ok.any() else -1
            return np.array([rank], dtype=np.int64)
        key = self._key(view).astype(np.float64).tolist()
        left = np.asarray(view.free_slots).astype(np.int64).tolist()  # free slots
        out = np.full(n, -1, dtype=np.int64)
        step = self._step(np.asarray(cands.prompt_len)).astype(np.float64).tolist()
        # (key, rank) pairs: the heap's minimum is the least key, lowest rank on ties
        # (np.argmin's rule), so this places exactly as a scan of every rank would.
        heap = [(k, g) for g, (k, f) in enumerate(zip(key, left)) if f > 0]
        heapq.heapify(heap)
        for j in range(n):
            if not heap:
                if not must_place:
                    break
                # Nowhere free: every active rank is eligible from here on (requests queue there).
                heap = [(k, g) for g, (k, ok) in enumerate(zip(key, view.active_ranks.tolist())) if ok]
                if not heap:
                    break
                heapq.heapify(heap)
                left = [1 << 62] * len(left)  # (never runs out again)
            k, g = heapq.heappop(heap)
            out[j] = g
            k += step[j]
            key[g] = k
            left[g] -= 1
            if left[g] > 0:
                heapq.heappush(heap, (k, g))
        return out


class JSQ(_LeastLoaded):
    """The paper's JSQ: fewest KV tokens among ranks with free slots."""

    name = "jsq"

    def _key(self, view):
        return view.kv_tokens

    def _step(self, prompt):
        return prompt


class TotalTokens(JSQ):
    """SGLang's total_tokens: fewest running+waiting tokens, counting the
    prompt just sent (its speculative increment)."""

    name = "total_tokens"


class TotalRequests(_LeastLoaded):
    """SGLang's total_requests: fewest running+waiting requests."""

    name = "total_requests"

    def _key(self, view):
        return view.num_requests

    def _step(self, prompt):
        return np.ones(prompt.shape[0])


class PowerOfTwo(Policy):
    """Two random eligible ranks; the one with fewer KV tokens wins."""

    name = "power_of_two"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self):
        self._rng = np.random.default_rng(self.seed)

    def assign(self, view, cands, must_place=False):
        key = view.kv_tokens.astype(np.float64).copy()
        free = view.free_slots.copy()
        out = np.full(len(cands), -1, dtype=np.int64)
        for j in range(len(cands)):
            ok = np.flatnonzero(pick_order(free, must_place, view.active))
            if ok.size == 0:
                break
            pair = self._rng.choice(ok, size=min(2, ok.size), replace=False)
            g = int(pair[np.argmin(key[pair])])
            out[j] = g
            free[g] -= 1
            key[g] += cands.prompt_len[j]
        return out


def _least_requests(view: ClusterView, cands: Candidates, start: int, placed: np.ndarray) -> np.ndarray:
    """Candidates from `start` on, one after another, to the ranks holding the fewest
    requests, counting those this call `placed` already."""
    key = (view.num_requests + np.bincount(placed, minlength=view.num_ranks)).astype(np.float64)
    key[~view.active_ranks] = np.inf
    out = np.empty(len(cands) - start, dtype=np.int64)
    for i in range(out.shape[0]):
        g = int(np.argmin(key))
        out[i] = g
        key[g] += 1
    return out
