"""Local search over pool placements (sglang_ext.policies.search): every move's
vectorised value equals a recomputation, the search never worsens or breaks a
placement, and on small pools it reaches the brute-force optimum the greedy
misses."""
import numpy as np
import pytest

from sglang_ext.optimal import brute_force, feasible, objective
from sglang_ext.policies import Candidates, ClusterView, make_policy
from sglang_ext.policies.search import _State, imbalance, improve


def _instance(rng, G, H1, n, max_free=3):
    L = rng.integers(0, 60, (H1, G)).astype(float)
    X = rng.integers(1, 30, (n, H1)).astype(float)
    X[rng.random((n, H1)) < 0.2] = 0.0
    free = rng.integers(0, max_free + 1, G)
    free[0] = max(free[0], 1)
    return L, X, free


def _fill(rng, n, free, spare=0):
    """A random feasible placement using all but `spare` of the slots."""
    slots = np.repeat(np.arange(free.size), free)
    rng.shuffle(slots)
    a = np.full(n, -1, np.int64)
    m = min(n, slots.size - spare)
    a[rng.permutation(n)[:m]] = slots[:m]
    return a


@pytest.mark.parametrize("seed", range(6))
def test_move_values_match_recomputation(seed):
    rng = np.random.default_rng(seed)
    G, H1, n = int(rng.integers(2, 6)), int(rng.integers(1, 7)), 14
    L, X, free = _instance(rng, G, H1, n)
    w = rng.random(H1) + 0.1
    st = _State(L, X, free, _fill(rng, n, free, spare=1), w)
    groups = st.candidates()
    assert [g.kind for g in groups] == ["replace", "swap", "move"], "a placement with waiting requests and open " \
        "slots has moves of every kind"
    for g in groups:
        q = g.q()
        assert q.shape == g.f.shape
        pairs = [g.where(i) for i in range(g.f.size)]
        assert len(set(pairs)) == len(pairs)  # (each move once)
        for i, (j, o) in enumerate(pairs):
            trial = _State(L, X, free, st.a, w)
            trial.apply(g.kind, j, o)
            if g.kind == "replace":  # (a placed request gives its slot to a waiting one)
                assert st.a[j] >= 0 > st.a[o]
            elif g.kind == "swap":  # (two placed ones on different ranks)
                assert st.a[j] >= 0 and st.a[o] >= 0 and st.a[j] != st.a[o]
            else:  # (a placed one to another rank with a slot open)
                assert st.a[j] >= 0 and st.left[o] > 0 and o != st.a[j]
            assert g.f[i] == pytest.approx(imbalance(trial.T, w), rel=1e-9, abs=1e-6)
            assert q[i] == pytest.approx(trial.value()[1], rel=1e-9, abs=1e-6)
            assert np.allclose(trial.T, _State(L, X, free, trial.a, w).T)


@pytest.mark.parametrize("seed", range(10))
def test_never_worse_and_keeps_the_count(seed):
    rng = np.random.default_rng(50 + seed)
    G, H1, n = 4, 6, 20
    L, X, free = _instance(rng, G, H1, n)
    a = _fill(rng, n, free)
    b, v = improve(L, X, free, a, kicks=5, seed=seed)
    assert feasible(b, free)
    assert (b >= 0).sum() == (a >= 0).sum()
    assert v == pytest.approx(objective(L, X, b))
    assert v <= objective(L, X, a) + 1e-9


def test_reaches_the_optimum_the_greedy_misses():
    hits = 0
    misses_by_greedy = 0
    for seed in range(12):
        rng = np.random.default_rng(200 + seed)
        L, X, free = _instance(rng, 3, 4, 7, max_free=2)
        _, opt = brute_force(L, X, free)
        a = _fill(rng, 7, free)
        greedy_v = objective(L, X, a)
        misses_by_greedy += greedy_v > opt + 1e-6
        _, v = improve(L, X, free, a, kicks=30, seed=0)
        assert v >= opt - 1e-6
        hits += v <= opt + 1e-6
    assert misses_by_greedy >= 6  # random starts are rarely optimal...
    assert hits >= 11  # ...the search almost always is


def test_budget_caps_the_time():
    rng = np.random.default_rng(3)
    L, X, free = _instance(rng, 8, 10, 200, max_free=10)
    import time
    t = time.perf_counter()
    b, _ = improve(L, X, free, _fill(rng, 200, free), kicks=10_000, budget_s=0.05)
    assert time.perf_counter() - t < 2.0  # one descent step may overrun; 10k kicks would take minutes
    assert feasible(b, free)


def test_bfio_search_option_improves_its_own_objective():
    rng = np.random.default_rng(7)
    G, H = 4, 6
    k = rng.integers(0, 5, G)
    req_rank = np.repeat(np.arange(G), k)
    view = ClusterView(free_slots=6 - k, kv_tokens=np.zeros(G), num_requests=k, req_rank=req_rank,
                       req_kv=rng.integers(50, 900, req_rank.size), req_remaining=rng.integers(1, 13, req_rank.size))
    cands = Candidates(prompt_len=rng.integers(20, 1500, 40), output_est=rng.integers(1, 30, 40))
    plain = make_policy("bfio", horizon=H, decay=1.0, now_weight=1.0)
    searched = make_policy("bfio", horizon=H, decay=1.0, now_weight=1.0, search=True, search_ms=0)
    L, X = plain.project(view).astype(float), plain.profiles(cands).astype(float)
    a, b = plain.assign(view, cands), searched.assign(view, cands)
    assert feasible(b, view.free_slots) and (b >= 0).sum() == (a >= 0).sum()
    assert objective(L, X, b) < objective(L, X, a)
