#!/usr/bin/env python
"""Online mode: timed traces, immediate binding (SGLang) and a central pool
(late binding), at a moderate and a saturated load, for every policy.

Load = arrival rate / capacity, where capacity is the request rate the ranks
serve with every slot busy (sglang_ext.sim.online.capacity_rps). Prints one
markdown table per (trace, G, load) cell and a summary of bfio against
total_tokens and pool jsq."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from sglang_ext.argtypes import (write_json, saved_rows, output_file, add_online_grid, add_online_model,
                                 check_online_model, comma_list, existing_file, positive_float,
                                 positive_int, repeat_note, run_main, run_specs)
from sglang_ext.cost import cost_preset, power_preset
from sglang_ext.estimators import make_estimator
from sglang_ext.sim.online import capacity_rps, scale_for_load, simulate_online
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"
RUNS = ("total_requests@immediate,total_tokens@immediate,round_robin@immediate,power_of_two@immediate,"
        "jsq@immediate,bfio@immediate,jsq@pool,bfio@pool")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_online_grid(ap, TRACES)
    ap.add_argument("--loads", type=comma_list(positive_float), default="0.7,1.3",
                    help="Comma list of loads: arrival rate / capacity.")
    ap.add_argument("--requests-per-rank", type=positive_int, default=250, help="N = min(trace, this * G).")
    add_online_model(ap)
    ap.add_argument("--max-pool-wait", type=positive_float, default=5.0,
                    help="Seconds a request may wait in the pool before the immediate rule binds it "
                         "(under a queue deeper than this, the pool turns into delayed immediate binding).")
    ap.add_argument("--runs", type=run_specs, default=RUNS,
                    help="Comma list of POLICY[:key=val...]@BINDING, e.g. bfio:prefill=8e-7@immediate (default: all).")
    ap.add_argument("--json", type=output_file, default=None, help="Write every cell's metrics here (read back by --summary-from).")
    ap.add_argument("--summary-from", type=existing_file, default=None, help="Print the comparison summary of a saved --json run and exit.")
    args = ap.parse_args()
    check_online_model(ap, args)
    if args.summary_from:
        print(summarize(saved_rows(args.summary_from, strings=("trace", "policy", "binding"), numbers=(
            "G", "load", "idle_fraction", "tpot_ms_p99", "latency_ms_p99", "energy_j_per_token"))))
        return
    runs = args.runs
    power = power_preset(args.power_preset)
    cost = cost_preset(args.cost_preset, args.batch)
    print(f"cost preset {cost.name} (a={cost.a*1e3:.3f} ms, b={cost.b*1e3:.4f} ms, c={cost.c*1e6:.4f} us/token, "
          f"prefill {cost.prefill_per_token*1e6:.2f} us/token); power {power.name}: busy {power.busy_w:.0f} W, "
          f"barrier-wait {power.wait_w:.0f} W, idle {power.idle_w:.0f} W; estimator {args.estimator}"
          f"{repeat_note(args.trace_repeat)}")
    results = []
    cells = [(path, G, load) for path in args.traces for G in args.ranks for load in args.loads]
    for path, G, load in tqdm(cells, desc="cells"):
        tname = path.name
        trace = load_trace(path).repeat(args.trace_repeat).head(args.requests_per_rank * G)
        cap = capacity_rps(trace, cost, G, args.batch, args.max_prompt_len, args.max_new_tokens)
        scale = scale_for_load(trace, load, cap)
        rows = []
        for spec in runs:
            cfg = spec.config(ranks=G, batch=args.batch, rate_scale=scale, cost=cost, power=power,
                              max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                              max_pool_wait_s=args.max_pool_wait)
            r = simulate_online(trace, spec.make_policy(cost), cfg, make_estimator(args.estimator, seed=0))
            row = dict(trace=tname, G=G, load=load, policy=spec.policy, binding=spec.binding,
                       **r.to_dict(), **r.extra)
            rows.append(row)
            results.append(row)
        print(f"\n### {tname}, G={G}, B={args.batch}, load {load} (N={len(trace)}, capacity {cap:.1f} req/s)\n")
        print("| policy | binding | idle | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | e2e p99 ms | J/token |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['policy']} | {r['binding']} | {r['idle_fraction']:.4f} | {r['throughput_tok_s']:,.0f} "
                  f"| {r['ttft_ms_p50']:.0f} | {r['ttft_ms_p99']:.0f} | {r['tpot_ms_p50']:.2f} | {r['tpot_ms_p99']:.2f} "
                  f"| {r['latency_ms_p99']:.0f} | {r['energy_j_per_token']:.4f} |")
    print(summarize(results))
    if args.json:
        write_json(args.json, results, indent=1)


def summarize(results: list[dict]) -> str:
    """bfio against SGLang's total_tokens (immediate) and jsq filling the same pool,
    per (trace, G, load) cell: idle ratios (lower is better), p99 TPOT and p99
    end-to-end latency."""
    cells: dict = {}
    for r in results:
        cells.setdefault((r["trace"], r["G"], r["load"]), {})[f"{r['policy']}@{r['binding']}"] = r
    lines = ["", "| trace | G | load | idle tt@imm | bfio@imm / tt | TPOT p99 bfio@imm vs tt (ms) "
             "| bfio@pool / tt | bfio@pool / jsq@pool | e2e p99 bfio@pool, tt, jsq@pool (s) | J/token tt, bfio@imm, bfio@pool |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (trace, G, load), c in cells.items():
        tt, bi, bp, jp = (c.get(k) for k in ("total_tokens@immediate", "bfio@immediate", "bfio@pool", "jsq@pool"))
        if not (tt and bi and bp and jp):
            continue
        lines.append(
            f"| {trace.split('.')[0]} | {G} | {load} | {tt['idle_fraction']:.4f} "
            f"| {bi['idle_fraction'] / tt['idle_fraction']:.2f} | {bi['tpot_ms_p99']:.1f} vs {tt['tpot_ms_p99']:.1f} "
            f"| {bp['idle_fraction'] / tt['idle_fraction']:.2f} | {bp['idle_fraction'] / jp['idle_fraction']:.2f} "
            f"| {bp['latency_ms_p99'] / 1e3:.2f}, {tt['latency_ms_p99'] / 1e3:.2f}, {jp['latency_ms_p99'] / 1e3:.2f} "
            f"| {tt['energy_j_per_token']:.3f}, {bi['energy_j_per_token']:.3f}, {bp['energy_j_per_token']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
