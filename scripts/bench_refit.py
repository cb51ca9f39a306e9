#!/usr/bin/env python
"""What a refit of the learned length estimate costs the controller, inline and in a worker thread.

The `empirical-prompt` estimator refits its survival functions (one per prompt
bucket, one entry per output length up to the longest seen) about once per
step at scale. Its arrays grow with the longest answer: a server whose answers
run to tens of thousands of tokens (reasoning models) refits arrays of millions
of entries. Per cell (longest answer L, running requests) this script builds
the estimator's state from synthetic lengths (log-normal, the longest at L;
prompts spread over three decades), makes a refit due, and times the call that
triggers it (estimating every running request, as the controller does after a
batch of reports): inline (`--balancer-inline-refit`), the call waits for the
fit; with the live controller's default, a fit of at least
`background_min_entries` entries is redone in a worker thread while the call
answers from the previous fit (a smaller one stays inline). The last column
times the same call with no refit due.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from sglang_ext.argtypes import write_json, output_file, comma_list, nonneg_int, positive_int, run_main
from sglang_ext.estimators import EmpiricalEstimator


def state(rng, longest: int, running: int, finished: int):
    """(finished lengths, their prompts, running ages, their prompts), lengths up to `longest`."""
    def lengths(n, scale):
        return np.minimum(rng.lognormal(np.log(longest / scale), 1.0, n).astype(np.int64) + 1, longest)

    def prompts(n):
        return (10 ** rng.uniform(1.5, 4.5, n)).astype(np.int64)

    return lengths(finished, 8), prompts(finished), lengths(running, 10) - 1, prompts(running)


def time_call(est: EmpiricalEstimator, ages, prompts) -> float:
    t = time.perf_counter()
    est.remaining(ages, np.zeros_like(ages), prompts)
    return time.perf_counter() - t


def time_cell(longest: int, running: int, args) -> dict:
    rng = np.random.default_rng(args.seed)
    fin, fin_p, ages, ages_p = state(rng, longest, running, args.window)
    rows = {"inline": [], "background": [], "no_refit": []}
    buckets = entries = 0
    for _ in range(args.calls):
        for mode in ("inline", "background"):
            est = EmpiricalEstimator(by_prompt=True, window=args.window, background=mode == "background")
            est.observe(fin, fin_p)
            est.observe_running(ages, ages_p)
            est.remaining(ages[:1], np.zeros(1, np.int64), ages_p[:1])  # the first fit (inline in both)
            fit = est._survival()[0]
            buckets, entries = fit.shape[0] - 1, fit.size
            est.observe(fin[: args.window // 4], fin_p[: args.window // 4])  # enough new lengths: a refit is due
            rows[mode].append(time_call(est, ages, ages_p))
            est.wait()
            if mode == "inline":
                rows["no_refit"].append(time_call(est, ages, ages_p))
    ms = lambda xs: float(np.median(xs) * 1e3)  # noqa: E731
    return dict(longest=longest, running=running, buckets=buckets, entries=entries, inline_ms=ms(rows["inline"]),
                background_ms=ms(rows["background"]), no_refit_ms=ms(rows["no_refit"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--longest", type=comma_list(positive_int), default="2048,8192,32768",
                    help="Comma-separated longest answers L (tokens): the fit's length axis.")
    ap.add_argument("--running", type=comma_list(positive_int), default="8192,65536",
                    help="Comma-separated numbers of running requests (G x B: 32 x 256, 256 x 256).")
    ap.add_argument("--window", type=positive_int, default=4096, help="Finished lengths the estimator keeps.")
    ap.add_argument("--calls", type=positive_int, default=7, help="Timed refits per cell and mode.")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="Seed of the synthetic learning histories (default 0).")
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here as JSON.")
    args = ap.parse_args()
    cells = [(L, n) for L in args.longest for n in args.running]
    rows = [time_cell(L, n, args) for L, n in tqdm(cells, desc="cells")]
    print("\nEstimating every running request when a refit is due (p50, ms): inline waits for the fit; the "
          f"default refits in a worker thread fits of at least {EmpiricalEstimator.background_min_entries:,} "
          "entries (buckets x lengths) and answers from the previous fit meanwhile\n")
    print("| longest answer | running requests | prompt buckets | fit entries | inline refit | default "
          "| no refit due |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['longest']} | {r['running']} | {r['buckets']} | {r['entries']:,} | {r['inline_ms']:.1f} "
              f"| {r['background_ms']:.1f} | {r['no_refit_ms']:.1f} |")
    if args.json:
        write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    run_main(main)
