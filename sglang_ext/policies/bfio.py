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
  (LPT) on the rank whose envelope grows least. With `search`, a local search
  (replace / swap / move, iterated with random kicks) then improves the
  greedy's pick within a time budget: on rich pools it closes most of the gap
  to the exact optimum (scripts/bench_optimality.py). With `pool_tail` (the
  online default, ONLINE_POOL_TAIL) a lookahead over a request's whole life
  (`tail_horizon` steps, evenly weighted) is added at a small weight: a
  request stays for its whole life, and a rank whose requests leave soon
  looks, 20 steps out, like one whose requests stay. The tail is projected at
  `tail_points` steps past the pool horizon, each standing for the stretch up
  to the next (the kernel takes the steps), so 2000 steps cost 16 rows.
- immediate (one arriving request): only *where* is open, and where matters
  over the request's whole stay, so the lookahead is long (immediate_horizon,
  slowly decaying weights): the rank whose envelope grows least; ties (nothing
  overflows, the common case) go to the rank with the least projected load
  along the request's lifetime. At H=0 that is exactly SGLang's total_tokens
  rule: with nothing to choose from it never drops below the best myopic rule.
  The pool's near weights are added at weight `immediate_near` (default 1):
  under steady traffic arrivals refill a rank whose requests leave, and the
  next steps are certain where the far end is hopeful (docs/benchmarks.md,
  section 4: without them bfio idles more than total_tokens on azure_conv
  while requests arrive).

Unknown output lengths: with `scenarios=k` and an estimator that knows its
uncertainty (noisy, empirical), each request's remaining steps come as k
equally likely scenarios (quantiles of its residual life) and the projection
is the expected cost: a request fades out of it as its chance of still
running falls, instead of vanishing at one guessed step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..argtypes import MAX_HORIZON
from ..triton_kernels import combine_counts, few_counts, project_counts
from . import paper_heuristic
from .matching import NEG as _NEG, match_round
from .base import Candidates, ClusterView, Policy, pick_order
from .rise import EnvelopeRise
from .search import imbalance, improve
from .sums import weighted_cross, weighted_rows, weighted_sum


#: "default": this package's heuristic; "paper": the paper's (policies/paper_heuristic.py)
VARIANTS = ("default", "paper")

#: pool_tail for pool decisions on a server (online simulator, plugin): where
#: requests arrive over time, a rank's load far out is what its placements
#: leave behind (docs/benchmarks.md, "Pool decisions that look past the pool
#: horizon"). With the default tail (2000 steps, evenly weighted) the tail's
#: total weight is 4 against the pool horizon's 14. The class default stays 0,
#: the paper's finite-horizon objective (paper mode, and the exact program in
#: scripts/bench_optimality.py).
ONLINE_POOL_TAIL = 0.002

def step_grid(first: int, last: int, points: int) -> np.ndarray:
    """About `points` distinct steps from `first` to `last` (both included),
    spaced geometrically from first + 1: dense near `first`, sparse far out."""
    return np.unique(np.round(np.geomspace(first + 1, last + 1, points)).astype(np.int64) - 1)


@dataclass(frozen=True)
class _Horizon:
    """Lookahead of one kind of decision: the steps it looks at and their weights.

    Rows are steps 0..H (dense), or, for a long tail, a few steps that each
    stand for the stretch up to the next one (`steps`): the projection kernel
    and the profiles are then computed at those steps only."""

    H: int
    w: np.ndarray  # weight of each row: one step (dense), or the steps a row stands for
    tie_scale: float  # tie-break terms stay below the smallest growth step
    pts: np.ndarray  # rows at which pool scores are evaluated
    wpts: np.ndarray  # float32 weight of each point: the w of the rows it stands for
    steps: np.ndarray | None = None  # the step of each row (None: row h is step h)

    @property
    def axis(self):
        """What the projection and the profiles take: H, or the steps."""
        return self.H if self.steps is None else self.steps

    @classmethod
    def make(cls, H: int, decay: float, now_weight: float, points: int = 16) -> "_Horizon":
        w = decay ** np.arange(H + 1, dtype=np.float64)
        w[0] *= now_weight  # the next step is certain, the rest predicted
        return cls._with_points(H, w, points)

    @classmethod
    def _with_points(cls, H: int, w: np.ndarray, points: int) -> "_Horizon":
        # Scoring every one of H+1 steps for every (candidate, rank) pair is the
        # hot loop; the projection changes slowly in h, so evaluate it on a
        # grid that is dense near h=0 and sparse far out, each point carrying
        # the weight of the steps up to the next one.
        pts = np.arange(H + 1) if H + 1 <= points else step_grid(0, H, points)
        wpts = np.add.reduceat(w, pts)
        return cls(H, w, 1e-3 * float(w[w > 0].min()), pts, wpts.astype(np.float32))

    @classmethod
    def blend(cls, near: "_Horizon", far: "_Horizon", weight: float, points: int = 16,
              far_points: int = 0) -> "_Horizon":
        """near's weights plus `weight` times far's, over the longer horizon.
        far_points > 0: sparse rows, near's scoring points plus about that many
        steps past near's horizon, each carrying the weight of the steps up to
        the next row (a 2000-step tail costs a few rows, not 2000)."""
        H = max(near.H, far.H)
        w = np.zeros(H + 1)
        w[:near.H + 1] += near.w
        w[:far.H + 1] += weight * far.w
        if far_points <= 0 or far.H <= near.H:
            return cls._with_points(H, w, points)
        steps = np.union1d(near.pts if near.steps is None else near.steps[near.pts], step_grid(near.H, H, far_points))
        wrows = np.add.reduceat(w, steps)
        return cls(H, wrows, 1e-3 * float(wrows[wrows > 0].min()), np.arange(steps.size),
                   wrows.astype(np.float32), steps)


class _Envelope:
    """The envelope of rank-major loads LT (G, steps), per step the most loaded rank's
    load, and each rank's room under it: the least, over the steps, of the envelope
    minus its load, less a margin for the rounding of that subtraction. A profile x
    with x[h] <= room at every step adds exactly 0 growth on that rank: (x - E) + L
    rounds to <= 0. Placements only add to rows (profiles are non-negative), so the
    envelope is kept by a max with the raised row, and the room recomputed for that
    row alone unless the envelope rose."""

    def __init__(self, LT: np.ndarray):
        self.E = LT.max(axis=0)
        self._rooms(LT)

    def _rooms(self, LT: np.ndarray) -> None:
        # |E - L| <= 2 spread, so each subtraction (and the margin's own) rounds by at
        # most 2^-52 spread: 8x that keeps room below the exact room (loads only grow,
        # so the spread still bounds them after a placement)
        spread = max(float(np.abs(self.E).max()), -float(LT.min()))
        self.margin = 2.0 ** -49 * spread
        self.room = (self.E - LT).min(axis=1) - self.margin

    def raise_row(self, LT: np.ndarray, g: int) -> None:
        row = LT[g]
        if (row > self.E).any():
            np.maximum(self.E, row, out=self.E)
            self._rooms(LT)
        else:
            self.room[g] = (self.E - row).min() - self.margin


class BFIO(Policy):
    name = "bfio"
    needs_requests = True

    def __init__(self, horizon: int = 20, decay: float = 0.8, now_weight: float = 10.0,
                 immediate_horizon: int = 200, immediate_decay: float = 0.99, immediate_now: float = 1.0,
                 pool_tail: float = 0.0, tail_horizon: int = 2000, tail_decay: float = 1.0, tail_points: int = 16,
                 immediate_near: float = 1.0,
                 growth: bool = True, a: float = 0.0, b: float = 0.0, c: float = 1.0, prefill: float = 0.0,
                 reward: float = 1.0, overflow: float | None = None, parallel: bool = True,
                 sequential_limit: int = 0, round_split: int = 2, round_cap: int = 32, bulk_after: int = 128,
                 prune_after: int = 512, levels: int = 1,
                 search: bool = False, search_kicks: int = 60, search_ms: float = 2.0,
                 scenarios: int = 0, full_wait: bool = False, backend: str = "auto", variant: str = "default"):
        if variant not in VARIANTS:
            raise ValueError(f"bfio variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not (0 <= horizon <= MAX_HORIZON and 0 <= immediate_horizon <= MAX_HORIZON
                and 0 <= tail_horizon <= MAX_HORIZON):
            raise ValueError(f"bfio horizon, immediate_horizon and tail_horizon must be between 0 and {MAX_HORIZON}, "
                             f"got {horizon}, {immediate_horizon} and {tail_horizon}")
        if not 0 < decay <= 1 or not 0 < immediate_decay <= 1 or not 0 < tail_decay <= 1:
            raise ValueError(f"bfio decay, immediate_decay and tail_decay must be in (0, 1], "
                             f"got {decay}, {immediate_decay} and {tail_decay}")
        if tail_points < 0:
            raise ValueError(f"bfio tail_points must be >= 0, got {tail_points}")
        if pool_tail < 0 or immediate_near < 0:
            raise ValueError(f"bfio pool_tail and immediate_near must be >= 0, got {pool_tail} and {immediate_near}")
        negative = [k for k, v in dict(now_weight=now_weight, immediate_now=immediate_now, reward=reward, a=a, b=b,
                                       c=c, prefill=prefill, overflow=overflow or 0.0, search_ms=search_ms,
                                       sequential_limit=sequential_limit, bulk_after=bulk_after,
                                       prune_after=prune_after, search_kicks=search_kicks,
                                       scenarios=scenarios).items() if v < 0]
        if negative:
            raise ValueError(f"bfio {', '.join(negative)} must be >= 0")
        if min(round_split, round_cap, levels) < 1:
            raise ValueError(f"bfio round_split, round_cap and levels must be >= 1, "
                             f"got {round_split}, {round_cap} and {levels}")
        if horizon == 0 and now_weight == 0:
            raise ValueError("bfio now_weight must be > 0 with horizon=0 (the next step is all it scores)")
        self.horizon = int(horizon)
        # variant="paper": the paper's own heuristic (policies/paper_heuristic.py), on
        # its projection (no growth, cost = KV tokens), for comparison
        self.variant = variant
        self.growth = bool(growth) and variant != "paper"
        self.weights = (float(a), float(b), float(c)) if variant != "paper" else (0.0, 0.0, 1.0)
        # Cost of prefilling one prompt token, in the units of c. With the view's
        # pending_prefill, the next step (h=0) carries each rank's prefill: a
        # prefill step lasts as long as the rank with the most prompt tokens to
        # prefill, so a burst of long prompts should be spread, not stacked.
        self.prefill = float(prefill)
        self.backend = backend
        self.reward = reward  # weight of the load a placement moves out of the queue
        self.overflow = overflow  # penalty per unit the envelope rises (default G)
        # parallel: a round takes every rank's best proposal even when it lifts the
        # envelope (scored against the envelope at the round's start); False
        # rescores after every placement (the exact sequential greedy, slower).
        self.parallel = parallel
        # Calls placing more than this many requests at once go in rounds.
        self.sequential_limit = int(sequential_limit)
        # A round places 1/round_split as many requests as there are open ranks,
        # so the lightest ranks can take several in a row, as sequential LPT would.
        self.round_split = max(1, int(round_split))
        self.round_cap = max(1, int(round_cap))  # at most this many placements per round
        # In a call placing more than this many, the rest (the smallest) go in
        # bulk rounds: the next k largest to the k least-loaded open ranks, one
        # sort per round instead of an assignment problem.
        self.bulk_after = max(0, int(bulk_after))
        # A pool round's assignment problem with at least this many candidates (and
        # four per open rank) is first settled without the solver where the scores
        # allow it (`match_at_best`, policies/matching.py), else offers each rank only
        # the candidates it could take in an optimal matching; 0: never.
        self.prune_after = max(0, int(prune_after))
        # Envelope levels tried by pool selection (1: today's envelope only).
        self.levels = max(1, int(levels))
        # Local search after the pool greedy (policies/search.py): `search_kicks`
        # perturb-and-descend rounds, at most `search_ms` of wall time per call
        # (0: no cap, deterministic).
        self.search = bool(search)
        self.search_kicks = max(0, int(search_kicks))
        self.search_ms = float(search_ms)
        # Output lengths as k equally likely scenarios from the estimator
        # (callers read `scenarios`): the projection becomes the expected cost,
        # not the cost under one guess. 0 or 1: point estimates.
        self.scenarios = max(0, int(scenarios))
        # Immediate placement when every rank is full: go where a slot frees
        # first (needs the view's slot_limit); False: least growth over all.
        self.full_wait = bool(full_wait)
        # An arriving request has only *where* to go, and where matters over its
        # whole stay: a long, slowly decaying horizon. horizon=0 stays myopic
        # everywhere (then the rule is exactly total_tokens).
        self._imm = (_Horizon.make(0, 1.0, 1.0) if self.horizon == 0
                     else _Horizon.make(max(self.horizon, int(immediate_horizon)), immediate_decay,
                                        immediate_now))
        near = _Horizon.make(self.horizon, decay, now_weight)
        # The immediate rule adds the pool's near weights at immediate_near
        # (default 1; 0: the long lookahead alone): under steady traffic,
        # arrivals refill a rank whose requests leave, so the long lookahead
        # alone is too hopeful about it; the next steps are certain.
        self.immediate_near = float(immediate_near)
        if self.immediate_near > 0 and self.horizon > 0:
            self._imm = _Horizon.blend(self._imm, near, self.immediate_near)
        # Pool decisions choose *which* requests: the next steps matter most.
        # With pool_tail > 0 a long horizon (tail_horizon steps, weights
        # tail_decay^h) is added at that weight: a request placed now stays for
        # its whole life, and when the traffic thins (or ends) nothing refills a
        # rank whose requests leave. tail_points > 0 evaluates the tail at that
        # many steps past the pool horizon instead of at every step.
        self.pool_tail = float(pool_tail)
        self.tail_horizon, self.tail_decay, self.tail_points = int(tail_horizon), float(tail_decay), int(tail_points)
        self._pool = near
        if self.pool_tail > 0 and self.horizon > 0:
            tail = _Horizon.make(max(self.horizon, self.tail_horizon), self.tail_decay, 1.0)
            self._pool = _Horizon.blend(near, tail, self.pool_tail, far_points=self.tail_points)

    @property
    def places_arrivals_together(self) -> bool:
        # full_wait reads where a slot frees first from the view, once per call
        return not self.full_wait

    def _call_axis(self, must_place: bool):
        """The steps a call projects at (the paper's heuristic: its own horizon)."""
        if self.variant == "paper":
            return self.horizon
        return (self._imm if must_place else self._pool).axis

    def warm_stages(self, view: ClusterView, must_place: bool):
        # the counts, then the cost, of the requests that outlive the view, for the steps
        # the call will use (two parts: at G=256 with 64k requests ~1.3 and ~0.2 ms)
        if view.projection_cache is not None and view.cached_requests and view.req_rank.shape[0]:
            H = self._call_axis(must_place)
            self._counts(view, H)
            if isinstance(view.req_rank, np.ndarray):  # (on a GPU the counts stay there: `_patched_cost`)
                yield
                self._kept_cost(view, H)

    # -- projection -------------------------------------------------------
    def project(self, view: ClusterView, H=None, rank_major: bool = False) -> np.ndarray:
        """(H+1, G) projected cost of what each rank already holds (H: the
        horizon, default the pool's; or the steps to project at, one row each): a
        new array, the caller's to write into. rank_major: its transpose (G, H+1),
        C-contiguous (a rank's row contiguous), the same values."""
        G = view.num_ranks
        H = self.horizon if H is None else H
        _, b, c = self.weights
        if view.req_rank.shape[0] or not view.kv_tokens.any():
            cost = self._patched_cost(view, H, rank_major)
            if cost is None:
                cost = combine_counts(*self._counts(view, H), a=0.0, b=b, c=c).cpu().numpy()
                cost = np.ascontiguousarray(cost.T) if rank_major else cost
            # k equally likely scenarios of remaining steps: the expected cost is the
            # mean of k projections, i.e. one of the requests repeated k times, over k
            if view.req_remaining.ndim == 2:
                cost /= view.req_remaining.shape[0]
            return cost
        # No per-request detail (e.g. a coarse load report): hold today's load flat.
        rows = H + 1 if np.isscalar(H) else len(H)
        flat = np.broadcast_to(b * view.num_requests + c * view.kv_tokens, (rows, G)).astype(np.float64)
        return np.ascontiguousarray(flat.T) if rank_major else flat

    @staticmethod
    def _part(view: ClusterView, part: slice) -> tuple:
        """The view's requests `part` as (rank, kv, remaining), 1-D: each scenario a copy
        of its request (numpy, or torch on a GPU)."""
        rank, kv, rem = view.req_rank[part], view.req_kv[part], view.req_remaining[..., part]
        k = rem.shape[0] if rem.ndim == 2 else 0
        if k:
            tile = (lambda x: np.tile(x, k)) if isinstance(rank, np.ndarray) else (lambda x: x.repeat(k))
            rank, kv, rem = tile(rank), tile(kv), rem.reshape(-1)
        return rank, kv, rem

    def _part_counts(self, view: ClusterView, part: slice, H):
        """The projection's int64 counts (n, S) of the view's requests `part`."""
        return project_counts(*self._part(view, part), view.num_ranks, H, growth=self.growth,
                              backend=self.backend)[:2]

    def _cache_key(self, view: ClusterView, H) -> tuple:
        k = view.req_remaining.shape[0] if view.req_remaining.ndim == 2 else 0
        return H if np.isscalar(H) else tuple(np.asarray(H).tolist()), self.growth, k, self.backend

    def _kept(self, view: ClusterView, H):
        """The counts of the requests that outlive the view (its last `cached_requests`),
        computed once per horizon into its `projection_cache`."""
        key = self._cache_key(view, H)
        kept = view.projection_cache.get(key)
        if kept is None:
            n, m = view.req_rank.shape[0], view.cached_requests
            kept = view.projection_cache[key] = self._part_counts(view, slice(n - m, n), H)
        return kept

    def _kept_cost(self, view: ClusterView, H) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Their cost (before any scenario mean) rank-major, (G, H+1) C-contiguous, and
        their counts as numpy arrays, (H+1, G): kept beside the counts."""
        key = ("cost", self._cache_key(view, H), self.weights[1:])
        kept = view.projection_cache.get(key)
        if kept is None:
            _, b, c = self.weights
            cnt, kvs = (x.cpu().numpy() for x in self._kept(view, H))
            cost = np.ascontiguousarray(combine_counts(cnt, kvs, a=0.0, b=b, c=c).T)
            kept = view.projection_cache[key] = (cost, cnt, kvs)
        return kept

    def _counts(self, view: ClusterView, H):
        """The projection's exact int64 counts (n, S) of the view's requests (each
        scenario a copy of its request). Those the view says outlive it are counted
        once per horizon and kept (`_kept`); each call adds the others': the same sums,
        so the same projection."""
        n, m = view.req_rank.shape[0], view.cached_requests if view.projection_cache is not None else 0
        if not 0 < m <= n:
            return self._part_counts(view, slice(None), H)
        kept = self._kept(view, H)
        if m == n:
            return kept
        cnt, kvs = self._part_counts(view, slice(0, n - m), H)
        return kept[0] + cnt, kept[1] + kvs

    def _patched_cost(self, view: ClusterView, H, rank_major: bool = False) -> np.ndarray | None:
        """The cost `project` computes (rank_major: as (G, H+1)), as the kept cost of the
        requests that outlive the view with only the rows of the ranks the others are
        on recomputed: fewer others than ranks (requests sent since the last reports)
        touch a few of G ranks, so the (H+1, G) sums and their conversion are done
        once per view, not once per call, and the others are counted in numpy
        (`few_counts`). The cost is elementwise in the counts: the same to the last
        bit. None where nothing is kept, there are many others, or the arrays are on
        a GPU."""
        n, m = view.req_rank.shape[0], view.cached_requests if view.projection_cache is not None else 0
        if not (0 < m <= n and n - m < view.num_ranks and isinstance(view.req_rank, np.ndarray)):
            return None
        kept_cost, kc, ks = self._kept_cost(view, H)
        cost = np.array(kept_cost if rank_major else kept_cost.T, order="C")  # (one copy either way)
        if m == n:
            return cost
        ranks, cnt, kvs = few_counts(*self._part(view, slice(0, n - m)), H, growth=self.growth)
        _, b, c = self.weights
        patched = combine_counts(kc[:, ranks] + cnt, ks[:, ranks] + kvs, a=0.0, b=b, c=c)  # (H+1, ranks)
        if rank_major:
            cost[ranks] = patched.T
        else:
            cost[:, ranks] = patched
        return cost

    def profiles(self, cands: Candidates, H=None) -> np.ndarray:
        """(n, H+1) cost each candidate adds at each horizon step (H: the
        horizon, or the steps, one column each)."""
        _, b, c = self.weights
        H = self.horizon if H is None else H
        steps = np.arange(H + 1, dtype=np.float64) if np.isscalar(H) else np.asarray(H, dtype=np.float64)
        h = steps[None, :]
        est = cands.output_est
        if est.ndim == 2:  # (n, k) scenarios: the chance the candidate still runs at h
            alive = (h[:, :, None] < est[:, None, :]).mean(axis=2)
        else:
            alive = h < est[:, None]
        # b + c * (prompt + h), masked: one (n, H+1) float64 array built in
        # place from float operands (the hot part of a large pool call with a
        # long horizon; mixing int64 operands into a float64 result converts
        # element by element, twice as slow). prompt + h is exact in float64.
        prompt = cands.prompt_len.astype(np.float64)[:, None]
        if self.growth:
            cost = prompt + h
        else:
            cost = np.repeat(prompt, steps.size, axis=1)
        cost *= c
        if b != 0.0:
            cost += b
        cost *= alive
        return cost

    # -- placement --------------------------------------------------------
    def assign(self, view, cands, must_place=False):
        n = len(cands)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return out
        if self.variant == "paper":
            L = self.project(view, self._call_axis(must_place))
            return paper_heuristic.assign(L, cands.prompt_len, cands.output_est, view.free_slots, self.horizon,
                                          must_place, view.active)
        hz = self._imm if must_place else self._pool
        # (rows, G); one at a time, each placement reads and updates whole ranks: rank-major
        L = self.project(view, self._call_axis(must_place), rank_major=must_place)
        X = self.profiles(cands, hz.axis)  # (n, rows)
        if self.prefill > 0 and view.pending_prefill is not None:
            now = L[:, 0] if must_place else L[0]  # (a view: every rank's next step)
            now += self.prefill * np.asarray(view.pending_prefill, dtype=np.float64)
            X[:, 0] += self.prefill * cands.prompt_len
        free = view.free_slots.copy()
        if must_place:
            if self.full_wait and n == 1 and not (free > 0).any() and view.slot_limit and view.req_rank.shape[0]:
                # Every rank is full: the request waits for a slot wherever it
                # goes. Send it where one frees first (then least growth).
                active = view.active_ranks
                wait = np.where(active, self._slot_wait(view), np.inf)  # (a rank that is down frees nothing for it)
                free = ((wait == wait.min()) & active).astype(np.int64)
            return self._place_each(hz, L, X, free, out, range(n), view.active, rank_major=True)
        slots = int(np.maximum(free, 0).sum())
        if slots == 0:
            return out
        if n <= slots:
            return self._place_all(hz, L, X, free, out)
        return self._select(hz, L, X, free, out)

    def _place_all(self, hz, L, X, free, out):
        """Every candidate gets a slot: largest first (LPT). In rounds: the next
        k largest candidates (k = open ranks / round_split) matched to distinct
        ranks at least total envelope growth (one assignment problem per
        round); past `bulk_after` placements, the smallest go in bulk rounds.
        With `sequential_limit` > 0 (default 0), a call of at most that many
        candidates places them one at a time instead, each on the rank whose
        envelope grows least."""
        xw = weighted_rows(X, hz.w)  # each candidate's weighted load over the horizon
        order = np.argsort(-xw, kind="stable")
        if order.size <= self.sequential_limit:
            return self._place_each(hz, L, X, free, out, order.tolist())
        pts = hz.pts
        # Per-rank state kept up to date row by row (a round changes at most C
        # ranks of G): the loads rank-major, at the scoring points in float32,
        # weighted totals, and the envelope.
        LT = np.ascontiguousarray(L.T)  # (G, H+1)
        Lp = np.ascontiguousarray(L[pts], dtype=np.float32)  # (points, G)
        wL = weighted_rows(LT, hz.w)  # (G,)
        E = L.max(axis=1)
        k = 0
        while k < order.size:
            live = np.flatnonzero(free > 0)
            if k >= self.bulk_after:
                # Bulk round (LPT's own rule, vectorised): small requests go where
                # the projected load is least, largest with least. Only the
                # weighted totals are read from here on.
                C = order[k:k + max(1, live.size // self.round_split)]
                gs = live[np.argpartition(wL[live], C.size - 1)[:C.size]] if live.size > C.size else live
                gs = gs[np.argsort(wL[gs], kind="stable")][:C.size]
                js = C[:gs.size]
                wL[gs] += xw[js]
            else:
                js, gs = self._lsap_round(hz, order, k, live, X, LT, Lp, wL, E)
                rows = LT[gs] + X[js]
                LT[gs] = rows
                Lp[:, gs] = rows[:, pts].T
                wL[gs] = weighted_rows(rows, hz.w)
                np.maximum(E, rows.max(axis=0), out=E)
            out[js] = gs
            free[gs] -= 1
            k += js.size
        return out

    def _lsap_round(self, hz, order, k, live, X, LT, Lp, wL, E):
        """The next largest candidates matched to distinct open ranks at least
        total envelope growth (ties: least shared load)."""
        pts, w32 = hz.pts, hz.wpts
        C = order[k:k + min(self.round_cap, max(1, live.size // self.round_split))]
        m = max(2 * C.size, 64)
        if live.size > m:
            # The round's candidates go to the least-loaded ranks anyway: offer
            # them those m ranks, not all (keeps each round small at big G).
            live = live[np.argpartition(wL[live], m - 1)[:m]]
        gap = (X[C].T[pts] - E[pts, None]).astype(np.float32)[:, :, None] + Lp[:, live][:, None, :]
        np.maximum(gap, 0.0, out=gap)
        rise = weighted_sum(w32, gap).reshape(C.size, live.size)
        shared = weighted_cross(X[C], LT[live], hz.w)
        cost = rise + shared * (hz.tie_scale / (np.abs(shared).max() + 1.0))
        ci, ri = linear_sum_assignment(cost)
        return C[ci], live[ri]  # distinct ranks: plain indexed updates

    @staticmethod
    def _slot_wait(view: ClusterView) -> np.ndarray:
        """(G,) predicted steps until a full rank can start one more request:
        with q requests beyond its slot limit (queued), the (q+1)-th earliest
        finish among what it holds (queued requests count as held)."""
        G = view.num_ranks
        as_np = lambda x: x if isinstance(x, np.ndarray) else x.cpu().numpy()  # noqa: E731
        rank, rem = as_np(view.req_rank), as_np(view.req_remaining)
        if rem.ndim == 2:
            rem = np.median(rem, axis=0)
        order = np.lexsort((rem, rank))
        held = np.bincount(rank, minlength=G)
        starts = np.concatenate([[0], np.cumsum(held)[:-1]])
        q = np.clip(view.num_requests - int(view.slot_limit), 0, None)
        ok = q < held
        wait = np.full(G, np.inf)
        wait[ok] = rem[order][(starts + q)[ok]]
        return wait

    def _place_each(self, hz, L, X, free, out, order, active=None, rank_major=False):
        """One candidate at a time, in `order`, each where the envelope grows least
        (among the ranks with a free slot; with none, among the `active` ones).
        L: the loads (steps, G), or with rank_major their (G, steps) transpose."""
        # The loads rank-major: the ranks open to a candidate are gathered, scored
        # and the chosen one updated a contiguous row each (a column gather of L
        # costs 3x the scoring at G=256).
        LT = L if rank_major else np.ascontiguousarray(L.T)
        order = list(order)
        if len(order) == 1:
            j = order[0]
            out[j] = self._least_growth(hz, LT, X[j], self._open_ranks(free, active))
            return out
        # Several: the envelope and each rank's room under it are kept as rows change
        # (one pass each per call, not per candidate), the open ranks as slots fill.
        env = _Envelope(LT)
        live = self._open_ranks(free, active)
        for j in order:
            out[j] = g = self._least_growth(hz, LT, X[j], live, env)
            LT[g] += X[j]
            free[g] -= 1
            env.raise_row(LT, g)
            if free[g] == 0:  # (its last slot: the open ranks change)
                live = self._open_ranks(free, active)
        return out

    @staticmethod
    def _open_ranks(free: np.ndarray, active: np.ndarray | None) -> np.ndarray:
        """The ranks a placement may choose: those with a free slot, else the active ones
        (else, with none active, every rank: the caller's problem, not a crash here)."""
        ok = pick_order(free, True, active)
        return np.flatnonzero(ok) if ok.any() else np.arange(free.shape[0])

    def _least_growth(self, hz: "_Horizon", LT: np.ndarray, x: np.ndarray, live: np.ndarray,
                      env: "_Envelope | None" = None) -> int:
        """The rank of `live` where x lifts the envelope least over the horizon; ties to
        the least load shared with x. LT: the (G, steps) loads, rank-major; env: their
        `_Envelope`, if kept."""
        # (live, steps): each weighted sum runs along a rank's contiguous row, in the
        # order a column sum of the (steps, G) loads adds, to the last bit
        whole = live.size == LT.shape[0]
        # Envelope over all ranks: a full rank still sets the barrier.
        lift = x - (LT.max(axis=0) if env is None else env.E)
        if env is None:
            Ll = LT if whole else LT[live]
            shared = weighted_rows(Ll, hz.w * x)
            grow = Ll + lift if whole else np.add(Ll, lift, out=Ll)  # (a gather is ours to overwrite)
            primary = weighted_rows(np.maximum(grow, 0.0, out=grow), hz.w)
        else:
            shared = weighted_rows(LT, hz.w * x)  # (every rank's: cheaper than a gather)
            shared = shared if whole else shared[live]
            # Where x fits in a rank's room at every step it lifts nothing: growth 0,
            # the sum the others get would be 0 there too. The rest are summed.
            primary = np.zeros(live.size)
            tight = env.room[live] < x.max()
            if tight.any():
                grow = LT[live[tight]] + lift
                primary[tight] = weighted_rows(np.maximum(grow, 0.0, out=grow), hz.w)
        key = primary + shared * (hz.tie_scale / (np.abs(shared).max() + 1.0))
        return int(live[np.argmin(key)])

    def _select(self, hz, L, X, free, out):
        """Pool with more candidates than slots: the greedy `_select_at`
        (with levels > 1, the best of several envelope floors), then, with
        `search`, local search from its placement (policies/search.py): the
        greedy places one request at a time against today's envelope and
        never lifts every rank to a common higher level at once; the search's
        replace and swap moves do."""
        if self.levels <= 1:
            out = self._select_at(hz, L.copy(), X, free.copy(), out, None)
        else:
            out = self._select_levels(hz, L, X, free, out)
        if self.search:
            out[:], _ = improve(L, X, free, out, hz.w, kicks=self.search_kicks,
                                budget_s=self.search_ms / 1e3 if self.search_ms > 0 else None)
        return out

    def _select_levels(self, hz, L, X, free, out):
        """The greedy against raised envelope floors too (the current envelope
        plus quantiles of the candidates' sizes); the placement with the
        smallest summed imbalance wins."""
        sizes = X[:, 0]
        best, best_val = None, np.inf
        for q in np.linspace(0.0, 1.0, self.levels):
            floor = L.max(axis=1) + (np.quantile(sizes, q) if q > 0 else 0.0)
            o = self._select_at(hz, L.copy(), X, free.copy(), out.copy(), floor)
            T = L.copy()
            placed = o >= 0
            np.add.at(T.T, o[placed], X[placed])
            val = imbalance(T, hz.w)
            if val < best_val:
                best, best_val = o, val
        out[:] = best
        return out

    def _select_at(self, hz, L, X, free, out, floor):
        """Best (candidate, rank) pairs against the envelope (or `floor`),
        score = w . (reward * x_j - overflow_penalty * rise of the envelope).

        Rounds: one candidate per rank with a free slot, matched greedily by
        score (`_match_round`: policies/matching.py); then the changed ranks
        are rescored (all of them when the envelope rose)."""
        n, G = X.shape[0], L.shape[1]
        w = hz.w
        gain = self.reward * weighted_rows(X, w)
        pen = G if self.overflow is None else self.overflow
        # Scoring runs in float32, h-major, on the horizon's evaluation points:
        # the (points, k, n) temporaries then stay in cache (several times
        # faster than float64 over every step at G=32, H=20). Scores read the
        # loads and the envelope at those points only, so only those rows are
        # kept up to date (with a long horizon, 16 rows instead of 201).
        # The scores are kept rank-major, (G, n): a rescored rank is one
        # contiguous row (a column scatter into (n, G) cost as much as the
        # scoring itself at G=256), and the assignment solver takes the
        # (ranks, candidates) matrix as it would transpose (candidates, ranks).
        pts, w32 = hz.pts, hz.wpts
        Lp = L[pts]  # (points, G) float64
        E = Lp.max(axis=1) if floor is None else np.maximum(Lp.max(axis=1), floor[pts])
        ST = np.full((G, n), _NEG)
        taken = np.zeros(n, bool)
        XT = X.T[pts]  # (points, n) float64: the loads' updates
        XT32 = XT.astype(np.float32)  # the scores' operand
        # (candidate minus envelope, summed over the terms that can be non-zero, as densely)
        rise_of = EnvelopeRise(XT32, w32, E.astype(np.float32))
        stale = np.flatnonzero(free > 0)
        while True:
            live = np.flatnonzero(free > 0)
            if live.size == 0 or taken.all():
                break
            if stale.size:
                rise = rise_of(Lp[:, stale].astype(np.float32))  # (k, n)
                ST[stale] = gain - pen * rise  # taken candidates have gain _NEG
            js, gs = self._match_round(ST[live], live, Lp[:, live].sum(axis=0))
            if js.size == 0:
                break
            out[js] = gs
            taken[js] = True
            gain[js] = _NEG  # (a rescored row scores the taken candidates below _NEG / 2)
            Lp[:, gs] += XT[:, js]
            free[gs] -= 1
            newE = np.maximum(E, Lp[:, gs].max(axis=1))
            if (newE > E).any():  # the envelope rose: every rank's deficit changed
                E = newE
                rise_of.set_envelope(E.astype(np.float32))
                stale = np.flatnonzero(free > 0)
            else:
                stale = gs[free[gs] > 0]
                # The taken candidates leave the rows of the open ranks not rescored,
                # the only ones read again: none after a parallel round, where every
                # open rank took one (there are more candidates than slots), all but
                # one with one pair a round. (Whole columns cost ~8% of a pool call
                # at G=256, B=72.)
                kept = free > 0
                kept[stale] = False
                ST[np.ix_(np.flatnonzero(kept), js)] = _NEG
        return out

    def _match_round(self, ST: np.ndarray, live: np.ndarray, loads: np.ndarray | None = None):
        """Match ranks (rows of ST, the open ranks `live`, with their `loads`
        for ties) to candidates (columns), at most one each, for the best
        total score. Without `parallel`: only the single best pair (the exact
        sequential greedy, one rescoring per placement). Returns (candidates,
        ranks)."""
        if not self.parallel:
            flat = int(np.argmax(ST.T))  # (ties: the first candidate, then the first rank)
            j, r = divmod(flat, ST.shape[0])
            if ST[r, j] <= _NEG / 2:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            return np.array([j], np.int64), live[[r]].astype(np.int64)
        return match_round(ST, live, loads, self.prune_after)
