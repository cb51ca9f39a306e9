"""Paper mode reproduces the released simulator's baselines to the printed digit,
and bfio --horizon 20 beats the paper's own BF-IO on idle and throughput."""
import pytest

from sglang_ext.policies import make_policy
from sglang_ext.sim.paper import PaperConfig, simulate_paper
from sglang_ext.traces import load_trace, paper_order

FILES = ["burstgpt_lengths_8000.json", "arxiv_lengths_8000.json"]


@pytest.fixture(scope="module")
def ordered():
    from conftest import TRACES

    return {f: paper_order(load_trace(TRACES / f), 8000, 42) for f in FILES}


@pytest.mark.parametrize("trace", FILES)
@pytest.mark.parametrize("policy", ["fcfs", "round_robin", "jsq"])
def test_baselines_match_reference(ordered, reference, trace, policy):
    ref = reference[trace][policy]
    r = simulate_paper(ordered[trace], make_policy(policy), PaperConfig(ranks=32, batch=72))
    assert r.idle_fraction == pytest.approx(ref["idle_fraction"], abs=5e-7)
    assert r.throughput_tok_s == pytest.approx(ref["throughput_tok_s"], abs=0.01)
    assert r.tpot_ms == pytest.approx(ref["tpot_ms"], abs=5e-5)
    assert r.energy_j_per_token * 1e3 == pytest.approx(ref["energy_mj_per_token"], abs=5e-4)
    assert r.requests_finished == 8000


@pytest.mark.parametrize("trace", FILES)
def test_bfio_h20_beats_the_papers_bfio(ordered, reference, trace):
    paper = reference[trace]["paper_bfio_h20"]
    r = simulate_paper(ordered[trace], make_policy("bfio", horizon=20), PaperConfig(ranks=32, batch=72))
    assert r.idle_fraction <= paper["idle_fraction"]
    assert r.throughput_tok_s >= paper["throughput_tok_s"]
    assert r.requests_finished == 8000


def test_small_run_invariants():
    import numpy as np

    from sglang_ext.traces import Trace

    rng = np.random.default_rng(0)
    tr = Trace("t", rng.integers(1, 100, 300), rng.integers(1, 30, 300))
    for name in ("fcfs", "jsq", "bfio"):
        r = simulate_paper(tr, make_policy(name, horizon=5), PaperConfig(ranks=4, batch=8))
        assert r.requests_finished == 300
        assert 0 <= r.idle_fraction < 1 and r.throughput_tok_s > 0 and r.tpot_ms > 0
