"""The exact finite-horizon solver (sglang_ext.optimal): MILP == brute force,
the evaluator matches a hand computation, no heuristic beats the optimum."""
import logging

import numpy as np
import pytest

from sglang_ext.optimal import brute_force, feasible, instance_from_view, objective, solve_exact
from sglang_ext.policies import Candidates, ClusterView, make_policy


def _random_instance(rng, G, H1, n, max_free=2):
    L = rng.integers(0, 40, (H1, G)).astype(float)
    X = rng.integers(0, 25, (n, H1)).astype(float)
    X[rng.random((n, H1)) < 0.2] = 0.0  # some candidates finish inside the horizon
    free = rng.integers(0, max_free + 1, G)
    return L, X, free


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("work_conserving", [True, False])
def test_milp_equals_brute_force(seed, work_conserving):
    rng = np.random.default_rng(seed)
    G = int(rng.integers(2, 4))
    L, X, free = _random_instance(rng, G, int(rng.integers(1, 5)), int(rng.integers(1, 6)))
    weights = None if seed % 2 else rng.random(L.shape[0]) * 2
    a, v = solve_exact(L, X, free, weights=weights, work_conserving=work_conserving, strict=True)
    b, u = brute_force(L, X, free, weights=weights, work_conserving=work_conserving)
    assert v == pytest.approx(u, abs=1e-6)
    assert feasible(a, free, work_conserving)
    assert objective(L, X, a, weights) == pytest.approx(v)


def test_duplicate_profiles_are_each_placed_once():
    L = np.array([[10.0, 0.0], [10.0, 0.0]])
    X = np.array([[5.0, 5.0]] * 4)
    a, v = solve_exact(L, X, np.array([2, 2]), strict=True)
    b, u = brute_force(L, X, np.array([2, 2]))
    assert v == pytest.approx(u)
    assert np.bincount(a[a >= 0], minlength=2).tolist() == [2, 2]


def test_objective_hand_computation():
    # G=2, H+1=2. L = [[3, 1], [2, 0]]; candidate 0 (profile [4, 0]) on rank 1,
    # candidate 1 (profile [1, 1]) on rank 0, candidate 2 waits.
    L = np.array([[3.0, 1.0], [2.0, 0.0]])
    X = np.array([[4.0, 0.0], [1.0, 1.0], [7.0, 7.0]])
    a = np.array([1, 0, -1])
    # totals: h=0: [4, 5] -> 2*5 - 9 = 1; h=1: [3, 0] -> 2*3 - 3 = 3
    assert objective(L, X, a) == pytest.approx(4.0)
    assert objective(L, X, a, weights=[1.0, 0.5]) == pytest.approx(1.0 + 1.5)
    assert objective(L, X, np.array([-1, -1, -1])) == pytest.approx((6 - 4) + (4 - 2))


def test_solver_picks_the_filler():
    # Rank 1 has a deficit of 5 at both steps; one slot; candidate 1 fills it exactly.
    L = np.array([[10.0, 5.0], [10.0, 5.0]])
    X = np.array([[2.0, 2.0], [5.0, 5.0], [9.0, 9.0]])
    a, v = solve_exact(L, X, np.array([0, 1]), strict=True)
    assert a.tolist() == [-1, 1, -1] and v == pytest.approx(0.0)


def test_edge_cases():
    L = np.array([[3.0, 1.0], [2.0, 1.0]])
    X = np.array([[4.0, 4.0], [1.0, 0.0]])
    # no free slots
    a, v = solve_exact(L, X, np.array([0, 0]))
    assert a.tolist() == [-1, -1] and v == pytest.approx(objective(L, X, a))
    # negative free counts are treated as full
    a, _ = solve_exact(L, X, np.array([-1, 0]))
    assert a.tolist() == [-1, -1]
    # no candidates
    a, v = solve_exact(L, np.zeros((0, 2)), np.array([1, 1]))
    assert a.shape == (0,) and v == pytest.approx((6 - 4) + (4 - 3))
    # fewer candidates than slots: work-conserving places them all
    a, _ = solve_exact(L, X, np.array([3, 3]), strict=True)
    assert (a >= 0).all()
    # bad shapes / weights
    with pytest.raises(ValueError):
        solve_exact(L, X, np.array([1, 1, 1]))
    with pytest.raises(ValueError):
        objective(L, X, np.array([0, 0]), weights=[1.0])
    with pytest.raises(ValueError):
        objective(L, X, np.array([0, 5]))
    a, v, info = solve_exact(L, X, np.array([1, 1]), return_info=True)
    assert info["optimal"] and info["bound"] == pytest.approx(v)


def _view(rng, G, B, H):
    k = rng.integers(0, B, size=G)
    req_rank = np.repeat(np.arange(G), k)
    kv = rng.integers(1, 60, size=req_rank.size)
    rem = rng.integers(1, 2 * H + 2, size=req_rank.size)
    view = ClusterView(free_slots=B - k, kv_tokens=np.bincount(req_rank, weights=kv, minlength=G).astype(np.int64),
                       num_requests=k, req_rank=req_rank, req_kv=kv, req_remaining=rem)
    n = int(rng.integers(1, 2 * int((B - k).sum()) + 2))
    cands = Candidates(prompt_len=rng.integers(1, 60, size=n), output_est=rng.integers(1, 2 * H + 2, size=n))
    return view, cands


def test_instance_from_view_matches_bfio_projection():
    rng = np.random.default_rng(3)
    view, cands = _view(rng, 3, 3, 4)
    L, X, free = instance_from_view(view, cands, 4)
    # by hand: load of request i at step h is kv_i + h while h < remaining_i
    for h in range(5):
        for g in range(3):
            on = (view.req_rank == g) & (view.req_remaining > h)
            assert L[h, g] == pytest.approx((view.req_kv[on] + h).sum())
        assert np.allclose(X[:, h], np.where(h < cands.output_est, cands.prompt_len + h, 0))
    assert (free == view.free_slots).all()


@pytest.mark.parametrize("seed", range(8))
def test_no_policy_beats_the_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    G, B, H = 3, 3, int(rng.integers(2, 5))
    view, cands = _view(rng, G, B, H)
    L, X, free = instance_from_view(view, cands, H)
    _, opt = solve_exact(L, X, free, strict=True)
    for name, params in (("bfio", {}), ("bfio", {"search": True, "search_ms": 0}), ("jsq", {}), ("fcfs", {})):
        pol = make_policy(name, horizon=H, decay=1.0, now_weight=1.0, **params)
        a = pol.assign(view, cands, must_place=False)
        assert feasible(a, free)
        assert objective(L, X, a) >= opt - 1e-6


def test_time_limit_returns_best_found(caplog):
    rng = np.random.default_rng(0)
    L, X, free = _random_instance(rng, 4, 6, 40, max_free=5)
    with caplog.at_level(logging.WARNING):
        a, v, info = solve_exact(L, X, free, time_limit=0.01, return_info=True)
    assert feasible(a, free)
    assert info["bound"] <= v + 1e-6
