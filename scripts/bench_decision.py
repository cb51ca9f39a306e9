#!/usr/bin/env python
"""bfio decision time per call on steady-state snapshots of a saturated server.

Each snapshot: G ranks, each holding B minus its free slots running requests
(KV and remaining steps drawn from a trace), a visible window of 4*G waiting
candidates, and a fraction of slots free (departures since the last step).
Prints p50/p99 microseconds per policy call for a grid of G, B and H, with
jsq on the same snapshots as the myopic reference. With --device cuda the
running requests are CUDA tensors, as the live controller hands them to the
policy on a GPU server (`--balancer-device`): the projection then runs the
compiled Triton kernel.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sglang_ext.argtypes import write_json, output_file, comma_list, nonneg_float, nonneg_int, positive_float, positive_int, require_device, run_main, trace_file
from sglang_ext.policies import Candidates, ClusterView, make_policy
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]


def snapshot(rng, trace, G, B, free_frac):
    free = rng.binomial(B, free_frac, size=G).clip(0, B)
    if free.sum() == 0:
        free[rng.integers(G)] = 1
    nrun = B - free
    N = int(nrun.sum())
    idx = rng.integers(0, len(trace), size=N)
    gen = (rng.random(N) * trace.output_len[idx]).astype(np.int64)
    req_rank = np.repeat(np.arange(G), nrun)
    req_kv = trace.prompt_len[idx] + gen
    req_rem = np.maximum(trace.output_len[idx] - gen, 1)
    view = ClusterView(free_slots=free, kv_tokens=np.bincount(req_rank, weights=req_kv, minlength=G).astype(np.int64),
                       num_requests=nrun, req_rank=req_rank, req_kv=req_kv, req_remaining=req_rem)
    c = rng.integers(0, len(trace), size=4 * G)
    return view, Candidates(prompt_len=trace.prompt_len[c], output_est=trace.output_len[c])


def time_calls(policy, snaps, must_place=False):
    out = []
    for view, cands in snaps:
        if must_place:
            cands = Candidates(cands.prompt_len[:1], cands.output_est[:1])
        t0 = time.perf_counter()
        policy.assign(view, cands, must_place=must_place)
        out.append((time.perf_counter() - t0) * 1e6)
    return np.percentile(out, 50), np.percentile(out, 99)


def add_snapshot_flags(ap: argparse.ArgumentParser, horizons: str, pool_tails: str, calls: int) -> None:
    """The flags of the snapshots and of the bfio timed on them (this script's and bench_pair's)."""
    ap.add_argument("--trace", type=trace_file(REPO / "data" / "traces"), default="burstgpt_lengths_8000.json",
                    help="Trace the running requests and candidates are drawn from (a name under data/traces, or a path).")
    ap.add_argument("--horizons", type=comma_list(nonneg_int), default=horizons, help="Comma-separated H values.")
    ap.add_argument("--pool-tails", type=comma_list(nonneg_float), default=pool_tails,
                    help="Comma-separated bfio pool_tail values (the online default is 0.002): with a tail, "
                         "pool calls also project a request's whole life (2000 steps) at 16 steps past H.")
    ap.add_argument("--free-frac", type=positive_float, default=0.02, help="Fraction of slots free at a call.")
    ap.add_argument("--calls", type=positive_int, default=calls, help="Snapshots per cell.")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="Seed of the snapshots drawn from the trace (default 0).")
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here as JSON.")


def parse_snapshot_flags(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if args.free_frac >= 1:
        ap.error(f"--free-frac must be below 1, got {args.free_frac}")
    return args


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=comma_list(positive_int), default="8,32,128", help="Comma-separated G values.")
    ap.add_argument("--batch", type=comma_list(positive_int), default="72,256", help="Comma-separated B values.")
    add_snapshot_flags(ap, horizons="0,20,80", pool_tails="0", calls=30)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="Where the running requests live: cpu (numpy, the torch reference projection) or cuda "
                         "(CUDA tensors, the compiled Triton kernel).")
    args = parse_snapshot_flags(ap)
    require_device(ap, args.device)
    trace = load_trace(args.trace)
    Gs, Bs, Hs, tails = args.ranks, args.batch, args.horizons, args.pool_tails
    rows = []
    cells = [(G, B, H, W) for G in Gs for B in Bs for H in Hs for W in tails]
    for G, B, H, W in tqdm(cells, desc="cells"):
        rng = np.random.default_rng(args.seed)
        snaps = [snapshot(rng, trace, G, B, args.free_frac) for _ in range(args.calls)]
        if args.device == "cuda":
            for view, _ in snaps:
                view.req_rank, view.req_kv, view.req_remaining = (
                    torch.from_numpy(x).cuda() for x in (view.req_rank, view.req_kv, view.req_remaining))
        bfio = make_policy("bfio", horizon=H, pool_tail=W)
        time_calls(bfio, snaps[:2])  # warm-up (on a GPU: the kernels compile for each horizon's block size)
        time_calls(bfio, snaps[:2], must_place=True)
        p50, p99 = time_calls(bfio, snaps)
        i50, i99 = time_calls(bfio, snaps, must_place=True)
        j50, _ = time_calls(make_policy("jsq"), snaps)
        slots = float(np.mean([v.free_slots.sum() for v, _ in snaps]))
        rows.append(dict(G=G, B=B, H=H, pool_tail=W, device=args.device, free_slots=slots, candidates=4 * G, pool_p50_us=p50,
                         pool_p99_us=p99, immediate_p50_us=i50, immediate_p99_us=i99, jsq_p50_us=j50))
    where = "CPU (numpy views, torch reference projection)"
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA views, compiled Triton projection)"
    print(f"\nbfio decision time per call on {where} (free slots ~{args.free_frac:.0%} of G*B, 4G candidates; "
          "immediate = one arriving request)\n")
    print("| G | B | H | pool tail | free slots | pool p50 us | pool p99 us | immediate p50 us | immediate p99 us "
          "| jsq pool p50 us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['B']} | {r['H']} | {r['pool_tail']:g} | {r['free_slots']:.0f} "
              f"| {r['pool_p50_us']:.0f} | {r['pool_p99_us']:.0f} | {r['immediate_p50_us']:.0f} "
              f"| {r['immediate_p99_us']:.0f} | {r['jsq_p50_us']:.0f} |")
    if args.json:
        write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    run_main(main)
