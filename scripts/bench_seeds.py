#!/usr/bin/env python
"""Paper mode across request-order seeds: how much of a policy's idle and
throughput is the policy and how much the draw. The paper's figures exist for
seed 42 only; other seeds show the spread (mean and range over seeds)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sglang_ext.argtypes import comma_list, nonneg_int, policy_spec, run_main, trace_file
from sglang_ext.policies import make_policy, parse_policy_spec
from sglang_ext.sim.paper import PaperConfig, simulate_paper
from sglang_ext.traces import load_trace, paper_order

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=comma_list(trace_file(TRACES)),
                    default="burstgpt_lengths_8000.json,arxiv_lengths_8000.json",
                    help="Comma list of length traces (names under data/traces, or paths).")
    ap.add_argument("--policies", type=comma_list(policy_spec), default="fcfs,jsq,bfio",
                    help="Comma list of POLICY[:key=val...] specs; the first is the throughput baseline.")
    ap.add_argument("--seeds", type=comma_list(nonneg_int), default="42,43,44,45,46",
                    help="Comma list of request-order seeds.")
    args = ap.parse_args()
    seeds = args.seeds
    print(f"\nPaper mode, G=32, B=72, N=8000, seeds {seeds}: mean [min, max]\n")
    print("| trace | policy | idle | throughput tok/s | throughput vs FCFS |")
    print("|---|---|---|---|---|")
    for path in args.traces:
        tname = path.name
        trace = load_trace(path)
        res = {}
        for seed in tqdm(seeds, desc=tname):
            tr = paper_order(trace, 8000, seed)
            for spec in args.policies:
                name, params = parse_policy_spec(spec)
                r = simulate_paper(tr, make_policy(name, **params), PaperConfig(32, 72))
                res.setdefault(spec, []).append((r.idle_fraction, r.throughput_tok_s))
        base = np.array(res[args.policies[0]])[:, 1]
        for spec, rows in res.items():
            a = np.array(rows)
            gain = (a[:, 1] / base - 1) * 100
            print(f"| {tname.split('_')[0]} | {spec} | {a[:, 0].mean():.4f} [{a[:, 0].min():.4f}, {a[:, 0].max():.4f}] "
                  f"| {a[:, 1].mean():,.0f} [{a[:, 1].min():,.0f}, {a[:, 1].max():,.0f}] "
                  f"| {gain.mean():+.1f}% [{gain.min():+.1f}, {gain.max():+.1f}] |")


if __name__ == "__main__":
    run_main(main)
