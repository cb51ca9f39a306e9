"""Online mode: timed arrivals, per-rank capacity, prefill as a barrier step,
unknown output lengths.

The loop is step-driven like a DP-attention server: at each iteration the
arrivals up to the clock are bound (immediately to a rank, or into a central
pool), ranks admit from their queues, and one barrier step runs: a prefill
step if any rank admitted something, else a decode step. Every rank joins every
step (DP attention's collective); a rank waits T - sync - t_g. With nothing to
run the clock jumps to the next arrival (not counted as step time).

Load: `capacity_rps` is the request rate the ranks serve when saturated,
measured by this simulator on the same requests all arriving at once.
load = arrival rate / capacity; `rate_scale` multiplies the recorded rate.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..cost import CostModel, PowerModel, cost_preset, power_preset
from ..estimators import Estimator, OracleEstimator
from ..errors import UsageError
from ..policies import Candidates, ClusterView, Policy
from ..traces import Trace
from .metrics import DecisionTimer, SimResult, pct

logger = logging.getLogger(__name__)


@dataclass
class OnlineConfig:
    ranks: int = 8
    batch: int = 72  # max running requests per rank
    kv_capacity: int = 1 << 62  # KV tokens per rank (admission stops above it)
    binding: str = "immediate"  # or "pool"
    pool_window: int | None = None  # candidates offered per pool call (default 4*G)
    max_pool_wait_s: float = 5.0  # a pooled request older than this is bound immediately
    rate_scale: float = 1.0  # multiplies the recorded arrival rate
    cost: CostModel | None = None
    power: PowerModel | None = None
    max_prompt_len: int | None = None  # clip prompts to a context limit
    # Every request's max_new_tokens (a server's or its clients' cap): longer
    # outputs stop there, and the `cap` estimator reads it. None: no cap.
    max_new_tokens: int | None = None
    # Each placement sees the running requests as they were this many decode steps
    # ago (the departures and growth since unseen), plus every request bound since at
    # its prompt, and the per-rank totals (free slots, KV tokens) as they are: what
    # the live controller places an arrival on before it has estimated the newest
    # reports (--balancer-view-lag), here for every placement (its worst case; the
    # controller's pool releases never lag: under a deep queue that costs idle,
    # docs/benchmarks.md section 2). 0: the current state.
    view_lag: int = 0
    progress: bool = False


def capacity_rps(trace: Trace, cost: CostModel, ranks: int, batch: int, max_prompt_len: int | None = None,
                 max_new_tokens: int | None = None) -> float:
    """Requests/s the ranks serve when saturated, measured: the same requests
    all arriving at once, placed by SGLang's total_tokens rule, through this
    simulator (decode slots busy, prefill steps stalling every rank). The rate
    is taken between the 10th and 90th percentile finish, so the ramp-up and
    the drain at the end of the burst do not count."""
    from ..policies import make_policy

    burst = Trace(trace.name, trace.prompt_len, trace.output_len, np.zeros(len(trace)))
    cfg = OnlineConfig(ranks=ranks, batch=batch, cost=cost, max_prompt_len=max_prompt_len,
                       max_new_tokens=max_new_tokens)
    r = simulate_online(burst, make_policy("total_tokens"), cfg)
    lo, hi = np.percentile(r.finish_s, [10, 90])
    done = np.count_nonzero((r.finish_s > lo) & (r.finish_s <= hi))
    return float(done / (hi - lo)) if hi > lo else len(trace) / max(float(r.finish_s.max()), 1e-9)


def native_rate(trace: Trace) -> float:
    span = float(trace.arrival_s[-1] - trace.arrival_s[0])
    return (len(trace) - 1) / span if span > 0 else float("inf")


def scale_for_load(trace: Trace, load: float, capacity: float) -> float:
    """The rate scale that makes `trace` arrive at `load` times `capacity` (req/s).
    A trace whose requests all arrive at one instant has no rate to scale."""
    rate = native_rate(trace)
    if not np.isfinite(rate):
        raise UsageError(f"--load: the {len(trace)} request(s) of {trace.name} arrive at one instant, so there "
                         "is no arrival rate to scale (take more requests, or give --rate-scale)")
    return load * capacity / rate


def simulate_online(trace: Trace, policy: Policy, cfg: OnlineConfig, estimator: Estimator | None = None) -> SimResult:
    if trace.arrival_s is None:
        raise ValueError(f"{trace.name}: online mode needs a timed trace (arrival times); "
                         "length-only files run in --mode paper")
    if cfg.binding not in ("immediate", "pool"):
        raise ValueError(f"binding must be 'immediate' or 'pool', got {cfg.binding!r}")
    G, B = cfg.ranks, cfg.batch
    cost = cfg.cost or cost_preset("paper-dsv3", B)
    power = cfg.power or power_preset("h100")
    estimator = estimator or OracleEstimator()
    n = len(trace)
    arrival = trace.arrival_s / cfg.rate_scale
    prompt = trace.prompt_len.astype(np.int64)
    if cfg.max_prompt_len:
        prompt = np.minimum(prompt, cfg.max_prompt_len)
    if n and prompt.max() > cfg.kv_capacity:  # it could never be admitted: the run would stall
        i = int(prompt.argmax())
        raise UsageError(f"--kv-capacity {cfg.kv_capacity}: smaller than the longest prompt of {trace.name} "
                         f"({int(prompt[i])} tokens, request {i}); raise it, or clip prompts with --max-prompt-len")
    out_len = trace.output_len.astype(np.int64)
    cap = None
    if cfg.max_new_tokens:
        out_len = np.minimum(out_len, cfg.max_new_tokens)
        cap = np.full(n, cfg.max_new_tokens, np.int64)
    est_total = np.zeros(n, np.int64)
    window = cfg.pool_window or 4 * G
    timer = DecisionTimer()
    policy.reset()

    # Queued at a rank (bound, not yet running), in binding order.
    q_id = np.zeros(0, np.int64)
    q_rank = np.zeros(0, np.int64)
    pool = np.zeros(0, np.int64)  # central pool (pool binding), arrival order
    # Running.
    r_id = np.zeros(0, np.int64)
    r_rank = np.zeros(0, np.int64)
    r_kv = np.zeros(0, np.int64)
    r_gen = np.zeros(0, np.int64)
    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    nxt = 0  # next arrival index
    clock = 0.0

    decode_time = wait_time = energy = prefill_time = 0.0
    queued_time = queued_wait = 0.0  # decode steps while a request waits (pool or a rank's queue)
    drain_time = drain_wait = 0.0  # decode steps after the last arrival: the replay's end empties the ranks
    sparse_time = sparse_wait = 0.0  # decode steps with fewer running requests than ranks: some rank must idle
    floor_wait = floor_drain = 0.0  # the wait no placement of each step's running requests avoids
    prefill_steps = 0
    tokens = 0
    steps = 0
    imb_sum = 0.0
    decode_steps = 0

    k_scen = int(policy.scenarios) if estimator.spread else 0
    lag = cfg.view_lag
    if lag < 0:
        raise ValueError(f"view_lag must be >= 0, got {lag}")
    # (r_id, r_rank, r_kv, r_gen) after each of the last lag + 1 steps, oldest first (the
    # newest is the current state)
    seen: deque[tuple[np.ndarray, ...]] = deque(maxlen=lag + 1)

    def lengths(ids: np.ndarray) -> np.ndarray:
        """Candidates' predicted lengths: (n,), or (n, k) scenarios."""
        return estimator.new_lengths(est_total[ids], k_scen, prompt[ids])

    def view_of(lagged: bool = False) -> ClusterView:
        held = np.bincount(r_rank, minlength=G) + np.bincount(q_rank, minlength=G)
        queued_prompt = np.bincount(q_rank, weights=prompt[q_id], minlength=G)
        kv = (np.bincount(r_rank, weights=r_kv, minlength=G) + queued_prompt).astype(np.int64)
        view = ClusterView(free_slots=np.maximum(B - held, 0), kv_tokens=kv, num_requests=held,
                           pending_prefill=queued_prompt, slot_limit=B)
        run_id, run_rank, run_kv, run_gen = r_id, r_rank, r_kv, r_gen
        new_id, new_rank = q_id, q_rank  # bound, not running (as far as the view knows)
        if lagged and lag and seen:
            # The requests as they were `lag` steps ago, what started since in flight (the
            # per-rank totals above are the newest: the live controller reads them off the
            # reports without estimating anything)
            run_id, run_rank, run_kv, run_gen = seen[0]
            since = ~np.isin(r_id, run_id)
            new_id, new_rank = np.concatenate([r_id[since], q_id]), np.concatenate([r_rank[since], q_rank])
        if policy.needs_requests:
            # Queued requests count as if running from now: they will be soon.
            view.req_rank = np.concatenate([run_rank, new_rank])
            view.req_kv = np.concatenate([run_kv, prompt[new_id]])
            r_prompt = prompt[run_id]
            estimator.observe_running(run_gen, r_prompt)  # lower bounds on the running lengths
            running = estimator.steps_left(run_gen, est_total[run_id], k_scen, r_prompt)
            if cap is not None:  # nothing runs past its max_new_tokens (as the live controller clips)
                running = np.clip(running, 1, np.maximum(cap[run_id] - run_gen, 1))
            view.req_remaining = np.concatenate([running, lengths(new_id).T], axis=-1)
        return view

    def bind_now(ids: np.ndarray) -> None:
        """Immediate binding: one policy call per request, as SGLang dispatches (the live
        controller places a burst read at once in one call, on the same ranks)."""
        nonlocal q_id, q_rank
        for i in ids:
            view = view_of(lagged=True)
            cands = Candidates(prompt_len=prompt[i:i + 1], output_est=lengths(np.array([i])))
            t0 = time.perf_counter()
            g = int(policy.assign(view, cands, must_place=True)[0])
            timer.add(time.perf_counter() - t0)
            q_id = np.append(q_id, i)
            q_rank = np.append(q_rank, g)

    def fill_from_pool() -> None:
        nonlocal pool, q_id, q_rank
        if pool.size == 0:
            return
        # Overdue requests are bound by the immediate rule: nobody is stranded.
        overdue = clock - arrival[pool] > cfg.max_pool_wait_s
        if overdue.any():
            bind_now(pool[overdue])
            pool = pool[~overdue]
        view = view_of(lagged=True)
        if pool.size == 0 or view.free_slots.sum() == 0:
            return
        vis = pool[:window]
        cands = Candidates(prompt_len=prompt[vis], output_est=lengths(vis))
        t0 = time.perf_counter()
        ranks = policy.assign(view, cands, must_place=False)
        timer.add(time.perf_counter() - t0)
        take = ranks >= 0
        q_id = np.concatenate([q_id, vis[take]])
        q_rank = np.concatenate([q_rank, ranks[take]])
        pool = np.concatenate([vis[~take], pool[window:]])

    bar = tqdm(total=n, desc=f"online {policy.name}", unit="req", disable=not cfg.progress, leave=False)
    done_count = 0
    while done_count < n:
        # 1. arrivals up to now
        hi = int(np.searchsorted(arrival, clock, side="right"))
        if hi > nxt:
            new = np.arange(nxt, hi)
            if cap is None:
                est_total[new] = estimator.initial(prompt[new], out_len[new], None)
            else:  # no guess past the cap (the live controller clips the same way)
                est_total[new] = np.minimum(estimator.initial(prompt[new], out_len[new], cap[new]), cap[new])
            nxt = hi
            if cfg.binding == "immediate":
                bind_now(new)
            else:
                pool = np.concatenate([pool, new])
        if cfg.binding == "pool":
            fill_from_pool()
        # 2. ranks admit from their queues (FCFS per rank) up to slots and KV capacity
        admitted = np.zeros(0, np.int64)
        if q_id.size:
            order = np.argsort(q_rank, kind="stable")
            qi, qr = q_id[order], q_rank[order]
            starts = np.searchsorted(qr, np.arange(G))
            pos = np.arange(qi.size) - starts[qr]
            running = np.bincount(r_rank, minlength=G)
            kv_now = np.bincount(r_rank, weights=r_kv, minlength=G)
            csum = np.cumsum(prompt[qi])
            base = np.concatenate([[0], csum])[starts][qr]
            fits = (pos < B - running[qr]) & (kv_now[qr] + csum - base <= cfg.kv_capacity)
            # FCFS: a rank stops at its first request that does not fit
            blocked = np.zeros(qi.size, bool)
            bad = np.flatnonzero(~fits)
            if bad.size:
                first_bad = np.full(G, qi.size)
                np.minimum.at(first_bad, qr[bad], bad)
                blocked = np.arange(qi.size) >= first_bad[qr]
            adm = fits & ~blocked
            admitted, adm_rank = qi[adm], qr[adm]
            q_id, q_rank = qi[~adm], qr[~adm]
            # restore binding order among the rest (ids grow with arrival)
            o2 = np.argsort(q_id, kind="stable")
            q_id, q_rank = q_id[o2], q_rank[o2]
        if admitted.size:
            # 3a. prefill barrier step: every rank joins; the longest prefill sets its length
            pre_tokens = np.bincount(adm_rank, weights=prompt[admitted], minlength=G)
            has = np.bincount(adm_rank, minlength=G) > 0
            local = np.where(has, cost.a + cost.prefill_per_token * pre_tokens, 0.0)
            T = local.max() + cost.sync
            energy += power.step_energy(T, local, has | (np.bincount(r_rank, minlength=G) > 0))
            prefill_time += T
            prefill_steps += 1
            clock += T
            steps += 1
            first_tok[admitted] = clock
            r_id = np.concatenate([r_id, admitted])
            r_rank = np.concatenate([r_rank, adm_rank])
            r_kv = np.concatenate([r_kv, prompt[admitted] + 1])
            r_gen = np.concatenate([r_gen, np.ones(admitted.size, np.int64)])
            tokens += admitted.size
        elif r_id.size:
            # 3b. decode step
            nrun = np.bincount(r_rank, minlength=G)
            L = np.bincount(r_rank, weights=r_kv, minlength=G)
            local = np.where(nrun > 0, cost.step_time(nrun, L), cost.a)  # empty ranks still join
            T = local.max() + cost.sync
            waits = T - cost.sync - local
            decode_time += T
            step_wait = float(waits.sum())
            wait_time += step_wait
            if pool.size or q_id.size:
                queued_time += T
                queued_wait += step_wait
            step_floor = cost.wait_floor(r_kv, G)
            floor_wait += step_floor
            if nxt >= n:
                drain_time += T
                drain_wait += step_wait
                floor_drain += step_floor
            if r_id.size < G:
                sparse_time += T
                sparse_wait += step_wait
            energy += power.step_energy(T, np.where(nrun > 0, local, 0.0), nrun > 0)
            imb_sum += G * L.max() - L.sum()
            decode_steps += 1
            clock += T
            steps += 1
            r_kv += 1
            r_gen += 1
            tokens += r_id.size
        else:
            # nothing to run: jump to the next arrival (or the pool deadline)
            nxt_t = arrival[nxt] if nxt < n else np.inf
            if pool.size:
                nxt_t = min(nxt_t, float(arrival[pool].min()) + cfg.max_pool_wait_s + 1e-9)
            if not np.isfinite(nxt_t):
                raise RuntimeError("simulation stalled: requests left but nothing can run "
                                   "(a prompt larger than --kv-capacity?)")
            clock = max(clock, float(nxt_t))
            continue
        # 4. departures
        done = r_gen >= out_len[r_id]
        if done.any():
            ids = r_id[done]
            finish[ids] = clock
            estimator.observe(out_len[ids], prompt[ids])
            keep = ~done
            r_id, r_rank, r_kv, r_gen = r_id[keep], r_rank[keep], r_kv[keep], r_gen[keep]
            done_count += ids.size
            bar.update(ids.size)
        if lag:  # (copies: the step updates r_kv and r_gen in place)
            seen.append((r_id, r_rank, r_kv.copy(), r_gen.copy()))
    bar.close()

    def idle_over(wait: float, seconds: float) -> float | None:
        """Idle fraction of a part of the decode time (None if the part is empty)."""
        return wait / (G * seconds) if seconds > 0 else None

    ttft = first_tok - arrival
    multi = out_len > 1
    tpot = (finish[multi] - first_tok[multi]) / (out_len[multi] - 1)
    latency = finish - arrival
    elapsed = float(finish.max() - arrival[0])
    res = SimResult(
        idle_fraction=wait_time / (G * decode_time) if decode_time > 0 else 0.0,
        throughput_tok_s=float(out_len.sum()) / elapsed if elapsed > 0 else None,
        tpot_ms=float(np.mean(tpot) * 1e3) if tpot.size else None,
        tpot_ms_p99=pct(tpot * 1e3, 99),
        ttft_ms_p50=pct(ttft * 1e3, 50),
        ttft_ms_p99=pct(ttft * 1e3, 99),
        imbalance=imb_sum / decode_steps if decode_steps else 0.0,
        energy_j_per_token=energy / tokens if tokens else None,
        decision_us_p50=timer.p50(),
        decision_us_p99=timer.p99(),
        requests_finished=int(np.isfinite(finish).sum()),
        steps=steps,
    )
    res.finish_s = finish  # per request, seconds (not part of the JSON contract)
    res.extra = {"latency_ms_p50": pct(latency * 1e3, 50), "latency_ms_p99": pct(latency * 1e3, 99),
                 "tpot_ms_p50": pct(tpot * 1e3, 50),
                 # where the time went: prefill steps stall every rank's decode
                 "prefill_steps": prefill_steps, "prefill_s": prefill_time,
                 "decode_steps": decode_steps, "decode_s": decode_time,
                 # the part of decode time during which a request was waiting
                 # (in the pool or a rank's queue): there a pool has a choice
                 "queued_s": queued_time,
                 "idle_queued": idle_over(queued_wait, queued_time),
                 "idle_unqueued": idle_over(wait_time - queued_wait, decode_time - queued_time),
                 # before and after the last arrival: a finite replay ends in a drain
                 # (a few long requests finishing alone) that a live server never reaches
                 "drain_s": drain_time,
                 "idle_arrivals": idle_over(wait_time - drain_wait, decode_time - drain_time),
                 "idle_drain": idle_over(drain_wait, drain_time),
                 # fewer running requests than ranks: idle that no placement avoids
                 "sparse_s": sparse_time, "sparse_idle_share": sparse_wait / wait_time if wait_time > 0 else None,
                 # a lower bound on idle given each step's running requests (CostModel.wait_floor):
                 # idle - floor is what placement could still win
                 "idle_floor": idle_over(floor_wait, decode_time),
                 "idle_above_floor": idle_over(wait_time - floor_wait, decode_time),
                 "floor_arrivals": idle_over(floor_wait - floor_drain, decode_time - drain_time),
                 "floor_drain": idle_over(floor_drain, drain_time)}
    return res
