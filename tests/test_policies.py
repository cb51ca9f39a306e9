import re

import numpy as np
import pytest

from sglang_ext.policies import Candidates, ClusterView, make_policy, parse_policy_spec, policy_names


def view(free, kv, nreq=None):
    free = np.asarray(free)
    return ClusterView(free_slots=free, kv_tokens=np.asarray(kv), num_requests=np.asarray(nreq if nreq is not None else np.zeros_like(free)))


def cands(prompts, outs=None):
    prompts = np.asarray(prompts)
    return Candidates(prompt_len=prompts, output_est=np.asarray(outs if outs is not None else np.full(prompts.size, 10)))


def test_registry_names_and_errors():
    assert {"fcfs", "round_robin", "jsq", "total_requests", "total_tokens", "power_of_two", "bfio"} <= set(policy_names())
    with pytest.raises(ValueError, match="unknown policy 'nope'; valid: fcfs"):
        make_policy("nope")
    assert parse_policy_spec("bfio:horizon=0:decay=0.5") == ("bfio", {"horizon": 0, "decay": 0.5})
    with pytest.raises(ValueError, match="not key=value"):
        parse_policy_spec("bfio:horizon")
    # a parameter the policy does not take is an error, not a run of the defaults under its name
    with pytest.raises(ValueError, match="bfio takes no parameter 'horizn'; valid: horizon, decay"):
        parse_policy_spec("bfio:horizn=40")
    with pytest.raises(ValueError, match="jsq takes no parameter 'horizon'; valid: none"):
        parse_policy_spec("jsq:horizon=3")
    assert parse_policy_spec("power_of_two:seed=3") == ("power_of_two", {"seed": 3})
    with pytest.raises(ValueError, match="variant must be one of default, paper"):
        make_policy("bfio", variant="papr")


@pytest.mark.parametrize("spec, needle", [
    ("bfio:horizon=abc", "bfio parameter 'horizon' takes an integer, got 'abc'"),
    ("bfio:horizon=0.5", "bfio parameter 'horizon' takes an integer, got 0.5"),
    ("bfio:decay=x", "bfio parameter 'decay' takes a finite number, got 'x'"),
    ("bfio:reward=inf", "bfio parameter 'reward' takes a finite number, got inf"),
    ("bfio:pool_tail=nan", "bfio parameter 'pool_tail' takes a finite number, got nan"),
    ("bfio:overflow=x", "bfio parameter 'overflow' takes a finite number"),
    ("bfio:search=1", "bfio parameter 'search' takes true or false, got 1"),
    ("round_robin:restart=3", "round_robin parameter 'restart' takes true or false"),
])
def test_a_parameter_of_the_wrong_type_is_named_before_the_constructor_runs(spec, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse_policy_spec(spec)


def test_parameters_are_returned_in_their_type():
    # an integer where a number is wanted is that number; a float default stays a float
    name, kw = parse_policy_spec("bfio:decay=1:overflow=3:search=true:variant=paper")
    assert kw == {"decay": 1.0, "overflow": 3.0, "search": True, "variant": "paper"}
    assert isinstance(kw["decay"], float) and isinstance(kw["overflow"], float)
    make_policy(name, **kw)  # and the constructor accepts them


def test_fcfs_fills_rank_zero_first():
    out = make_policy("fcfs").assign(view([2, 1, 3], [0, 0, 0]), cands([5, 6, 7, 8, 9]))
    assert out.tolist() == [0, 0, 1, 2, 2]


def test_round_robin_restarts_each_call_in_pool_mode_and_skips_full():
    p = make_policy("round_robin")
    assert p.assign(view([1, 0, 2], [0] * 3), cands([1, 1, 1, 1])).tolist() == [0, 2, 2, -1]
    assert p.assign(view([1, 1, 1], [0] * 3), cands([1])).tolist() == [0]  # restarted at rank 0


def test_round_robin_keeps_cursor_under_immediate_binding():
    p = make_policy("round_robin")
    got = [int(p.assign(view([5, 5, 5], [0] * 3), cands([1]), must_place=True)[0]) for _ in range(4)]
    assert got == [0, 1, 2, 0]


def test_jsq_counts_what_it_just_sent_and_ties_go_low():
    out = make_policy("jsq").assign(view([3, 3, 0], [10, 10, 0]), cands([5, 1, 1]))
    # rank 2 has no slot; rank 0 wins the tie, then rank 1 is lighter, then rank 1 (11 < 15)
    assert out.tolist() == [0, 1, 1]


def _least_loaded_scan(key, free, steps, must_place):
    """The least-loaded rule as plainly as it reads: each candidate to the eligible rank
    of least key (lowest index on ties), the key then grown by what it adds."""
    key, free = np.asarray(key, np.float64).copy(), np.asarray(free).copy()
    out = np.full(len(steps), -1, dtype=np.int64)
    for j, step in enumerate(steps):
        ok = free > 0
        if must_place and not ok.any():
            ok[:] = True
        if not ok.any():
            break
        g = int(np.argmin(np.where(ok, key, np.inf)))
        out[j], free[g], key[g] = g, free[g] - 1, key[g] + step
    return out


@pytest.mark.parametrize("name", ["jsq", "total_tokens", "total_requests"])
def test_least_loaded_rules_place_as_a_scan_of_every_rank(name):
    # The heap the policies use must place exactly as the plain scan: ties (equal keys,
    # equal prompts), full ranks, no free slot at all, more candidates than slots.
    rng = np.random.default_rng(7)
    policy = make_policy(name)
    for trial in range(300):
        G = int(rng.integers(1, 12))
        free = rng.integers(-2, 4, G) if trial % 4 else np.zeros(G, np.int64)
        kv = rng.integers(0, 5, G) * (1 if trial % 3 else 1000)  # small values: many ties
        num = rng.integers(0, 4, G)
        n = int(rng.integers(1, 3 * G + 4))
        prompts = rng.integers(1, 4, n) * (1 if trial % 2 else 500)
        v = ClusterView(free_slots=free, kv_tokens=kv, num_requests=num)
        for must in (False, True):
            got = policy.assign(v, cands(prompts.tolist()), must_place=must)
            key, steps = (num, np.ones(n)) if name == "total_requests" else (kv, prompts)
            assert got.tolist() == _least_loaded_scan(key, free, steps, must).tolist(), (trial, must)


def test_total_requests_and_total_tokens_immediate():
    v = view([0, 0, 0], [100, 5, 50], nreq=[1, 3, 2])
    assert make_policy("total_requests").assign(v, cands([7]), must_place=True).tolist() == [0]
    assert make_policy("total_tokens").assign(v, cands([7]), must_place=True).tolist() == [1]


def test_power_of_two_is_seeded_and_respects_slots():
    a = make_policy("power_of_two", seed=3).assign(view([1, 0, 1, 1], [5, 0, 9, 1]), cands([1, 1, 1, 1]))
    b = make_policy("power_of_two", seed=3).assign(view([1, 0, 1, 1], [5, 0, 9, 1]), cands([1, 1, 1, 1]))
    assert a.tolist() == b.tolist()
    assert 1 not in a.tolist() and sorted(x for x in a if x >= 0) == [0, 2, 3]


def _bfio_view(G=4):
    # rank 0: a long heavy request; rank 1: a heavy request ending in 2 steps; ranks 2-3 empty
    return ClusterView(free_slots=np.full(G, 2), kv_tokens=np.array([1000, 1000, 0, 0][:G]),
                       num_requests=np.array([1, 1, 0, 0][:G]), req_rank=np.array([0, 1]),
                       req_kv=np.array([1000, 1000]), req_remaining=np.array([50, 2]))


def test_bfio_immediate_sees_the_future():
    p = make_policy("bfio", horizon=20)
    v = _bfio_view()
    v.free_slots[2:] = 0  # only ranks 0 and 1 can take it
    # present loads tie (1000 vs 1000); rank 1 empties in 2 steps, so a long request goes there
    assert p.assign(v, cands([900], [40]), must_place=True).tolist() == [1]
    # total_tokens cannot tell them apart and takes the lowest index
    assert make_policy("total_tokens").assign(v, cands([900], [40]), must_place=True).tolist() == [0]


def test_bfio_prefill_weight_spreads_pending_prompts():
    v = _bfio_view()
    v.free_slots[2:] = 0
    # a short request: rank 1 empties in 2 steps, so plain bfio puts it there...
    plain = make_policy("bfio", horizon=20)
    assert plain.assign(v, cands([900], [3]), must_place=True).tolist() == [1]
    # ...but 3000 prompt tokens wait there for prefill: stacking 900 more on the
    # next (prefill) step costs more than three steps of decode imbalance on rank 0
    v.pending_prefill = np.array([0, 3000, 0, 0])
    aware = make_policy("bfio", horizon=20, prefill=8.0)  # a prefill token costs 8 decode tokens
    assert plain.assign(v, cands([900], [3]), must_place=True).tolist() == [1]
    assert aware.assign(v, cands([900], [3]), must_place=True).tolist() == [0]
    v.pending_prefill = None  # unknown: the weight has nothing to act on
    assert aware.assign(v, cands([900], [3]), must_place=True).tolist() == [1]


def test_bfio_h0_reduces_to_total_tokens():
    rng = np.random.default_rng(0)
    p, tt = make_policy("bfio", horizon=0), make_policy("total_tokens")
    for _ in range(50):
        G = int(rng.integers(2, 9))
        kv = rng.integers(0, 1000, G)
        v = ClusterView(free_slots=np.full(G, 4), kv_tokens=kv, num_requests=np.ones(G, int),
                        req_rank=np.arange(G), req_kv=kv, req_remaining=np.full(G, 100))
        c = cands([int(rng.integers(1, 500))], [50])
        assert p.assign(v, c, must_place=True).tolist() == tt.assign(v, c, must_place=True).tolist()


def test_bfio_pool_respects_slots_and_prefers_fitting_requests():
    p = make_policy("bfio", horizon=5)
    v = ClusterView(free_slots=np.array([0, 1]), kv_tokens=np.array([1000, 200]), num_requests=np.array([1, 1]),
                    req_rank=np.array([0, 1]), req_kv=np.array([1000, 200]), req_remaining=np.array([30, 30]))
    out = p.assign(v, cands([50, 790, 3000], [30, 30, 30]))
    # one slot, on rank 1 (deficit ~800): the 790-token request fills it best
    assert out.tolist() == [-1, 1, -1]


def test_bfio_places_everything_when_slots_suffice_and_balances():
    p = make_policy("bfio", horizon=3)
    v = ClusterView(free_slots=np.full(4, 10), kv_tokens=np.zeros(4, int), num_requests=np.zeros(4, int))
    prompts = np.array([400, 300, 300, 200, 200, 100, 100, 100, 100, 100])
    out = p.assign(v, cands(prompts, np.full(10, 10)))
    assert (out >= 0).all()
    loads = np.bincount(out, weights=prompts, minlength=4)
    assert loads.max() - loads.min() <= 100


@pytest.mark.parametrize("parallel", [True, False])
def test_bfio_pool_fills_every_free_slot_once_with_more_candidates_than_slots(parallel):
    # A round's taken candidates must leave every open rank's scores, rescored or not:
    # a rank left holding a taken candidate's old score could take it again, and the
    # slot it fills would be lost (the candidate's rank overwritten). With one pair a
    # round (`parallel=False`) most open ranks are not rescored; in parallel rounds
    # every open rank takes one and is rescored (at G=128 the first round is large,
    # settled at the candidates' best scores).
    rng = np.random.default_rng(3)
    for G, B, frac in [(16, 8, 0.3), (128, 32, 0.03)]:
        free = rng.binomial(B, frac, G)
        nrun = B - free
        req_rank = np.repeat(np.arange(G), nrun)
        req_kv = rng.integers(50, 4000, req_rank.size)
        v = ClusterView(free_slots=free, kv_tokens=np.bincount(req_rank, weights=req_kv, minlength=G).astype(np.int64),
                        num_requests=nrun, req_rank=req_rank, req_kv=req_kv,
                        req_remaining=rng.integers(1, 800, req_rank.size))
        c = cands(rng.integers(20, 3000, 4 * G), rng.integers(5, 900, 4 * G))
        out = make_policy("bfio", horizon=80, pool_tail=0.002, parallel=parallel).assign(v, c)
        placed = np.bincount(out[out >= 0], minlength=G)
        assert (placed == free).all(), (G, int(free.sum()), int(placed.sum()))


def test_bfio_large_pool_round_matches_as_well_on_the_pruned_candidates():
    # A large round offers each rank only its m best candidates (m ranks): the matched
    # total must be the full assignment problem's, ties (candidates that fit anywhere
    # score alike on every rank), taken candidates (the sentinel) and all included.
    from scipy.optimize import linear_sum_assignment

    from sglang_ext.policies.matching import NEG as _NEG, matchable_columns

    p = make_policy("bfio")
    rng = np.random.default_rng(5)
    pruned = 0
    for trial in range(60):
        n, m = int(rng.integers(512, 1100)), int(rng.integers(1, 129))
        gain = rng.integers(0, 50, n).astype(np.float64)  # few distinct values: many ties
        S = gain[:, None] - (rng.random((n, m)) < 0.3) * rng.integers(0, 40, (n, m))
        S[rng.random(n) < (0.9 if trial % 5 == 0 else 0.2)] = _NEG  # taken candidates
        live = np.arange(100, 100 + m)
        js, gs = p._match_round(np.ascontiguousarray(S.T), live)  # (it takes the scores rank-major)
        fj, fr = linear_sum_assignment(S, maximize=True)
        keep = S[fj, fr] > _NEG / 2
        assert len(set(js.tolist())) == js.size and len(set(gs.tolist())) == gs.size
        assert S[js, gs - 100].sum() == pytest.approx(S[fj[keep], fr[keep]].sum(), rel=1e-12, abs=1e-9)
        assert js.size == keep.sum()
        cols = matchable_columns(np.ascontiguousarray(S.T), p.prune_after)
        pruned += cols is not None and cols.size < n
    assert pruned > 30  # (the pruning did shrink most of these problems)
    assert matchable_columns(np.zeros((8, 511)), 512) is None and matchable_columns(np.zeros((200, 600)), 512) is None


def test_bfio_large_round_settled_at_the_candidates_best_scores_is_optimal():
    # Large rounds where most ranks score most candidates at the candidate's best (it
    # fits there) and a few ranks score every candidate lower (at the envelope): the
    # matching found without the solver must reach the solver's total, every rank
    # matched to a distinct candidate.
    from scipy.optimize import linear_sum_assignment

    from sglang_ext.policies.matching import NEG as _NEG, match_at_best as _match_at_best

    rng = np.random.default_rng(8)
    settled = {0: 0, 1: 0, 2: 0}
    for trial in range(90):
        hot = trial % 3  # ranks at the envelope
        n, m = int(rng.integers(512, 900)), int(rng.integers(2, 129))
        gain = rng.integers(1, 60, n).astype(np.float64)  # few distinct values: many ties
        kinds = gain[None, :] - (rng.random((4, n)) < 0.01) * rng.integers(1, 30, (4, n))
        S = kinds[rng.integers(0, 4, m)]  # (ranks, candidates): a few kinds of rank
        S[:hot] = gain - rng.integers(1, 80, (hot, n))
        S[:, rng.random(n) < 0.1] = _NEG  # taken candidates
        ST = np.ascontiguousarray(S[rng.permutation(m)])
        found = _match_at_best(ST, rng.random(m) if trial % 2 else None)  # (ranks offered in load order)
        fr, fj = linear_sum_assignment(ST, maximize=True)
        if found is None:
            continue
        settled[hot] += 1
        rs, js = found
        assert sorted(rs.tolist()) == list(range(m)) and len(set(js.tolist())) == m
        assert ST[rs, js].sum() == pytest.approx(ST[fr, fj].sum(), rel=1e-12, abs=1e-9)
    assert settled[0] >= 25 and settled[1] >= 20 and settled[2] >= 15
    # and the policy takes it: a round's matching on such scores, against the solver's total
    p = make_policy("bfio")
    js, gs = p._match_round(ST, np.arange(10, 10 + m), rng.random(m))
    keep = ST[fr, fj] > _NEG / 2
    assert ST[gs - 10, js].sum() == pytest.approx(ST[fr[keep], fj[keep]].sum(), rel=1e-12, abs=1e-9)


def test_seats_at_best_are_hopcroft_karps_with_or_without_the_diagonal_read():
    # `_seats_at_best` reads the matching off the diagonal where every row scores its
    # own column at the column's best, without building the pairs. That must be the
    # matching scipy's Hopcroft-Karp returns on the pairs (its greedy start seats each
    # row at its first free column); elsewhere it is that matching, built from parts.
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    from sglang_ext.policies.matching import MOST_LEFT_OUT, NEG as _NEG, seats_at_best as _seats_at_best

    rng = np.random.default_rng(12)
    read_off = 0
    for trial in range(400):
        k = int(rng.integers(1, 90))
        n = k + int(rng.integers(0, 40))
        best = rng.integers(1, 30, n).astype(np.float64)
        ST = best - (rng.random((k, n)) < rng.choice([0.01, 0.3, 0.9])) * rng.integers(1, 9, (k, n))
        ST[:, rng.random(n) < 0.05] = _NEG  # taken candidates: at their "best" everywhere
        rows, cols = rng.permutation(k), rng.permutation(n)
        if trial % 2:
            ST[rows, cols[:k]] = best[cols[:k]]  # every row at its best on its own column
        pairs = ST[np.ix_(rows, cols)] == best[cols]
        want = maximum_bipartite_matching(csr_matrix(pairs), perm_type="column")
        got = _seats_at_best(ST, rows, cols, best)
        if k - np.count_nonzero(pairs.any(axis=1)) > MOST_LEFT_OUT:
            assert got is None
            continue
        assert np.array_equal(got, want), trial
        read_off += bool((ST[rows, cols[:k]] == best[cols[:k]]).all())
    assert read_off >= 150


def test_bfio_round_matching_is_the_candidate_major_solvers_pair_for_pair():
    # Scores are kept rank-major; below the pruning size the round's matching must be
    # the one the solver gives on (candidates, ranks), ties and all, in every shape
    # (square included, where the solver does not transpose), so placements do not
    # depend on the layout.
    from scipy.optimize import linear_sum_assignment

    from sglang_ext.policies.matching import NEG as _NEG

    p = make_policy("bfio")
    rng = np.random.default_rng(11)
    for n, m in [(6, 6), (40, 40), (30, 12), (12, 30), (1, 5), (5, 1), (200, 64)]:
        for _ in range(5):
            S = rng.integers(0, 4, (n, m)).astype(np.float64)  # many ties
            S[rng.random(n) < 0.2] = _NEG
            js, gs = p._match_round(np.ascontiguousarray(S.T), np.arange(m))
            fj, fr = linear_sum_assignment(S, maximize=True)
            keep = S[fj, fr] > _NEG / 2
            assert sorted(zip(js.tolist(), gs.tolist())) == sorted(zip(fj[keep].tolist(), fr[keep].tolist()))
    for parallel in (True, False):  # the sequential greedy: the first best pair, candidates first
        q = make_policy("bfio", parallel=parallel)
        S = np.array([[1.0, 3.0], [3.0, 3.0], [0.0, 1.0]])
        js, gs = q._match_round(np.ascontiguousarray(S.T), np.array([7, 9]))
        assert sorted(zip(js.tolist(), gs.tolist())) == ([(0, 9), (1, 7)] if parallel else [(0, 9)])


@pytest.mark.parametrize("spec", ["fcfs", "round_robin", "jsq", "total_requests", "total_tokens", "power_of_two", "bfio",
                                  "bfio:variant=paper"])
def test_every_policy_obeys_slots_and_must_place(spec):
    rng = np.random.default_rng(1)
    name, kw = parse_policy_spec(spec)
    p = make_policy(name, horizon=4, seed=0, **kw)
    for _ in range(20):
        G = int(rng.integers(1, 6))
        free = rng.integers(0, 3, G)
        nreq = rng.integers(0, 5, G)
        v = ClusterView(free_slots=free, kv_tokens=rng.integers(0, 500, G), num_requests=nreq,
                        req_rank=np.repeat(np.arange(G), nreq), req_kv=rng.integers(1, 100, nreq.sum()),
                        req_remaining=rng.integers(1, 20, nreq.sum()))
        c = cands(rng.integers(1, 300, 6), rng.integers(1, 30, 6))
        out = p.assign(v, c)
        placed = out[out >= 0]
        assert (np.bincount(placed, minlength=G) <= free).all()
        assert placed.size == min(6, free.sum())  # work-conserving
        forced = p.assign(v, c, must_place=True)
        assert ((forced >= 0) & (forced < G)).all()


@pytest.mark.parametrize("spec", ["fcfs", "round_robin", "jsq", "total_requests", "total_tokens", "power_of_two",
                                  "bfio", "bfio:full_wait=true", "bfio:variant=paper"])
def test_a_rank_that_is_down_takes_nothing_even_when_every_rank_is_full(spec):
    # Every rank full, the lightest one down: must-place requests queue on active ranks
    # only, one request at a time or several in one call.
    name, kw = parse_policy_spec(spec)
    p = make_policy(name, horizon=4, seed=0, **kw)
    rng = np.random.default_rng(2)
    for _ in range(20):
        G = int(rng.integers(2, 6))
        nreq = rng.integers(1, 5, G)
        nreq[0] = 0  # the rank that is down holds nothing: it looks lightest of all
        active = np.arange(G) != 0
        kv = rng.integers(1, 100, nreq.sum())
        rank = np.repeat(np.arange(G), nreq)
        v = ClusterView(free_slots=np.zeros(G, np.int64), kv_tokens=np.bincount(rank, kv, G).astype(np.int64),
                        num_requests=nreq, req_rank=rank, req_kv=kv, req_remaining=rng.integers(1, 20, nreq.sum()),
                        slot_limit=int(nreq.max()), active=active)
        for n in (1, 5):
            out = p.assign(v, cands(rng.integers(1, 300, n), rng.integers(1, 30, n)), must_place=True)
            assert ((out >= 1) & (out < G)).all(), (spec, out)


def _least_growth_reference(w, tie_scale, L, x, free):
    """bfio's immediate rule in plain numpy, on (steps, G) loads: the rank with a free
    slot (any, when none has) where x lifts the envelope least; ties to the least
    shared load."""
    from sglang_ext.policies.sums import weighted_sum

    live = np.flatnonzero(free > 0) if (free > 0).any() else np.arange(L.shape[1])
    grow = np.maximum(L[:, live] + (x - L.max(axis=1))[:, None], 0.0)
    shared = weighted_sum(w * x, L[:, live])
    key = weighted_sum(w, grow) + shared * (tie_scale / (np.abs(shared).max() + 1.0))
    return int(live[np.argmin(key)])


def test_bfio_immediate_rule_places_as_the_plain_reference_to_the_last_bit():
    # The rule keeps its loads rank-major; each placement must be the reference's,
    # near ties included (equal loads, loads that are not whole numbers).
    rng = np.random.default_rng(3)
    for t in range(300):
        p = make_policy("bfio", horizon=int(rng.choice([0, 5, 20])))
        hz = p._imm if t % 2 else p._pool
        G, R, n = int(rng.integers(1, 300)) if t % 3 else int(rng.integers(1, 8)), len(hz.w), int(rng.integers(1, 10))
        L = rng.integers(0, 10**5, (R, G)).astype(np.float64)
        if t % 4 == 0:
            L[:, rng.random(G) < 0.5] = 0
        if t % 5 == 0:
            L /= 7.0
        X = rng.integers(0, 3000, (n, R)) * (rng.random((n, R)) < 0.9).astype(np.float64)
        free = rng.integers(-1, 3, G)
        out = p._place_each(hz, L.copy(), X, free.copy(), np.full(n, -1), range(n))
        ranks_first = p._place_each(hz, L.T.copy(), X, free.copy(), np.full(n, -1), range(n),
                                    rank_major=True)
        assert ranks_first.tolist() == out.tolist()
        ref, Lr, fr = [], L.copy(), free.copy()
        for j in range(n):
            g = _least_growth_reference(hz.w, hz.tie_scale, Lr, X[j], fr)
            ref.append(g)
            Lr[:, g] += X[j]
            fr[g] -= 1
        assert out.tolist() == ref


def test_bfio_burst_places_as_one_at_a_time_with_the_envelope_kept():
    # A burst (several candidates in one immediate call) keeps the envelope and each
    # rank's room under it instead of recomputing them per candidate, and sums the
    # growth only where a candidate does not fit in the room. Each placement must be
    # the plain reference's, to the last bit: projections that decay with h (as real
    # ones do), equal ranks, loads that are not whole numbers, ranks that fill during
    # the burst, bursts with no free slot, and envelopes that rise.
    from sglang_ext.policies.bfio import _Envelope

    rng = np.random.default_rng(11)
    fitted = rose = 0
    for t in range(40):
        p = make_policy("bfio", horizon=int(rng.choice([5, 20])))
        hz = p._imm
        R = len(hz.w)
        G, n = int(rng.choice([1, 7, 64, 256])), int(rng.integers(2, 60))
        decay = np.exp(-np.arange(R) / rng.uniform(20, 400))
        L = rng.uniform(2e4, 6e5, G)[None, :] * decay[:, None] * rng.uniform(0.97, 1.0, (R, G))
        if t % 3 == 0:
            L[:, : G // 2] = L[:, :1]  # equal ranks: ties to the first
        if t % 4 == 0:
            L = np.round(L)
        if t % 5 == 0:
            L[:, rng.random(G) < 0.3] = 0
        prompt = rng.integers(1, 8000, n).astype(np.float64)
        X = (prompt[:, None] + np.arange(R)) * (np.arange(R)[None, :] < rng.integers(1, 2 * R, n)[:, None])
        if t % 7 == 0:
            X *= 100  # big enough to raise the envelope
        free = rng.integers(0, 3, G) if t % 6 else np.zeros(G, np.int64)
        active = rng.random(G) < 0.9 if t % 8 == 0 else None
        out = p._place_each(hz, L.T.copy(), X, free.copy(), np.full(n, -1), range(n), active, rank_major=True)
        Lr, fr = L.copy(), free.copy()
        for j in range(n):
            if (fr > 0).any() or active is None:
                fr_ref = fr
            else:  # no free slot: the reference chooses among the active ranks
                fr_ref = active.astype(np.int64)
            live = np.flatnonzero(fr_ref > 0) if (fr_ref > 0).any() else np.arange(G)
            E = Lr.max(axis=1)
            fitted += int((X[j][:, None] <= E[:, None] - Lr[:, live]).all(axis=0).any())
            g = _least_growth_reference(hz.w, hz.tie_scale, Lr, X[j], fr_ref)
            assert out[j] == g, (t, j)
            Lr[:, g] += X[j]
            rose += int((Lr[:, g] > E).any())
            fr[g] -= 1
    assert fitted > 100 and rose > 10  # both ways of scoring a rank were taken

    # The room never exceeds the exact one: where a profile fits in it, its growth is 0
    # to the last bit, even with loads a rounding away from the envelope.
    for scale in (1.0, 1e9, 1e15):
        LT = scale * rng.uniform(0.5, 1.0, (64, 33))
        LT[::2] = LT.max(axis=0) * (1 - rng.integers(0, 4, (32, 33)) * 2.0 ** -52)
        LT[1::4] = scale * 2.0 ** -60 * rng.integers(1, 9, (16, 33))  # E - L rounds up
        env = _Envelope(LT)
        for k in range(400):
            if k % 2:
                x = scale * 10.0 ** rng.uniform(-17, -1) * rng.random(33)
            else:  # at the boundary: the rounded room of a rank at one step, a few ulps off
                g, h = rng.integers(0, 64), rng.integers(0, 33)
                x = np.full(33, (env.E[h] - LT[g, h]) * (1 + rng.integers(-3, 4) * 2.0 ** -53))
            fits = env.room >= x.max()
            grow = np.maximum(LT + (x - env.E), 0.0)
            assert not grow[fits].any()
            assert (env.room <= (env.E - LT).min(axis=1)).all()


@pytest.mark.parametrize("split", ["per point", "all sparse", "all dense"])
def test_envelope_rise_skips_only_zero_terms_and_sums_as_the_dense_rise(split):
    # The pool rule's rise of the envelope sums only the terms that can be non-zero
    # (a candidate above a rank's room at a point), point by point in ascending order.
    # It must be the dense sum to the last bit: loads at the envelope and a rounding
    # below it, empty far points (every rank at an envelope of 0), candidates exactly
    # at a rank's room, magnitudes from 1 to 1e12, ties among candidates' sizes.
    from sglang_ext.policies.rise import EnvelopeRise, dense_rise

    rng = np.random.default_rng(5)
    for t in range(60):
        P, k, n = int(rng.integers(1, 30)), int(rng.integers(1, 120)), int(rng.integers(1, 400))
        scale = 10.0 ** rng.uniform(0, 12)
        L = scale * rng.uniform(0.3, 1.0, (P, k)) * np.exp(-np.arange(P) / rng.uniform(2, 40))[:, None]
        L[:, rng.random(k) < 0.2] = L.max(axis=1, keepdims=True)  # ranks at the envelope
        L[P // 2:, :] *= rng.random() < 0.3  # empty far points
        L[:, rng.random(k) < 0.1] = scale * 2.0 ** -60  # e - l rounds to e in float64
        L32 = L.astype(np.float32)
        E32 = np.maximum(L32.max(axis=1), np.float32(scale * rng.random() * (t % 2)))  # a floor above, at times
        X = scale * 0.05 * rng.random((P, n)) * (rng.random((P, n)) < 0.7)
        X[:, : n // 4] = X[:, :1]  # equal sizes
        X32 = X.astype(np.float32)
        hit = rng.integers(0, k, n // 5)  # candidates exactly at (or a rounding off) some rank's room
        X32[:, : hit.size] = (E32[:, None] - L32[:, hit]) * (1 + rng.integers(-2, 3, hit.size) * 2.0 ** -24)
        X32[:, -(n // 5):] = E32[:, None]  # exactly the envelope: above the room of a rank with any load
        X32 = np.maximum(X32, 0).astype(np.float32)
        w32 = (0.8 ** np.arange(P) * rng.uniform(0.5, 2, P)).astype(np.float32)
        rise = EnvelopeRise(X32, w32, E32)
        rise.dense_below, rise.sparse_below = 0, 2.0
        rise.point_sparse_below = {"per point": 0.15, "all sparse": 2.0, "all dense": -1.0}[split]
        got, want = rise(L32), dense_rise(w32, L32, X32 - E32[:, None])
        assert got.dtype == want.dtype == np.float32
        assert np.array_equal(got, want), t


@pytest.mark.parametrize("k", [0, 3])
def test_bfio_projection_keeps_the_counts_of_requests_that_outlive_the_view(k):
    # The view's last `cached_requests` are the same in every view sharing the cache:
    # their counts (and cost) are kept per horizon, the rest added per call: fewer than
    # G in numpy on the columns of their ranks, more through the kernel. The projection
    # must be the one computed from scratch, to the last bit (3 scenarios: not a power of 2).
    rng = np.random.default_rng(6)
    p = make_policy("bfio", pool_tail=0.002, scenarios=k, backend="torch")
    G, m = 6, 400
    kept_rank, kept_kv = rng.integers(0, G, m), rng.integers(1, 3000, m)
    kept_rem = rng.integers(1, 900, (k, m) if k else m)
    cache = {}
    for trial in range(6):
        f = int(rng.integers(1, 5) if trial % 2 else rng.integers(6, 13)) * (trial > 0)  # in flight, new each time
        rank = np.concatenate([rng.integers(0, G, f), kept_rank])
        kv = np.concatenate([rng.integers(1, 3000, f), kept_kv])
        rem = np.concatenate([rng.integers(1, 900, (k, f) if k else f), kept_rem], axis=-1)
        fields = dict(free_slots=np.ones(G, np.int64), kv_tokens=np.bincount(rank, kv, G).astype(np.int64),
                      num_requests=np.bincount(rank, minlength=G), req_rank=rank, req_kv=kv, req_remaining=rem)
        shared = ClusterView(**fields, projection_cache=cache, cached_requests=m)
        fresh = ClusterView(**fields)
        for hz in (p._imm, p._pool):
            if trial == 1 and hz is p._imm:
                p.warm(shared, must_place=True)
            got, want = p.project(shared, hz.axis), p.project(fresh, hz.axis)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            for view in (shared, fresh):  # (the immediate rule's layout: a rank's steps contiguous)
                ranks_first = p.project(view, hz.axis, rank_major=True)
                assert ranks_first.flags.c_contiguous and np.array_equal(ranks_first, want.T)
    assert len(cache) == 4  # counts and cost per horizon, reused by every later view


def test_bfio_full_wait_sends_a_request_where_a_slot_frees_first():
    # 3 ranks, 2 slots each, all full; rank 2's first request ends next step.
    rank = np.array([0, 0, 1, 1, 1, 2, 2])  # rank 1 also has one queued beyond its slots
    kv = np.array([10, 10, 10, 10, 10, 900, 900])
    rem = np.array([50, 60, 1, 70, 80, 2, 90])
    v = ClusterView(free_slots=np.zeros(3, np.int64), kv_tokens=np.bincount(rank, kv, 3).astype(np.int64),
                    num_requests=np.bincount(rank, minlength=3), req_rank=rank, req_kv=kv, req_remaining=rem,
                    slot_limit=2)
    pol = make_policy("bfio", horizon=10, full_wait=True, backend="torch")
    # rank 1's freed slot goes to its queued request first; rank 2 frees one in 2 steps
    assert pol._slot_wait(v).tolist() == [50, 70, 2]
    assert pol.assign(v, cands([100], [5]), must_place=True).tolist() == [2]
    # without it, the heavy rank 2 is avoided
    assert make_policy("bfio", horizon=10, backend="torch").assign(v, cands([100], [5]), must_place=True).tolist() != [2]


def test_bfio_pool_tail_looks_past_the_pool_horizon():
    # two ranks, equal KV for the next 20 steps; rank `early` empties at step 30,
    # the other at 300. A 400-step request in the pool: within the pool's
    # 20-step horizon the ranks tie; the long tail sees rank `early` run empty.
    short = dict(tail_horizon=200, tail_decay=0.99, tail_points=0)  # a dense 200-step tail
    for early in (0, 1):
        rem = np.array([30, 300]) if early == 0 else np.array([300, 30])
        v = ClusterView(free_slots=np.array([1, 1]), kv_tokens=np.array([1000, 1000]), num_requests=np.array([1, 1]),
                        req_rank=np.array([0, 1]), req_kv=np.array([1000, 1000]), req_remaining=rem)
        tail = make_policy("bfio", horizon=20, pool_tail=0.02, **short).assign(v, cands([800, 50], [400, 5]))
        # both fit (two slots): the long one goes where the load leaves soon
        assert tail.tolist()[0] == early
        # without the tail the ranks tie and the lower index takes it
        assert make_policy("bfio", horizon=20).assign(v, cands([800, 50], [400, 5])).tolist()[0] == 0
    with pytest.raises(ValueError, match="pool_tail"):
        make_policy("bfio", pool_tail=-1)
    # the blended weights: the pool's near weights plus the tail's, over the long horizon
    p = make_policy("bfio", horizon=20, pool_tail=0.5, **short)
    near, far = make_policy("bfio", horizon=20)._pool, make_policy("bfio", horizon=20, immediate_near=0)._imm
    assert p._pool.H == far.H == 200
    assert np.allclose(p._pool.w[:21], near.w + 0.5 * far.w[:21]) and np.allclose(p._pool.w[21:], 0.5 * far.w[21:])


def test_bfio_pool_tail_over_a_whole_life_at_a_few_steps():
    # rank 0 empties at step 600, rank 1 at 1200, equal KV until then. A 1500-step
    # request: a 200-step tail sees the ranks tie; a 2000-step tail (the whole
    # life of the longest requests) sends it where the load leaves first, and
    # evaluating that tail at 16 steps past the pool horizon decides the same.
    for early in (0, 1):
        rem = np.array([600, 1200]) if early == 0 else np.array([1200, 600])
        v = ClusterView(free_slots=np.array([1, 1]), kv_tokens=np.array([1000, 1000]), num_requests=np.array([1, 1]),
                        req_rank=np.array([0, 1]), req_kv=np.array([1000, 1000]), req_remaining=rem)
        c = cands([800, 50], [1500, 5])
        long = dict(horizon=20, pool_tail=0.005, tail_horizon=2000, tail_decay=1.0, tail_points=0)
        assert make_policy("bfio", **long).assign(v, c).tolist()[0] == early
        assert make_policy("bfio", **long | dict(tail_points=16)).assign(v, c).tolist()[0] == early
        assert make_policy("bfio", horizon=20, pool_tail=0.005).assign(v, c).tolist()[0] == early  # the defaults
        short = dict(tail_horizon=200, tail_decay=0.99)
        assert make_policy("bfio", horizon=20, pool_tail=0.005, **short).assign(v, c).tolist()[0] == 0  # a tie
    # the sparse rows: the pool's own scoring steps, then about 16 steps out to
    # the tail's end, each weighing the steps up to the next row
    dense = make_policy("bfio", **long)._pool
    sparse = make_policy("bfio", **long | dict(tail_points=16))._pool
    near = make_policy("bfio", horizon=20)._pool
    assert sparse.steps[0] == 0 and sparse.steps[-1] == 2000 and np.all(np.diff(sparse.steps) > 0)
    assert set(near.pts.tolist()) <= set(sparse.steps.tolist()) and sparse.steps.size <= near.pts.size + 16
    assert np.isclose(sparse.w.sum(), dense.w.sum())
    assert np.allclose(sparse.w, np.add.reduceat(dense.w, sparse.steps))
    assert sparse.pts.tolist() == list(range(sparse.steps.size))  # every row is scored
    # no tail: the paper's dense 0..H rows
    assert near.steps is None and near.axis == 20
    for bad in (dict(tail_horizon=-1), dict(tail_points=-2), dict(tail_decay=0.0), dict(tail_decay=1.5)):
        with pytest.raises(ValueError, match="tail"):
            make_policy("bfio", **bad)


def test_bfio_immediate_near_weighs_the_next_steps():
    # rank 0 is heavier now but empties in 5 steps; rank 1 is lighter and stays 300 steps
    v = ClusterView(free_slots=np.array([1, 1]), kv_tokens=np.array([1200, 1000]), num_requests=np.array([1, 1]),
                    req_rank=np.array([0, 1]), req_kv=np.array([1200, 1000]), req_remaining=np.array([5, 300]))
    c = cands([500], [300])
    # the 200-step lookahead alone: rank 0 soon runs empty, so the long request goes there
    assert make_policy("bfio", horizon=20, immediate_near=0).assign(v, c, must_place=True).tolist() == [0]
    # with the next steps weighed heavily, today's lighter rank wins
    assert make_policy("bfio", horizon=20, immediate_near=1000).assign(v, c, must_place=True).tolist() == [1]
    # the weights: the long lookahead plus the pool's near weights at that weight
    p = make_policy("bfio", horizon=20, immediate_near=2.0)
    near, far = make_policy("bfio", horizon=20)._pool, make_policy("bfio", horizon=20, immediate_near=0)._imm
    assert np.allclose(p._imm.w[:21], far.w[:21] + 2.0 * near.w) and np.allclose(p._imm.w[21:], far.w[21:])
    # the default weight is 1
    assert np.allclose(make_policy("bfio", horizon=20)._imm.w[:21], far.w[:21] + near.w)
    with pytest.raises(ValueError, match="immediate_near"):
        make_policy("bfio", immediate_near=-1)
    # horizon 0 stays total_tokens whatever the weight
    assert make_policy("bfio", horizon=0, immediate_near=5)._imm.H == 0


def test_weighted_sums_equal_the_matrix_products():
    """bfio's CPU-independent weighted sums (einsum, not BLAS) are the products they replace."""
    from sglang_ext.policies.sums import weighted_rows, weighted_sum

    rng = np.random.default_rng(3)
    w = rng.random(21)
    rows = rng.normal(size=(21, 7, 5))
    np.testing.assert_allclose(weighted_sum(w, rows), np.tensordot(w, rows, axes=1), rtol=1e-12)
    M = rng.normal(size=(9, 21))
    np.testing.assert_allclose(weighted_rows(M, w), M @ w, rtol=1e-12)
    w32, g32 = w.astype(np.float32), rows.reshape(21, -1).astype(np.float32)
    np.testing.assert_allclose(weighted_sum(w32, g32), w32 @ g32, rtol=1e-5)


def _avx2_openblas() -> bool:
    import platform

    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return platform.machine() == "x86_64" and " avx2" in flags and "openblas" in str(np.show_config(mode="dicts")).lower()


@pytest.mark.skipif(not _avx2_openblas(), reason="needs x86-64 with AVX2 and numpy on OpenBLAS (to force its kernels)")
def test_bfio_run_is_the_same_whatever_blas_kernel_the_cpu_gets(tmp_path):
    """A paper-mode run is chaotic: one flipped near-tie moves its idle by a few
    percent. bfio's scores must not depend on the BLAS kernel the machine
    picks (they once did: idle 0.0796 under OpenBLAS's Haswell kernels, 0.0807
    under Sandybridge's, 0.0814 under SkylakeX's), so the same run on two
    kernels gives the same placements to the last digit, with and without
    the local search."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    trace = Path(__file__).resolve().parents[1] / "data" / "traces" / "burstgpt_lengths_8000.json"
    results = []
    for core in ("Haswell", "Sandybridge"):
        out = tmp_path / f"{core}.json"
        env = {**os.environ, "OPENBLAS_CORETYPE": core}
        subprocess.run([sys.executable, "-m", "sglang_ext.cli", "simulate", "--trace", str(trace), "--mode", "paper",
                        "--ranks", "32", "--batch", "72", "--policies", "bfio,bfio:search=true:search_ms=0:search_kicks=0",
                        "--horizon", "20", "--json", str(out)],
                       env=env, check=True, capture_output=True, timeout=600)
        for res in json.loads(out.read_text())["results"].values():  # the greedy, and with its local search
            results.append({k: res[k] for k in ("idle_fraction", "throughput_tok_s", "imbalance", "steps")})
    assert results[:2] == results[2:]
