#!/usr/bin/env python
"""Paper mode across request-order seeds: how much of a policy's idle and
throughput is the policy and how much the draw. The paper's figures exist for
seed 42 only; other seeds show the spread (mean and range over seeds)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sglang_ext.policies import make_policy, parse_policy_spec
from sglang_ext.sim.paper import PaperConfig, simulate_paper
from sglang_ext.traces import load_trace, paper_order

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="burstgpt_lengths_8000.json,arxiv_lengths_8000.json")
    ap.add_argument("--policies", default="fcfs,jsq,bfio")
    ap.add_argument("--seeds", default="42,43,44,45,46")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"\nPaper mode, G=32, B=72, N=8000, seeds {seeds}: mean [min, max]\n")
    print("| trace | policy | idle | throughput tok/s | throughput vs FCFS |")
    print("|---|---|---|---|---|")
    for tname in args.traces.split(","):
        trace = load_trace(REPO / "data/traces" / tname)
        res = {}
        for seed in tqdm(seeds, desc=tname):
            tr = paper_order(trace, 8000, seed)
            for spec in args.policies.split(","):
                name, params = parse_policy_spec(spec)
                r = simulate_paper(tr, make_policy(name, **params), PaperConfig(32, 72))
                res.setdefault(spec, []).append((r.idle_fraction, r.throughput_tok_s))
        base = np.array(res[args.policies.split(",")[0]])[:, 1]
        for spec, rows in res.items():
            a = np.array(rows)
            gain = (a[:, 1] / base - 1) * 100
            print(f"| {tname.split('_')[0]} | {spec} | {a[:, 0].mean():.4f} [{a[:, 0].min():.4f}, {a[:, 0].max():.4f}] "
                  f"| {a[:, 1].mean():,.0f} [{a[:, 1].min():,.0f}, {a[:, 1].max():,.0f}] "
                  f"| {gain.mean():+.1f}% [{gain.min():+.1f}, {gain.max():+.1f}] |")


if __name__ == "__main__":
    main()
