#!/usr/bin/env python
"""The patched DP controller's cost per decision, view building included.

`bench_decision.py` times the policy alone on a ready-made view. In the server the
controller first builds that view from the ranks' reports: every running and
waiting request, plus those sent but not yet acknowledged, with a remaining-length
estimate each. This script drives the real `BalancedDispatch` (real RankReports,
the default empirical-prompt estimator learning from reported finished lengths)
on steady-state snapshots of a saturated server: G ranks each holding B minus its
free slots running requests drawn from a trace. Per snapshot it times the
reading of the G reports (one step's worth), the first arriving request after
them under immediate binding when it waits for their estimate (`--balancer-view-lag 0`:
the reported requests are estimated, and a
refit of the estimator started, on first use: in a worker thread by default,
inside the call with --refit inline) and when it is placed on the previous
step's estimate (the default, view lag 1), the next arrival before the
next reports (the controller reuses what the reports said, so this is the policy
plus the in-flight requests), the estimate of the reports that the live event
loop makes while idle (`BalancedDispatch.prepare`: once a step's reports are in
and no message waits) and the arrival after it, a burst of arrivals read in one turn of the loop
(placed one call each, as before, or together in one call, as the loop now
does; per arrival, after the idle estimate), and one release of a 4G-request
pool under pool binding. A second table times an arrival that lands at a
uniformly drawn moment of the idle estimate (its length: the same snapshot's idle
estimate above), from the moment it lands to the end of its placement: when the
loop finishes the estimate first, and when the estimate pauses at its next stage
(`BalancedDispatch.prepare(interrupted=...)`, the live loop's default) and the
arrival is placed on the previous estimate; with it, the estimate's stages (how
many, and the longest: what such an arrival may wait for besides its own
placement). Only the encoding of each request and its ZMQ send are replaced (by
no-ops): their cost is the same whatever the policy.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import zmq
from tqdm import tqdm

from sglang_ext.argtypes import write_json, output_file, comma_list, grid_cell, nonneg_int, positive_float, positive_int, require_device, run_main, trace_file
from sglang_ext.plugin.config import BalancerConfig
from sglang_ext.plugin.protocol import RankReport
from sglang_ext.policies import policy_names
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
#: arrivals timed per snapshot landing during its idle estimate (the second table)
DURING_ARRIVALS = 8


class Nowhere:
    """A rank's socket whose sends go nowhere."""

    def send(self, data, flags: int = 0) -> None:
        pass


def make_controller(policy: str, binding: str, G: int, workdir: str, inline_refit: bool = False, tag: str = "",
                    device: str = "cpu", view_lag: int = 1, cpu_threads: int = 1, encode: bool = False):
    """A BalancedDispatch on a controller with G workers whose sends go nowhere; each
    request is encoded for its send as the live controller encodes it only with `encode`
    (else it is held as empty bytes)."""
    from sglang_ext.patches import controller
    from sglang_ext.plugin import protocol

    controller.encode_request = protocol.encode_request if encode else (lambda req: b"")
    ctrl = SimpleNamespace(workers=[Nowhere() for _ in range(G)], _active_workers=list(range(G)),
                           context=zmq.Context.instance())
    cfg = BalancerConfig(policy=policy, binding=binding, device=device, inline_refit=inline_refit, view_lag=view_lag,
                         cpu_threads=cpu_threads, report_addr=f"ipc://{workdir}/reports-{policy}-{binding}{tag}-{G}")
    return controller.BalancedDispatch(ctrl, cfg)


def reports(rng, trace, G: int, B: int, free_frac: float, step: int, cap: int) -> list[RankReport]:
    """One report per rank: B minus ~free_frac*B running requests, part-way through their answers,
    with their ignore_eos flags (all False) as the ranks' scheduler sends them."""
    free = rng.binomial(B, free_frac, size=G).clip(0, B)
    out = []
    for g in range(G):
        n = B - int(free[g])
        idx = rng.integers(0, len(trace), size=n)
        gen = (rng.random(n) * np.minimum(trace.output_len[idx], cap - 1)).astype(np.int64)
        fin = rng.integers(0, len(trace), size=int(free[g]))  # the departures that freed its slots
        out.append(RankReport(dp_rank=g, step=step, received=0, free_slots=int(free[g]), slot_limit=B,
                              run_kv=trace.prompt_len[idx] + gen, run_generated=gen, run_cap=np.full(n, cap),
                              finished_lengths=np.minimum(trace.output_len[fin], cap),
                              finished_prompts=trace.prompt_len[fin], run_exact=np.zeros(n, bool),
                              wait_exact=np.zeros(0, bool), finished_exact=np.zeros(fin.size, bool)))
    return out


def request(prompt_len: int, cap: int):
    return SimpleNamespace(rid=f"r{prompt_len}", input_ids=[1] * int(prompt_len), routed_dp_rank=None,
                           sampling_params=SimpleNamespace(max_new_tokens=cap, ignore_eos=False))


def clear_sent(bal) -> None:
    for q in bal.inflight:
        q.clear()


def add_grid(ap: argparse.ArgumentParser, cells: str, policies: str) -> None:
    """--trace, --cells and --policies: what the controller benchmarks run over."""
    ap.add_argument("--trace", type=trace_file(REPO / "data" / "traces"), default="burstgpt_lengths_8000.json",
                    help="Trace the requests' lengths are drawn from.")
    ap.add_argument("--cells", type=comma_list(grid_cell), default=cells,
                    help="Comma-separated GxB cells (ranks x running-request slots per rank).")
    ap.add_argument("--policies", type=comma_list(str), default=policies, help="Comma-separated policies.")


def grid_cells(ap: argparse.ArgumentParser, args) -> list[tuple[int, int]]:
    """`--cells` as (G, B) pairs, and `--policies` checked (a usage error names the flag)."""
    for p in args.policies:
        if p not in policy_names():
            ap.error(f"--policies: unknown policy {p!r} (known: {', '.join(policy_names())})")
    return args.cells


def time_cell(policy: str, trace, G: int, B: int, args, workdir: str) -> dict:
    rng = np.random.default_rng(args.seed)
    burst_rng = np.random.default_rng(args.seed + 1)  # (the snapshots stay those of --seed)
    inline = args.refit == "inline"
    dev = args.device

    def make(binding: str, tag: str = "", **kw):  # (every controller of the cell alike but for these)
        return make_controller(policy, binding, G, workdir, inline, tag=tag, device=dev, cpu_threads=args.cpu_threads,
                               **kw)

    immediate = make("immediate", view_lag=0)
    if immediate.device != dev:  # (the controller falls back to cpu when its CUDA probe fails, and logs why)
        raise SystemExit(f"--device {dev}: the controller runs on {immediate.device} (see the warning above)")
    prepared = make("immediate", "-prepared")
    lagging = make("immediate", "-lagging")
    pool = make("pool")
    each = make("immediate", "-each")
    together = make("immediate", "-together")
    whole = make("immediate", "-whole")
    pausing = make("immediate", "-pausing")
    staged = make("immediate", "-staged")
    arrive_rng = np.random.default_rng(args.seed + 2)
    t_whole, t_paused, paused, lagged = [], [], [], []
    t_reports, t_dispatch, t_next, t_prepare, t_prepared, t_release, placed, free = ([] for _ in range(8))
    t_each, t_together, t_lagged = [], [], []
    stages, longest = [], []
    for step in range(1, args.calls + 3):  # the first two snapshots warm up
        reps = reports(rng, trace, G, B, args.free_frac, step, args.max_new_tokens)
        prompts = trace.prompt_len[rng.integers(0, len(trace), size=4 * G + 1)]

        t0 = time.perf_counter()
        immediate.on_reports(reps)
        t1 = time.perf_counter()
        immediate.dispatch(request(prompts[0], args.max_new_tokens))  # the first arrival since the reports
        t2 = time.perf_counter()
        immediate.dispatch(request(prompts[-1], args.max_new_tokens))  # the next one, same reports
        t_next_arrival = time.perf_counter() - t2
        clear_sent(immediate)

        lagging.on_reports(reps)  # an arrival before the idle loop estimates them: the previous step's
        t12 = time.perf_counter()
        lagging.dispatch(request(prompts[0], args.max_new_tokens))
        t13 = time.perf_counter()
        lagging.prepare()  # (then the idle loop estimates them)
        clear_sent(lagging)

        prepared.on_reports(reps)  # the same step, estimated by the idle loop before the arrival
        t5 = time.perf_counter()
        prepared.prepare()
        t6 = time.perf_counter()
        prepared.dispatch(request(prompts[0], args.max_new_tokens))
        t7 = time.perf_counter()
        clear_sent(prepared)

        # an arrival landing at a uniform moment of the idle estimate (as long as the one
        # above); DURING_ARRIVALS moments per snapshot, each on the snapshot's reports afresh
        for at in arrive_rng.random(DURING_ARRIVALS) * (t6 - t5):
            paused_before, lagged_before = pausing.stats["paused"], pausing.stats["lagged"]
            for ctl, waits in ((whole, t_whole), (pausing, t_paused)):
                ctl.on_reports(reps)
                t_arrive = time.perf_counter() + at
                ctl.prepare(interrupted=(lambda: time.perf_counter() >= t_arrive) if ctl is pausing else None)
                while time.perf_counter() < t_arrive:  # (the estimate ended first: the arrival comes after it)
                    pass
                ctl.dispatch(request(prompts[0], args.max_new_tokens))
                waits.append(time.perf_counter() - t_arrive)
                ctl.prepare()  # (the idle loop then goes on with the estimate)
                clear_sent(ctl)
            paused.append(pausing.stats["paused"] > paused_before)
            lagged.append(pausing.stats["lagged"] > lagged_before)

        # the idle estimate's stages: the time between two of the loop's questions
        staged.on_reports(reps)
        stamps = [time.perf_counter()]
        staged.prepare(interrupted=lambda: stamps.append(time.perf_counter()) or False)
        stamps.append(time.perf_counter())
        gaps = np.diff(stamps)

        burst_prompts = trace.prompt_len[burst_rng.integers(0, len(trace), args.burst)]
        burst = [request(p, args.max_new_tokens) for p in burst_prompts]
        each.on_reports(reps)
        each.prepare()
        t8 = time.perf_counter()
        for r in burst:  # one policy call per arrival
            each.dispatch(r)
        t9 = time.perf_counter()
        clear_sent(each)
        together.on_reports(reps)
        together.prepare()
        t10 = time.perf_counter()
        together._arrivals = []  # as the event loop reads them: collected, then placed in one call
        for r in burst:
            together.dispatch(r)
        together.place_arrivals()
        together._arrivals = None
        t11 = time.perf_counter()
        clear_sent(together)

        pool.on_reports(reps)
        pool.pool.clear()
        for p in prompts[:-1]:
            pool.dispatch(request(p, args.max_new_tokens))
        sent_before = int(pool.sent.sum())
        t3 = time.perf_counter()
        pool.release_pool()
        t4 = time.perf_counter()
        clear_sent(pool)
        if step > 2:
            t_reports.append(t1 - t0)
            t_dispatch.append(t2 - t1)
            t_next.append(t_next_arrival)
            t_prepare.append(t6 - t5)
            t_prepared.append(t7 - t6)
            t_release.append(t4 - t3)
            t_each.append((t9 - t8) / len(burst))
            t_together.append((t11 - t10) / len(burst))
            t_lagged.append(t13 - t12)
            placed.append(int(pool.sent.sum()) - sent_before)
            stages.append(gaps.size)
            longest.append(gaps.max())
            free.append(sum(r.free_slots for r in reps))
        else:  # (the warm-up snapshots)
            for xs in (t_whole, t_paused, paused, lagged):
                xs.clear()
    us = lambda xs, q: float(np.percentile(xs, q) * 1e6)  # noqa: E731
    return dict(policy=policy, G=G, B=B, requests=int(G * B * (1 - args.free_frac)),
                reports_p50_us=us(t_reports, 50), dispatch_p50_us=us(t_dispatch, 50), dispatch_p99_us=us(t_dispatch, 99),
                lagged_dispatch_p50_us=us(t_lagged, 50), lagged_dispatch_p99_us=us(t_lagged, 99),
                lagged_placements=lagging.stats["lagged"],  # (every snapshot but the first)
                next_dispatch_p50_us=us(t_next, 50), prepare_p50_us=us(t_prepare, 50),
                prepared_dispatch_p50_us=us(t_prepared, 50), prepared_dispatch_p99_us=us(t_prepared, 99),
                release_p50_us=us(t_release, 50), release_p99_us=us(t_release, 99), burst=args.burst,
                burst_each_p50_us=us(t_each, 50), burst_together_p50_us=us(t_together, 50),
                pool_placed=float(np.mean(placed)), pool_free_slots=float(np.mean(free)),
                during_whole_p50_us=us(t_whole, 50), during_whole_p90_us=us(t_whole, 90),
                during_whole_max_us=us(t_whole, 100), during_paused_p50_us=us(t_paused, 50),
                during_paused_p90_us=us(t_paused, 90), during_paused_max_us=us(t_paused, 100),
                during_paused=int(np.sum(paused)), during_lagged=int(np.sum(lagged)),
                stages_p50=float(np.median(stages)), longest_stage_p50_us=us(longest, 50),
                longest_stage_max_us=us(longest, 100))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid(ap, cells="8x72,32x72,32x256,256x256", policies="total_tokens,bfio")
    ap.add_argument("--free-frac", type=positive_float, default=0.02, help="Fraction of slots free at a snapshot.")
    ap.add_argument("--max-new-tokens", type=positive_int, default=2048, help="Every request's max_new_tokens.")
    ap.add_argument("--calls", type=positive_int, default=30, help="Snapshots per cell.")
    ap.add_argument("--burst", type=positive_int, default=16,
                    help="Arrivals read in one turn of the controller's loop, timed placed one call each "
                    "and together (per arrival).")
    ap.add_argument("--refit", choices=("background", "inline"), default="background",
                    help="Where the estimator refits: in a worker thread (the live default) or inside "
                    "the timed call (--balancer-inline-refit).")
    ap.add_argument("--cpu-threads", type=nonneg_int, default=1,
                    help="The controllers' --balancer-cpu-threads (torch threads of the CPU projection; "
                    "0: torch's default).")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="The controller's --balancer-device: cpu (numpy views, the torch projection) or cuda "
                         "(the requests shipped to the GPU, the compiled Triton projection).")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="Seed of the snapshots drawn from the trace (default 0).")
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here as JSON.")
    args = ap.parse_args()
    if args.free_frac >= 1:
        ap.error(f"--free-frac must be below 1, got {args.free_frac}")
    require_device(ap, args.device)
    cells = grid_cells(ap, args)
    trace = load_trace(args.trace)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for G, B in tqdm(cells, desc="cells"):
            for policy in args.policies:
                rows.append(time_cell(policy, trace, G, B, args, workdir))
    print(f"\nController time per decision on {args.device}, view included (free slots ~{args.free_frac:.0%}; immediate = one "
          f"arriving request; pool = releasing a 4G-request pool; {args.refit} refit)\n")
    print("| G | B | running | policy | G reports p50 us | immediate, estimate first, p50 us | its p99 us "
          "| on the previous estimate p50 us | its p99 us | next arrival p50 us | idle estimate p50 us | arrival after it p50 us | arrival after it p99 us "
          f"| burst of {args.burst}, one call each, p50 us per arrival | burst together, p50 us per arrival "
          "| pool p50 us | pool p99 us | pool placed / free slots |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['B']} | {r['requests']} | {r['policy']} | {r['reports_p50_us']:.0f} "
              f"| {r['dispatch_p50_us']:.0f} | {r['dispatch_p99_us']:.0f} | {r['lagged_dispatch_p50_us']:.0f} "
              f"| {r['lagged_dispatch_p99_us']:.0f} | {r['next_dispatch_p50_us']:.0f} "
              f"| {r['prepare_p50_us']:.0f} | {r['prepared_dispatch_p50_us']:.0f} "
              f"| {r['prepared_dispatch_p99_us']:.0f} | {r['burst_each_p50_us']:.0f} "
              f"| {r['burst_together_p50_us']:.0f} | {r['release_p50_us']:.0f} "
              f"| {r['release_p99_us']:.0f} | {r['pool_placed']:.0f} / {r['pool_free_slots']:.0f} |")
    print("\nAn arrival landing at a uniform moment of the idle estimate, waited from then to the end of its "
          "placement (us): the estimate finished first, or paused at its next stage (the default); "
          "the estimate's stages, and the longest of each estimate\n")
    print("| G | B | running | policy | idle estimate p50 | finished first p50 | p90 | max "
          "| paused p50 | p90 | max | arrivals paused (placed on the previous estimate) | stages p50 "
          "| longest stage p50 | max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['B']} | {r['requests']} | {r['policy']} | {r['prepare_p50_us']:.0f} "
              f"| {r['during_whole_p50_us']:.0f} | {r['during_whole_p90_us']:.0f} | {r['during_whole_max_us']:.0f} "
              f"| {r['during_paused_p50_us']:.0f} | {r['during_paused_p90_us']:.0f} | {r['during_paused_max_us']:.0f} "
              f"| {r['during_paused']} ({r['during_lagged']}) of {DURING_ARRIVALS * args.calls} "
              f"| {r['stages_p50']:.0f} | {r['longest_stage_p50_us']:.0f} | {r['longest_stage_max_us']:.0f} |")
    if args.json:
        write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    run_main(main)
