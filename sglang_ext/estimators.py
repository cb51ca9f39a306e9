"""Output-length estimators: how many decode steps a request has left.

A live server does not know output lengths, so the estimator is part of the
balancer. `oracle` and `noisy:<delta>` exist for simulation only (they read the
true length); `cap` uses max_new_tokens; `empirical` learns the residual life
E[O - age | O > age] online from the lengths of finished requests.
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

_REFIT_POOL = None


def _refit_pool():
    """One worker thread for background refits, shared by every estimator."""
    global _REFIT_POOL
    if _REFIT_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _REFIT_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-ext-refit")
    return _REFIT_POOL


class Estimator:
    name = "base"
    #: whether `scenarios` spreads its guesses (else it repeats one point estimate)
    spread = False

    def initial(self, prompt_len: np.ndarray, true_out: np.ndarray | None, cap: np.ndarray | None) -> np.ndarray:
        """Predicted total output length of newly seen requests."""
        raise NotImplementedError

    @property
    def reads_total(self) -> bool:
        """Whether `remaining` and `scenarios` read `predicted_total` now (else a caller
        may skip `initial` for requests already running)."""
        return True

    def remaining(self, generated: np.ndarray, predicted_total: np.ndarray, prompt_len=None) -> np.ndarray:
        """Predicted decode steps left for running requests (at least 1).
        Every method that takes `prompt_len` (optional) reads only the prompt
        lengths of the same requests, known at arrival."""
        return np.maximum(np.asarray(predicted_total) - np.asarray(generated), 1)

    def scenarios(self, generated: np.ndarray, predicted_total: np.ndarray, k: int, prompt_len=None) -> np.ndarray:
        """(k, n) decode steps left in k equally likely scenarios: the residual
        life at quantile levels (i + 0.5) / k. A point estimator repeats its
        one guess; estimators that know their uncertainty spread them."""
        r = self.remaining(generated, predicted_total, prompt_len)
        return np.broadcast_to(r, (int(k), r.shape[0])).copy()

    def steps_left(self, generated: np.ndarray, predicted_total: np.ndarray, k: int = 0,
                   prompt_len=None) -> np.ndarray:
        """`remaining` (n,), or (k, n) `scenarios` when k > 1 and this estimator spreads them."""
        if k > 1 and self.spread:
            return self.scenarios(generated, predicted_total, k, prompt_len)
        return self.remaining(generated, predicted_total, prompt_len)

    def new_lengths(self, predicted_total: np.ndarray, k: int = 0, prompt_len=None) -> np.ndarray:
        """Lengths of requests that have not started: the predicted totals (n,),
        or (n, k) `scenarios` when k > 1 and this estimator spreads them."""
        if k > 1 and self.spread:
            return self.scenarios(np.zeros(len(predicted_total), np.int64), predicted_total, k, prompt_len).T
        return predicted_total

    def observe(self, finished_out_len: np.ndarray, prompt_len=None) -> None:
        """Learn from the true lengths of requests that just finished."""

    def observe_running(self, generated: np.ndarray, prompt_len=None) -> None:
        """The requests running now, by tokens generated so far: each is known
        to be longer than that (a right-censored length)."""

    def fit(self) -> None:
        """Refit now if what was observed calls for it (else the next estimate would)."""

    def fit_stages(self):
        """`fit`, as a generator for a caller that may stop between two of its yields
        (the controller's idle estimate polls for messages there). By default the fit
        itself, in one piece."""
        self.fit()
        yield from ()


class OracleEstimator(Estimator):
    name = "oracle"

    def initial(self, prompt_len, true_out, cap):
        return np.asarray(true_out, dtype=np.int64).copy()


class NoisyEstimator(Estimator):
    """The paper's noisy oracle: o * U[1 - delta, 1 + delta] (at least 1)."""

    spread = True

    def __init__(self, delta: float, seed: int = 0):
        if not 0 <= delta < 1:
            raise ValueError(f"noisy estimator delta must be in [0, 1), got {delta}")
        self.delta = delta
        self.name = f"noisy:{delta:g}"
        self._rng = np.random.default_rng(seed)

    def initial(self, prompt_len, true_out, cap):
        o = np.asarray(true_out, dtype=np.float64)
        noisy = o * self._rng.uniform(1 - self.delta, 1 + self.delta, size=o.shape)
        return np.maximum(np.rint(noisy), 1).astype(np.int64)

    def remaining(self, generated, predicted_total, prompt_len=None):
        """Knowing the noise model, the true length lies in [est/(1+d), est/(1-d)];
        given that the request is still running after g tokens, expect the
        middle of what is left of that interval. (Plain est - g would call every
        request that outlived its estimate 'about to finish'.)"""
        g = np.asarray(generated, dtype=np.float64)
        est = np.asarray(predicted_total, dtype=np.float64)
        lo = np.maximum(est / (1 + self.delta), g)
        hi = np.maximum(est / (1 - self.delta), g + 1)
        return np.maximum(np.rint((lo + hi) / 2 - g), 1).astype(np.int64)

    def scenarios(self, generated, predicted_total, k, prompt_len=None):
        """Quantiles of the true length given the estimate and that it outlived g:
        o = est / u with u uniform, so the length's density is proportional to
        1/o on [lo, hi] and its q-quantile is lo * (hi / lo) ** q."""
        g = np.asarray(generated, dtype=np.float64)
        est = np.asarray(predicted_total, dtype=np.float64)
        lo = np.maximum(est / (1 + self.delta), g + 1)
        hi = np.maximum(est / (1 - self.delta), lo + 1)
        q = (np.arange(int(k)) + 0.5)[:, None] / int(k)
        length = lo * (hi / lo) ** q
        return np.maximum(np.rint(length - g), 1).astype(np.int64)


class CapEstimator(Estimator):
    """Assume every request runs to its max_new_tokens."""

    name = "cap"

    def initial(self, prompt_len, true_out, cap):
        if cap is None:
            raise ValueError("the 'cap' estimator needs max_new_tokens for every request")
        return np.asarray(cap, dtype=np.int64).copy()


class EmpiricalEstimator(Estimator):
    """Residual life from the distribution of output lengths, learned online.

    Finished requests give lengths; requests still running give lower bounds
    (right-censored lengths: O > generated). Lengths alone are biased short,
    since short requests finish first (after a cold start or a burst, most of
    what has finished is short), so once running requests are reported
    (`observe_running`) the survival function is the Kaplan-Meier estimate from
    both. Remaining steps of a request that generated g tokens: the mean of
    O - g given O > g; past the longest length seen, assume it runs as long
    again as it has (a Lindy guess). Before anything finished, `prior` is the
    guess.

    `by_prompt`: one survival function per prompt-length bucket
    (`bins_per_octave` buckets per doubling), since one deployment serves
    several applications whose prompts and answers differ in size together (in
    the Azure 2023 conversation trace, prompts of 700 to 1300 tokens get
    answers of about 400 tokens, the rest about 100). A bucket's hazard at each
    length is shrunk towards the pooled one by `shrink` pseudo-requests, so a
    bucket with little data follows the pooled estimate; only the prompt,
    known at arrival, is read. A fit per bucket costs tens of times a pooled
    one, so with by_prompt it is redone only after the running set moved on
    `refit_every` times (about once per step) or the finished lengths grew by
    an eighth since the fit; the pooled fit follows every change.

    `background`: once the fit is large (`background_min_entries`: answers
    several thousand tokens long), refit in a worker thread and keep answering
    from the last fit until the new one is ready and new data comes in (numpy
    releases the GIL for the fit's array passes). A live controller should not
    stall on a refit (tens of ms for answers tens of thousands of tokens long);
    a smaller fit takes a few ms, where a worker would only contend for the
    cores, and a simulator refits inline, so its runs repeat exactly.
    """

    spread = True
    #: with `background`, fits with fewer entries (buckets x lengths) than this stay
    #: inline: about 10 ms on one core (41 buckets of answers up to 6k tokens)
    background_min_entries = 1 << 18

    def __init__(self, prior: int = 256, window: int = 4096, by_prompt: bool = False,
                 bins_per_octave: int = 4, shrink: float = 4.0, refit_every: int = 8, background: bool = False):
        if prior < 1 or window < 1 or bins_per_octave < 1 or shrink < 0:
            raise ValueError(f"empirical estimator: prior, window and bins_per_octave must be >= 1 and "
                             f"shrink >= 0, got {prior}, {window}, {bins_per_octave} and {shrink}")
        self.prior = prior
        self.window = window
        self.by_prompt = bool(by_prompt)
        self.bins_per_octave = int(bins_per_octave)
        self.shrink = float(shrink)
        self.refit_every = max(1, int(refit_every))
        self._moves = self._new = 0  # since the last fit: running-set changes, finished lengths
        self._fit_seen = 0  # finished lengths the last fit saw
        self.name = "empirical-prompt" if self.by_prompt else "empirical"
        self._seen = np.zeros(0, dtype=np.int64)
        self._seen_bin = np.zeros(0, dtype=np.int64)
        self._sorted = np.zeros(0, dtype=np.int64)
        self._suffix = np.zeros(1, dtype=np.float64)
        self._running = np.zeros(0, dtype=np.int64)
        self._running_bin = np.zeros(0, dtype=np.int64)
        self._km = None  # the fitted survival functions (see _survival)
        self.background = bool(background)
        self._pending = None  # a refit running in the worker thread (background)
        self._bins = np.zeros(0, dtype=np.int64)  # bucket by integer prompt length (_bin_table)

    def prompt_bin(self, prompt_len, n: int) -> np.ndarray:
        """Each request's prompt-length bucket (0 for every request unless
        by_prompt; 0 also where the prompt is not given)."""
        if not self.by_prompt or prompt_len is None:
            return np.zeros(n, dtype=np.int64)
        p = np.asarray(prompt_len)
        if p.dtype.kind in "iu" and p.size and 0 <= p.min() and p.max() < self.bin_table_max:
            # integer prompts (the live case, every estimate): one gather from a table of
            # the same formula, not a log per request
            return self._bin_table(int(p.max()))[p]
        return self._bins_of(np.asarray(p, dtype=np.float64))

    #: integer prompts up to this length read their bucket from a table (8 MB at most)
    bin_table_max = 1 << 20

    def _bins_of(self, p: np.ndarray) -> np.ndarray:
        return 1 + np.floor(self.bins_per_octave * np.log2(np.maximum(p, 1.0))).astype(np.int64)

    def _bin_table(self, longest: int) -> np.ndarray:
        """Buckets of the prompt lengths 0..at least `longest` (grown by doubling)."""
        if self._bins.size <= longest:
            size = 1 << max(12, int(longest).bit_length())
            self._bins = self._bins_of(np.arange(size, dtype=np.float64))
        return self._bins

    def observe(self, finished_out_len, prompt_len=None):
        self._adopt_finished_fit()
        finished = np.asarray(finished_out_len, dtype=np.int64).ravel()
        if finished.size == 0:
            return
        self._seen = np.concatenate([self._seen, finished])[-self.window:]
        self._seen_bin = np.concatenate([self._seen_bin, self.prompt_bin(prompt_len, finished.size)])[-self.window:]
        if not self.by_prompt:  # by prompt, every answer comes from a fit (_survival)
            self._sorted = np.sort(self._seen)
            # suffix[i] = sum of sorted[i:], so the mean above an index is one division
            self._suffix = np.concatenate([np.cumsum(self._sorted[::-1])[::-1], [0.0]]).astype(np.float64)
        self._new += finished.size

    def observe_running(self, generated, prompt_len=None):
        self._adopt_finished_fit()
        running = np.asarray(generated, dtype=np.int64).ravel()
        bins = self.prompt_bin(prompt_len, running.size)
        # Callers report before every decision (one per arrival under immediate
        # binding) while the running set changes once a step: refit only then.
        if not (np.array_equal(running, self._running) and np.array_equal(bins, self._running_bin)):
            # A copy: a caller that grows its array in place (a simulator's `gen += 1`)
            # would otherwise change this one with it, and the next step would look unmoved.
            self._running, self._running_bin = running.copy(), bins
            self._moves += 1

    def _survival(self):
        """The Kaplan-Meier fit (S, tail, bins, key, row_of, residual), or None while no request
        runs (then the finished lengths are the whole sample; with by_prompt,
        None only before anything finished). Row 0 is pooled over every
        request, row 1 + i the bucket bins[i]: S[r, t] = P(O > t) for t < T;
        tail[r, t] = the sum of S[r] over t..T-1 plus the Lindy mass past
        T - 1; key: -S offset by 2 per row, one sorted array for quantiles (None
        until `_quantile_key` builds it);
        row_of[b]: the row of bucket id b (0, pooled, where b has no row);
        residual: the rounded mean residual life per (row, age) (None until
        `_residual_table` builds it)."""
        if not self._fittable():
            return None
        if self._refit_due() and self._pending is None:
            inputs = self._refit_inputs()
            if self._in_worker():
                self._pending = _refit_pool().submit(self._fit, *inputs)
            else:
                self._km = self._fit(*inputs)
        return self._km

    def _fittable(self) -> bool:
        """Whether there is anything to fit: finished lengths, and (pooled) some running."""
        return self._seen.size > 0 and (self._running.size > 0 or self.by_prompt)

    def _refit_inputs(self) -> tuple:
        """Start a refit: what it reads (arrays this class replaces, never writes into, so
        a worker thread may read them), with the counters since the last fit reset."""
        self._moves, self._new, self._fit_seen = 0, 0, self._seen.size
        return self._seen, self._seen_bin, self._running, self._running_bin

    def _in_worker(self) -> bool:
        """Whether a refit goes to the worker thread: with `background`, once the last fit
        (a proxy for the next) has `background_min_entries` entries."""
        return self.background and self._km is not None and self._km[0].size >= self.background_min_entries

    def fit(self) -> None:
        self._survival()

    def fit_stages(self):
        """`fit` in steps: an inline refit yields between its array passes (at G=256 with
        64k requests running, ~2.5 ms in six steps of at most ~0.7 ms), so a caller that
        stops to serve a message waits for one step, not the refit. The same fit as
        `fit`'s; a refit for the worker thread goes there, as in `fit`."""
        if not (self._fittable() and self._refit_due() and self._pending is None) or self._in_worker():
            self.fit()  # (nothing to refit, one in the worker already, or one for the worker)
            return
        self._km = yield from self._fit_steps(*self._refit_inputs())

    def wait(self) -> None:
        """Block until a background refit in progress is done and answer from it."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._km = pending.result()

    def _adopt_finished_fit(self) -> None:
        """Answer from a background refit once it is done. Called as new data comes in
        (observe, observe_running), so every answer between two updates comes from one fit.
        A refit that failed in the worker is redone inline at the next answer, where the
        caller sees the error (the controller then falls back to the least-loaded rank)."""
        if self._pending is not None and self._pending.done():
            try:
                self.wait()
            except Exception:  # noqa: BLE001  (learning from reports must go on)
                logger.exception("sglang-ext: background refit of the %s estimator failed; refitting inline", self.name)
                self._km = None

    def _fit(self, seen, seen_bin, running, running_bin):
        """The fit `_survival` describes, from these lengths (read only: it may run in
        the worker thread)."""
        steps = self._fit_steps(seen, seen_bin, running, running_bin)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _fit_steps(self, seen, seen_bin, running, running_bin):
        """`_fit` as a generator that yields between its array passes and returns the fit."""
        keep = running > 0
        ev, ce = seen, running[keep]
        T = int(max(ev.max(), ce.max() if ce.size else 0)) + 2
        # the buckets present (bucket ids are small: a bincount, not a sort), and
        # the row of each bucket id (0: the pooled row), one gather per request
        present = np.bincount(seen_bin, minlength=1) if self.by_prompt else np.zeros(0, np.int64)
        if self.by_prompt and keep.any():
            run_present = np.bincount(running_bin[keep])
            present = np.pad(present, (0, max(0, run_present.size - present.size)))
            present[:run_present.size] += run_present
        bins = np.flatnonzero(present)
        R = 1 + bins.size
        row_of = np.zeros(int(bins.max()) + 2 if bins.size else 1, dtype=np.int64)
        row_of[bins] = 1 + np.arange(bins.size)
        yield

        def counts(lengths, b):  # integer counts: sums of them are exact in any order
            c = np.zeros((R, T), np.int64)
            c[0] = np.bincount(lengths, minlength=T)[:T]
            if R > 1:
                c[1:] = np.bincount((row_of[b] - 1) * T + lengths, minlength=(R - 1) * T).reshape(R - 1, T)
            return c

        d = counts(ev, seen_bin)
        yield
        # at risk at t: lengths >= t, and running requests already past t
        at_risk = np.cumsum((d + counts(ce, running_bin[keep]))[:, ::-1], axis=1)[:, ::-1] \
            .astype(np.float64)
        d = d.astype(np.float64)
        yield
        hazard = np.divide(d, at_risk, out=np.zeros((R, T)), where=at_risk > 0)
        if R > 1:  # a bucket's hazard, shrunk towards the pooled one (the pooled one past its data)
            denom = at_risk[1:] + self.shrink
            shrunk = d[1:] + self.shrink * hazard[0]
            if self.shrink > 0:  # (every denominator is positive)
                np.divide(shrunk, np.maximum(denom, 1e-300, out=denom), out=hazard[1:])
            else:
                hazard[1:] = np.where(denom > 0, shrunk / np.maximum(denom, 1e-300), hazard[0])
        yield
        # (in place: at long lengths these arrays hold millions of entries)
        S = np.cumprod(np.subtract(1.0, hazard, out=hazard), axis=1, out=hazard)
        yield
        # mass left past T - 1 (the longest requests are still running):
        # expected to run as long again
        tail = np.cumsum(S[:, ::-1], axis=1)[:, ::-1]
        tail += S[:, -1:] * (T - 1)
        key = None  # for quantiles: built on first use (_quantile_key)
        return S, tail, bins, key, row_of, None  # (the residual table: built on use)

    def _quantile_key(self, km) -> np.ndarray:
        """km's key (-S offset by 2 per row, one sorted array), built once per fit and
        only when quantiles are asked for."""
        if km[3] is None:
            km = self._km = km[:3] + ((2.0 * np.arange(km[0].shape[0])[:, None] - km[0]).ravel(),) + km[4:]
        return km[3]

    def _residual_table(self, km) -> np.ndarray:
        """km's mean residual life, rounded, for every (row, age) below T - 1: what
        `remaining` computes per request, computed once per fit (with tens of
        thousands of requests running, one gather per request instead of two
        gathers, a division and a rounding; the same numbers)."""
        if km[5] is None:
            S, tail = km[0], km[1]
            alive = S > 0
            rem = np.divide(tail, S, out=np.zeros(S.shape), where=alive)
            rem = np.where(alive, rem, np.maximum(np.arange(S.shape[1]), 1))
            km = self._km = km[:5] + (np.maximum(np.rint(rem), 1).astype(np.int64),)
        return km[5]

    @property
    def reads_total(self) -> bool:
        return self._seen.size == 0  # with lengths seen, the residual life comes from them alone

    def _refit_due(self) -> bool:
        if self._km is None:
            return True
        if not self.by_prompt:
            return self._moves > 0 or self._new > 0
        return self._moves >= self.refit_every or 8 * self._new > self._fit_seen

    def _rows(self, km, prompt_len, n: int) -> np.ndarray:
        """Row of each request in the fit: its bucket's, else the pooled row."""
        if km[2].size == 0:
            return np.zeros(n, dtype=np.int64)
        row_of = km[4]  # a bucket id past the last fitted one reads its final 0
        return row_of[np.minimum(self.prompt_bin(prompt_len, n), row_of.size - 1)]

    def initial(self, prompt_len, true_out, cap):
        n = np.asarray(prompt_len).shape[0]
        km = self._survival()
        if km is not None:
            guess = km[1][self._rows(km, prompt_len, n), 0]  # E[O] = sum_t P(O > t)
        else:
            guess = np.full(n, float(self._seen.mean()) if self._seen.size else float(self.prior))
        out = np.maximum(np.rint(guess), 1).astype(np.int64)
        if cap is not None:
            out = np.minimum(out, np.asarray(cap, dtype=np.int64))
        return out

    def remaining(self, generated, predicted_total, prompt_len=None):
        g = np.asarray(generated, dtype=np.int64)
        if self._seen.size == 0:
            return np.maximum(np.asarray(predicted_total) - g, np.maximum(g, 1))
        km = self._survival()
        if km is not None:
            S, tail = km[0], km[1]
            r = self._rows(km, prompt_len, g.shape[0])
            T = S.shape[1]
            gi = np.minimum(g, T - 1)
            if km[5] is not None or 4 * g.size >= S.size:  # (the table pays for itself)
                rem = np.take(self._residual_table(km), r * T + gi)
                return np.where(g < T - 1, rem, np.maximum(g, 1))
            alive = S[r, gi]
            rem = np.where((g < T - 1) & (alive > 0),
                           np.divide(tail[r, gi], alive, out=np.zeros(g.shape), where=alive > 0), np.maximum(g, 1))
            return np.maximum(np.rint(rem), 1).astype(np.int64)
        idx = np.searchsorted(self._sorted, g, side="right")
        count = self._sorted.size - idx
        mean_above = np.divide(self._suffix[idx], count, out=np.zeros(g.shape), where=count > 0)
        rem = np.where(count > 0, mean_above - g, np.maximum(g, 1))
        return np.maximum(np.rint(rem), 1).astype(np.int64)

    def scenarios(self, generated, predicted_total, k, prompt_len=None):
        """Quantiles of O - g given O > g (past the longest seen, the Lindy
        guess in every scenario)."""
        g = np.asarray(generated, dtype=np.int64)
        if self._seen.size == 0:
            return super().scenarios(generated, predicted_total, k)
        q = (np.arange(int(k)) + 0.5)[:, None] / int(k)
        km = self._survival()
        if km is not None:
            S, key = km[0], self._quantile_key(km)
            r = self._rows(km, prompt_len, g.shape[0])
            T = S.shape[1]
            gi = np.minimum(g, T - 1)
            # the q-quantile of O given O > g: the first t with S(t) < (1 - q) S(g),
            # found in every request's row at once (-S rises along a row; rows are 2 apart)
            level = (1.0 - q) * S[r, gi]
            t = np.searchsorted(key, 2.0 * r - level, side="right") - r * T
            # a quantile in the mass past the data: reach T - 1 and run as long again
            t = np.where(t < T, t, 2 * (T - 1))
            rem = np.where((g < T - 1) & (S[r, gi] > 0), t - g, np.maximum(g, 1))
            return np.maximum(rem, 1).astype(np.int64)
        idx = np.searchsorted(self._sorted, g, side="right")
        count = self._sorted.size - idx
        pos = np.minimum(idx + (q * count).astype(np.int64), self._sorted.size - 1)
        rem = np.where(count > 0, self._sorted[pos] - g, np.maximum(g, 1))
        return np.maximum(rem, 1).astype(np.int64)


ESTIMATORS = ("oracle", "noisy:<delta>", "cap", "empirical", "empirical-prompt")


def make_estimator(spec: str, seed: int = 0, background: bool = False) -> Estimator:
    """'oracle' | 'noisy:0.5' | 'cap' | 'empirical[:prior]' | 'empirical-prompt[:prior]'.
    `background`: learned estimators refit in a worker thread (see EmpiricalEstimator)."""
    name, _, arg = spec.partition(":")
    if name == "oracle" and not arg:
        return OracleEstimator()
    if name == "noisy":
        if not arg:
            raise ValueError(f"estimator {spec!r}: give a delta, e.g. noisy:0.5")
        try:
            delta = float(arg)
        except ValueError:
            raise ValueError(f"estimator {spec!r}: the delta must be a number in [0, 1), got {arg!r}") from None
        try:
            return NoisyEstimator(delta, seed=seed)
        except ValueError as exc:
            raise ValueError(f"estimator {spec!r}: {exc}") from None
    if name == "cap" and not arg:
        return CapEstimator()
    if name in ("empirical", "empirical-prompt"):
        by_prompt = name == "empirical-prompt"
        if not arg:
            return EmpiricalEstimator(by_prompt=by_prompt, background=background)
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"estimator {spec!r}: the prior must be a whole number of tokens >= 1")
        return EmpiricalEstimator(prior=int(arg), by_prompt=by_prompt, background=background)
    raise ValueError(f"unknown estimator {spec!r}; choose from {', '.join(ESTIMATORS)}")
