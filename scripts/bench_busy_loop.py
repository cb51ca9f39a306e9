#!/usr/bin/env python
"""The patched DP controller's loop when arrivals leave it little idle time.

`bench_controller.py` times each thing the controller does on its own. Here the
real `BalancedDispatch` runs as its event loop does, on a clock of decode steps:
every step (`--step-ms`; by default the paper-dsv3 preset's step for the ranks' KV)
all G ranks report, each acknowledging what was sent to it before the step
began (the running requests drawn as in bench_controller.py: saturated ranks,
the default empirical-prompt estimator); requests arrive as a Poisson stream
(`--arrivals` per step on average). In each turn the loop reads the reports
that are due, then the arrivals that are due (immediate binding: placed
together, in one call, as the loop places what it reads in one turn; pool
binding: pooled), then releases the pool into the free slots (every turn, as
the live loop does), and with nothing due estimates the newest reports while
idle (`prepare`), pausing for an arrival as the live loop does (a report does
not pause it). Per arrival: the time from its arrival to its send, and whether
the call that sent it estimated the newest reports first (immediate binding:
none it could use, more than `--balancer-view-lag` reports behind; a pool
release always reads the newest); per run, the loop's time on messages and
releases, and the garbage collector's own passes while the clock runs (how many,
how many of them full, the longest).
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np
from tqdm import tqdm

from bench_controller import add_grid, grid_cells, make_controller, reports, request
from bench_gc import Pauses
from sglang_ext.argtypes import (comma_list, nonneg_int, output_file, positive_float, positive_int, run_main,
                                 write_json)
from sglang_ext.cost import cost_preset
from sglang_ext.traces import load_trace

def acknowledged(reps, sent: np.ndarray):
    """The step's reports, each acknowledging what was sent to its rank before the step."""
    for r in reps:
        r.received = int(sent[r.dp_rank])
    return reps


def step_seconds(reps, B: int) -> float:
    """A decode step of these ranks under the paper-dsv3 cost preset: its slowest rank's."""
    cost = cost_preset("paper-dsv3", B)
    return float(cost.step_time(np.array([len(r.run_kv) for r in reps]),
                                np.array([int(r.run_kv.sum()) for r in reps])).max() + cost.sync)


def run_cell(policy: str, binding: str, trace, G: int, B: int, per_step: float, args, workdir: str) -> dict:
    rng = np.random.default_rng(args.seed)
    bal = make_controller(policy, binding, G, workdir, tag=f"-busy-{per_step:g}", view_lag=args.view_lag,
                          cpu_threads=args.cpu_threads)
    snapshots = [reports(rng, trace, G, B, args.free_frac, s + 1, args.max_new_tokens)
                 for s in range(args.steps + args.warmup)]
    step_s = args.step_ms / 1e3 if args.step_ms else step_seconds(snapshots[0], B)
    gaps = rng.exponential(step_s / per_step, size=int(3 * per_step * len(snapshots)) + 16)
    arrivals = np.cumsum(gaps)  # seconds after the first step's reports
    prompts = trace.prompt_len[rng.integers(0, len(trace), size=arrivals.size)]
    sent_at = np.full(arrivals.size, np.nan)  # when each arrival was sent, seconds on the same clock
    estimated_first = np.zeros(arrivals.size, bool)  # sent by a call that estimated the newest reports first
    send = bal._send

    def timed_send(g, out):  # (every send goes through here: the time of each request's)
        send(g, out)
        k = int(out.rid[1:])  # (rid a<k>)
        sent_at[k] = time.perf_counter() - t0
        estimated_first[k] = bal._reported is not view_before

    bal._send = timed_send
    step, nxt = 0, 0
    bal.on_reports(acknowledged(snapshots[0], bal.sent))
    bal.prepare()  # (the first estimate, before the clock runs)
    bal.freeze_gc("bench")  # (as the live loop does when it starts; undone after the run)
    gc_pauses = Pauses().start()  # (the collector's own passes while the clock runs)
    t0 = time.perf_counter()
    end = len(snapshots) * step_s
    busy = 0.0  # seconds the loop spent on messages (reports, arrivals, pool releases)
    while True:
        now = time.perf_counter() - t0
        if now >= end:
            break
        view_before = bal._reported
        due_step = min(int(now // step_s), len(snapshots) - 1)
        due = int(np.searchsorted(arrivals, now, side="right"))
        if due_step > step or due > nxt:  # a turn of the loop: reports first, then the arrivals
            for s_ in range(step + 1, due_step + 1):
                bal.on_reports(acknowledged(snapshots[s_], bal.sent))
            step = max(step, due_step)
            bal._arrivals = [] if binding == "immediate" else None  # (read together, placed in one call)
            for k in range(nxt, due):
                req = request(prompts[k], args.max_new_tokens)
                req.rid = f"a{k}"
                bal.dispatch(req)
            if bal._arrivals is not None:
                bal.place_arrivals()
            bal._arrivals = None
            nxt = due
            bal.release_pool()  # (the loop's last stage, every turn; nothing under immediate binding)
            busy += time.perf_counter() - t0 - now
            continue
        next_arrival = t0 + arrivals[nxt]
        if bal.prepare_due():
            bal.prepare(interrupted=lambda: time.perf_counter() >= next_arrival)
            continue
        next_step = t0 + (step + 1) * step_s
        while time.perf_counter() < min(next_arrival, next_step):  # (idle: spin, as a poll would wake)
            pass
    gc_pauses.stop()
    gc.unfreeze()
    gc_ms = [ms for _, ms in gc_pauses.passes]
    timed = (arrivals >= args.warmup * step_s) & (arrivals < end)
    placed = timed & ~np.isnan(sent_at)
    waits = (sent_at - arrivals)[placed] * 1e3
    ms = lambda q: float(np.percentile(waits, q)) if waits.size else float("nan")  # noqa: E731
    return dict(policy=policy, binding=binding, G=G, B=B, step_ms=step_s * 1e3, arrivals_per_step=per_step,
                arrivals=int(timed.sum()), unplaced=int((timed & ~placed).sum()),
                wait_p50_ms=ms(50), wait_p90_ms=ms(90), wait_p99_ms=ms(99), wait_max_ms=ms(100),
                estimated_first=int(estimated_first[placed].sum()), lagged=bal.stats["lagged"],
                arrived=nxt, sent=int(bal.sent.sum()), pooled=len(bal.pool), busy_fraction=busy / end,
                estimates_while_idle=bal.stats["prepared"], paused=bal.stats["paused"], steps=args.steps,
                gc_passes=len(gc_ms), gc_full_passes=int(gc_pauses.full().size), gc_max_ms=max(gc_ms, default=0.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid(ap, cells="256x256", policies="bfio")
    ap.add_argument("--bindings", type=comma_list(str), default="immediate",
                    help="Comma list of --balancer-binding values: immediate (each arrival placed as it is "
                         "read) and/or pool (held, released into the free slots every turn of the loop).")
    ap.add_argument("--arrivals", type=comma_list(positive_float), default="1,2,4,8",
                    help="Comma list: mean arrivals per decode step.")
    ap.add_argument("--step-ms", type=positive_float, default=None,
                    help="Decode step, ms (default: the paper-dsv3 preset's step for the ranks' KV).")
    ap.add_argument("--steps", type=positive_int, default=200, help="Decode steps timed per run.")
    ap.add_argument("--warmup", type=nonneg_int, default=5, help="Steps run before timing.")
    ap.add_argument("--view-lag", type=nonneg_int, default=1, help="--balancer-view-lag of the controller.")
    ap.add_argument("--cpu-threads", type=nonneg_int, default=1,
                    help="--balancer-cpu-threads of the controller (torch threads of the CPU projection; "
                    "0: torch's default).")
    ap.add_argument("--free-frac", type=positive_float, default=0.02, help="Fraction of slots free at a report.")
    ap.add_argument("--max-new-tokens", type=positive_int, default=2048, help="Every request's max_new_tokens.")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="Seed of the reports and arrivals.")
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here as JSON.")
    args = ap.parse_args()
    if args.free_frac >= 1:
        ap.error(f"--free-frac must be below 1, got {args.free_frac}")
    if bad := [b for b in args.bindings if b not in ("immediate", "pool")]:
        ap.error(f"--bindings: unknown {', '.join(bad)} (choose from immediate, pool)")
    cells = grid_cells(ap, args)
    trace = load_trace(args.trace)
    rows = []
    jobs = [(p, b, G, B, a) for G, B in cells for p in args.policies for b in args.bindings for a in args.arrivals]
    with tempfile.TemporaryDirectory() as workdir:
        for policy, binding, G, B, per_step in tqdm(jobs, desc="runs"):
            rows.append(run_cell(policy, binding, trace, G, B, per_step, args, workdir))
    print(f"\nview lag {args.view_lag}, {args.steps} steps per run; an arrival's wait: from its arrival to its "
          "send (ms); busy: the loop's time on messages and releases, of the run's\n")
    print("| G | B | policy | binding | step ms | arrivals per step | arrivals | wait p50 | p90 | p99 | max "
          "| estimated first | estimates while idle | paused | busy | GC passes (full) | longest GC pause |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['B']} | {r['policy']} | {r['binding']} | {r['step_ms']:.2f} "
              f"| {r['arrivals_per_step']:g} | {r['arrivals']} | {r['wait_p50_ms']:.2f} | {r['wait_p90_ms']:.2f} "
              f"| {r['wait_p99_ms']:.2f} | {r['wait_max_ms']:.2f} | {r['estimated_first']} "
              f"| {r['estimates_while_idle']} | {r['paused']} | {r['busy_fraction']:.0%} "
              f"| {r['gc_passes']} ({r['gc_full_passes']}) | {r['gc_max_ms']:.2f} |")
    if args.json:
        write_json(args.json, {"config": vars(args) | {"trace": str(args.trace)}, "rows": rows})


if __name__ == "__main__":
    run_main(main)
