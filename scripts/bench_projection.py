#!/usr/bin/env python3
"""Benchmark the cost projection: CPU torch reference vs the compiled Triton kernel.

    python scripts/bench_projection.py --ranks 32 --requests-per-rank 256 --horizon 80 --repeats 200
    python scripts/bench_projection.py --horizon 2000 --steps 26   # a long tail at a few steps

Times `project_cost_reference` on CPU (median of --repeats calls, microseconds)
and, when CUDA is available, the compiled Triton kernel on the GPU (warm-up,
then median with torch.cuda.synchronize around every call), checks the results
are identical, and prints a markdown table. Without CUDA the kernel row reads
"n/a (no CUDA)". With --steps P, the same projection at P steps of 0..H (dense
near 0, sparse far out, as bfio's pool tail evaluates it) is timed too and
checked equal to those rows of the full projection. With --contention, the CPU
reference is timed instead on 1 thread and on torch's default (one per core),
each with the machine idle and with a thread keeping one core busy (a BLAS
product in a loop, which releases the GIL, as another process on that core
would): p50, p99 and max of --repeats calls, the controller's
--balancer-cpu-threads choice.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import numpy as np
import torch

from sglang_ext.argtypes import nonneg_int, positive_int, run_main
from sglang_ext.policies.bfio import step_grid
from sglang_ext.triton_kernels import project_cost, project_cost_reference, project_cost_triton


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_us(fn, repeats: int, sync=None) -> float:
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter_ns()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def contention_table(rank, kv, rem, G: int, H: int, w: dict, repeats: int) -> None:
    """The CPU reference per torch thread count, idle and beside a busy core."""
    default = torch.get_num_threads()
    stop = threading.Event()

    def busy():  # (one core's worth: the BLAS library on one thread, the GIL released)
        x = np.random.default_rng(0).random((1000, 1000))
        while not stop.is_set():
            x @ x

    print(f"cost projection on the CPU, G={G}, N={rank.size} requests, H={H}, {repeats} calls per row "
          f"({cpu_name()}, {os.cpu_count()} cores; ms)\n")
    print("| torch threads | another core busy | p50 | p99 | max |")
    print("|---|---|---:|---:|---:|")
    try:
        for threads in (1, default) if default > 1 else (1,):
            torch.set_num_threads(threads)
            for loaded in (False, True):
                stop.clear()
                other = threading.Thread(target=busy, daemon=True) if loaded else None
                if other:
                    other.start()
                    time.sleep(0.05)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter_ns()
                    project_cost_reference(rank, kv, rem, G, H, **w)
                    times.append((time.perf_counter_ns() - t0) / 1e6)
                stop.set()
                if other:
                    other.join()
                t = np.array(times)
                print(f"| {threads} | {'yes' if loaded else 'no'} | {np.median(t):.2f} | {np.percentile(t, 99):.2f} | "
                      f"{t.max():.2f} |")
    finally:
        torch.set_num_threads(default)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=positive_int, default=32, help="DP ranks G")
    ap.add_argument("--requests-per-rank", type=positive_int, default=256, help="running requests per rank (N = G * this)")
    ap.add_argument("--horizon", type=nonneg_int, default=80, help="projection horizon H (steps)")
    ap.add_argument("--repeats", type=positive_int, default=200, help="timed calls; the median is reported")
    ap.add_argument("--warmup", type=nonneg_int, default=10, help="untimed calls first")
    ap.add_argument("--no-growth", action="store_true", help="growth=False (the paper's projection)")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="seed of the random requests")
    ap.add_argument("--steps", type=nonneg_int, default=0,
                    help="also project at about this many steps of 0..H (0: only every step)")
    ap.add_argument("--contention", action="store_true",
                    help="time the CPU reference on 1 thread and on torch's default, idle and beside a busy core")
    args = ap.parse_args(argv)

    G, H = args.ranks, args.horizon
    N = G * args.requests_per_rank
    growth = not args.no_growth
    rng = np.random.default_rng(args.seed)
    rank = rng.integers(0, G, N, dtype=np.int64)
    kv = rng.integers(1, 32768, N, dtype=np.int64)
    rem = rng.integers(0, 2 * H + 1, N, dtype=np.int64)  # about half outlive the horizon
    w = dict(a=1e-3, b=5e-5, c=7.5e-8, growth=growth)
    torch.set_num_threads(torch.get_num_threads())  # as configured (OMP_NUM_THREADS)
    if args.contention:
        contention_table(rank, kv, rem, G, H, w, args.repeats)
        return

    ref = project_cost_reference(rank, kv, rem, G, H, **w)
    for _ in range(args.warmup):
        project_cost_reference(rank, kv, rem, G, H, **w)
    t_ref = median_us(lambda: project_cost_reference(rank, kv, rem, G, H, **w), args.repeats)
    t_pub = median_us(lambda: project_cost(rank, kv, rem, G, H, backend="torch", **w), args.repeats)

    cpu = f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
    rows = [
        ("torch reference (numpy in)", cpu, f"{t_ref:.1f}", "-"),
        ("project_cost(backend='torch')", "CPU", f"{t_pub:.1f}", "-"),
    ]
    steps = None
    if args.steps:
        steps = step_grid(0, H, args.steps)
        sparse = project_cost_reference(rank, kv, rem, G, steps, **w)
        same_sparse = torch.equal(sparse, ref[torch.from_numpy(steps)])
        t_sp = median_us(lambda: project_cost_reference(rank, kv, rem, G, steps, **w), args.repeats)
        rows.append((f"torch reference at {steps.size} steps", "CPU", f"{t_sp:.1f}",
                     "yes" if same_sparse else "NO"))
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        r_d, kv_d, rem_d = (torch.from_numpy(x).to(dev) for x in (rank, kv, rem))
        for _ in range(max(3, args.warmup)):  # includes JIT compilation
            out = project_cost_triton(r_d, kv_d, rem_d, G, H, **w)
        torch.cuda.synchronize()
        same = torch.equal(out.cpu(), ref)
        t_k = median_us(lambda: project_cost_triton(r_d, kv_d, rem_d, G, H, **w), args.repeats,
                        torch.cuda.synchronize)
        auto = project_cost(r_d, kv_d, rem_d, G, H, **w)
        same_auto = auto.backend == "triton" and torch.equal(auto.cost.cpu(), ref)
        t_auto = median_us(lambda: project_cost(r_d, kv_d, rem_d, G, H, **w), args.repeats,
                           torch.cuda.synchronize)
        t_tg = median_us(lambda: project_cost_reference(r_d, kv_d, rem_d, G, H, **w), args.repeats,
                         torch.cuda.synchronize)
        same_tg = torch.equal(project_cost_reference(r_d, kv_d, rem_d, G, H, **w).cpu(), ref)
        name = torch.cuda.get_device_name(dev)
        rows += [
            ("Triton kernel (compiled)", f"CUDA: {name}", f"{t_k:.1f}", "yes" if same else "NO"),
            ("project_cost(auto) on CUDA", f"CUDA: {name}", f"{t_auto:.1f}", "yes" if same_auto else "NO"),
            ("torch reference on CUDA", f"CUDA: {name}", f"{t_tg:.1f}", "yes" if same_tg else "NO"),
        ]
        ok = same and same_auto and same_tg
        if steps is not None:
            st_d = torch.from_numpy(steps).to(dev)
            out_sp = project_cost_triton(r_d, kv_d, rem_d, G, st_d, **w)
            same_k = torch.equal(out_sp.cpu(), sparse)
            t_ks = median_us(lambda: project_cost_triton(r_d, kv_d, rem_d, G, st_d, **w), args.repeats,
                             torch.cuda.synchronize)
            rows.append((f"Triton kernel at {steps.size} steps", f"CUDA: {name}", f"{t_ks:.1f}",
                         "yes" if same_k else "NO"))
            ok = ok and same_k
    else:
        rows.append(("Triton kernel (compiled)", "n/a (no CUDA)", "n/a (no CUDA)", "n/a"))
        ok = True

    print(f"cost projection: G={G} ranks, N={N} requests ({args.requests_per_rank}/rank), H={H}, "
          f"growth={growth}, median of {args.repeats} (us, incl. input conversion and validation)\n")
    print("| implementation | device | median (us) | equal to reference |")
    print("|---|---|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if not ok:
        raise SystemExit("MISMATCH between the Triton kernel and the torch reference")
    if steps is not None and not same_sparse:
        raise SystemExit("MISMATCH between the projection at steps and the full projection's rows")


if __name__ == "__main__":
    run_main(main)
