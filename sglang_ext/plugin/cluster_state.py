"""What the DP controller knows of its ranks, and the policy's view built from it.

Per-rank state comes from the ranks' per-step `RankReport`s plus what the
controller sent that the rank has not yet acknowledged (in flight), so a burst
of arrivals between two reports is not all sent to the same rank. What the
reports say (every reported request with its remaining-length estimate) is
computed once per batch of reports, while the controller's loop is idle
(between the step's last report and the next message) where it can be, so an
arrival does not wait for it; each placement adds only what is in flight. An
arrival that comes after new reports but before they are estimated is placed
on the previous estimate plus everything sent since (`--balancer-view-lag`,
default one report per rank): with DP attention that is one decode step older,
and estimating the newest first would make it wait (~6 ms at 256 ranks with 64k
requests). The estimate runs in stages and pauses between two when a message
comes from the tokenizer, so an arrival that lands during it waits for one
stage, not the whole. Reports that come while it is paused do not throw its
stages away while it would be at most `--balancer-view-lag` reports behind:
it is finished and adopted that far behind, and the next estimate takes the
newest.

`ClusterState` is the state half of the controller's `BalancedDispatch`
(patches/controller.py), which sets the policy the view is built for.
"""
from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from sglang_ext.estimators import make_estimator
from sglang_ext.plugin.config import BalancerConfig
from sglang_ext.plugin.protocol import RankReport

logger = logging.getLogger(__name__)

#: capacity assumed for a rank that has not reported yet (the paper's B)
DEFAULT_CAPACITY = 72
#: an inactive rank looks this loaded, so a must-place rule never picks it
_INACTIVE_LOAD = np.int64(1) << 50


def _cat(arrays, dtype=np.int64) -> np.ndarray:
    arrays = list(arrays)
    return np.concatenate(arrays, dtype=dtype) if arrays else np.zeros(0, dtype)


def _exact_flags(reps, which: str) -> np.ndarray:
    """The `which` ('run' or 'wait') requests' ignore_eos flags of every report,
    concatenated. The ranks' scheduler sends one bool per request in every report, so
    they are joined as they are; otherwise each report is read as `RankReport.exact`
    reads it (missing or miscounted flags: none forced; other values: cast to bool)."""
    key = f"{which}_exact"
    flags = [getattr(r, key, None) for r in reps]
    counts = [r.count(which) for r in reps]
    try:  # (None has no len; bools only: np.concatenate refuses to cast ints or floats)
        if list(map(len, flags)) == counts:
            joined = np.concatenate(flags, dtype=bool) if flags else np.zeros(0, bool)
            if joined.ndim == 1:
                return joined
    except (TypeError, ValueError):
        pass
    return _cat((r.exact(which) for r in reps), bool)


def remaining_steps(estimator, generated: np.ndarray, cap: np.ndarray, scenarios: int = 0,
                    prompt: np.ndarray | None = None, exact: np.ndarray | None = None) -> np.ndarray:
    """Predicted decode steps left, never beyond the max_new_tokens cap: (n,), or
    (scenarios, n) equally likely ones when asked and the estimator spreads them.
    `prompt`: the requests' prompt lengths (an estimator may condition on them).
    `exact`: requests under ignore_eos, which run exactly to their cap whatever
    the estimator would guess (benchmark clients force lengths this way)."""
    generated = np.asarray(generated, dtype=np.int64)
    cap = np.asarray(cap, dtype=np.int64)
    # (an estimator that answers from what it learned alone needs no initial guess)
    total = estimator.initial(np.zeros_like(cap) if prompt is None else prompt, None, cap) \
        if estimator.reads_total else cap
    rem = estimator.steps_left(generated, total, scenarios, prompt)
    left = np.maximum(cap - generated, 1)
    rem = np.minimum(np.maximum(rem, 1), left)  # (np.clip's own overhead is most of it at one request)
    if exact is not None and np.asarray(exact).any():
        rem = np.where(exact, left, rem)
    return rem


@dataclass
class _Estimating:
    """An estimate in progress: what it started on (the report count, `_behind`, the
    acknowledgements its reports hold, the batches of finished lengths it learns) and
    its stages (`ClusterState._estimate_stages`)."""

    reports: int
    behind: np.ndarray
    acked: np.ndarray
    lengths: int
    stages: object = None


@dataclass
class _Reported:
    """The ranks' last reports, per rank (length G, ranks that have not reported at
    their defaults) and per reported request."""

    free: np.ndarray
    kv: np.ndarray
    num: np.ndarray
    pending: np.ndarray
    slot_limit: int | None
    req_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_kv: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_remaining: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # what the policy computes once from the reported requests (`ClusterView.projection_cache`)
    projection_cache: dict = field(default_factory=dict)
    # the buffers `set_requests` put the request arrays in, by name
    _room: dict = field(default_factory=dict, repr=False)

    #: rows in flight a view puts in front of the reported requests without copying them
    FRONT = 256

    def set_requests(self, **arrays: np.ndarray) -> None:
        """Set req_rank, req_kv or req_remaining, each at the end of a buffer with
        FRONT columns of room in front (`with_in_flight`)."""
        for name, x in arrays.items():
            buf = np.empty(x.shape[:-1] + (self.FRONT + x.shape[-1],), x.dtype)
            buf[..., self.FRONT:] = x
            self._room[name] = buf
            setattr(self, name, buf[..., self.FRONT:])

    def with_in_flight(self, rank: np.ndarray, kv: np.ndarray, remaining: np.ndarray) -> list[np.ndarray]:
        """[rank, kv, remaining] of these requests followed by the reported ones, as
        `np.concatenate` gives them. With at most FRONT of them, written into the room
        in front of the reported ones and returned as views of the buffers: the
        reported ones (64k at G=256) are not copied once per placement. Such views
        hold until the next call."""
        names = ("req_rank", "req_kv", "req_remaining")
        ours = [getattr(self, k) for k in names]
        f = rank.shape[0]
        if f > self.FRONT or any(x.base is None or x.base is not self._room.get(k) for k, x in zip(names, ours)):
            return [np.concatenate([a, x], axis=-1) for a, x in zip((rank, kv, remaining), ours)]
        out = []
        for a, x in zip((rank, kv, remaining), ours):
            buf = x.base
            buf[..., self.FRONT - f:self.FRONT] = a
            out.append(buf[..., self.FRONT - f:])
        return out


class ClusterState:
    """The ranks' newest reports, what was sent to each since, and the estimate of every
    reported request, as the policy's `ClusterView` (`build_view`)."""

    def __init__(self, controller, cfg: BalancerConfig):
        self.ctrl = controller
        self.cfg = cfg
        self.num_ranks = len(controller.workers)
        # A live loop must not stall on a refit: it refits in a worker thread unless told not to.
        self.estimator = make_estimator(cfg.estimator, seed=cfg.seed, background=not cfg.inline_refit)
        self.pool_mode = cfg.binding == "pool"
        # what the view is built for, and where its per-request arrays go (set by the dispatch)
        self.policy = None
        self.device = "cpu"

        G = self.num_ranks
        self.reports: list[RankReport | None] = [None] * G
        # Each rank's newest report in numbers (`_rank_columns`; ranks that have not
        # reported at their defaults), kept as reports come (~1.4 us each), so the per-rank
        # totals an arrival reads are one (G, 6) array, not a pass over every report and
        # every request (`_newest_totals`).
        self._rank_totals: list[tuple[int, ...]] = [(DEFAULT_CAPACITY, 0, 0, 0, 0, 0)] * G
        self.acked = np.zeros(G, dtype=np.int64)  # cumulative requests each rank said it received
        self.sent = np.zeros(G, dtype=np.int64)  # cumulative requests sent to each rank
        # (prompt_len, max_new_tokens, ignore_eos) of requests sent but not yet acknowledged, oldest first
        self.inflight: list[deque[tuple[int, int, bool]]] = [deque() for _ in range(G)]
        # What the reports say, estimates included: built once per batch of reports (when
        # the loop goes idle, else on the next placement) and reused until the next batch.
        # Placements that must happen now may use it while no rank has reported more than
        # cfg.view_lag times since it was built (`_behind`); the in-flight rows then run from
        # the acknowledgements it was built with (`_est_acked`: the deques are cut to those
        # only when an estimate is built, so a request acknowledged by a newer report is
        # still counted until then).
        self._reported: _Reported | None = None
        self._totals: _Reported | None = None  # the newest reports' per-rank totals (`_newest_totals`)
        self._fresh = np.zeros(G, dtype=bool)  # ranks that reported since the last estimate (tried)
        self._behind = np.zeros(G, dtype=np.int64)  # reports per rank since the last estimate (built)
        self._est_acked = np.zeros(G, dtype=np.int64)  # acknowledgements the in-flight deques start after
        self._to_learn: tuple[list, list] = ([], [])  # finished lengths (and prompts) not yet learned
        self._estimate: _Estimating | None = None  # the estimate in progress
        self._mask_of, self._mask = None, None  # the active-rank mask, and the list it was built from
        # counters for the stats line (the dispatch counts its placements here too)
        self.stats = {"dispatched": 0, "pinned": 0, "pool_deadline": 0, "reports": 0, "prepared": 0,
                      "paused": 0, "placements": 0, "lagged": 0}

    # ---- reports in ------------------------------------------------------------------

    def on_reports(self, reports: list[RankReport]) -> None:
        """Take a batch of rank reports: each rank's newest is kept (one from before the
        kept one is stale and dropped), with its totals, acknowledgements and finished
        lengths; what they say is estimated later (`prepare`, or the next placement)."""
        lengths, prompts_of = self._to_learn  # natural finished lengths, taught at the next estimate
        for rep in reports:
            g = rep.dp_rank
            if not 0 <= g < self.num_ranks:
                continue
            prev = self.reports[g]
            if prev is not None and rep.step < prev.step and rep.received <= prev.received:
                continue  # stale
            self.reports[g] = rep
            n_run, n_wait = len(rep.run_kv), len(rep.wait_prompt)
            self._rank_totals[g] = (rep.free_slots, n_run, n_wait, int(rep.run_kv.sum()) if n_run else 0,
                                    int(rep.wait_prompt.sum()) if n_wait else 0, rep.slot_limit)
            self._totals = None
            self._fresh[g] = True
            self._behind[g] += 1
            self.acked[g] = max(self.acked[g], rep.received)
            if rep.finished_lengths.size:
                # Only answers that ended by themselves teach the estimator (a forced,
                # ignore_eos length says nothing of them). A report without prompts, or
                # with a mismatched count, teaches the pooled fit only.
                natural = ~rep.exact("finished")
                prompts = getattr(rep, "finished_prompts", None)
                ok = prompts is not None and np.shape(prompts) == rep.finished_lengths.shape
                if natural.any():
                    lengths.append(rep.finished_lengths[natural])
                    prompts_of.append(np.asarray(prompts)[natural] if ok else None)
            self.stats["reports"] += 1
        if self._behind.max() > self.cfg.view_lag:
            # The last estimate will not be read again before the next (with view_lag 0, at
            # once): what these reports acknowledge can leave the deques now, so they stay
            # short even while every estimate fails; with an estimate in progress, only
            # what its own reports acknowledge (it may yet be adopted).
            self._drop_acknowledged(None if self._estimate is None else self._estimate.acked)

    def _learn_finished(self, estimator, count: int) -> None:
        """Teach `estimator` the first `count` batches of lengths reported finished since
        the last estimate, in one call (a report without prompts, a rare sender, keeps one
        call per report). Taught when the reports are estimated, not as they come: a
        placement on the previous estimate then reads the fit it was made with, and does
        not refit for it."""
        lengths, prompts_of = (x[:count] for x in self._to_learn)
        if not lengths:
            return
        if all(p is not None for p in prompts_of):
            estimator.observe(np.concatenate(lengths), np.concatenate(prompts_of))
        else:
            for x, p in zip(lengths, prompts_of):
                estimator.observe(x, p)

    # ---- the view ---------------------------------------------------------------------

    def _any_active(self) -> bool:
        """Whether any rank is active (asked once per message read: no (G,) mask built)."""
        return any(g < self.num_ranks for g in self.ctrl._active_workers)

    def _active_mask(self) -> np.ndarray:
        """(G,) bool, read-only: the active ranks (rebuilt only when the controller's
        list of them changes; asked twice a placement)."""
        key = tuple(self.ctrl._active_workers)
        if key != self._mask_of:
            mask = np.zeros(self.num_ranks, dtype=bool)
            mask[[g for g in key if g < self.num_ranks]] = True
            mask.flags.writeable = False
            self._mask_of, self._mask = key, mask
        return self._mask

    def _inflight_rows(self, unacked_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Requests sent but not acknowledged when the current estimate was built (or,
        unacked_only, by the newest reports): an (n, 3) array of (prompt_len,
        max_new_tokens, ignore_eos), rank by rank, and each rank's row count."""
        held = np.fromiter(map(len, self.inflight), np.int64, self.num_ranks)
        if not unacked_only:
            return np.array([t for q in self.inflight for t in q], dtype=np.int64).reshape(-1, 3), held
        # (only the ranks still holding some: at G=256 a pass over every deque is most of it)
        counts = np.maximum(held - np.maximum(self.acked - self._est_acked, 0), 0)
        rows = [t for g in np.flatnonzero(counts).tolist() for t in self.unacked(g)]
        return np.array(rows, dtype=np.int64).reshape(-1, 3), counts

    def unacked(self, g: int) -> list[tuple[int, int, bool]]:
        """Rank g's requests not acknowledged by its newest report, oldest first."""
        return list(islice(self.inflight[g], max(int(self.acked[g] - self._est_acked[g]), 0), None))

    def _view_is_current(self, lagged_ok: bool) -> bool:
        """Whether the last estimate may stand for the reports: it does when no report
        came since, or, for a placement that may lag, none more than cfg.view_lag per rank."""
        if self._reported is None:
            return False
        behind = int(self._behind.max())
        return behind == 0 or (lagged_ok and behind <= self.cfg.view_lag)

    def _newest_totals(self) -> "_Reported":
        """The newest reports' per-rank totals (ranks that have not reported at their
        defaults), from the numbers kept as they came: nothing concatenated, nothing
        estimated, so cheap (an arrival placed on the previous estimate reads them);
        kept until the next reports."""
        if self._totals is not None:
            return self._totals
        free, n_run, n_wait, run_kv, pending, limit = self._rank_columns()
        self._totals = _Reported(free=free, num=n_run + n_wait, pending=pending, kv=run_kv + pending,
                                 slot_limit=int(limit.max()) if limit.max() > 0 else None)
        return self._totals

    def _rank_columns(self) -> np.ndarray:
        """The numbers kept of each rank's newest report, one int64 row each: free slots,
        running and waiting requests, the running requests' KV tokens, the waiting ones'
        prompt tokens, and the slot limit (0: unknown)."""
        return np.array(self._rank_totals, np.int64).T.copy()

    def _concatenated(self) -> tuple:
        """The newest reports and their requests, all ranks concatenated, what the estimate
        reads: (reports, run_kv, run_generated, wait_prompt, run_rank, wait_rank)."""
        ranks = [g for g, r in enumerate(self.reports) if r is not None]
        reps = [self.reports[g] for g in ranks]
        at = np.array(ranks, np.int64)
        _, n_run, n_wait, *_ = self._rank_columns()[:, at]
        return (reps, _cat(r.run_kv for r in reps), _cat(r.run_generated for r in reps),
                _cat(r.wait_prompt for r in reps), np.repeat(at, n_run), np.repeat(at, n_wait))

    def _reported_state(self, lagged_ok: bool = False) -> "_Reported":
        """The reports' per-rank totals and every reported request (running, then
        waiting, all ranks concatenated) with its remaining-length estimate. The
        estimator learns only from reports, so between two batches of reports every
        placement would compute the same: once per batch (at G=256 with 64k running
        requests, the estimator's refit and the concatenation cost several ms).
        lagged_ok: the previous batch's, when it is at most cfg.view_lag reports behind."""
        if not self._view_is_current(lagged_ok):
            self._advance_estimate(may_lag=lagged_ok)
            if not self._view_is_current(lagged_ok):  # (it finished one that reports had overtaken)
                self._advance_estimate()
        return self._reported

    def _advance_estimate(self, interrupted=None, may_lag: bool = False) -> bool:
        """Run an estimate to its end: True; or, between two of its stages, stop when
        `interrupted()` says a message waits: False (the loop places it on the previous
        estimate, then goes on from there). The one in progress goes on unless reports
        came since it started; with `may_lag`, it goes on while it would be at most
        cfg.view_lag reports behind once adopted, so a loop too busy to finish an
        estimate within a step does not throw away the stages it ran. Else an estimate
        of the newest reports starts."""
        e = self._estimate
        if e is not None and e.reports != self.stats["reports"]:
            if not (may_lag and int((self._behind - e.behind).max()) <= self.cfg.view_lag):
                e = None
        if e is None:
            e = self._estimate = _Estimating(self.stats["reports"], self._behind.copy(), self.acked.copy(),
                                             len(self._to_learn[0]))
            e.stages = self._estimate_stages(e)
        try:
            for _ in e.stages:
                if interrupted is not None and interrupted():
                    return False
        except BaseException:
            self._estimate = None
            # (as if learned: the lengths a failing estimate holds are dropped)
            self._to_learn = tuple(x[e.lengths:] for x in self._to_learn)
            raise
        self._estimate = None
        return True

    def _estimate_stages(self, e: "_Estimating"):
        """The estimate of the newest reports when `e` started, stage by stage (a
        generator; at G=256 with 64k requests running: the totals, what runs now, the
        reported requests, the estimator's refit in steps (`fit_stages`), every
        request's estimate, the policy's projection of them in its parts (bfio: the
        counts, then the cost); the longest about 1.3 ms). Until the last stage ends, the previous
        estimate stands whole for the placements that may lag: the estimator learns
        on a copy (its arrays are replaced, never written into, so a shallow one),
        adopted with the estimate, and the projection goes into the new estimate's
        own cache. Adopted, it is as far behind as the reports that came since it
        started."""
        self._fresh[:] = False  # (a failure is not retried by `prepare` before the next reports)
        state = self._newest_totals()
        parts = self._concatenated() if self.policy.needs_requests else None
        yield
        est = copy.copy(self.estimator)
        self._learn_finished(est, e.lengths)
        if self.policy.needs_requests:
            estimate = yield from self._observe_requests(est, state, *parts)
            yield
            yield from est.fit_stages()  # (the refit, when one is due, else a no-op)
            yield
            estimate()
            yield
            yield from self._warm(state)
        self.estimator = est
        self._to_learn = tuple(x[e.lengths:] for x in self._to_learn)  # (those taught to est left)
        self._drop_acknowledged(e.acked)  # (built: its reports hold them)
        self._behind -= e.behind
        self._reported = state

    def _warm(self, state: "_Reported"):
        """Let the policy compute what it reads of the estimated requests (bfio: their
        projection's counts, then its cost) into the estimate's cache, ahead of the
        next placement, which then adds only what is in flight (a generator: the
        policy's parts, `warm_stages`). A failure costs that placement the work,
        nothing else: logged, and the estimate stands."""
        view = self._view_with_requests(state, state.free, state.kv, state.num, state.pending, state.slot_limit,
                                        self._active_mask(), [state.req_rank, state.req_kv, state.req_remaining])
        try:
            yield from self.policy.warm_stages(view, must_place=not self.pool_mode)
        except Exception:  # noqa: BLE001
            logger.exception("sglang-ext: the %s policy's projection of the reported requests failed",
                             self.cfg.policy)

    def _drop_acknowledged(self, acked: np.ndarray | None = None) -> None:
        """Cut the in-flight deques to what reports acknowledging `acked` requests per rank
        (default: the newest reports) have not acknowledged."""
        acked = np.maximum(self.acked if acked is None else acked, self._est_acked)
        for g in np.flatnonzero(acked > self._est_acked).tolist():
            q = self.inflight[g]
            for _ in range(min(int(acked[g] - self._est_acked[g]), len(q))):
                q.popleft()
        self._est_acked = acked.copy()

    def _observe_requests(self, est, state: "_Reported", reps, run_kv, run_gen, wait_prompt, run_rank, wait_rank):
        """Teach the estimator `est` what runs now, then put the reported requests in
        `state` (a generator: one stage each); returns the call that estimates every
        reported request, running then waiting, from its fit (the rest of the estimate)."""
        generated = np.concatenate([run_gen, np.zeros_like(wait_prompt)])
        exact = np.concatenate([_exact_flags(reps, "run"), _exact_flags(reps, "wait")])
        prompt = np.concatenate([np.maximum(run_kv - run_gen, 0), wait_prompt])
        # What runs now bounds the lengths from below (right-censored lengths), those
        # under ignore_eos excepted: their lengths are forced.
        natural = ~exact[:run_kv.shape[0]]
        est.observe_running(run_gen[natural], prompt[:run_kv.shape[0]][natural])
        yield
        state.set_requests(req_rank=np.concatenate([run_rank, wait_rank]), req_kv=np.concatenate([run_kv, wait_prompt]))
        cap = np.concatenate([_cat(r.run_cap for r in reps), _cat(r.wait_cap for r in reps)])

        def estimate():
            state.set_requests(req_remaining=remaining_steps(est, generated, cap, self._scenarios, prompt,
                                                             exact).astype(np.int64))
        return estimate

    def build_view(self, lagged_ok: bool = False):
        """The policy's view: what the reports say (`_reported_state`) plus what was
        sent since."""
        from sglang_ext.policies import ClusterView

        G = self.num_ranks
        rep = self._reported_state(lagged_ok)
        inflight, fl_count = self._inflight_rows()
        fl_rank = np.repeat(np.arange(G), fl_count)
        totals, sent, sent_count, sent_rank = rep, inflight, fl_count, fl_rank
        if self._behind.any():
            # The requests' estimate lags; the per-rank totals (slots above all) need none:
            # the newest reports' plus what they have not acknowledged.
            totals = self._newest_totals()
            sent, sent_count = self._inflight_rows(unacked_only=True)
            sent_rank = np.repeat(np.arange(G), sent_count)
        sent_prompt = np.bincount(sent_rank, weights=sent[:, 0], minlength=G).astype(np.int64)
        free = totals.free - sent_count
        kv = totals.kv + sent_prompt
        num = totals.num + sent_count
        pending = totals.pending + sent_prompt  # prompt tokens not prefilled yet
        active = self._active_mask()
        free = np.where(active, np.maximum(free, 0), 0)
        kv = np.where(active, kv, _INACTIVE_LOAD)
        num = np.where(active, num, _INACTIVE_LOAD)
        if not self.policy.needs_requests:
            return ClusterView(free_slots=free, kv_tokens=kv, num_requests=num, pending_prefill=pending,
                               slot_limit=totals.slot_limit, active=active)

        # Requests in flight are estimated as they come (the reported ones were, once).
        fl_rem = remaining_steps(self.estimator, np.zeros(inflight.shape[0], np.int64), inflight[:, 1],
                                 self._scenarios, inflight[:, 0], inflight[:, 2].astype(bool)).astype(np.int64)
        return self._view_with_requests(rep, free, kv, num, pending, totals.slot_limit, active,
                                        rep.with_in_flight(fl_rank, inflight[:, 0], fl_rem))

    def _view_with_requests(self, rep: "_Reported", free, kv, num, pending, slot_limit, active, arrays):
        """A view holding per-request arrays (rank, KV, remaining), shipped to the GPU on
        cuda, whose last ones are `rep`'s reported requests (their projection kept in
        `rep.projection_cache`)."""
        from sglang_ext.policies import ClusterView

        if self.device == "cuda":
            import torch

            arrays = [torch.from_numpy(x).to("cuda", non_blocking=True) for x in arrays]
        return ClusterView(free_slots=free, kv_tokens=kv, num_requests=num,
                           req_rank=arrays[0], req_kv=arrays[1], req_remaining=arrays[2], pending_prefill=pending,
                           slot_limit=slot_limit, active=active,
                           projection_cache=rep.projection_cache, cached_requests=rep.req_rank.shape[0])

    @property
    def _scenarios(self) -> int:
        """Scenarios per request the policy takes, when the estimator can spread them."""
        return int(self.policy.scenarios) if self.estimator.spread else 0

    # ---- requests out, and the estimate ahead of the next placement -------------------

    def _record_sent(self, g: int, row: tuple[int, int, bool]) -> None:
        self.sent[g] += 1
        self.inflight[g].append(row)
        self.stats["dispatched"] += 1

    def prepare_due(self) -> bool:
        """Whether `prepare` has work: new reports, or an estimate it paused."""
        return bool(self._fresh.any()) or self._estimate is not None

    def prepare(self, interrupted=None) -> bool:
        """Estimate what the reports say now, and let the policy compute what it reads of
        them (bfio: their projection), ahead of the next placement (at G=256 with 64k
        requests running: several ms that an arrival would otherwise wait for).
        `interrupted()`, asked between stages: a message waits; stop there, and go on at
        the next call (an arrival meanwhile is placed on the previous estimate, under
        `--balancer-view-lag`). True if it finished a new estimate."""
        if not self.prepare_due():  # (nothing new: `_reported` is current, or was tried)
            return False
        try:
            # (an overtaken estimate goes on only for the placements that may lag: a pool
            # release reads the newest reports, so under pool binding it starts over)
            if not self._advance_estimate(interrupted, may_lag=not self.pool_mode):
                self.stats["paused"] += 1
                return False
        except Exception:  # noqa: BLE001  (the next placement retries it and falls back if it fails)
            logger.exception("sglang-ext: estimating the ranks' reports failed")
            return False
        self.stats["prepared"] += 1
        return True
