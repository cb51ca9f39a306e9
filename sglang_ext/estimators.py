"""Output-length estimators: how many decode steps a request has left.

A live server does not know output lengths, so the estimator is part of the
balancer. `oracle` and `noisy:<delta>` exist for simulation only (they read the
true length); `cap` uses max_new_tokens; `empirical` learns the residual life
E[O - age | O > age] online from the lengths of finished requests.
"""
from __future__ import annotations

import numpy as np


class Estimator:
    name = "base"
    #: whether predictions read the true output length (simulation only)
    needs_truth = False
    #: whether `scenarios` spreads its guesses (else it repeats one point estimate)
    spread = False

    def initial(self, prompt_len: np.ndarray, true_out: np.ndarray | None, cap: np.ndarray | None) -> np.ndarray:
        """Predicted total output length of newly seen requests."""
        raise NotImplementedError

    def remaining(self, generated: np.ndarray, predicted_total: np.ndarray) -> np.ndarray:
        """Predicted decode steps left for running requests (at least 1)."""
        return np.maximum(np.asarray(predicted_total) - np.asarray(generated), 1)

    def scenarios(self, generated: np.ndarray, predicted_total: np.ndarray, k: int) -> np.ndarray:
        """(k, n) decode steps left in k equally likely scenarios: the residual
        life at quantile levels (i + 0.5) / k. A point estimator repeats its
        one guess; estimators that know their uncertainty spread them."""
        r = self.remaining(generated, predicted_total)
        return np.broadcast_to(r, (int(k), r.shape[0])).copy()

    def steps_left(self, generated: np.ndarray, predicted_total: np.ndarray, k: int = 0) -> np.ndarray:
        """`remaining` (n,), or (k, n) `scenarios` when k > 1 and this estimator spreads them."""
        if k > 1 and self.spread:
            return self.scenarios(generated, predicted_total, k)
        return self.remaining(generated, predicted_total)

    def new_lengths(self, predicted_total: np.ndarray, k: int = 0) -> np.ndarray:
        """Lengths of requests that have not started: the predicted totals (n,),
        or (n, k) `scenarios` when k > 1 and this estimator spreads them."""
        if k > 1 and self.spread:
            return self.scenarios(np.zeros(len(predicted_total), np.int64), predicted_total, k).T
        return predicted_total

    def observe(self, finished_out_len: np.ndarray) -> None:
        """Learn from the true lengths of requests that just finished."""

    def observe_running(self, generated: np.ndarray) -> None:
        """The requests running now, by tokens generated so far: each is known
        to be longer than that (a right-censored length)."""


class OracleEstimator(Estimator):
    name = "oracle"
    needs_truth = True

    def initial(self, prompt_len, true_out, cap):
        return np.asarray(true_out, dtype=np.int64).copy()


class NoisyEstimator(Estimator):
    """The paper's noisy oracle: o * U[1 - delta, 1 + delta] (at least 1)."""

    needs_truth = True
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

    def remaining(self, generated, predicted_total):
        """Knowing the noise model, the true length lies in [est/(1+d), est/(1-d)];
        given that the request is still running after g tokens, expect the
        middle of what is left of that interval. (Plain est - g would call every
        request that outlived its estimate 'about to finish'.)"""
        g = np.asarray(generated, dtype=np.float64)
        est = np.asarray(predicted_total, dtype=np.float64)
        lo = np.maximum(est / (1 + self.delta), g)
        hi = np.maximum(est / (1 - self.delta), g + 1)
        return np.maximum(np.rint((lo + hi) / 2 - g), 1).astype(np.int64)

    def scenarios(self, generated, predicted_total, k):
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
    """

    name = "empirical"
    spread = True

    def __init__(self, prior: int = 256, window: int = 4096):
        self.prior = prior
        self.window = window
        self._seen = np.zeros(0, dtype=np.int64)
        self._sorted = np.zeros(0, dtype=np.int64)
        self._suffix = np.zeros(1, dtype=np.float64)
        self._running = np.zeros(0, dtype=np.int64)
        self._km = None  # (S, tail_sum) once fitted with censored lengths

    def observe(self, finished_out_len):
        finished = np.asarray(finished_out_len, dtype=np.int64)
        if finished.size == 0:
            return
        self._seen = np.concatenate([self._seen, finished])[-self.window:]
        self._sorted = np.sort(self._seen)
        # suffix[i] = sum of sorted[i:], so the mean above an index is one division
        self._suffix = np.concatenate([np.cumsum(self._sorted[::-1])[::-1], [0.0]]).astype(np.float64)
        self._km = None

    def observe_running(self, generated):
        running = np.asarray(generated, dtype=np.int64).ravel()
        # Callers report before every decision (one per arrival under immediate
        # binding) while the running set changes once a step: refit only then.
        if not np.array_equal(running, self._running):
            self._running = running
            self._km = None

    def _survival(self):
        """Kaplan-Meier (S, tail): S[t] = P(O > t) for t < T, and tail[t] =
        sum of S over t..T-1 plus the Lindy mass past T - 1; None while no
        request runs (then the finished lengths are the whole sample)."""
        if self._running.size == 0 or self._sorted.size == 0:
            return None
        if self._km is None:
            ev, ce = self._seen, self._running[self._running > 0]
            T = int(max(ev.max(), ce.max() if ce.size else 0)) + 2
            d = np.bincount(ev, minlength=T)[:T]
            # at risk at t: lengths >= t, and running requests already past t
            at_risk = np.cumsum(d[::-1])[::-1] + np.cumsum(np.bincount(ce, minlength=T)[:T][::-1])[::-1]
            hazard = np.divide(d, at_risk, out=np.zeros(T), where=at_risk > 0)
            S = np.cumprod(1.0 - hazard)
            # mass left past T - 1 (the longest requests are still running):
            # expected to run as long again
            tail = np.cumsum(S[::-1])[::-1] + S[-1] * (T - 1)
            self._km = (S, tail)
        return self._km

    def initial(self, prompt_len, true_out, cap):
        n = np.asarray(prompt_len).shape[0]
        km = self._survival()
        if km is not None:
            guess = float(km[1][0])  # E[O] = sum_t P(O > t)
        else:
            guess = float(self._sorted.mean()) if self._sorted.size else float(self.prior)
        out = np.full(n, max(int(round(guess)), 1), dtype=np.int64)
        if cap is not None:
            out = np.minimum(out, np.asarray(cap, dtype=np.int64))
        return out

    def remaining(self, generated, predicted_total):
        g = np.asarray(generated, dtype=np.int64)
        if self._sorted.size == 0:
            return np.maximum(np.asarray(predicted_total) - g, np.maximum(g, 1))
        km = self._survival()
        if km is not None:
            S, tail = km
            gi = np.minimum(g, S.size - 1)
            alive = S[gi]
            rem = np.where((g < S.size - 1) & (alive > 0),
                           np.divide(tail[gi], alive, out=np.zeros(g.shape), where=alive > 0), np.maximum(g, 1))
            return np.maximum(np.rint(rem), 1).astype(np.int64)
        idx = np.searchsorted(self._sorted, g, side="right")
        count = self._sorted.size - idx
        mean_above = np.divide(self._suffix[idx], count, out=np.zeros(g.shape), where=count > 0)
        rem = np.where(count > 0, mean_above - g, np.maximum(g, 1))
        return np.maximum(np.rint(rem), 1).astype(np.int64)

    def scenarios(self, generated, predicted_total, k):
        """Quantiles of O - g given O > g (past the longest seen, the Lindy
        guess in every scenario)."""
        g = np.asarray(generated, dtype=np.int64)
        if self._sorted.size == 0:
            return super().scenarios(generated, predicted_total, k)
        q = (np.arange(int(k)) + 0.5)[:, None] / int(k)
        km = self._survival()
        if km is not None:
            S = km[0]
            gi = np.minimum(g, S.size - 1)
            # the q-quantile of O given O > g: the first t with S(t) < (1 - q) S(g)
            level = (1.0 - q) * S[gi]
            t = np.searchsorted(-S, -level, side="right")  # S is non-increasing
            # a quantile in the mass past the data: reach T - 1 and run as long again
            t = np.where(t < S.size, t, 2 * (S.size - 1))
            rem = np.where((g < S.size - 1) & (S[gi] > 0), t - g, np.maximum(g, 1))
            return np.maximum(rem, 1).astype(np.int64)
        idx = np.searchsorted(self._sorted, g, side="right")
        count = self._sorted.size - idx
        pos = np.minimum(idx + (q * count).astype(np.int64), self._sorted.size - 1)
        rem = np.where(count > 0, self._sorted[pos] - g, np.maximum(g, 1))
        return np.maximum(rem, 1).astype(np.int64)


ESTIMATORS = ("oracle", "noisy:<delta>", "cap", "empirical")


def make_estimator(spec: str, seed: int = 0) -> Estimator:
    """'oracle' | 'noisy:0.5' | 'cap' | 'empirical'."""
    name, _, arg = spec.partition(":")
    if name == "oracle" and not arg:
        return OracleEstimator()
    if name == "noisy":
        try:
            return NoisyEstimator(float(arg), seed=seed)
        except ValueError as exc:
            raise ValueError(f"--estimator {spec!r}: {exc}" if arg else
                             f"--estimator {spec!r}: give a delta, e.g. noisy:0.5") from None
    if name == "cap" and not arg:
        return CapEstimator()
    if name == "empirical":
        return EmpiricalEstimator(prior=int(arg)) if arg else EmpiricalEstimator()
    raise ValueError(f"unknown estimator {spec!r}; choose from {', '.join(ESTIMATORS)}")
