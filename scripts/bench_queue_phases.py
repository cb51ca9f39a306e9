#!/usr/bin/env python
"""Where the idle is under saturation: decode time with a request waiting (in
the pool or a rank's queue) against decode time without, and decode time
before the last arrival against the drain after it, per policy.

A pool can only choose *which* request goes next while requests wait. A finite
replay also ends in a drain: after the last arrival nothing is left to place,
and the last long requests finish on a few ranks while the rest wait, which a
server under steady traffic never reaches. The two splits show which part of
each run's idle fraction a placement policy can act on; the floor (a lower
bound on the idle of any placement of each step's running requests, see
CostModel.wait_floor) shows how much of it none can."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from sglang_ext.argtypes import (write_json, output_file, add_deep_queue, add_online_grid, add_online_model, check_online_model,
                                 positive_float, repeat_note, run_main)
from sglang_ext.cost import cost_preset, power_preset
from sglang_ext.estimators import make_estimator
from sglang_ext.sim.online import capacity_rps, scale_for_load, simulate_online
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_online_grid(ap, TRACES)
    ap.add_argument("--load", type=positive_float, default=1.3, help="Arrival rate / capacity.")
    add_deep_queue(ap)
    add_online_model(ap, power=False)
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here as JSON.")
    args = ap.parse_args()
    check_online_model(ap, args)
    runs = args.runs
    cost = cost_preset(args.cost_preset, args.batch)
    power = power_preset("h100")
    cells = [(path, G) for path in args.traces for G in args.ranks]
    rows = []
    for path, G in tqdm(cells, desc="cells"):
        tname, trace = path.name, load_trace(path).repeat(args.trace_repeat).head(args.requests_per_rank * G)
        scale = scale_for_load(trace, args.load, capacity_rps(trace, cost, G, args.batch, args.max_prompt_len, args.max_new_tokens))
        for spec in runs:
            cfg = spec.config(ranks=G, batch=args.batch, rate_scale=scale, cost=cost, power=power,
                              max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                              max_pool_wait_s=args.max_pool_wait)
            r = simulate_online(trace, spec.make_policy(cost), cfg, make_estimator(args.estimator, seed=0))
            rows.append(dict(trace=tname, G=G, N=len(trace), load=args.load, run=spec.text, **r.to_dict(), **r.extra))
    print(f"\nload {args.load}, N = min(trace, {args.requests_per_rank} x G), pool max wait {args.max_pool_wait:g} s, "
          f"cost preset {cost.name}{repeat_note(args.trace_repeat)}\n")
    # Two splits of each run's decode time. A split gives: the share of decode
    # time in the part the first column names, the idle fraction in the two
    # columns' parts, and the share of decode time in the second one.
    def waiting(r):
        share = r["queued_s"] / r["decode_s"]
        return share, r["idle_queued"], r["idle_unqueued"], 1 - share

    def drain(r):
        share = r["drain_s"] / r["decode_s"]
        return share, r["idle_arrivals"], r["idle_drain"], share

    _table(rows, "decode time with a request waiting | idle there | idle elsewhere | share of the idle elsewhere",
           waiting)
    print()
    _table(rows, "decode time after the last arrival | idle before it | idle after it | share of the idle after it "
                 "| share of the idle with fewer running requests than ranks | floor before | floor after",
           drain, extra=lambda r: f" {_pct(r['sparse_idle_share'])} | {_f(r['floor_arrivals'])} "
                                  f"| {_f(r['floor_drain'])} |")
    if args.json:
        write_json(args.json, rows, indent=1)


def _table(rows, head, split, extra=lambda r: ""):
    """One line per run: its idle fraction, then `split`'s columns and the share
    of the run's idle in the second column's part, then `extra` columns."""
    print(f"| trace | G | run | idle | {head} |")
    print("|" + "---|" * (4 + head.count("|") + 1))
    for r in rows:
        share, first, second, second_share = split(r)
        idle_share = second * second_share / r["idle_fraction"] if second is not None and r["idle_fraction"] else 0.0
        print(f"| {r['trace'].split('.')[0]} | {r['G']} | {r['run']} | {r['idle_fraction']:.4f} | {share:.0%} "
              f"| {_f(first)} | {_f(second)} | {idle_share:.0%} |" + extra(r))


def _f(x):
    return "-" if x is None else f"{x:.4f}"


def _pct(x):
    return "-" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    run_main(main)
