#!/usr/bin/env python
"""The controller process's full garbage collections, with and without the startup freeze.

CPython collects in three generations; a full (generation-2) pass walks every object
the collector tracks. The DP controller's process tracks 620-680k objects from its
imports alone (sglang, torch, scipy), so each full pass stalls its loop: no arrival
is placed and no pool released until it ends. `BalancedDispatch.freeze_gc`
(`gc.freeze`) takes what exists when the loop starts out of every later pass.

Per cell and policy (`--policies`) this script builds the real `BalancedDispatch`
(pool binding, one step's reports of a saturated server estimated, as in
bench_controller.py) and times:

1. a full pass (`gc.collect(2)`, `--repeats` times) with nothing frozen, and after
   the freeze, with `--pool` requests pooled after it (real
   `TokenizedGenerateReqInput`s decoded from msgpack as the tokenizer socket gives
   them, held as the saturated pool holds them: what the freeze does not cover);
2. the full passes CPython starts by itself while a pool grows to `--grow` such
   requests, none released (a queue building under saturation), with the collector
   as the process left it and after the freeze: the pool's depth at each and its
   pause. (CPython counts young objects net of those freed, so a pool that holds
   its depth starts no collection at all; one that grows does.)
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from array import array

import numpy as np
from tqdm import tqdm

from bench_controller import add_grid, grid_cells, make_controller, reports
from sglang_ext.argtypes import comma_list, nonneg_int, output_file, positive_int, run_main, write_json
from sglang_ext.traces import load_trace


def request_bytes(prompt_len: int, max_new_tokens: int) -> bytes:
    """One tokenized request as the tokenizer manager sends it to the DP controller."""
    from sglang.srt.managers import io_struct
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = io_struct.TokenizedGenerateReqInput(
        rid="r", input_text="", input_ids=array("q", range(prompt_len)), input_embeds=None, mm_inputs=None,
        token_type_ids=None, sampling_params=SamplingParams(max_new_tokens=max_new_tokens), return_logprob=False,
        logprob_start_len=-1, top_logprobs_num=0, token_ids_logprob=None, stream=True)
    return io_struct.msgpack_encode(req)


class Pauses:
    """The collector's own passes while installed: (generation, ms) each, and with
    `at`, what it returned when each pass began (`self.at`)."""

    def __init__(self, at=None):
        self.passes: list[tuple[int, float]] = []
        self._at, self.at = at, []
        self._t = 0.0

    def __call__(self, phase, info):
        if phase == "start":
            if self._at is not None:
                self.at.append(self._at())
            self._t = time.perf_counter()
        else:
            self.passes.append((info["generation"], (time.perf_counter() - self._t) * 1e3))

    def start(self) -> "Pauses":
        gc.callbacks.append(self)
        return self

    def stop(self) -> None:
        gc.callbacks.remove(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def full(self) -> np.ndarray:
        return np.array([ms for gen, ms in self.passes if gen == 2])


def full_pass_ms(repeats: int) -> np.ndarray:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        gc.collect(2)
        out.append((time.perf_counter() - t) * 1e3)
    return np.array(out)


def pool_requests(bal, data: bytes, n: int, tag: str) -> None:
    """`n` requests decoded from `data` (rids tag0, tag1, ...) and dispatched into the pool."""
    from sglang.srt.managers.io_struct import msgpack_decode

    for k in range(n):
        req = msgpack_decode(data)
        req.rid = f"{tag}{k}"
        bal.dispatch(req)


def grow(bal, data: bytes, n: int) -> dict:
    """`n` requests decoded and pooled, none released (a queue building under
    saturation): the full passes CPython starts meanwhile, with the pool's depth at each."""
    with Pauses(at=lambda: len(bal.pool)) as p:
        pool_requests(bal, data, n, "s")
    full = [(d, ms) for (gen, ms), d in zip(p.passes, p.at) if gen == 2]
    bal.pool.clear()
    return dict(full_passes=len(full), depth_at=[d for d, _ in full], full_ms=[ms for _, ms in full])


def run_cell(policy: str, trace, G: int, B: int, args, workdir: str) -> dict:
    rng = np.random.default_rng(args.seed)
    bal = make_controller(policy, "pool", G, workdir, tag=f"-gc-{G}x{B}", encode=True)
    bal.on_reports(reports(rng, trace, G, B, 0.02, 1, args.max_new_tokens))
    bal.prepare()
    data = request_bytes(int(np.median(trace.prompt_len)), args.max_new_tokens)
    gc.collect()
    row = dict(G=G, B=B, policy=policy, tracked=len(gc.get_objects()), pool=args.pool, grow=args.grow)
    row["unfrozen_ms"] = full_pass_ms(args.repeats)
    row["unfrozen_grow"] = grow(bal, data, args.grow)
    bal.freeze_gc("bench")
    try:
        row["frozen"] = gc.get_freeze_count()
        before = len(gc.get_objects())
        pool_requests(bal, data, args.pool, "p")  # (pooled after the freeze, as the live pool forms)
        row["tracked_per_pooled"] = (len(gc.get_objects()) - before) / max(args.pool, 1)
        row["frozen_ms"] = full_pass_ms(args.repeats)
        bal.pool.clear()
        row["frozen_grow"] = grow(bal, data, args.grow)
    finally:
        gc.unfreeze()  # (the next cell starts from the same collector)
    bal.close()
    for k in ("unfrozen_ms", "frozen_ms"):
        ms = row.pop(k)
        row[k.replace("_ms", "_p50_ms")], row[k.replace("_ms", "_max_ms")] = float(np.median(ms)), float(ms.max())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid(ap, cells="32x256,256x256", policies="bfio")
    ap.add_argument("--pool", type=nonneg_int, default=16384,
                    help="Requests held in the pool (pool binding under saturation) after the freeze.")
    ap.add_argument("--grow", type=positive_int, default=150_000,
                    help="Requests pooled one by one, none released, while CPython's own full passes are "
                    "recorded.")
    ap.add_argument("--repeats", type=positive_int, default=5, help="Full passes timed each way.")
    ap.add_argument("--max-new-tokens", type=positive_int, default=2048, help="Every request's max_new_tokens.")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="Seed of the reports.")
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here as JSON.")
    args = ap.parse_args()
    cells = grid_cells(ap, args)
    trace = load_trace(args.trace)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for G, B, policy in tqdm([(G, B, p) for G, B in cells for p in args.policies], desc="runs"):
            rows.append(run_cell(policy, trace, G, B, args, workdir))
    print(f"\nA full garbage collection in the controller's process (ms, p50 / max of {args.repeats}); frozen: "
          f"after BalancedDispatch.freeze_gc, with {args.pool} requests pooled after it\n")
    print("| G | B | policy | tracked objects | full pass, nothing frozen | frozen objects | tracked per pooled request "
          "| full pass, frozen | ratio (p50) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['B']} | {r['policy']} | {r['tracked']} | {r['unfrozen_p50_ms']:.1f} / {r['unfrozen_max_ms']:.1f} "
              f"| {r['frozen']} | {r['tracked_per_pooled']:.1f} | {r['frozen_p50_ms']:.2f} / {r['frozen_max_ms']:.2f} "
              f"| {r['frozen_p50_ms'] / r['unfrozen_p50_ms']:.4f} |")
    print(f"\nCPython's own full passes while a pool grows to {args.grow} requests (none released): "
          "the pool's depth at each, and its pause (ms)\n")
    print("| G | B | policy | collector | full passes | pool depth at each | pause of each |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for name in ("unfrozen", "frozen"):
            s = r[f"{name}_grow"]
            print(f"| {r['G']} | {r['B']} | {r['policy']} | {name} | {s['full_passes']} | {', '.join(map(str, s['depth_at']))} "
                  f"| {', '.join(f'{ms:.1f}' for ms in s['full_ms'])} |")
    if args.json:
        write_json(args.json, {"config": vars(args) | {"trace": str(args.trace)}, "rows": rows})


if __name__ == "__main__":
    run_main(main)
