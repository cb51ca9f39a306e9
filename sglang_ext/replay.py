"""Replay a timed trace against a live SGLang server (`sglang-ext replay`).

Every trace request is sent at its recorded arrival time (times the
`--time-scale`) to POST {url}/generate as token ids (`input_ids` of the
recorded prompt length; `max_new_tokens` = recorded output length,
`ignore_eos`, greedy), streamed, and timed:

- TTFT: attempt start to the first chunk carrying a token;
- TPOT: (last token time - first token time) / (tokens - 1);
- latency: attempt start to the end of the stream.

All three are measured on the attempt that succeeded; `total_s` adds the
failed attempts and back-off before it (what a user would have waited).

With `--max-new-tokens N` the server is not told the lengths: every request
asks for up to N tokens and may end by EOS; the recorded length goes in
`custom_params` for the stand-in backend, whose model ends the answer there (a
real model ignores it), so a balancer has to estimate lengths, as under real
traffic.

Server errors (HTTP 5xx/429, connection errors, stream errors, incomplete
streams) and timeouts are retried with exponential back-off up to `--retries`
times; then the request counts as failed with its last reason. The replay
never stops on a bad answer. Output: `requests.jsonl` (one line per request,
written as each finishes) and `summary.json` in `--out`.

The replay is open-loop (requests are sent on schedule whatever the server's
backlog), so queueing shows up in TTFT, as with real users.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .argtypes import output_dir, server_url
from .errors import UsageError
from .plugin.protocol import ANSWER_LEN_KEY

logger = logging.getLogger(__name__)

try:  # SGLang's own dependency; much faster on the cumulative output_ids chunks
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads


@dataclass
class ReplayConfig:
    url: str
    trace: str
    out: str
    time_scale: float = 1.0
    max_requests: int | None = None
    trace_repeat: int = 1  # replay the trace this many times back to back
    duration: float | None = None
    retries: int = 3
    timeout: float = 60.0  # per attempt: connect, and the longest silence between stream chunks
    total_timeout: float | None = None  # per attempt, whole request; None = unlimited
    backoff: float = 0.5  # first retry delay (s); doubles each retry
    backoff_max: float = 10.0
    max_prompt_len: int = 8192
    max_output_len: int | None = None
    max_new_tokens: int | None = None  # send this cap and hide the recorded lengths (see the module doc)
    vocab: int = 1000  # token ids drawn from [1, vocab): valid for any model's vocabulary
    seed: int = 0
    skip_bad: bool = False
    progress: bool = True
    rid_prefix: str = "replay"


@dataclass
class RequestSpec:
    index: int
    arrival_s: float  # scaled, from the replay start
    prompt_len: int
    max_new_tokens: int
    answer_len: int | None = None  # the recorded length, for the stand-in's EOS (None: forced by ignore_eos)

    @property
    def expected_tokens(self) -> int:
        return self.max_new_tokens if self.answer_len is None else min(self.answer_len, self.max_new_tokens)


@dataclass
class Attempt:
    ok: bool
    reason: str | None = None
    retryable: bool = False
    tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    dp_rank: int | None = None


@dataclass
class RequestResult:
    rid: int
    prompt_len: int
    max_new_tokens: int
    expected_tokens: int | None = None  # a complete answer's length (default: max_new_tokens)
    tokens_received: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    dp_rank: int | None = None
    attempts: int = 0
    ok: bool = False
    error: str | None = None
    total_s: float | None = None  # first attempt start to the end, retries and back-off included
    send_lag_s: float = 0.0  # how late the first attempt left vs. its schedule (client overload)
    retry_reasons: list = field(default_factory=list)

    def __post_init__(self):
        if self.expected_tokens is None:
            self.expected_tokens = self.max_new_tokens


# -- trace -> plan ---------------------------------------------------------------------------


def plan_requests(cfg: ReplayConfig) -> list[RequestSpec]:
    """Load the trace and turn it into scheduled requests (scaled, clipped, sliced)."""
    from .traces import load_trace

    def finite(lo_ok):  # a finite number passing lo_ok (inf and nan pass no bound check here)
        return lambda v: math.isfinite(v) and lo_ok(v)

    checks = (  # (flag, value, ok, what it must be); None where a flag is optional and unset
        ("--time-scale", cfg.time_scale, finite(lambda v: v >= 0), "a finite number >= 0"),
        ("--max-prompt-len", cfg.max_prompt_len, lambda v: v >= 1, ">= 1"),
        ("--max-output-len", cfg.max_output_len, lambda v: v >= 1, ">= 1"),
        ("--max-new-tokens", cfg.max_new_tokens, lambda v: v >= 1, ">= 1"),
        ("--trace-repeat", cfg.trace_repeat, lambda v: v >= 1, ">= 1"),
        ("--max-requests", cfg.max_requests, lambda v: v >= 1, ">= 1"),
        ("--duration", cfg.duration, finite(lambda v: v > 0), "a finite number > 0"),
        ("--retries", cfg.retries, lambda v: v >= 0, ">= 0"),
        ("--timeout", cfg.timeout, finite(lambda v: v > 0), "a finite number > 0"),
        ("--total-timeout", cfg.total_timeout, finite(lambda v: v > 0), "a finite number > 0"),
        ("--backoff", cfg.backoff, finite(lambda v: v >= 0), "a finite number >= 0"),
        ("--seed", cfg.seed, lambda v: v >= 0, ">= 0"),
        ("--vocab", cfg.vocab, lambda v: v >= 2, ">= 2 (token ids are drawn from [1, VOCAB))"),
    )
    for flag, value, ok, need in checks:
        if value is not None and not ok(value):
            raise UsageError(f"{flag} must be {need} (got {value})")
    trace = load_trace(cfg.trace, skip_bad=cfg.skip_bad).repeat(cfg.trace_repeat).head(cfg.max_requests)
    n = len(trace)
    # Length-only traces describe a saturated server: everything arrives at t=0.
    arrival = np.zeros(n) if trace.arrival_s is None else (trace.arrival_s - trace.arrival_s[0]) * cfg.time_scale
    prompt = np.minimum(trace.prompt_len, cfg.max_prompt_len)
    output = trace.output_len if cfg.max_output_len is None else np.minimum(trace.output_len, cfg.max_output_len)
    keep = np.ones(n, dtype=bool) if cfg.duration is None else arrival < cfg.duration
    clipped = int(np.sum(trace.prompt_len > cfg.max_prompt_len))
    if clipped:
        logger.info("clipped %d prompts to %d tokens", clipped, cfg.max_prompt_len)
    hidden = cfg.max_new_tokens is not None  # send the cap; the length rides along for the stand-in's EOS
    return [RequestSpec(int(i), float(arrival[i]), int(prompt[i]), cfg.max_new_tokens if hidden else int(output[i]),
                        int(output[i]) if hidden else None) for i in np.flatnonzero(keep)]


def prompt_ids(spec: RequestSpec, cfg: ReplayConfig) -> list[int]:
    # Random ids per request (deterministic): identical prompts would hit the
    # radix prefix cache and make prefill unrealistically cheap on a real GPU.
    rng = np.random.default_rng((cfg.seed, spec.index))
    return rng.integers(1, max(2, cfg.vocab), size=spec.prompt_len).tolist()


# -- one attempt -----------------------------------------------------------------------------


def _chunk_tokens(chunk: dict, previous: int) -> int:
    meta = chunk.get("meta_info") or {}
    if isinstance(meta.get("completion_tokens"), int):
        return meta["completion_tokens"]
    ids = chunk.get("output_ids")
    if isinstance(ids, list):  # cumulative (SGLang's default when streaming token ids)
        return max(previous, len(ids))
    return previous + 1  # neither: count chunks


def _chunk_dp_rank(chunk: dict) -> int | None:
    meta = chunk.get("meta_info") or {}
    for value in (meta.get("dp_rank"), chunk.get("dp_rank")):
        if isinstance(value, int):
            return value
    return None


async def _attempt(session, url: str, body: bytes, cfg: ReplayConfig) -> Attempt:
    import aiohttp

    start = time.perf_counter()
    tokens, first_t, last_t, dp_rank = 0, None, None, None
    done = False
    finished_t = None  # when a chunk said the answer ended (its finish_reason)

    def answered(end: float) -> Attempt:
        tpot = (last_t - first_t) / (tokens - 1) if tokens > 1 else None
        return Attempt(True, None, False, tokens, None if first_t is None else first_t - start, tpot, end - start,
                       dp_rank)

    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                text = (await resp.read())[:200].decode(errors="replace")
                retryable = resp.status >= 500 or resp.status in (408, 429)
                logger.debug("HTTP %d: %s", resp.status, text)
                return Attempt(False, f"http_{resp.status}", retryable)
            buf = b""
            # iter_any + manual split: chunks with cumulative output_ids can exceed
            # aiohttp's readline limit on long outputs.
            async for piece in resp.content.iter_any():
                buf += piece
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = _loads(payload)
                    except ValueError:
                        return Attempt(False, "bad_json", True, tokens)
                    if not isinstance(chunk, dict):
                        return Attempt(False, "bad_json", True, tokens)
                    if "error" in chunk:
                        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        code = err.get("code") if isinstance(err.get("code"), int) else 500
                        retryable = bool(err.get("retryable", code >= 500))
                        logger.debug("stream error: %s", err)
                        return Attempt(False, f"stream_error_{code}", retryable, tokens)
                    meta = chunk.get("meta_info") or {}
                    finish = meta.get("finish_reason")
                    if isinstance(finish, dict) and finish.get("type") == "abort":
                        # A server-side abort of a bad request (status 400: a prompt past the
                        # context, say) fails the same way again: not retried.
                        status = finish.get("status_code")
                        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                            return Attempt(False, f"aborted_{status}", False, tokens)
                        return Attempt(False, "aborted", True, tokens)
                    now = time.perf_counter()
                    count = _chunk_tokens(chunk, tokens)
                    if count > tokens:
                        if first_t is None:
                            first_t = now
                        last_t = now
                        tokens = count
                    rank = _chunk_dp_rank(chunk)
                    if rank is not None:
                        dp_rank = rank
                    if finish:
                        finished_t = now
                if done:
                    break
    except asyncio.TimeoutError:  # aiohttp.ServerTimeoutError is a subclass
        failed = Attempt(False, "timeout", True, tokens)
    except aiohttp.ClientConnectorError:
        failed = Attempt(False, "connect_error", True, tokens)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError):
        failed = Attempt(False, "disconnected", True, tokens)
    except aiohttp.ClientError as exc:
        failed = Attempt(False, f"client_error_{type(exc).__name__}", True, tokens)
    else:
        if done:
            return answered(time.perf_counter())
        failed = Attempt(False, "incomplete_stream", True, tokens)
    # The answer was whole (its last chunk said how it ended) and only the stream's end
    # was lost: a retry would have the server generate it again and count it twice.
    return answered(finished_t) if finished_t is not None else failed


async def _request(session, spec: RequestSpec, cfg: ReplayConfig, t0: float, url: str) -> RequestResult:
    loop = asyncio.get_running_loop()
    delay = t0 + spec.arrival_s - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    res = RequestResult(spec.index, spec.prompt_len, spec.max_new_tokens, spec.expected_tokens)
    res.send_lag_s = max(0.0, loop.time() - (t0 + spec.arrival_s))
    ids = prompt_ids(spec, cfg)
    sampling = {"max_new_tokens": spec.max_new_tokens, "temperature": 0}
    if spec.answer_len is None:
        sampling["ignore_eos"] = True
    else:
        sampling["custom_params"] = {ANSWER_LEN_KEY: spec.answer_len}
    first_start = time.perf_counter()
    for attempt in range(1, cfg.retries + 2):
        body = json.dumps({
            "rid": f"{cfg.rid_prefix}-{spec.index}-a{attempt}",  # unique per attempt: a timed-out one may live on
            "input_ids": ids,
            "sampling_params": sampling,
            "stream": True,
        }).encode()
        res.attempts = attempt
        try:
            att = await _attempt(session, url, body, cfg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad answer must not end the replay
            logger.exception("request %d attempt %d: unexpected error", spec.index, attempt)
            att = Attempt(False, f"internal_{type(exc).__name__}", False)
        if att.ok:
            res.ok, res.error = True, None
            res.tokens_received, res.ttft_s, res.tpot_s, res.latency_s = att.tokens, att.ttft_s, att.tpot_s, att.latency_s
            res.dp_rank = att.dp_rank
            break
        res.error, res.tokens_received = att.reason, att.tokens
        if not att.retryable or attempt > cfg.retries:
            break
        res.retry_reasons.append(att.reason)
        await asyncio.sleep(min(cfg.backoff * 2 ** (attempt - 1), cfg.backoff_max))
    res.total_s = time.perf_counter() - first_start
    return res


# -- summary ---------------------------------------------------------------------------------


def _pct(values, qs=(50, 99)) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {f"p{q}": None for q in qs} | {"mean": None, "n": 0}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs} | {"mean": float(arr.mean()), "n": int(arr.size)}


def summarize(results: list[RequestResult], wall_s: float, cfg: ReplayConfig | None = None,
              start_unix: float | None = None, end_unix: float | None = None) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = int(sum(r.tokens_received for r in ok))
    summary = {
        "sent": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "failure_reasons": dict(Counter(r.error for r in failed)),
        "attempts": int(sum(r.attempts for r in results)),
        "retries": int(sum(r.attempts - 1 for r in results)),
        "retry_reasons": dict(Counter(x for r in results for x in r.retry_reasons)),
        "short_outputs": sum(1 for r in ok if r.tokens_received < r.expected_tokens),
        "input_tokens": int(sum(r.prompt_len for r in ok)),
        "output_tokens": out_tokens,
        "throughput_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "request_throughput_req_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_s": _pct(r.ttft_s for r in ok),
        "tpot_s": _pct(r.tpot_s for r in ok),
        "latency_s": _pct(r.latency_s for r in ok),
        "send_lag_s": _pct((r.send_lag_s for r in results), qs=(50, 99, 100)),
        "dp_rank_counts": {str(k): v for k, v in sorted(Counter(r.dp_rank for r in ok if r.dp_rank is not None).items())},
        "wall_time_s": wall_s,
        "start_unix": start_unix,
        "end_unix": end_unix,
    }
    if cfg is not None:
        summary["config"] = asdict(cfg)
    return summary


def _result_line(r: RequestResult) -> dict:
    d = asdict(r)
    d.pop("retry_reasons")
    d["retry_reasons"] = list(r.retry_reasons)
    return d


def _server_snapshot(url: str):
    """The server's sglang_ext series now (`watch.read_snapshot`), or None when it shows
    none (no --enable-metrics, no plugin, or not reachable): the replay measures the
    client side whatever the server exposes."""
    from sglang_ext.watch import read_snapshot

    try:
        return read_snapshot(url, timeout=5.0)
    except ValueError as exc:
        logger.info("no balancer metrics from the server (%s); server_metrics will be null", exc)
        return None


def server_metrics(before, after, output_tokens: int) -> dict | None:
    """What the server's /metrics say of the replay window (two `_server_snapshot`s): the
    barrier-idle fraction of all ranks and per rank, their power and energy per output
    token of the replay; None without both reads."""
    if before is None or after is None:
        return None
    from sglang_ext.watch import interval_stats

    st = interval_stats(before, after)
    return {"idle_fraction": st["idle_fraction"], "power_w": st["power_w"], "energy_j": st["energy_j"],
            "energy_j_per_output_token": st["energy_j"] / output_tokens if output_tokens else None,
            "rank_idle_fraction": {str(r["dp_rank"]): r["idle_fraction"] for r in st["ranks"]},
            "requests_placed": round(st["controller"]["requests_placed"]),
            "placement_ms_p50": st["controller"]["placement_ms_p50"],
            "placement_ms_p99": st["controller"]["placement_ms_p99"]}


def server_metrics_line(sm: dict | None) -> str | None:
    """One line of `server_metrics` (None when the server showed none, or ran no step)."""
    if sm is None or sm["idle_fraction"] is None:
        return None
    idle = [v for v in sm["rank_idle_fraction"].values() if v is not None]
    per_token = sm["energy_j_per_output_token"]
    return (f"server /metrics over the replay: barrier idle {sm['idle_fraction']:.3f} of step time "
            f"(ranks {min(idle):.3f}-{max(idle):.3f}), "
            f"{'-' if per_token is None else format(per_token, '.3f')} J per output token, "
            f"{sm['requests_placed']} requests placed")


async def replay_async(cfg: ReplayConfig, specs: list[RequestSpec] | None = None) -> dict:
    """Run the replay; returns the summary (also written to `cfg.out`)."""
    import aiohttp
    from tqdm import tqdm

    specs = plan_requests(cfg) if specs is None else specs
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    url = cfg.url.rstrip("/") + "/generate"
    timeout = aiohttp.ClientTimeout(total=cfg.total_timeout, sock_connect=cfg.timeout, sock_read=cfg.timeout)
    # limit=0: open-loop replay, no client-side cap on concurrent requests.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    results: list[RequestResult] = []
    metrics_before = _server_snapshot(cfg.url)
    bar = tqdm(total=len(specs), unit="req", disable=not cfg.progress, dynamic_ncols=True)
    start_unix = time.time()
    t_start = time.perf_counter()
    with open(out / "requests.jsonl", "w") as fh:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 20) as session:
            t0 = asyncio.get_running_loop().time()
            tasks = [asyncio.ensure_future(_request(session, s, cfg, t0, url)) for s in specs]
            nfail = 0  # (counted as results come: a recount each time is quadratic in the trace)
            try:
                for fut in asyncio.as_completed(tasks):
                    res = await fut
                    results.append(res)
                    fh.write(json.dumps(_result_line(res)) + "\n")
                    bar.update(1)
                    nfail += not res.ok
                    bar.set_postfix(ok=len(results) - nfail, failed=nfail, refresh=False)
            finally:
                for t in tasks:
                    t.cancel()
                bar.close()
    wall = time.perf_counter() - t_start
    results.sort(key=lambda r: r.rid)
    summary = summarize(results, wall, cfg, start_unix, time.time())
    summary["trace"] = cfg.trace
    summary["url"] = cfg.url
    summary["server_metrics"] = server_metrics(
        metrics_before, _server_snapshot(cfg.url) if metrics_before is not None else None, summary["output_tokens"])
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def replay(cfg: ReplayConfig, specs: list[RequestSpec] | None = None) -> dict:
    """Synchronous wrapper around `replay_async`."""
    return asyncio.run(replay_async(cfg, specs))


# -- CLI -------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, type=server_url, help="server base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--trace", required=True, help="trace file (.csv Azure, .jsonl Mooncake, .json lengths)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="arrival times are multiplied by this: 0.5 replays twice as fast, 2 half as fast, "
                   "0 sends everything at once (default 1)")
    p.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--trace-repeat", type=int, default=1,
                   help="replay the trace this many times back to back at its recorded rate (each copy starts one "
                        "mean inter-arrival gap after the last request of the one before; --max-requests and "
                        "--duration count over the whole replay)")
    p.add_argument("--duration", type=float, default=None,
                   help="send only requests whose scaled arrival is within S seconds; in-flight ones are awaited")
    p.add_argument("--out", type=output_dir, default=None, help="output directory (default runs/replay-<time>)")
    p.add_argument("--retries", type=int, default=3, help="retries per request on 5xx/connection errors/timeouts")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="per attempt: seconds to connect and longest silence between stream chunks (default 60)")
    p.add_argument("--total-timeout", type=float, default=None, help="per attempt: seconds for the whole request")
    p.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds; doubles per retry")
    p.add_argument("--max-prompt-len", type=int, default=8192, help="clip prompts to this many tokens")
    p.add_argument("--max-output-len", type=int, default=None, help="clip outputs to this many tokens")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="send every request with this max_new_tokens, without ignore_eos, so the server does not "
                        "know the output lengths; the recorded length goes in custom_params, where the stand-in "
                        "backend's model ends the answer with EOS (default: max_new_tokens = the recorded length)")
    p.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn from [1, VOCAB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed trace rows instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    out = args.out or os.path.join("runs", time.strftime("replay-%Y%m%d-%H%M%S"))
    return ReplayConfig(
        url=args.url, trace=args.trace, out=out, time_scale=args.time_scale, max_requests=args.max_requests,
        trace_repeat=args.trace_repeat,
        duration=args.duration, retries=args.retries, timeout=args.timeout, total_timeout=args.total_timeout,
        backoff=args.backoff, max_prompt_len=args.max_prompt_len, max_output_len=args.max_output_len,
        max_new_tokens=args.max_new_tokens, vocab=args.vocab, seed=args.seed, skip_bad=args.skip_bad, progress=not args.no_progress,
    )


def _fmt(x, scale=1.0, unit=""):
    return "-" if x is None else f"{x * scale:.1f}{unit}"


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = replay(cfg)
    print(
        f"sent {summary['sent']}  ok {summary['ok']}  failed {summary['failed']} {summary['failure_reasons'] or ''}"
        f"  retries {summary['retries']}  wall {summary['wall_time_s']:.1f} s"
        f"  throughput {_fmt(summary['throughput_tok_s'])} tok/s\n"
        f"TTFT p50/p99 {_fmt(summary['ttft_s']['p50'], 1e3)}/{_fmt(summary['ttft_s']['p99'], 1e3)} ms"
        f"  TPOT p50/p99 {_fmt(summary['tpot_s']['p50'], 1e3)}/{_fmt(summary['tpot_s']['p99'], 1e3)} ms"
        f"  latency p50/p99 {_fmt(summary['latency_s']['p50'])}/{_fmt(summary['latency_s']['p99'])} s\n"
        f"wrote {cfg.out}/requests.jsonl, {cfg.out}/summary.json"
    )
    line = server_metrics_line(summary["server_metrics"])
    if line:
        print(line)
    # Failures are data, not a crash; only "nothing got through" is an error exit.
    return 0 if summary["ok"] > 0 or summary["sent"] == 0 else 1
