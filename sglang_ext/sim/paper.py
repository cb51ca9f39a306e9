"""Paper mode: the released simulator's semantics (design.md section 3).

All requests wait at time 0 in the paper's order and are revealed so that a
window of 4*G is visible. Each step lasts C + t_l * max_g L_g on the loads
before growth; then every running request gains a token, finished ones leave,
the step's idle is taken (mean_g 1 - L_g / max L), and the policy fills free
slots from the window. Metrics are summed up to the last step at which
anything was assigned.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..cost import CostModel, paper_deepseek_v3, paper_power
from ..policies import Candidates, ClusterView, Policy
from ..traces import Trace
from ..estimators import Estimator, OracleEstimator
from .metrics import DecisionTimer, SimResult

logger = logging.getLogger(__name__)


@dataclass
class PaperConfig:
    ranks: int = 32
    batch: int = 72  # B: running requests per rank
    window_per_rank: int = 4  # visible window = window_per_rank * G
    cost: CostModel | None = None  # default: the paper's DeepSeek-V3 preset for this B
    progress: bool = False


def simulate_paper(trace: Trace, policy: Policy, cfg: PaperConfig, estimator: Estimator | None = None) -> SimResult:
    G, B = cfg.ranks, cfg.batch
    cost = cfg.cost or paper_deepseek_v3(B)
    estimator = estimator or OracleEstimator()
    n = len(trace)
    prompt = trace.prompt_len.astype(np.int64)
    out_len = trace.output_len.astype(np.int64)
    out_est = estimator.initial(prompt, out_len, None)
    window = cfg.window_per_rank * G

    # Running requests as flat arrays (one entry per request in a slot).
    r_id = np.zeros(0, np.int64)
    r_rank = np.zeros(0, np.int64)
    r_kv = np.zeros(0, np.int64)
    r_gen = np.zeros(0, np.int64)
    start = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    pending = np.arange(n, dtype=np.int64)  # waiting, in order
    clock = 0.0
    timer = DecisionTimer()
    policy.reset()

    steps_T, steps_run, steps_idle, steps_energy, steps_imb, steps_assigned = [], [], [], [], [], []

    k_scen = int(policy.scenarios) if estimator.spread else 0

    def fill() -> int:
        nonlocal r_id, r_rank, r_kv, r_gen, pending
        free = B - np.bincount(r_rank, minlength=G)
        if pending.size == 0 or free.sum() == 0:
            return 0
        vis = pending[:window]
        kv = np.bincount(r_rank, weights=r_kv, minlength=G).astype(np.int64)
        view = ClusterView(free_slots=free, kv_tokens=kv, num_requests=B - free)
        if policy.needs_requests:
            view.req_rank, view.req_kv = r_rank, r_kv
            estimator.observe_running(r_gen, prompt[r_id])  # lower bounds on the running lengths
            view.req_remaining = estimator.steps_left(r_gen, out_est[r_id], k_scen, prompt[r_id])
        cands = Candidates(prompt_len=prompt[vis],
                           output_est=estimator.new_lengths(out_est[vis], k_scen, prompt[vis]))
        t0 = time.perf_counter()
        ranks = policy.assign(view, cands, must_place=False)
        timer.add(time.perf_counter() - t0)
        take = ranks >= 0
        if take.any():
            chosen = vis[take]
            if (np.bincount(ranks[take], minlength=G) > free).any():
                raise RuntimeError(f"policy {policy.name} overfilled a rank")
            r_id = np.concatenate([r_id, chosen])
            r_rank = np.concatenate([r_rank, ranks[take]])
            r_kv = np.concatenate([r_kv, prompt[chosen]])
            r_gen = np.concatenate([r_gen, np.zeros(chosen.size, np.int64)])
            start[chosen] = clock
            pending = np.concatenate([vis[~take], pending[window:]])
        return int(take.sum())

    fill()
    bar = tqdm(total=n, desc=f"paper {policy.name}", unit="req", disable=not cfg.progress, leave=False)
    while r_id.size:
        loads = np.bincount(r_rank, weights=r_kv, minlength=G)
        top = loads.max()
        T = cost.a + cost.c * top
        running = r_id.size
        clock += T
        r_kv += 1
        r_gen += 1
        done = r_gen >= out_len[r_id]
        if done.any():
            finish[r_id[done]] = clock
            estimator.observe(out_len[r_id[done]], prompt[r_id[done]])
            bar.update(int(done.sum()))
            keep = ~done
            r_id, r_rank, r_kv, r_gen = r_id[keep], r_rank[keep], r_kv[keep], r_gen[keep]
        after = np.bincount(r_rank, weights=r_kv, minlength=G)
        amax = after.max() if after.size else 0.0
        idle = float(np.mean(1.0 - after / amax)) if amax > 0 else 0.0
        energy = float(paper_power(after).sum() * T)
        imb = float(G * amax - after.sum())
        assigned = fill()
        steps_T.append(T)
        steps_run.append(running)
        steps_idle.append(idle)
        steps_energy.append(energy)
        steps_imb.append(imb)
        steps_assigned.append(assigned)
    bar.close()

    assigned_steps = np.flatnonzero(np.asarray(steps_assigned) > 0)
    last = int(assigned_steps[-1]) + 1 if assigned_steps.size else len(steps_T)
    T_arr = np.asarray(steps_T[:last])
    run_arr = np.asarray(steps_run[:last], dtype=np.float64)
    tpot = (finish - start) / out_len
    return SimResult(
        idle_fraction=float(np.mean(steps_idle[:last])),
        throughput_tok_s=float(run_arr.sum() / T_arr.sum()),
        tpot_ms=float(np.nanmean(tpot) * 1e3),
        tpot_ms_p99=float(np.nanpercentile(tpot, 99) * 1e3),
        imbalance=float(np.mean(steps_imb[:last])),
        energy_j_per_token=float(np.sum(steps_energy[:last]) / run_arr.sum()),
        decision_us_p50=timer.p50(),
        decision_us_p99=timer.p99(),
        requests_finished=int(np.isfinite(finish).sum()),
        steps=len(steps_T),
    )
