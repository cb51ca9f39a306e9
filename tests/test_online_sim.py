import numpy as np
import pytest

from sglang_ext.cost import CostModel, cost_preset
from sglang_ext.estimators import EmpiricalEstimator, Estimator, make_estimator
from sglang_ext.policies import make_policy
from sglang_ext.sim.online import OnlineConfig, capacity_rps, native_rate, simulate_online
from sglang_ext.traces import Trace, load_trace


def small_trace(n=400, seed=0, rate=50.0):
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1 / rate, n))
    return Trace("synthetic", rng.integers(10, 2000, n), rng.integers(1, 200, n), arr - arr[0])


@pytest.mark.parametrize("binding", ["immediate", "pool"])
@pytest.mark.parametrize("policy", ["round_robin", "total_tokens", "jsq", "bfio"])
def test_every_request_finishes_once_and_metrics_are_sane(binding, policy):
    tr = small_trace()
    r = simulate_online(tr, make_policy(policy, horizon=8), OnlineConfig(ranks=4, batch=16, binding=binding))
    assert r.requests_finished == len(tr)
    assert 0 <= r.idle_fraction < 1
    assert r.ttft_ms_p50 > 0 and r.ttft_ms_p99 >= r.ttft_ms_p50
    assert r.tpot_ms > 0 and r.energy_j_per_token > 0
    assert r.throughput_tok_s > 0


def test_pool_never_strands_a_request_past_its_deadline():
    # Saturated: slots are scarce; the deadline forces binding, all finish.
    tr = small_trace(rate=2000.0)
    cfg = OnlineConfig(ranks=2, batch=4, binding="pool", max_pool_wait_s=0.05)
    r = simulate_online(tr, make_policy("bfio", horizon=4), cfg)
    assert r.requests_finished == len(tr)


def test_saturated_pool_bfio_idles_less_than_immediate_total_tokens():
    tr = load_trace(__import__("conftest").TRACES / "azure_conv_2023.csv").head(1500)
    cost = cost_preset("paper-dsv3", 72)
    scale = 1.3 * capacity_rps(tr, cost, 8, 72) / native_rate(tr)
    imm = simulate_online(tr, make_policy("total_tokens"), OnlineConfig(ranks=8, batch=72, rate_scale=scale, cost=cost))
    pool = simulate_online(tr, make_policy("bfio", horizon=20), OnlineConfig(ranks=8, batch=72, rate_scale=scale,
                                                                             cost=cost, binding="pool"))
    assert pool.idle_fraction < imm.idle_fraction


def test_untimed_trace_is_rejected():
    tr = Trace("lengths", np.array([5]), np.array([5]))
    with pytest.raises(ValueError, match="needs a timed trace"):
        simulate_online(tr, make_policy("jsq"), OnlineConfig())


def test_estimators():
    est = make_estimator("noisy:0.5", seed=1)
    o = np.full(1000, 100)
    pred = est.initial(o, o, None)
    assert pred.min() >= 50 and pred.max() <= 150 and abs(pred.mean() - 100) < 5
    emp = EmpiricalEstimator(prior=64)
    assert emp.initial(np.zeros(2), None, None).tolist() == [64, 64]
    emp.observe(np.array([10, 20, 30, 100]))
    # at age 15: finished longer than 15 are 20, 30, 100 -> mean 50 -> 35 left
    assert emp.remaining(np.array([15]), np.array([0])).tolist() == [35]
    # beyond the longest seen: Lindy guess (as long again)
    assert emp.remaining(np.array([200]), np.array([0])).tolist() == [200]
    for bad in ("noisy", "noisy:1.5", "magic"):
        with pytest.raises(ValueError):
            make_estimator(bad)


def test_deep_queue_gain_needs_a_pool_deadline_longer_than_the_queue():
    # Arrivals at twice the capacity: a queue of tens of seconds builds. With a
    # deadline longer than that queue the pool holds it and bfio chooses which
    # request goes where; with a short one nearly every request is bound by the
    # immediate rule after waiting, and the pool's choice is gone.
    tr = load_trace(__import__("conftest").TRACES / "mooncake_conversation.jsonl").head(1000)
    cost = cost_preset("paper-dsv3", 16)
    scale = 2.0 * capacity_rps(tr, cost, 4, 16, 32768) / native_rate(tr)

    def run(policy, wait_s):
        cfg = OnlineConfig(ranks=4, batch=16, rate_scale=scale, cost=cost, binding="pool",
                           max_pool_wait_s=wait_s, max_prompt_len=32768)
        r = simulate_online(tr, make_policy(policy, horizon=20), cfg)
        assert r.requests_finished == len(tr)
        return r

    jsq, held, bypassed = run("jsq", 1e4), run("bfio", 1e4), run("bfio", 1.0)
    assert bypassed.ttft_ms_p50 > 10 * 1e3  # the queue is far deeper than the short deadline
    assert held.idle_fraction < 0.5 * jsq.idle_fraction
    assert held.idle_fraction < 0.5 * bypassed.idle_fraction


def test_idle_splits_into_decode_time_with_and_without_a_waiting_request():
    tr = small_trace(rate=2000.0)  # a queue builds at once, drains at the end
    r = simulate_online(tr, make_policy("bfio", horizon=8),
                        OnlineConfig(ranks=4, batch=16, binding="pool", max_pool_wait_s=100.0))
    e = r.extra
    assert 0 < e["queued_s"] < e["decode_s"]
    # the two parts recombine into the overall idle fraction
    whole = (e["idle_queued"] * e["queued_s"] + e["idle_unqueued"] * (e["decode_s"] - e["queued_s"])) / e["decode_s"]
    assert whole == pytest.approx(r.idle_fraction, rel=1e-9)
    # a trickle never queues: every decode second is unqueued
    calm = simulate_online(small_trace(n=100, rate=0.5), make_policy("total_tokens"),
                           OnlineConfig(ranks=4, batch=16))
    assert calm.extra["queued_s"] == 0 and calm.extra["idle_queued"] is None
    assert calm.extra["idle_unqueued"] == pytest.approx(calm.idle_fraction)


def test_idle_splits_at_the_last_arrival_and_counts_steps_with_fewer_requests_than_ranks():
    tr = small_trace(rate=2000.0)
    r = simulate_online(tr, make_policy("total_tokens"), OnlineConfig(ranks=4, batch=16))
    e = r.extra
    # every replay ends in a drain: decode steps after the last arrival
    assert 0 < e["drain_s"] < e["decode_s"]
    whole = (e["idle_arrivals"] * (e["decode_s"] - e["drain_s"]) + e["idle_drain"] * e["drain_s"]) / e["decode_s"]
    assert whole == pytest.approx(r.idle_fraction, rel=1e-9)
    # the last requests finish alone: some steps run fewer requests than ranks
    assert 0 < e["sparse_s"] <= e["decode_s"] and 0 < e["sparse_idle_share"] <= 1
    # two requests on four ranks: every decode step leaves a rank empty, all idle is forced
    two = Trace("two", np.array([10, 10]), np.array([5, 30]), np.array([0.0, 0.0]))
    r2 = simulate_online(two, make_policy("total_tokens"), OnlineConfig(ranks=4, batch=16))
    assert r2.extra["sparse_s"] == pytest.approx(r2.extra["decode_s"])
    assert r2.extra["sparse_idle_share"] == pytest.approx(1.0)


def test_wait_floor_bounds_every_placement_of_a_step():
    """CostModel.wait_floor never exceeds the least summed wait over all
    placements (brute force on small steps), and is reached where it is tight."""
    import itertools

    cm = CostModel("t", a=1.0, b=0.3, c=0.01)
    rng = np.random.default_rng(1)
    for _ in range(150):
        G, n = int(rng.integers(1, 4)), int(rng.integers(0, 7))
        kv = rng.integers(1, 500, n)
        least = np.inf if n else 0.0
        for place in itertools.product(range(G), repeat=n):
            place = np.array(place, int)
            nrun = np.bincount(place, minlength=G)
            local = np.where(nrun > 0, cm.step_time(nrun, np.bincount(place, weights=kv, minlength=G)), cm.a)
            least = min(least, float((local.max() - local).sum()))
        assert cm.wait_floor(kv, G) <= least + 1e-9
    # one request per rank: the longest sets the step, the bound is exact
    kv = np.array([100, 300, 50])
    assert cm.wait_floor(kv, 3) == pytest.approx(3 * (cm.a + cm.b + cm.c * 300) - (3 * cm.a + 3 * cm.b + cm.c * 450))
    # four equal requests on two ranks: a perfect split exists, nothing is forced
    assert cm.wait_floor(np.array([10, 10, 10, 10]), 2) == pytest.approx(0.0)


@pytest.mark.parametrize("policy,binding", [("total_tokens", "immediate"), ("round_robin", "immediate"),
                                            ("bfio", "pool")])
def test_idle_floor_lies_below_every_runs_idle(policy, binding):
    tr = small_trace(rate=2000.0)
    r = simulate_online(tr, make_policy(policy), OnlineConfig(ranks=4, batch=16, binding=binding,
                                                              max_pool_wait_s=100.0))
    e = r.extra
    assert 0 < e["idle_floor"] <= r.idle_fraction + 1e-12
    assert e["floor_arrivals"] <= e["idle_arrivals"] + 1e-12 and e["floor_drain"] <= e["idle_drain"] + 1e-12
    # two requests on four ranks, each on its own rank: all idle is forced, the floor is the idle
    two = Trace("two", np.array([10, 10]), np.array([5, 30]), np.array([0.0, 0.0]))
    r2 = simulate_online(two, make_policy("total_tokens"), OnlineConfig(ranks=4, batch=16))
    assert r2.extra["idle_floor"] == pytest.approx(r2.idle_fraction, rel=1e-9)


def test_max_new_tokens_cuts_outputs_and_bounds_every_guess():
    """A cap on every request (a server's or its clients' max_new_tokens): outputs
    longer stop there, exactly as if the trace had been clipped, and no request is
    projected past it, whatever the estimator guesses (as the live controller clips)."""
    tr = small_trace()
    capped = simulate_online(tr, make_policy("total_tokens"), OnlineConfig(ranks=4, batch=16, max_new_tokens=50))
    clipped = Trace(tr.name, tr.prompt_len, np.minimum(tr.output_len, 50), tr.arrival_s)
    plain = simulate_online(clipped, make_policy("total_tokens"), OnlineConfig(ranks=4, batch=16))
    for key in ("idle_fraction", "throughput_tok_s", "steps", "requests_finished", "tpot_ms_p99"):
        assert getattr(capped, key) == getattr(plain, key), key

    class Huge(Estimator):  # guesses far past any cap
        def initial(self, prompt_len, true_out, cap):
            return np.full(len(prompt_len), 10 ** 6, np.int64)

        def remaining(self, generated, predicted_total, prompt_len=None):
            return np.full(len(generated), 10 ** 6, np.int64)

    policy = make_policy("bfio", horizon=8)
    longest, assign = [], policy.assign

    def spy(view, cands, must_place):
        longest.append(max(int(np.max(view.req_remaining, initial=0)), int(np.max(cands.output_est))))
        return assign(view, cands, must_place)

    policy.assign = spy
    r = simulate_online(tr, policy, OnlineConfig(ranks=4, batch=16, max_new_tokens=50), Huge())
    assert r.requests_finished == len(tr) and longest and max(longest) <= 50
    # the cap estimator reads the cap
    cap_run = simulate_online(tr, make_policy("bfio", horizon=8), OnlineConfig(ranks=4, batch=16, max_new_tokens=50),
                              make_estimator("cap"))
    assert cap_run.requests_finished == len(tr)
    with pytest.raises(ValueError, match="max_new_tokens"):
        simulate_online(tr, make_policy("bfio", horizon=8), OnlineConfig(ranks=4, batch=16), make_estimator("cap"))


def test_view_lag_shows_the_requests_as_they_were_steps_ago():
    # Rank 0's long prompt finishes (two tokens) just as the third request arrives. With
    # view_lag=1 (the live controller's --balancer-view-lag, before it estimates the
    # newest reports) the placement sees the requests one decode step old, request 0
    # still on rank 0, and the per-rank totals as they are now (read off the reports).
    def run(lag, arrive):
        policy, views = make_policy("bfio", horizon=8), []
        assign = policy.assign

        def spy(view, cands, must_place):
            views.append((view.kv_tokens.tolist(), view.free_slots.tolist(),
                          sorted(zip(view.req_rank.tolist(), view.req_kv.tolist()))))
            return assign(view, cands, must_place=must_place)

        policy.assign = spy
        tr = Trace("lag", np.array([1000, 10, 10]), np.array([2, 50, 5]), np.array([0.0, 0.0, arrive]))
        return simulate_online(tr, policy, OnlineConfig(ranks=2, batch=4, view_lag=lag)), views

    first, _ = run(0, 1e3)
    t = float(first.finish_s[0])  # request 0's last step ends here
    (now, seen_now), (lagged, seen_lag) = run(0, t), run(1, t)
    assert seen_now[2] == ([0, 12], [4, 3], [(1, 12)])  # request 1 after a prefill and a decode step
    assert seen_lag[2] == ([0, 12], [4, 3], [(0, 1001), (1, 11)])  # its requests one step earlier
    assert seen_now[:2] == seen_lag[:2]
    assert now.requests_finished == lagged.requests_finished == 3
    # a lag of 0 is the current state; pool releases lag too when asked, every request served once
    tr = small_trace(rate=400.0)
    pool = [simulate_online(tr, make_policy("bfio", horizon=8), OnlineConfig(ranks=4, batch=16, binding="pool", **kw))
            for kw in ({}, {"view_lag": 0}, {"view_lag": 1})]
    assert np.array_equal(pool[0].finish_s, pool[1].finish_s) and not np.array_equal(pool[1].finish_s, pool[2].finish_s)
    assert pool[2].requests_finished == len(tr)
    with pytest.raises(ValueError, match="view_lag"):
        simulate_online(small_trace(n=5), make_policy("total_tokens"), OnlineConfig(view_lag=-1))


@pytest.mark.parametrize("args, needle", [
    (["--requests", "1", "--load", "0.8"], "--load: the 1 request(s) of azure_code_2023 arrive at one instant"),
    (["--kv-capacity", "10"], "--kv-capacity 10: smaller than the longest prompt of azure_code_2023"),
    (["--policies", "fcfs,,jsq"], "--policies 'fcfs,,jsq': entry 2 is empty"),
    (["--policies", "jsq,bfio,jsq"], "--policies 'jsq,bfio,jsq': 'jsq' is given twice"),
])
def test_inputs_a_run_could_not_finish_on_are_refused_up_front(traces_dir, args, needle):
    # (each once ran into a division by zero, a stalled simulation or a result silently
    # overwritten)
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "sglang_ext.cli", "simulate", "--trace",
                        str(traces_dir / "azure_code_2023.csv"), "--mode", "online", "--ranks", "2", "--batch", "4",
                        "--requests", "40", *args], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"sglang-ext simulate: error: {needle}")


def test_simulate_online_refuses_a_prompt_no_rank_can_hold():
    tr = small_trace(n=20)
    with pytest.raises(ValueError, match=r"--kv-capacity 50: smaller than the longest prompt"):
        simulate_online(tr, make_policy("total_tokens"), OnlineConfig(ranks=2, batch=4, kv_capacity=50))
