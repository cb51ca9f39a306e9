#!/usr/bin/env python
"""Two commits' bfio decision time side by side, in one process.

The policy of an earlier commit (`--base`, read out of git into a temporary
package) and the working tree's are timed on the same saturated snapshots as
`bench_decision.py`, alternating per snapshot (which goes first alternates
too), so a noisy machine slows both alike. Prints per cell each one's p50 and
p99 per pool call, the median over snapshots of the per-snapshot time ratio
(this tree over the base: below 1 is faster), and on how many snapshots the
two placed every candidate alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench_decision import add_snapshot_flags, parse_snapshot_flags, snapshot
from sglang_ext.argtypes import comma_list, grid_cell, run_main, write_json
from sglang_ext.policies import make_policy
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
BASE_NAME = "sglang_ext_base"
# setup.py's package_dir: folders at the top of the repository installed under the namespace.
NAMESPACED = {"sglang_ext": "", "triton_kernels": "triton_kernels", "patches": "patches"}


def base_package(rev: str, into: Path):
    """Commit `rev`'s sglang_ext, assembled as setup.py installs it, imported as `sglang_ext_base`."""
    src = into / "src"
    src.mkdir()
    folders = [f for f in NAMESPACED if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{rev}:{f}"],
                                                       capture_output=True).returncode == 0]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, *folders],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = into / BASE_NAME
    for folder in folders:
        shutil.copytree(src / folder, pkg / NAMESPACED[folder], dirs_exist_ok=True)
    word = re.compile(r"\bsglang_ext\b")
    for py in pkg.rglob("*.py"):
        py.write_text(word.sub(BASE_NAME, py.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{BASE_NAME}.policies")


def resolve(ap: argparse.ArgumentParser, rev: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        ap.error(f"--base: {rev!r} is not a commit of {REPO}")
    return done.stdout.strip()


def as_base(mod, view, cands):
    """The same snapshot built from the base package's own dataclasses (fields it lacks are left out)."""
    def convert(cls, obj):
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)})
    return convert(mod.ClusterView, view), convert(mod.Candidates, cands)


def timed(policy, view, cands):
    t0 = time.perf_counter()
    placed = policy.assign(view, cands)
    return (time.perf_counter() - t0) * 1e3, np.asarray(placed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="The commit to compare against (any git revision, e.g. HEAD~1).")
    ap.add_argument("--cells", type=comma_list(grid_cell), default="128x32,128x72,256x32,256x72,256x256",
                    help="Comma-separated GxB cells (ranks x running-request slots per rank).")
    add_snapshot_flags(ap, horizons="20,80", pool_tails="0,0.002", calls=40)
    args = parse_snapshot_flags(ap)
    rev = resolve(ap, args.base)
    trace = load_trace(args.trace)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pair_") as tmp:
        try:
            base = base_package(rev, Path(tmp))
        except (ImportError, AttributeError, subprocess.CalledProcessError) as exc:
            raise ValueError(f"--base {args.base}: its policies do not load here ({exc})") from None
        grid = [(G, B, H, W) for G, B in args.cells for H in args.horizons for W in args.pool_tails]
        for G, B, H, W in tqdm(grid, desc="cells"):
            rng = np.random.default_rng(args.seed)
            snaps = [snapshot(rng, trace, G, B, args.free_frac) for _ in range(args.calls)]
            ours = make_policy("bfio", horizon=H, pool_tail=W)
            try:
                theirs = base.make_policy("bfio", horizon=H, pool_tail=W)
            except (TypeError, ValueError) as exc:  # (a commit from before pool_tail, say)
                raise ValueError(f"--base {args.base}: its bfio does not take horizon={H}, pool_tail={W:g} ({exc})") \
                    from None
            for view, cands in snaps[:2]:  # warm-up
                timed(ours, view, cands)
                timed(theirs, *as_base(base, view, cands))
            t_ours, t_base, same = [], [], 0
            for i, (view, cands) in enumerate(snaps):
                old_view, old_cands = as_base(base, view, cands)
                if i % 2:
                    tb, pb = timed(theirs, old_view, old_cands)
                    to, po = timed(ours, view, cands)
                else:
                    to, po = timed(ours, view, cands)
                    tb, pb = timed(theirs, old_view, old_cands)
                t_ours.append(to)
                t_base.append(tb)
                same += bool(np.array_equal(po, pb))
            t_ours, t_base = np.array(t_ours), np.array(t_base)
            rows.append(dict(G=G, B=B, H=H, pool_tail=W, calls=len(snaps),
                             base_p50_ms=float(np.percentile(t_base, 50)), base_p99_ms=float(np.percentile(t_base, 99)),
                             p50_ms=float(np.percentile(t_ours, 50)), p99_ms=float(np.percentile(t_ours, 99)),
                             paired_ratio=float(np.median(t_ours / t_base)), same_placements=same))
    print(f"\nbfio pool call, this tree against {args.base} ({rev[:7]}), alternating per snapshot "
          f"(free slots ~{args.free_frac:.0%} of G*B, 4G candidates; ratio = median of this tree / base per snapshot)\n")
    print("| G | B | H | pool tail | base p50 ms | p50 ms | base p99 ms | p99 ms | paired ratio | same placements |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['B']} | {r['H']} | {r['pool_tail']:g} | {r['base_p50_ms']:.2f} | {r['p50_ms']:.2f} "
              f"| {r['base_p99_ms']:.2f} | {r['p99_ms']:.2f} | {r['paired_ratio']:.3f} | {r['same_placements']}/{r['calls']} |")
    if args.json:
        write_json(args.json, dict(base=rev, rows=rows), indent=1)


if __name__ == "__main__":
    run_main(main)
