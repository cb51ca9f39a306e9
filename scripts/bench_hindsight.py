#!/usr/bin/env python
"""How much of a replay's drain placement could still win: each run's requests
held at its last placement, re-placed with hindsight.

A finite replay ends in a drain: after the last placement the ranks decode
what they hold, and the last long requests finish on a few ranks while the
others wait. This script records what the ranks hold at each run's last
placement (running, queued and just placed; KV tokens and decode steps left,
exact under the oracle estimator), and compares the drain those requests make
where the run put them against the drain they make re-placed knowing every
length (sim/hindsight.py: largest first where they overlap least, or where
the run put them if that drains better, then swaps). Requests cannot move and no policy knows the future, so the hindsight
drain is out of any online policy's reach; the run's idle with its drain
swapped for the hindsight one shows how far placement could move the whole
run's idle, and the floor (CostModel.wait_floor) how far none can.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sglang_ext.argtypes import (write_json, output_file, add_deep_queue, add_online_grid, add_online_model,
                                 check_online_model, comma_list, nonneg_int,
                                 positive_float, repeat_note, run_main)
from sglang_ext.cost import cost_preset, power_preset
from sglang_ext.estimators import make_estimator
from sglang_ext.policies import Policy
from sglang_ext.sim.hindsight import drain, rank_loads, replace
from sglang_ext.sim.online import capacity_rps, scale_for_load, simulate_online
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"


class LastPlacement(Policy):
    """Wraps a policy and keeps what the ranks hold after its last placement.
    Asks the simulator for the per-request arrays whatever the policy reads."""

    needs_requests = True

    def __init__(self, inner: Policy):
        self.inner, self.name, self.scenarios = inner, inner.name, inner.scenarios
        self.held = None

    def reset(self):
        self.inner.reset()
        self.held = None

    def assign(self, view, cands, must_place=False):
        out = self.inner.assign(view, cands, must_place)
        put = out >= 0
        if put.any():
            self.held = (np.concatenate([view.req_rank, out[put]]),
                         np.concatenate([view.req_kv, cands.prompt_len[put]]),
                         np.concatenate([view.req_remaining, cands.output_est[put]]))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_online_grid(ap, TRACES)
    ap.add_argument("--loads", type=comma_list(positive_float), default="1.3",
                    help="Comma list of loads: arrival rate / capacity.")
    add_deep_queue(ap)
    ap.add_argument("--swaps", type=nonneg_int, default=20000,
                    help="Swaps tried by the hindsight re-placement after its greedy start.")
    add_online_model(ap, power=False)
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here.")
    args = ap.parse_args()
    check_online_model(ap, args)
    if args.estimator != "oracle":
        ap.error("--estimator: hindsight needs the exact lengths (oracle)")
    runs = args.runs
    cost = cost_preset(args.cost_preset, args.batch)
    power = power_preset("h100")
    rows = []
    for path, G, load in tqdm([(p, G, x) for p in args.traces for G in args.ranks for x in args.loads], desc="cells"):
        trace = load_trace(path).repeat(args.trace_repeat).head(args.requests_per_rank * G)
        scale = scale_for_load(trace, load, capacity_rps(trace, cost, G, args.batch, args.max_prompt_len, args.max_new_tokens))
        for spec in runs:
            cfg = spec.config(ranks=G, batch=args.batch, rate_scale=scale, cost=cost, power=power,
                              max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                              max_pool_wait_s=args.max_pool_wait)
            policy = LastPlacement(spec.make_policy(cost))
            r = simulate_online(trace, policy, cfg, make_estimator("oracle", seed=0))
            rank, kv, left = policy.held
            row = dict(trace=path.name, G=G, N=len(trace), load=load, run=spec.text,
                       idle_fraction=r.idle_fraction, idle_floor=r.extra["idle_floor"], held=int(rank.size),
                       drain_s=None, idle_drain_as_run=None, idle_drain_hindsight=None,
                       idle_with_hindsight_drain=None)
            # Immediate binding queues requests at ranks past their slots: they
            # start when the drain frees a slot, so the drain is not one of
            # fixed requests. Only a drain of requests that all fit is re-placed.
            if rank.size <= G * args.batch:
                as_run = drain(rank_loads(rank, kv, left, G, cost), cost)
                moved = replace(kv, left, G, args.batch, cost, swaps=args.swaps, start=rank)
                hind = drain(rank_loads(moved, kv, left, G, cost), cost)
                wait, time_s = r.idle_fraction * G * r.extra["decode_s"], r.extra["decode_s"]
                row.update(drain_s=as_run.time_s, idle_drain_as_run=as_run.idle(G),
                           idle_drain_hindsight=hind.idle(G),
                           idle_with_hindsight_drain=(wait - as_run.wait_s + hind.wait_s)
                           / (G * (time_s - as_run.time_s + hind.time_s)))
            rows.append(row)
    print(f"\nN = min(trace, {args.requests_per_rank} x G), pool max wait {args.max_pool_wait:g} s, "
          f"cost preset {cost.name}, {args.swaps} swaps{repeat_note(args.trace_repeat)}\n")
    print("| trace | G | load | run | idle | / total_tokens | held at the last placement | drain after it (s) "
          "| idle there as placed | with hindsight | run idle, hindsight drain | / total_tokens | floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b["idle_fraction"] for b in rows if b["trace"] == r["trace"] and b["G"] == r["G"]
                     and b["load"] == r["load"] and b["run"] == "total_tokens@immediate"), None)
        ratio = (lambda x: "-" if x is None else f"{x / base:.2f}") if base else (lambda x: "-")
        print(f"| {r['trace'].split('.')[0]} | {r['G']} | {r['load']:g} | {r['run']} | {r['idle_fraction']:.4f} "
              f"| {ratio(r['idle_fraction'])} | {r['held']} | {_f(r['drain_s'], 1)} | {_f(r['idle_drain_as_run'])} "
              f"| {_f(r['idle_drain_hindsight'])} | {_f(r['idle_with_hindsight_drain'])} "
              f"| {ratio(r['idle_with_hindsight_drain'])} | {r['idle_floor']:.4f} |")
    if args.json:
        write_json(args.json, rows, indent=1)


def _f(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    run_main(main)
