"""One interface for every placement policy.

A policy sees a `ClusterView` (per-rank load and free slots, plus the running
requests the projection kernel needs) and a batch of `Candidates` (waiting
requests, in arrival order) and returns, for each candidate, the rank it goes
to or -1 (stays waiting). Two binding styles share the interface:

- pool (late binding, the paper's setting): `must_place=False`; a candidate may
  only take a free slot, and may be left waiting;
- immediate (SGLang's setting): `must_place=True`; every candidate gets a rank
  now; ranks with free slots are preferred, but a full rank can queue it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class Candidates:
    """Waiting requests offered to a policy, in arrival order."""

    prompt_len: np.ndarray  # (n,) prompt tokens
    output_est: np.ndarray  # (n,) predicted decode steps (from an estimator)

    def __post_init__(self):
        self.prompt_len = np.asarray(self.prompt_len, dtype=np.int64)
        self.output_est = np.asarray(self.output_est, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.prompt_len.shape[0])


@dataclass
class ClusterView:
    """What a policy may know about the ranks at a decision point."""

    free_slots: np.ndarray  # (G,) slots a rank can fill now
    kv_tokens: np.ndarray  # (G,) KV tokens held or owed (running + queued + in flight)
    num_requests: np.ndarray  # (G,) requests held or owed
    # Per running request, for the future-load projection (may be empty).
    req_rank: np.ndarray = field(default_factory=lambda: _EMPTY)
    req_kv: np.ndarray = field(default_factory=lambda: _EMPTY)
    req_remaining: np.ndarray = field(default_factory=lambda: _EMPTY)
    # (G,) prompt tokens bound to each rank and not prefilled yet (None: unknown).
    # Their prefill is the next barrier step, whose length the longest one sets.
    pending_prefill: np.ndarray | None = None
    # Running requests a rank can hold (None: unknown). With it, a policy that
    # must place a request while every rank is full can tell when a slot frees.
    slot_limit: int | None = None
    # (G,) ranks that may take a request (None: all). A rank that is down has no free
    # slot, and must not be chosen either when every rank is full.
    active: np.ndarray | None = None
    # Requests that outlive this view: the last `cached_requests` of the req_* arrays
    # are the same (and in the same order) in every view that shares this dict, where a
    # policy may keep what it computed from them (bfio: their projection's counts).
    projection_cache: dict | None = None
    cached_requests: int = 0

    def __post_init__(self):
        self.free_slots = np.asarray(self.free_slots, dtype=np.int64)
        self.kv_tokens = np.asarray(self.kv_tokens, dtype=np.int64)
        self.num_requests = np.asarray(self.num_requests, dtype=np.int64)

    @property
    def num_ranks(self) -> int:
        return int(self.free_slots.shape[0])

    @property
    def active_ranks(self) -> np.ndarray:
        """(G,) bool: the ranks that may take a request."""
        return np.ones(self.num_ranks, bool) if self.active is None else np.asarray(self.active, dtype=bool)


class Policy:
    """Base class: subclasses implement `assign`. Registered by `name`."""

    name = "base"
    #: whether `assign` reads lengths: the view's per-request arrays and the candidates'
    #: output_est (callers may skip building and estimating them)
    needs_requests = False
    #: k > 1: the policy takes remaining steps as (k, n) equally likely scenarios
    #: (view.req_remaining) and candidates' lengths as (n, k) (output_est)
    scenarios = 0
    #: a must_place call with n candidates places them as n calls in a row would, each
    #: seeing the ones before it as sent (so a controller may place a burst of
    #: arrivals in one call); False: the caller must place them one call each
    places_arrivals_together = True

    def assign(self, view: ClusterView, cands: Candidates, must_place: bool = False) -> np.ndarray:
        raise NotImplementedError

    def warm(self, view: ClusterView, must_place: bool) -> None:
        """Compute ahead, while the caller is idle, what a later call on a view that
        shares this one's projection_cache will need: all of `warm_stages` at once."""
        for _ in self.warm_stages(view, must_place):
            pass

    def warm_stages(self, view: ClusterView, must_place: bool):
        """`warm` as a generator that yields between its parts, for a caller that
        serves a message between two of them (default: nothing to compute)."""
        yield from ()

    def reset(self) -> None:
        """Forget state kept across calls (round-robin cursor, RNG)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def pick_order(free: np.ndarray, must_place: bool, active: np.ndarray | None = None) -> np.ndarray:
    """Ranks eligible for a placement: those with a free slot; when the caller must
    place and none is free, every active rank (the request queues there)."""
    ok = free > 0
    if must_place and not ok.any():
        ok = np.ones_like(ok) if active is None else np.asarray(active, dtype=bool).copy()
    return ok
