"""DP controller patch: dispatch through an sglang-ext policy.

Hooks (registered by `sglang_ext.plugin.load`):
- AFTER `DataParallelController.__init__`: when `server_args._balancer` names a
  policy, attach a `BalancedDispatch` and make it the controller's
  `self.dispatching` (SGLang calls that for every non-health-check request, so
  health checks keep their stock round-robin path);
- AROUND `DataParallelController.event_loop`: with a balancer, run our loop,
  which waits on the tokenizer socket and the report socket with a zmq Poller
  (stock busy-polls a whole core) and releases the central pool on time.

What the controller knows of the ranks (their reports, what was sent since,
the estimate of every reported request, estimated while the loop is idle) and
the policy's view built from it are `sglang_ext.plugin.cluster_state`; this
module places requests on that view, sends them, holds the pool and runs the
loop.
"""
from __future__ import annotations

import gc
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice

import numpy as np
import zmq

from sglang_ext.plugin.cluster_state import ClusterState, remaining_steps
from sglang_ext.plugin.config import BalancerConfig, get_config
from sglang_ext.plugin.metrics import controller_metrics
from sglang_ext.plugin.protocol import allow_ipv6, decode_request, encode_request, recv_reports, request_types, runs_to_cap

logger = logging.getLogger(__name__)

#: poll timeout when nothing is pending: wakes the loop to feed SGLang's soft watchdog
IDLE_POLL_MS = 500
#: after some ranks' reports, the loop waits this long for the others' before it estimates
#: what it has (see `wait_for_messages`)
PREPARE_AFTER_QUIET_MS = 2
#: placement-call times kept for the periodic stats line (its percentiles are over the latest ones)
DECISION_TIMES_KEPT = 1 << 16
#: the periodic stats line (`BalancedDispatch.log_stats`), as `read_stats` parses it back
STATS_LINE = re.compile(
    r"sglang-ext balancer, last (?P<seconds>\d+) s: requests placed (?P<placed>\d+) \(pinned (?P<pinned>\d+), "
    r"at the pool deadline (?P<pool_deadline>\d+)\), pooled now (?P<pooled>\d+); reports (?P<reports>\d+) "
    r"\(estimated while idle (?P<prepared>\d+)(?:, paused for a message (?P<paused>\d+))?\); "
    r"placement calls (?P<calls>\d+)"
    r"(?: \(on the previous estimate (?P<lagged>\d+)\))?"
    r"(?:, decision time p50 (?P<p50_ms>[\d.]+) ms, p99 (?P<p99_ms>[\d.]+) ms, max (?P<max_ms>[\d.]+) ms)?")
#: immediate binding: arrivals read in one turn of the loop are placed together, at most
#: this many per policy call (bounds the wait of a burst's first request)
ARRIVALS_PER_CALL = 64
#: after a send fails, the request waits in the pool this long before it is tried again
SEND_RETRY_S = 0.1

#: `--balancer-device auto` projects on the GPU from this many DP ranks. Measured on an
#: H200 (docs/benchmarks.md section 3): up to 64 ranks the CPU path is faster in every
#: cell (launches and host syncs cost more than the work), at 128 on every pool call (5 of
#: 8 cells), at 256 the GPU path is faster in 7 of 8 (B=256: 2.4-3.3 against 4.0-4.1 ms
#: per pool call, 0.8-0.9 against 1.9-2.1 ms per arrival).
AUTO_CUDA_MIN_RANKS = 256


def _resolve_device(device: str, num_ranks: int) -> str:
    if device != "auto":
        return device
    if num_ranks < AUTO_CUDA_MIN_RANKS:
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def _max_new_tokens(req) -> int:
    sp = getattr(req, "sampling_params", None)
    value = getattr(sp, "max_new_tokens", None) if sp is not None else None
    return int(value) if value is not None else 128  # SGLang's SamplingParams default


def _prompt_len(req) -> int:
    ids = getattr(req, "input_ids", None)
    return len(ids) if ids is not None else 0


def _is_request(msg) -> bool:
    """A request (or a batch of them), which SGLang's controller hands to its dispatch."""
    return isinstance(msg, request_types())


def read_stats(log_text: str) -> list[dict]:
    """The controller's stats lines in a server log, oldest first: ints for the counts,
    floats for the decision times (None where a window had no placement call)."""
    out = []
    for m in STATS_LINE.finditer(log_text):
        d = m.groupdict()
        out.append({k: (None if v is None else float(v) if k.endswith("_ms") else int(v)) for k, v in d.items()})
    return out


def request_row(req) -> tuple[int, int, bool]:
    """All the controller reads of a request: (prompt_len, max_new_tokens, ignore_eos).
    Read once per request (a pooled one when it arrives), not at every decision."""
    return _prompt_len(req), _max_new_tokens(req), runs_to_cap(req)


@dataclass(slots=True)
class _Outgoing:
    """A request read and not yet sent, as it will go: its bytes on the wire
    (`encode_request`, taken when it is read), its rid (an abort matches on it), its
    row, the rank a client pinned it to (it then goes there, never where the policy
    would put it), and, pooled, since when (monotonic seconds; -inf for a failed
    send, retried first).

    Held as bytes, a pooled request costs the garbage collector one tracked object
    (this one) instead of three: a queue that builds under saturation starts fewer
    full passes, and each walks less (`scripts/bench_gc.py`)."""

    data: bytes
    rid: str
    row: tuple[int, int, bool]
    pin: int | None = None
    since: float = 0.0


class BalancedDispatch(ClusterState):
    """Policy-driven dispatch: placement, sends, the pool and the loop, over the
    per-rank state of `ClusterState`."""

    def __init__(self, controller, cfg: BalancerConfig):
        super().__init__(controller, cfg)
        self.window = 4 * self.num_ranks  # the paper's visible window
        self.pool: deque[_Outgoing] = deque()
        self._retry_after = 0.0  # monotonic time before which the pool is not retried after a failed send
        # Immediate binding, while the loop reads the tokenizer socket: the arrivals read
        # so far, placed together (`place_arrivals`); None outside that read.
        self._arrivals: list[_Outgoing] | None = None
        # Requests and aborts read while no rank is active (elastic EP between a rank
        # going down and one coming up), in order: stock raises and loses them; they are
        # dispatched as read once a rank is active again (`_dispatch_held`).
        self._held: deque = deque()
        # for the periodic stats line (log_stats): the counters when it was last written,
        # and the time of each placement call since (the latest DECISION_TIMES_KEPT)
        self._stats_since, self._stats_logged = time.monotonic(), dict(self.stats)
        self._decision_s: deque[float] = deque(maxlen=DECISION_TIMES_KEPT)
        # under --enable-metrics: the counters above, the pool and the call times on /metrics
        self.metrics = controller_metrics(cfg, getattr(controller, "server_args", None))

        self.policy = self._make_policy()
        if _resolve_device(cfg.device, self.num_ranks) == "cuda":
            self.device = "cuda"
            self.policy = self._make_policy()
            if self.policy.needs_requests and not self._cuda_projection_works():
                self.device = "cpu"
                self.policy = self._make_policy()
        if self.device == "cpu" and self.policy.needs_requests:
            self._pin_cpu_threads()
            self._warm_up()

        self.sock = controller.context.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        allow_ipv6(self.sock, cfg.report_addr)
        self.sock.bind(cfg.report_addr)
        logger.info(
            "sglang-ext balancer: policy=%s binding=%s horizon=%d device=%s estimator=%s scenarios=%d "
            "full_wait=%s pool_tail=%g over %d steps refit=%s cpu_threads=%s reports on %s",
            cfg.policy, cfg.binding, cfg.horizon, self.device, cfg.estimator, cfg.scenarios,
            cfg.full_wait, cfg.pool_tail, cfg.pool_tail_horizon, "inline" if cfg.inline_refit else "background",
            cfg.cpu_threads or "default", cfg.report_addr,
        )

    def _pin_cpu_threads(self) -> None:
        """torch's intra-op threads for the projection on the CPU (`--balancer-cpu-threads`):
        a parallel op ends when its slowest thread does, so on a host whose other cores
        run the schedulers and the tokenizer, one thread scheduled late stalls the whole
        placement (a 64k-request projection with one core busy elsewhere: 5.7 ms at p99
        on one thread, 143 ms on two). SGLang pins its own CPU-side processes to one
        thread for the same reason; this process runs nothing else on torch."""
        if self.cfg.cpu_threads > 0:
            import torch

            torch.set_num_threads(self.cfg.cpu_threads)

    def _make_policy(self):
        """The projection kernel runs where its input tensors live (Triton for CUDA tensors,
        torch on CPU): on cpu, pin the torch backend; on cuda, build_view ships the
        per-request arrays to the GPU."""
        from sglang_ext.policies import make_policy

        backend = "torch" if self.device == "cpu" else "auto"
        return make_policy(self.cfg.policy, horizon=self.cfg.horizon, seed=self.cfg.seed, backend=backend,
                           prefill=self.cfg.prefill_weight, scenarios=self.cfg.scenarios,
                           full_wait=self.cfg.full_wait, pool_tail=self.cfg.pool_tail,
                           tail_horizon=self.cfg.pool_tail_horizon, variant=self.cfg.variant)

    def _warm_up(self) -> None:
        """One tiny placement on a made-up view, at startup: the first calls of torch's
        ops in the projection cost ms (the first bfio placement 2.0-2.4 ms on a 4-rank
        view, the next 0.5-0.7), which the first request would pay: until one runs the
        idle loop has nothing to project. The controller's state is not read or
        written, and the policy is reset after."""
        from sglang_ext.policies import ClusterView

        one = np.ones(self.num_ranks, np.int64)
        try:
            self._tiny_placement(ClusterView(free_slots=one, kv_tokens=10 * one, num_requests=one))
        except Exception as exc:  # noqa: BLE001  (a slower first request, nothing worse)
            logger.warning("sglang-ext: warming up the %s policy failed (%s)", self.cfg.policy, exc)
        self.policy.reset()

    def _tiny_placement(self, view, to=lambda x: x) -> None:
        """One request running on every rank (its arrays passed through `to`, e.g. onto the
        GPU), one candidate placed: what startup runs through the policy."""
        from sglang_ext.policies import Candidates

        G = self.num_ranks
        view.projection_cache = None  # (its requests are these, not the reported ones)
        view.req_rank, view.req_kv, view.req_remaining = (
            to(x) for x in (np.arange(G, dtype=np.int64), np.full(G, 10, np.int64), np.full(G, 5, np.int64)))
        self.policy.assign(view, Candidates(prompt_len=[5], output_est=[5]), must_place=True)

    def _cuda_projection_works(self) -> bool:
        """One tiny placement with CUDA inputs at startup, so a broken GPU path falls back to
        CPU here instead of failing requests later."""
        try:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False in the controller")
            self._tiny_placement(self.build_view(), to=lambda x: torch.as_tensor(x, device="cuda"))
            return True
        except Exception as exc:  # noqa: BLE001
            logger.warning("sglang-ext: --balancer-device cuda unusable (%s); projecting on cpu", exc)
            return False

    # ---- placement -----------------------------------------------------------------

    def _candidates(self, rows: np.ndarray):
        """The policy's candidates from the requests' rows (`request_row`, one per row)."""
        from sglang_ext.policies import Candidates

        prompt, cap = rows[:, 0], rows[:, 1]
        if not self.policy.needs_requests:  # a myopic policy reads no lengths: no estimator call
            return Candidates(prompt_len=prompt, output_est=cap)
        est = remaining_steps(self.estimator, np.zeros_like(cap), cap, self._scenarios, prompt,
                              rows[:, 2].astype(bool))
        return Candidates(prompt_len=prompt, output_est=est.T if est.ndim == 2 else est)

    def _place(self, rows: np.ndarray, must_place: bool) -> np.ndarray:
        """A rank per request (rows of `request_row`), or -1 (stay pooled) unless must_place.
        A placement that must happen now may use the previous estimate (`build_view`); a
        pool release fills the slots the newest reports say are free, so it never does."""
        active = self._active_mask()
        if not active.any():
            raise RuntimeError("No active DP workers are available for routing.")
        t0 = time.perf_counter()
        try:
            view = self.build_view(lagged_ok=must_place)
            self.stats["lagged"] += int(self._behind.any())  # (a view built now left nothing behind)
            ranks = np.asarray(self.policy.assign(view, self._candidates(rows), must_place=must_place),
                               dtype=np.int64)
            if (ranks.shape != (len(rows),) or (ranks >= self.num_ranks).any()
                    or (ranks < (0 if must_place else -1)).any()):
                raise ValueError(f"placed {len(rows)} request(s) at {ranks.tolist()[:8]} "
                                 f"(a rank per request, 0..{self.num_ranks - 1}{'' if must_place else ' or -1'})")
            took = time.perf_counter() - t0
            self._decision_s.append(took)
            self.stats["placements"] += 1
        except Exception:  # noqa: BLE001  (a policy bug must not lose requests)
            logger.exception("sglang-ext: policy %s failed; falling back to the least-loaded rank", self.cfg.policy)
            if not must_place:
                return np.full(len(rows), -1, dtype=np.int64)  # stay pooled; the deadline places them
            return self._least_tokens(rows, active)
        if self.metrics is not None:
            self.metrics.placement_call(took)
        stranded = (ranks >= 0) & ~active[np.maximum(ranks, 0)]  # defensive: a policy must never
        if stranded.any():  # strand a request on a dead rank
            ranks[stranded] = int(np.flatnonzero(active)[0]) if must_place else -1
        return ranks

    def _least_tokens(self, rows: np.ndarray, active: np.ndarray) -> np.ndarray:
        """The fallback when the policy fails: each request, in order, to the active rank
        with the fewest KV tokens reported plus sent since, counting those before it
        (plain Python over the raw state: no view, no estimator, nothing that failed)."""
        loads = np.array([(r.kv_tokens if r is not None else 0) + sum(t[0] for t in self.unacked(g))
                          for g, r in enumerate(self.reports)], dtype=np.float64)
        loads[~active] = np.inf
        out = np.empty(len(rows), dtype=np.int64)
        for i, prompt in enumerate(rows[:, 0].tolist()):  # (each sees the ones before it)
            out[i] = g = int(np.argmin(loads))
            loads[g] += max(prompt, 1)
        return out

    def _send(self, g: int, out: _Outgoing) -> None:
        self.ctrl.workers[g].send(out.data)  # (the bytes stock's sock_send would send)
        self._record_sent(g, out.row)

    def _send_now(self, out: _Outgoing) -> None:
        """Send one request to the rank a client pinned it to, else where the immediate
        rule places it."""
        g = self._still_pinned(out)
        if g is None:
            g = int(self._place(np.array([out.row], dtype=np.int64), must_place=True)[0])
        self._send(g, out)

    def _active_pin(self, pin, rid) -> int | None:
        """`pin` (a client's `routed_dp_rank`) if that rank is active, else None. A pin to
        a rank that is not active is dropped, with a warning: stock raises and the request
        is never answered (elastic EP: the rank went down after the client picked it);
        the policy places it instead."""
        if pin is None:
            return None
        if 0 <= pin < self.num_ranks and pin in self.ctrl._active_workers and self.ctrl.workers[pin] is not None:
            return int(pin)
        logger.warning("sglang-ext: request %s is pinned to DP rank %s, which is not active; "
                       "placing it by the policy", rid, pin)
        return None

    def _outgoing(self, req) -> _Outgoing:
        """`req` as it will be sent, its pin dropped first if that rank is not active."""
        asked, rid = getattr(req, "routed_dp_rank", None), str(getattr(req, "rid", "?"))
        pin = self._active_pin(asked, rid)
        if asked is not None and pin is None:
            req.routed_dp_rank = None
        return _Outgoing(encode_request(req), rid, request_row(req), pin)

    def _still_pinned(self, out: _Outgoing) -> int | None:
        """The pinned rank of a request read earlier (a failed send retried), if it is
        still active; else the pin is dropped, in its bytes too."""
        if out.pin is None or self._active_pin(out.pin, out.rid) is not None:
            return out.pin
        req = decode_request(out.data)
        req.routed_dp_rank = None
        out.data, out.pin = encode_request(req), None
        return None

    def place_arrivals(self) -> None:
        """Place the arrivals collected so far by the immediate rule, in one policy call
        (one view, one projection, one estimate of their lengths) where the policy places
        a burst as it would one request after another; else one call each. Sent in
        arrival order."""
        batch = self._arrivals
        if not batch:
            return
        self._arrivals = []
        if not self._any_active():  # (defensive: the loop holds them before they get here)
            self._held.extendleft(decode_request(out.data) for out in reversed(batch))
            return
        ranks = [None] * len(batch)  # None: placed by a call of its own as it is sent
        if len(batch) > 1 and self.policy.places_arrivals_together:
            # (`_place` never raises for a policy failure: it falls back)
            ranks = self._place(np.array([out.row for out in batch], dtype=np.int64), must_place=True).tolist()
        for out, g in zip(batch, ranks):
            try:
                if g is None:
                    self._send_now(out)
                else:
                    self._send(g, out)
            except Exception:  # noqa: BLE001  (one failed send must not cost the others theirs)
                self._retry_later(out)

    def _retry_later(self, out: _Outgoing) -> None:
        """A request whose send failed: to the head of the pool behind the other failed
        sends, past its deadline, so `release_pool` sends it first after SEND_RETRY_S
        (not lost), to its pinned rank or by the immediate rule."""
        self._send_failed(out)
        at = 0
        while at < len(self.pool) and self.pool[at].since == float("-inf"):
            at += 1
        out.since = float("-inf")
        self.pool.insert(at, out)

    def _send_failed(self, out: _Outgoing) -> None:
        """Log a failed send; the pool (where the request now waits) is retried after SEND_RETRY_S."""
        logger.exception("sglang-ext: failed to send request %s; retrying in %g s", out.rid, SEND_RETRY_S)
        self._retry_after = time.monotonic() + SEND_RETRY_S

    def dispatch(self, req) -> None:
        """Replaces `DataParallelController.dispatching` (never sees health checks)."""
        out = self._outgoing(req)
        pinned = out.pin is not None  # client-pinned: sent there at once, as stock does
        self.stats["pinned"] += pinned
        if self.pool_mode and not pinned:
            out.since = time.monotonic()
            self.pool.append(out)
            return  # released by the event loop once this batch of messages is read
        if self._arrivals is not None and not pinned:  # the loop is reading a burst: placed together
            self._arrivals.append(out)
            if len(self._arrivals) >= ARRIVALS_PER_CALL:
                self.place_arrivals()
            return
        try:
            self._send_now(out)
        except Exception:  # noqa: BLE001  (stock would raise and lose it)
            self._retry_later(out)

    def release_pool(self) -> None:
        """Pool binding: let the policy fill the slots ranks reported free, then place
        anything that has waited past the deadline by the immediate rule (or at its
        pin). A request leaves the pool only once it is sent: one whose send fails
        stays pooled, and the pool is retried after `SEND_RETRY_S`."""
        if not self.pool or not self._any_active():  # (pooled until a rank is active)
            return
        if time.monotonic() < self._retry_after:
            return
        # (a pinned request, whose send failed, waits at the head for the deadline path)
        window = [p for p in islice(self.pool, self.window) if p.pin is None]
        ranks = self._place(np.array([p.row for p in window], dtype=np.int64), must_place=False).tolist() \
            if window else []
        sent = {id(p) for p, g in zip(window, ranks) if g >= 0 and self._sent_pooled(g, p)}
        if sent:
            self.pool = deque(p for p in self.pool if id(p) not in sent)
        now = time.monotonic()
        while self.pool and now - self.pool[0].since >= self.cfg.pool_max_wait_s and now >= self._retry_after:
            p = self.pool[0]
            if not self._sent_pooled(None, p):
                break
            self.pool.popleft()
            self.stats["pool_deadline"] += 1

    def _sent_pooled(self, g: int | None, p: _Outgoing) -> bool:
        """Send a pooled request to rank g (None: by the immediate rule); False, logged,
        if the send failed (it stays pooled: retried after SEND_RETRY_S)."""
        try:
            if g is None:
                self._send_now(p)
            else:
                self._send(g, p)
            return True
        except Exception:  # noqa: BLE001
            self._send_failed(p)
            return False

    def _place_aborted_from_pool(self, msg) -> None:
        """An abort for requests still pooled here: send them now, before the abort is
        forwarded, so a rank reads the request, then the abort, and answers it as
        aborted exactly as stock SGLang would. Under DP attention stock sends control
        messages to the first rank only (the others get them from its broadcast a step
        later, and a request read by another rank meanwhile would run on unaborted):
        the aborted requests go to that first rank, behind which the abort travels on
        the same socket. Matched as the scheduler matches (a rid starting with the
        abort's). One whose send fails stays pooled (answered in full, not lost)."""
        from sglang.srt.managers.io_struct import AbortReq

        if not isinstance(msg, AbortReq):
            return
        rid = msg.rid or ""
        hit = [p for p in self.pool if msg.abort_all or p.rid.startswith(rid)]
        if not hit:
            return
        step = int(getattr(self.ctrl, "control_message_step", 1) or 1)
        told = [g for g in self.ctrl._active_workers[::step] if g < self.num_ranks] if step > 1 else []
        sent = {id(p) for p in hit if self._sent_pooled(told[0] if told and p.pin is None else None, p)}
        self.pool = deque(p for p in self.pool if id(p) not in sent)

    def wait_for_messages(self, poller: zmq.Poller) -> None:
        """Block until a message comes (or the pool's deadline, or the watchdog's
        wake-up). When reports came in since the last estimate and nothing is waiting,
        estimate them first: at once if every active rank has reported (with DP
        attention the ranks step together), else once `PREPARE_AFTER_QUIET_MS` pass
        without a message (the rest of the step's reports may be on their way)."""
        timeout = self.poll_timeout_ms()
        if self.prepare_due() and timeout > 0:
            # (an estimate paused for a message goes on at once, unless new reports came)
            whole_step = not self._fresh.any() or bool((self._fresh | ~self._active_mask()).all())
            if poller.poll(0 if whole_step else min(timeout, PREPARE_AFTER_QUIET_MS)):
                return
            tokenizer = getattr(self.ctrl, "recv_from_tokenizer", None)
            # (only a message from the tokenizer pauses it: reports come every step, and
            # where steps are shorter than the estimate none would ever finish while idle)
            self.prepare(interrupted=lambda: any(sock is tokenizer for sock, _ in poller.poll(0)))
            timeout = self.poll_timeout_ms()
        poller.poll(timeout)

    def log_stats(self, now: float | None = None) -> bool:
        """Every `stats_interval_s` (monotonic seconds) in which requests came, log one line
        of what the controller did since the last one. True if it logged."""
        now = time.monotonic() if now is None else now
        interval = self.cfg.stats_interval_s
        if interval <= 0 or now - self._stats_since < interval:
            return False
        done = {k: v - self._stats_logged[k] for k, v in self.stats.items()}
        elapsed, calls = now - self._stats_since, np.array(self._decision_s)
        self._stats_since, self._stats_logged = now, dict(self.stats)
        self._decision_s.clear()
        if not done["dispatched"]:
            return False  # an idle server logs nothing
        timing = ""
        if calls.size:
            p50, p99 = np.percentile(calls, [50, 99]) * 1e3
            timing = f", decision time p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {calls.max() * 1e3:.2f} ms"
        logger.info("sglang-ext balancer, last %.0f s: requests placed %d (pinned %d, at the pool deadline %d), "
                    "pooled now %d; reports %d (estimated while idle %d, paused for a message %d); "
                    "placement calls %d (on the previous estimate %d)%s",
                    elapsed, done["dispatched"], done["pinned"], done["pool_deadline"], len(self.pool),
                    done["reports"], done["prepared"], done["paused"], done["placements"], done["lagged"], timing)
        return True

    def poll_timeout_ms(self) -> int:
        if not self.pool or not self._any_active():  # (no rank to release to: no deadline)
            return IDLE_POLL_MS
        wait = max(self.pool[0].since + self.cfg.pool_max_wait_s, self._retry_after) - time.monotonic()
        return max(0, min(IDLE_POLL_MS, int(wait * 1000) + 1))

    # ---- loop ------------------------------------------------------------------------

    def freeze_gc(self, why: str, threshold=None) -> None:
        """Take every object alive now out of the garbage collector's passes (`gc.freeze`;
        `threshold`: new collection thresholds first, as SGLang's /freeze_gc sets them).

        Why: a full (generation-2) collection walks every tracked object, and this
        process holds 620-680k of them from its imports alone (sglang, torch, scipy): each
        full pass stalls the loop 260-290 ms on a 2-core VM (`scripts/bench_gc.py`), a dozen
        decode steps in which no arrival is placed and no pool released. Frozen, a full
        pass walks only what was made since. SGLang freezes its tokenizer, scheduler and
        detokenizer after warm-up but not this process, so the controller freezes when
        its loop starts and again when SGLang's post-warm-up /freeze_gc passes through."""
        from sglang.srt.utils.common import freeze_gc

        freeze_gc(f"DP controller (sglang-ext, {why})", threshold)
        logger.info("sglang-ext: %d objects taken out of the garbage collector's passes (%s)",
                    gc.get_freeze_count(), why)

    def event_loop(self) -> None:
        ctrl = self.ctrl
        self._stage("freezing the garbage collector", lambda: self.freeze_gc("the loop starts"))
        poller = zmq.Poller()
        poller.register(ctrl.recv_from_tokenizer, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLIN)
        try:
            while True:
                ctrl.soft_watchdog.feed()
                self.wait_for_messages(poller)
                # Reports first: placement decisions then see this step's state. A stage
                # that raises is logged and the loop goes on (stock's loop would die, and
                # the server with every request in it); each stage leaves its state whole.
                self._stage("reading the rank reports", lambda: self.on_reports(recv_reports(self.sock)))
                self.read_requests()
                self._stage("releasing the pool", self.release_pool)
                self._stage("logging stats", self.log_stats)
                if self.metrics is not None:
                    self.metrics.sync(self.stats, len(self.pool))
        finally:
            self.close()

    def read_requests(self) -> None:
        """Dispatch every message waiting on the tokenizer socket, in order. Under
        immediate binding the arriving requests are collected and placed together
        (`place_arrivals`) once the socket is empty, or before any other message is
        passed on: an abort, or a change of the active ranks, never overtakes the
        requests read before it."""
        from sglang.srt.managers.io_struct import sock_recv

        ctrl = self.ctrl
        # (a policy that must place each request in its own call sends each as it is read)
        self._arrivals = [] if not self.pool_mode and self.policy.places_arrivals_together else None
        try:
            while True:
                try:
                    recv_req = sock_recv(ctrl.recv_from_tokenizer, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
                if self._holds(recv_req):
                    self._held.append(recv_req)
                    continue
                self._dispatch_one(recv_req)
                if self._held and self._any_active():  # (this message brought a rank back)
                    self._dispatch_held()
        finally:
            self._guarded(self.place_arrivals)
            self._arrivals = None

    def _dispatch_one(self, msg) -> None:
        from sglang.srt.managers.io_struct import FreezeGCReq

        if isinstance(msg, FreezeGCReq):  # (then on to the ranks, as stock sends it)
            self._stage("freezing the garbage collector", lambda: self.freeze_gc("/freeze_gc", msg.gc_threshold))
        if self._arrivals and not _is_request(msg):
            self._guarded(self.place_arrivals)
        if self.pool:
            self._guarded(self._place_aborted_from_pool, msg)
        self._guarded(self.ctrl._request_dispatcher, msg)

    def _holds(self, msg) -> bool:
        """Whether `msg` waits in `_held`: a request or an abort while no rank is active,
        or behind others waiting (an abort never overtakes its request). Other messages
        (a change of the active ranks above all) go on at once."""
        from sglang.srt.managers.io_struct import AbortReq

        if not (_is_request(msg) or isinstance(msg, AbortReq)):
            return False
        if self._held:
            return True
        if self._any_active():
            return False
        logger.warning("sglang-ext: no active DP rank; holding requests until one is active")
        return True

    def _dispatch_held(self) -> None:
        logger.info("sglang-ext: a DP rank is active again; dispatching %d held message(s)", len(self._held))
        while self._held and self._any_active():
            self._dispatch_one(self._held.popleft())

    @staticmethod
    def _stage(what: str, fn) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001
            logger.exception("sglang-ext: %s failed", what)

    def _guarded(self, fn, *args) -> None:
        # Stock lets a failed dispatch kill the controller (and with it the server); one
        # bad message must not take the others down.
        what = type(args[0]).__name__ if args else "the arrivals read together"
        self._stage(f"dispatching {what}", lambda: fn(*args))

    def close(self) -> None:
        try:
            self.sock.close(linger=0)  # zmq unlinks the ipc file of a bound socket on close
        except Exception:
            pass


# ---- hooks -------------------------------------------------------------------------------


def after_init(result, self, server_args, *args, **kwargs):
    """AFTER hook on DataParallelController.__init__."""
    cfg = get_config(server_args)
    if cfg is None or not cfg.enabled:
        return None
    if (gc_warn_s := getattr(server_args, "gc_warning_threshold_secs", 0.0) or 0.0) > 0:
        # (SGLang logs its long collections in the tokenizer manager only: --gc-warning-threshold-secs)
        from sglang.srt.utils.common import configure_gc_warning

        configure_gc_warning(gc_warn_s)
    self._sglang_ext_balancer = BalancedDispatch(self, cfg)
    self.dispatching = self._sglang_ext_balancer.dispatch
    # Stock refreshes its shm load budget per dispatch for total_* methods; we have our own state.
    self.refresh_load_budget_on_dispatch = False
    return None


def around_event_loop(original, self, *args, **kwargs):
    """AROUND hook on DataParallelController.event_loop."""
    balancer = getattr(self, "_sglang_ext_balancer", None)
    if balancer is None:
        return original(self, *args, **kwargs)
    return balancer.event_loop()
