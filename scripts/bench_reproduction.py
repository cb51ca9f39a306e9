#!/usr/bin/env python
"""Paper-mode reproduction (G=32, B=72, N=8000, seed 42, exact output lengths):
our fcfs / round_robin / jsq against the released simulator's figures, and
bfio, ours and the paper's heuristic as design.md outlines it (variant=paper),
against the paper's BF-IO. Prints a markdown table."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from sglang_ext.argtypes import write_json, output_file, comma_list, estimator_spec, nonneg_int, policy_spec, positive_int, run_main, trace_file
from sglang_ext.estimators import make_estimator
from sglang_ext.policies import make_policy, parse_policy_spec
from sglang_ext.sim.paper import PaperConfig, simulate_paper
from sglang_ext.traces import load_trace, paper_order

REPO = Path(__file__).resolve().parents[1]
REF = REPO / "data/reference/paper_mode_baselines.json"
POLICIES = ["fcfs", "round_robin", "jsq", "total_tokens", "bfio:variant=paper:horizon=0",
            "bfio:variant=paper:horizon=20", "bfio:horizon=0", "bfio:horizon=20"]
# bfio rows, ours and the paper's heuristic (variant=paper), against the paper's BF-IO at the same H
REF_KEY = {f"bfio:{v}horizon={H}": f"paper_bfio_h{H}" for v in ("", "variant=paper:") for H in (0, 20)}
TRACES = REPO / "data" / "traces"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=comma_list(trace_file(TRACES)),
                    default="burstgpt_lengths_8000.json,arxiv_lengths_8000.json,longbench_lengths_8000.json",
                    help="Comma list of length traces (names under data/traces, or paths).")
    ap.add_argument("--policies", type=comma_list(policy_spec), default=",".join(POLICIES),
                    help="Comma list of POLICY[:key=val...] specs.")
    ap.add_argument("--estimator", type=estimator_spec, default="oracle", help="oracle, noisy:<delta>, empirical, empirical-prompt")
    ap.add_argument("--estimator-seed", type=nonneg_int, default=42, help="Seed of the noisy estimator's draws.")
    ap.add_argument("--max-prompt-len", type=positive_int, default=131072, help="Context limit for clipping (longbench).")
    ap.add_argument("--json", type=output_file, default=None, help="Write every run's metrics here.")
    args = ap.parse_args()
    ref = json.loads(REF.read_text())["results"]
    rows = {}
    for path in args.traces:
        tname = path.name
        trace = load_trace(path)
        trace.prompt_len = trace.prompt_len.clip(max=args.max_prompt_len)
        trace = paper_order(trace, 8000, 42)
        for spec in tqdm(args.policies, desc=tname):
            name, params = parse_policy_spec(spec)
            r = simulate_paper(trace, make_policy(name, **params), PaperConfig(32, 72),
                               make_estimator(args.estimator, seed=args.estimator_seed))
            rows[(tname, spec)] = r
    print(f"\nPaper mode, G=32, B=72, N=8000, seed 42, estimator {args.estimator} (seed {args.estimator_seed}) "
          f"(prompts clipped to {args.max_prompt_len}); ref = the paper's released simulator\n")
    print("| trace | policy | idle | ref idle | tok/s | ref tok/s | vs FCFS | TPOT ms | ref TPOT | mJ/token | decision p50 us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for (tname, spec), r in rows.items():
        rr = ref.get(tname, {}).get(REF_KEY.get(spec, spec), {})
        base = rows[(tname, "fcfs")].throughput_tok_s if (tname, "fcfs") in rows else None
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        print(f"| {tname.split('_')[0]} | {spec} | {r.idle_fraction:.4f} | {f(rr.get('idle_fraction'), '.4f')} "
              f"| {r.throughput_tok_s:,.0f} | {f(rr.get('throughput_tok_s'), ',.0f')} "
              f"| {f(base and (r.throughput_tok_s / base - 1) * 100, '+.1f')}% | {r.tpot_ms:.2f} "
              f"| {f(rr.get('tpot_ms'), '.2f')} | {r.energy_j_per_token * 1e3:.1f} | {r.decision_us_p50:.0f} |")
        out.setdefault(tname, {})[spec] = r.to_dict()
    if args.json:
        write_json(args.json, out, indent=1)


if __name__ == "__main__":
    run_main(main)
