"""Output lengths as equally likely scenarios: estimators that know their
uncertainty spread them, and bfio projects the expected cost."""
import numpy as np
import pytest

from sglang_ext.estimators import EmpiricalEstimator, make_estimator
from sglang_ext.policies import Candidates, ClusterView, make_policy
from sglang_ext.sim.paper import PaperConfig, simulate_paper
from sglang_ext.traces import Trace


def test_point_estimators_repeat_their_guess():
    est = make_estimator("oracle")
    assert not est.spread
    s = est.scenarios(np.array([0, 5]), np.array([10, 8]), 4)
    assert s.shape == (4, 2) and (s == est.remaining(np.array([0, 5]), np.array([10, 8]))).all()


def test_noisy_scenarios_span_what_the_noise_allows():
    est = make_estimator("noisy:0.5")
    assert est.spread
    g = np.array([0, 0, 150, 400])
    e = np.array([100, 300, 100, 300])
    s = est.scenarios(g, e, 8)
    assert s.shape == (8, 4) and (s >= 1).all()
    assert (np.diff(s, axis=0) >= 0).all()  # quantile levels rise
    total = s + g
    lo = np.maximum(e / 1.5, g + 1)
    hi = np.maximum(e / 0.5, lo + 1)
    assert (total >= np.floor(lo)).all() and (total <= np.ceil(hi)).all()
    # a request that outlived its interval still has at least one step left
    assert s[:, 2].min() >= 1


def test_empirical_scenarios_are_quantiles_of_the_longer_finished():
    emp = EmpiricalEstimator(prior=64)
    cold = emp.scenarios(np.array([0, 10]), np.array([64, 64]), 3)
    assert (cold == emp.remaining(np.array([0, 10]), np.array([64, 64]))).all()  # nothing seen yet
    seen = np.array([10, 20, 30, 40, 100, 200, 300, 1000])
    emp.observe(seen)
    g = np.array([0, 25, 500, 2000])
    s = emp.scenarios(g, np.zeros(4, np.int64), 4)
    for col, age in enumerate(g):
        above = np.sort(seen[seen > age])
        if above.size == 0:
            assert (s[:, col] == age).all()  # Lindy, as remaining() guesses
            continue
        levels = (np.arange(4) + 0.5) / 4
        want = above[np.minimum((levels * above.size).astype(int), above.size - 1)] - age
        assert s[:, col].tolist() == want.tolist()


def _view(rng, G=4, n=30, k=None):
    rank = rng.integers(0, G, n)
    kv = rng.integers(1, 500, n)
    rem = rng.integers(1, 40, (k, n)) if k else rng.integers(1, 40, n)
    free = np.full(G, 3)
    return ClusterView(free_slots=free, kv_tokens=np.bincount(rank, kv, G).astype(np.int64),
                       num_requests=np.bincount(rank, minlength=G), req_rank=rank, req_kv=kv, req_remaining=rem)


@pytest.mark.parametrize("growth", [True, False])
def test_scenario_projection_is_the_mean_of_point_projections(growth):
    rng = np.random.default_rng(3)
    pol = make_policy("bfio", horizon=12, growth=growth, backend="torch", b=0.5, c=2.0)
    v = _view(rng, k=5)
    got = pol.project(v)
    want = np.mean([pol.project(ClusterView(v.free_slots, v.kv_tokens, v.num_requests, v.req_rank, v.req_kv, row))
                    for row in v.req_remaining], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    c = Candidates(prompt_len=rng.integers(1, 300, 6), output_est=rng.integers(1, 30, (6, 5)))
    got = pol.profiles(c)
    want = np.mean([pol.profiles(Candidates(c.prompt_len, c.output_est[:, s])) for s in range(5)], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_identical_scenarios_place_like_point_estimates():
    rng = np.random.default_rng(5)
    pol = make_policy("bfio", horizon=10, backend="torch")
    for must in (False, True):
        v = _view(rng)
        c = Candidates(prompt_len=rng.integers(1, 400, 20), output_est=rng.integers(1, 30, 20))
        v3 = ClusterView(v.free_slots, v.kv_tokens, v.num_requests, v.req_rank, v.req_kv,
                         np.tile(v.req_remaining, (3, 1)))
        c3 = Candidates(c.prompt_len, np.tile(c.output_est[:, None], (1, 3)))
        n = 20 if not must else 1
        a = pol.assign(v, Candidates(c.prompt_len[:n], c.output_est[:n]), must_place=must)
        b = pol.assign(v3, Candidates(c3.prompt_len[:n], c3.output_est[:n]), must_place=must)
        assert a.tolist() == b.tolist()


def test_paper_mode_with_scenarios_serves_every_request():
    rng = np.random.default_rng(0)
    tr = Trace("t", rng.integers(10, 2000, 600), rng.integers(1, 300, 600))
    pol = make_policy("bfio", horizon=10, scenarios=4, backend="torch")
    r = simulate_paper(tr, pol, PaperConfig(ranks=4, batch=8), make_estimator("noisy:0.5", seed=1))
    assert r.requests_finished == 600
    r2 = simulate_paper(tr, make_policy("bfio", horizon=10, scenarios=4, backend="torch"),
                        PaperConfig(ranks=4, batch=8), make_estimator("empirical"))
    assert r2.requests_finished == 600


def test_scenario_projection_takes_torch_tensors():
    # the plugin hands the policy torch tensors (on the GPU when there is one)
    import torch

    rng = np.random.default_rng(4)
    pol = make_policy("bfio", horizon=8, backend="torch")
    v = _view(rng, k=3)
    vt = ClusterView(v.free_slots, v.kv_tokens, v.num_requests, torch.from_numpy(v.req_rank),
                     torch.from_numpy(v.req_kv), torch.from_numpy(v.req_remaining))
    np.testing.assert_array_equal(pol.project(vt), pol.project(v))


def _censored_sample(n=20000, seed=0):
    """Lengths uniform on 1..400, each seen at a random time: finished if it
    is shorter than that time, else still running at that age."""
    rng = np.random.default_rng(seed)
    length = rng.integers(1, 401, n)
    seen_at = rng.integers(0, 500, n)
    done = length <= seen_at
    return length[done], seen_at[~done]


def test_empirical_corrects_for_requests_still_running():
    finished, running = _censored_sample()
    naive = EmpiricalEstimator(window=len(finished))
    naive.observe(finished)
    km = EmpiricalEstimator(window=len(finished))
    km.observe(finished)
    km.observe_running(running)
    # the finished ones alone are biased short; with the running ones as lower
    # bounds the estimate recovers the true mean (200.5) and residual lives
    assert naive.initial(np.zeros(1), None, None)[0] < 175
    assert abs(km.initial(np.zeros(1), None, None)[0] - 200.5) < 6
    true_rem = np.array([200.5, 150.5, 50.5])  # E[O - g | O > g] for g = 0, 100, 300
    np.testing.assert_allclose(km.remaining(np.array([0, 100, 300]), None), true_rem, atol=6)
    assert (naive.remaining(np.array([0, 100]), None) < true_rem[:2] - 15).all()
    # scenario quantiles of the residual life at age 100: uniform on 1..300
    q = km.scenarios(np.array([100]), None, 4)[:, 0]
    np.testing.assert_allclose(q, [37.5, 112.5, 187.5, 262.5], atol=10)


def test_empirical_without_running_requests_is_the_finished_sample():
    finished, _ = _censored_sample()
    a, b = EmpiricalEstimator(window=len(finished)), EmpiricalEstimator(window=len(finished))
    a.observe(finished)
    b.observe(finished)
    b.observe_running(np.zeros(5, np.int64))  # nothing generated yet: no information
    g = np.array([0, 10, 150, 399, 600])
    np.testing.assert_array_equal(a.remaining(g, None), b.remaining(g, None))
    np.testing.assert_array_equal(a.scenarios(g, None, 8), b.scenarios(g, None, 8))
    assert a.initial(np.zeros(2), None, None).tolist() == b.initial(np.zeros(2), None, None).tolist()


def _two_applications(n=4000, seed=3):
    """Short prompts get short answers (1..100 tokens), long prompts long ones (301..500)."""
    rng = np.random.default_rng(seed)
    long_app = rng.random(n) < 0.5
    prompt = np.where(long_app, rng.integers(900, 1100, n), rng.integers(60, 120, n))
    out = np.where(long_app, rng.integers(301, 501, n), rng.integers(1, 101, n))
    return prompt, out


def test_empirical_by_prompt_learns_each_prompt_bucket():
    prompt, out = _two_applications()
    pooled, by = EmpiricalEstimator(window=len(out)), make_estimator("empirical-prompt")
    by.window = len(out)
    for est in (pooled, by):
        est.observe(out, prompt)
        est.observe_running(np.array([20, 20]), np.array([100, 1000]))
    short, long_ = np.array([100]), np.array([1000])
    # pooled: one guess for every request; by prompt: each application's mean
    assert pooled.initial(short, None, None)[0] == pooled.initial(long_, None, None)[0]
    assert abs(by.initial(short, None, None)[0] - 50.5) < 4 and abs(by.initial(long_, None, None)[0] - 400.5) < 8
    # residual life at age 20: (21 + 100) / 2 - 20 for the short, 400.5 - 20 for the long
    np.testing.assert_allclose(by.remaining(np.array([20, 20]), None, np.array([100, 1000])), [40.5, 380.5], atol=8)
    # quantiles of the residual life stay inside each application's range
    s = by.scenarios(np.array([20, 20]), None, 4, np.array([100, 1000]))
    assert s.shape == (4, 2) and s[:, 0].max() <= 80 and s[:, 1].min() >= 280 - 20
    # a prompt bucket never seen falls back to the pooled estimate
    far = np.array([100000])
    assert by.initial(far, None, None)[0] == pooled.initial(far, None, None)[0]
    assert by.remaining(np.array([20]), None, far)[0] == pooled.remaining(np.array([20]), None, far)[0]


def test_empirical_by_prompt_matches_the_pooled_fit_within_one_bucket():
    finished, running = _censored_sample()
    pooled, by = EmpiricalEstimator(window=len(finished)), EmpiricalEstimator(window=len(finished), by_prompt=True)
    for est in (pooled, by):
        est.observe(finished, np.full(finished.size, 500))
        est.observe_running(running, np.full(running.size, 510))
    g, p = np.array([0, 100, 300, 600]), np.full(4, 505)
    # one bucket holds every request: shrinking its hazard towards the pooled one changes nothing
    np.testing.assert_array_equal(by.remaining(g, None, p), pooled.remaining(g, None, p))
    np.testing.assert_array_equal(by.scenarios(g, None, 8, p), pooled.scenarios(g, None, 8, p))


def test_empirical_by_prompt_shrinks_a_thin_bucket_towards_the_pooled_fit():
    prompt, out = _two_applications()
    est = EmpiricalEstimator(window=len(out) + 2, by_prompt=True, shrink=64)
    est.observe(out, prompt)
    est.observe(np.array([2000, 2000]), np.array([30000, 30000]))  # two very long answers, one bucket
    est.observe_running(np.array([1]), np.array([100]))
    thin = est.initial(np.array([30000]), None, None)[0]
    pooled = EmpiricalEstimator(window=len(out) + 2)
    pooled.observe(np.concatenate([out, [2000, 2000]]))
    pooled.observe_running(np.array([1]))
    # two requests are little evidence: the bucket's guess sits between them and the pooled mean
    assert pooled.initial(np.array([1]), None, None)[0] < thin < 2000


def test_empirical_by_prompt_rows_are_each_requests_fitted_bucket_else_pooled():
    rng = np.random.default_rng(5)
    est = EmpiricalEstimator(by_prompt=True)
    est.observe(rng.integers(1, 400, 300), rng.integers(20, 3000, 300))
    est.observe(rng.integers(1, 400, 20))  # lengths without prompts: bucket 0
    est.observe_running(rng.integers(1, 100, 30), rng.integers(20, 3000, 30))
    km = est._survival()
    bins = km[2]
    p = np.concatenate([rng.integers(1, 10**6, 500), [1, 20, 3000, 10**7]])  # fitted buckets and unseen ones
    b = est.prompt_bin(p, p.size)
    want = np.array([1 + int(np.flatnonzero(bins == x)[0]) if (bins == x).any() else 0 for x in b])
    assert 0 in bins and (want == 0).any() and (want > 0).any()
    assert np.array_equal(est._rows(km, p, p.size), want)
    assert np.array_equal(est._rows(km, None, 4), [1 + int(np.flatnonzero(bins == 0)[0])] * 4)


def test_empirical_by_prompt_quantiles_equal_a_row_by_row_search():
    prompt, out = _two_applications(n=600, seed=5)
    est = EmpiricalEstimator(by_prompt=True, bins_per_octave=4)
    est.observe(out, prompt)
    rng = np.random.default_rng(0)
    g = rng.integers(0, 520, 50)
    p = rng.choice(prompt, 50)
    est.observe_running(g[:10], p[:10])
    s = est.scenarios(g, None, 6, p)
    S, _, bins, _, _, _ = est._survival()
    rows = est._rows(est._survival(), p, 50)
    T = S.shape[1]
    q = (np.arange(6) + 0.5) / 6
    for j in range(50):
        row, age = S[rows[j]], min(g[j], T - 1)
        for i in range(6):
            if g[j] >= T - 1 or row[age] <= 0:
                want = max(g[j], 1)
            else:
                t = int(np.searchsorted(-row, -(1 - q[i]) * row[age], side="right"))
                want = max((t if t < T else 2 * (T - 1)) - g[j], 1)
            assert s[i, j] == want


@pytest.mark.parametrize("spec,needle", [("empirical:abc", "prior"), ("empirical-prompt:0", "prior"),
                                         ("empirical-prompts", "unknown estimator")])
def test_empirical_specs_reject_bad_values(spec, needle):
    with pytest.raises(ValueError, match=needle):
        make_estimator(spec)
    assert make_estimator("empirical-prompt:64").prior == 64 and make_estimator("empirical-prompt").by_prompt


def test_online_replay_with_the_prompt_estimator_serves_every_request():
    from sglang_ext.sim.online import OnlineConfig, simulate_online
    prompt, out = _two_applications(n=300)
    tr = Trace("apps", prompt, out, np.sort(np.random.default_rng(1).uniform(0, 3.0, 300)))
    for k in (0, 4):
        r = simulate_online(tr, make_policy("bfio", horizon=8, scenarios=k), OnlineConfig(ranks=4, batch=16),
                            make_estimator("empirical-prompt"))
        assert r.requests_finished == 300 and 0 <= r.idle_fraction < 1


def test_background_refit_answers_from_the_last_fit_until_the_new_one_is_adopted():
    # A live controller refits in a worker thread: until the new fit is done and new
    # data comes in, answers come from the previous fit; then they equal an inline fit's.
    prompt, out = _two_applications(n=600, seed=3)
    inline, bg = make_estimator("empirical-prompt"), make_estimator("empirical-prompt", background=True)
    bg.background_min_entries = 0  # (a fit this small stays inline by default)
    g, p = np.array([0, 5, 50, 150]), np.array([100, 1000, 100, 1000])
    for est in (inline, bg):
        est.observe(out[:300], prompt[:300])
        est.observe_running(np.array([20, 20]), np.array([100, 1000]))
    before = bg.remaining(g, None, p)  # the first fit is inline in both
    assert np.array_equal(before, inline.remaining(g, None, p))
    for est in (inline, bg):
        est.observe(out[300:] * 3, prompt[300:])  # answers three times longer: a refit is due
    want = inline.remaining(g, None, p)
    assert not np.array_equal(want, before)
    assert np.array_equal(bg.remaining(g, None, p), before)  # the refit runs in the worker
    assert bg._pending is not None
    assert np.array_equal(bg.scenarios(g, None, 4, p), bg.scenarios(g, None, 4, p))  # one fit per update
    bg.wait()
    assert bg._pending is None
    assert np.array_equal(bg.remaining(g, None, p), want)
    assert np.array_equal(bg.scenarios(g, None, 4, p), inline.scenarios(g, None, 4, p))
    # without wait(): adopted as new data comes in, once done
    for est in (inline, bg):
        est.observe(out[:100], prompt[:100])
    bg.remaining(g, None, p)
    bg._pending.result()  # done
    bg.observe_running(np.array([20, 20]), np.array([100, 1000]))
    inline.observe_running(np.array([20, 20]), np.array([100, 1000]))
    assert bg._pending is None
    assert np.array_equal(bg.remaining(g, None, p), inline.remaining(g, None, p))


def test_background_keeps_small_fits_inline():
    prompt, out = _two_applications(n=600, seed=3)
    bg = make_estimator("empirical-prompt", background=True)
    bg.observe(out[:300], prompt[:300])
    bg.observe_running(np.array([20, 20]), np.array([100, 1000]))
    bg.remaining(np.array([5]), None, np.array([100]))
    assert bg._survival()[0].size < bg.background_min_entries
    bg.observe(out[300:] * 3, prompt[300:])
    bg.remaining(np.array([5]), None, np.array([100]))
    assert bg._pending is None and bg._new == 0  # refit at once, in this thread


@pytest.mark.parametrize("name", ["empirical", "empirical-prompt"])
def test_fit_stages_yields_between_the_refits_passes_and_ends_with_fits_fit(name):
    # The controller's idle estimate refits through fit_stages, stopping between two of
    # its yields to serve a message: the fit it ends with must be fit()'s, entry for
    # entry, and a fit for the worker thread must go there unwaited, as with fit().
    prompt, out = _two_applications(n=600, seed=4)
    stepped, whole = make_estimator(name), make_estimator(name)
    g, p = np.array([0, 7, 60, 400]), np.array([100, 1000, 30, 5000])
    for round_ in range(3):
        for est in (stepped, whole):
            est.observe(out[200 * round_:200 * (round_ + 1)] * (round_ + 1), prompt[200 * round_:200 * (round_ + 1)])
            est.observe_running(np.array([20, 300, 5]), np.array([100, 1000, 40]))
        yields = sum(1 for _ in stepped.fit_stages())
        whole.fit()
        assert yields >= 5  # (a refit is due after every update here)
        assert stepped._new == whole._new == 0 and stepped._moves == whole._moves == 0
        for a, b in zip(stepped._km, whole._km):
            assert (a is None and b is None) or np.array_equal(a, b)
        assert np.array_equal(stepped.remaining(g, None, p), whole.remaining(g, None, p))
        assert np.array_equal(stepped.scenarios(g, None, 4, p), whole.scenarios(g, None, 4, p))
    assert sum(1 for _ in stepped.fit_stages()) == 0  # nothing due: nothing to do
    bg = make_estimator(name, background=True)
    bg.observe(out[:300], prompt[:300])
    bg.observe_running(np.array([20, 20]), np.array([100, 1000]))
    assert sum(1 for _ in bg.fit_stages()) >= 5 and bg._pending is None  # small: inline, in steps
    bg.background_min_entries = 0
    bg.observe(out[300:] * 3, prompt[300:])
    assert sum(1 for _ in bg.fit_stages()) == 0 and bg._pending is not None  # large: the worker's
    bg.wait()


def test_a_refit_that_fails_in_the_worker_is_redone_inline(monkeypatch, caplog):
    prompt, out = _two_applications(n=600, seed=3)
    bg = make_estimator("empirical-prompt", background=True)
    bg.background_min_entries = 0
    bg.observe(out[:300], prompt[:300])
    bg.observe_running(np.array([20, 20]), np.array([100, 1000]))
    g, p = np.array([5]), np.array([1000])
    bg.remaining(g, None, p)
    real_fit = bg._fit
    monkeypatch.setattr(bg, "_fit", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    bg.observe(out[300:] * 3, prompt[300:])
    bg.remaining(g, None, p)  # submits the failing refit
    bg._pending.exception()  # (wait for it to fail)
    bg.observe_running(np.array([20, 20]), np.array([100, 1000]))  # learning goes on: no error here
    assert "background refit" in caplog.text and bg._km is None and bg._pending is None
    with pytest.raises(RuntimeError, match="boom"):  # the next answer refits inline and says why it cannot
        bg.remaining(g, None, p)
    monkeypatch.setattr(bg, "_fit", real_fit)
    inline = make_estimator("empirical-prompt")
    inline.observe(out[:300], prompt[:300])
    inline.observe(out[300:] * 3, prompt[300:])
    inline.observe_running(np.array([20, 20]), np.array([100, 1000]))
    assert np.array_equal(bg.remaining(g, None, p), inline.remaining(g, None, p))


@pytest.mark.parametrize("spec", ["empirical", "empirical-prompt"])
def test_learned_estimators_read_no_initial_guess_once_lengths_are_seen(spec):
    # The controller skips `initial` for running requests when `reads_total` is False:
    # the answers must then not depend on it.
    prompt, out = _two_applications(n=400, seed=9)
    est = make_estimator(spec)
    assert est.reads_total  # nothing seen: the prior guess is all there is
    est.observe(out, prompt)
    est.observe_running(np.array([3, 40, 200]), np.array([100, 1000, 1000]))
    assert not est.reads_total
    rng = np.random.default_rng(0)
    g, p = rng.integers(0, 600, 50), rng.choice(prompt, 50)
    for k in (0, 4):
        a = est.steps_left(g, rng.integers(1, 5000, 50), k, p)
        b = est.steps_left(g, rng.integers(1, 5000, 50), k, p)
        assert np.array_equal(a, b)


def test_empirical_residual_table_answers_as_the_per_request_computation():
    # With many requests to estimate, `remaining` reads one table per fit instead of
    # computing each request's residual life: the same numbers, at every age.
    rng = np.random.default_rng(11)
    for by_prompt, shrink in ((False, 4.0), (True, 0.0), (True, 4.0)):
        est = EmpiricalEstimator(by_prompt=by_prompt, shrink=shrink)
        est.observe(rng.integers(1, 600, 400), rng.integers(1, 5000, 400))
        est.observe_running(rng.integers(0, 900, 50), rng.integers(1, 5000, 50))
        S = est._survival()[0]
        T = S.shape[1]
        g = np.concatenate([rng.integers(0, T + 50, 200), [0, 1, T - 3, T - 2, T - 1, T, 10**6]])
        p = rng.integers(0, 10**6, g.size)
        direct = est.remaining(g, None, p)
        assert est._km[5] is None  # (a small batch: computed per request)
        est.remaining(np.zeros(S.size, np.int64), None)  # a large one builds the table
        assert est._km[5] is not None
        assert np.array_equal(est.remaining(g, None, p), direct)
        assert direct[-1] == 10**6 and (direct >= 1).all()  # past the data: as long again


def test_prompt_buckets_read_from_the_table_equal_the_formula():
    est = EmpiricalEstimator(by_prompt=True, bins_per_octave=4)

    def formula(p):
        return 1 + np.floor(4 * np.log2(np.maximum(np.asarray(p, np.float64), 1.0))).astype(np.int64)

    edges = 2 ** np.arange(1, 20)
    ints = np.concatenate([np.arange(5000), edges - 1, edges, edges + 1, [est.bin_table_max - 1]])
    assert np.array_equal(est.prompt_bin(ints, ints.size), formula(ints))
    assert est._bins.size > est.bin_table_max - 1
    for p in (np.array([-5, 3, 100]), np.array([est.bin_table_max, 7]), np.array([2.5, 1000.0, 0.3])):
        assert np.array_equal(est.prompt_bin(p, p.size), formula(p))  # (those take the formula)
    assert np.array_equal(est.prompt_bin(np.zeros(0, np.int64), 0), np.zeros(0, np.int64))


def test_running_lengths_grown_in_place_count_as_a_move():
    # A simulator advances its running requests with `gen += 1` on the array it handed
    # over: the estimator must see that as the running set moving on (and refit its
    # lower bounds), as it does for the fresh arrays of a live controller's reports.
    est = make_estimator("empirical")
    est.observe(np.full(50, 40), np.full(50, 100))
    gen, prompt = np.array([10, 30, 35]), np.array([100, 100, 100])
    est.observe_running(gen, prompt)
    before = est.remaining(gen, None, prompt).copy()
    moves = est._moves
    gen += 20  # the three now outlived every finished answer
    est.observe_running(gen, prompt)
    assert est._moves == moves + 1
    fresh = make_estimator("empirical")
    fresh.observe(np.full(50, 40), np.full(50, 100))
    fresh.observe_running(gen.copy(), prompt)
    assert np.array_equal(est.remaining(gen, None, prompt), fresh.remaining(gen, None, prompt))
    assert not np.array_equal(est.remaining(gen, None, prompt), before)
