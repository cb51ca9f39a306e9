"""Per-step load reports from DP ranks to the controller.

Rank 0 of each DP group PUSHes one `RankReport` per scheduler step to the PULL
socket the controller binds at `BalancerConfig.report_addr` (ipc on one node,
tcp across nodes). The real scheduler patch and the GPU-free stand-in send the
same message through the same `ReportSender`, so the controller cannot tell them
apart.
"""
from __future__ import annotations

import functools
import logging
import pickle
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

logger = logging.getLogger(__name__)

_EMPTY = np.zeros(0, dtype=np.int64)
_NONE = np.zeros(0, dtype=bool)


@functools.cache
def request_types() -> tuple[type, ...]:
    """The messages SGLang handles as work (one request, or a batch of them); every
    other message from the tokenizer is a control message (an abort, a flush, ...)."""
    from sglang.srt.managers import io_struct as io

    return (io.TokenizedGenerateReqInput, io.TokenizedEmbeddingReqInput,
            io.BatchTokenizedGenerateReqInput, io.BatchTokenizedEmbeddingReqInput)


def runs_to_cap(req) -> bool:
    """A request under ignore_eos runs exactly to its max_new_tokens: its length is known."""
    return bool(getattr(getattr(req, "sampling_params", None), "ignore_eos", False))


def exact_mask(flags, n: int) -> np.ndarray:
    """A report's ignore_eos flags for its n requests; all False where the sender
    left them out (or their count does not match)."""
    flags = np.asarray(flags if flags is not None else _NONE, dtype=bool)
    return flags if flags.shape == (n,) else np.zeros(n, dtype=bool)


def encode_request(req) -> bytes:
    """`req` as SGLang's `sock_send` puts it on the wire (pickle under
    `SGLANG_USE_PICKLE_IPC`, else msgpack), for a plain `socket.send` later.

    The controller encodes each request when it reads it, where stock sends it:
    its `time_stats` is then the wrapped copy that stock's dispatch call sends
    (stock puts the raw one back after the call, and a rank cannot decode that
    under msgpack IPC), and a pooled request is held as bytes, which the garbage
    collector does not walk (a decoded request holds tracked objects of its own)."""
    from sglang.srt.managers import io_struct

    if io_struct._USE_PICKLE_IPC:  # (what sock_send reads: pyzmq's send_pyobj pickles so)
        return pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
    return io_struct.msgpack_encode(req)


def decode_request(data: bytes):
    """The request `encode_request` encoded, as a rank's `sock_recv` decodes it."""
    from sglang.srt.managers import io_struct

    if io_struct._USE_PICKLE_IPC:
        return pickle.loads(data)
    return io_struct.msgpack_decode(data)


#: `custom_params` key of a request's answer length for the stand-in backend: its
#: stand-in model ends the answer with EOS after that many tokens, as a real model
#: ends where its text ends (`sglang-ext replay --max-new-tokens` sets it; a real
#: model ignores it). The balancer never reads it: it sees max_new_tokens only.
ANSWER_LEN_KEY = "sglang_ext_answer_len"


@dataclass
class RankReport:
    """One rank's state after a step."""

    dp_rank: int
    step: int
    received: int  # requests (health checks excluded) this rank has received so far, cumulative
    free_slots: int  # running-request slots it could still fill (capacity - running - waiting)
    # Running requests: KV length now, tokens generated so far, max_new_tokens cap.
    run_kv: np.ndarray = field(default_factory=lambda: _EMPTY)
    run_generated: np.ndarray = field(default_factory=lambda: _EMPTY)
    run_cap: np.ndarray = field(default_factory=lambda: _EMPTY)
    # Waiting (received, not yet admitted): prompt length and max_new_tokens.
    wait_prompt: np.ndarray = field(default_factory=lambda: _EMPTY)
    wait_cap: np.ndarray = field(default_factory=lambda: _EMPTY)
    # Output lengths of requests that finished since the last report (estimator input),
    # and their prompt lengths in the same order (empty from a sender that omits them).
    finished_lengths: np.ndarray = field(default_factory=lambda: _EMPTY)
    finished_prompts: np.ndarray = field(default_factory=lambda: _EMPTY)
    # Which of them run under ignore_eos, so exactly to their cap (running, waiting,
    # finished: a forced length says nothing of natural answers). Empty: none.
    run_exact: np.ndarray = field(default_factory=lambda: _NONE)
    wait_exact: np.ndarray = field(default_factory=lambda: _NONE)
    finished_exact: np.ndarray = field(default_factory=lambda: _NONE)
    time: float = field(default_factory=time.time)
    slot_limit: int = 0  # running requests the rank can hold (max_running_requests; 0: unknown)

    @property
    def run_prompt(self) -> np.ndarray:
        """Prompt lengths of the running requests: a KV length is prompt plus generated."""
        return np.maximum(self.run_kv - self.run_generated, 0)

    def count(self, which: str) -> int:
        """How many 'run', 'wait' or 'finished' requests the report lists."""
        return (self.run_kv if which == "run" else self.wait_prompt if which == "wait"
                else self.finished_lengths).shape[0]

    def exact(self, which: str) -> np.ndarray:
        """ignore_eos flags of the 'run', 'wait' or 'finished' requests (all False if not sent)."""
        return exact_mask(getattr(self, f"{which}_exact", None), self.count(which))

    @property
    def kv_tokens(self) -> int:
        return int(self.run_kv.sum() + self.wait_prompt.sum())

    @property
    def num_requests(self) -> int:
        return int(self.run_kv.shape[0] + self.wait_prompt.shape[0])


def is_health_check_rid(rid) -> bool:
    return isinstance(rid, str) and rid.startswith("HEALTH_CHECK")


def allow_ipv6(sock: zmq.Socket, addr: str) -> None:
    """A tcp address with a bracketed host (tcp://[fd00::1]:port) is IPv6, which a
    ZMQ socket refuses unless told."""
    if addr.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


class ReportSender:
    """PUSH side: never blocks the scheduler; a report that cannot go now is dropped
    (the next step's report supersedes it)."""

    def __init__(self, addr: str, dp_rank: int):
        self.dp_rank = dp_rank
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 64)
        self._sock.setsockopt(zmq.LINGER, 0)
        allow_ipv6(self._sock, addr)
        self._sock.connect(addr)
        self.dropped = 0
        # Finished lengths (with their prompts and ignore_eos flags) of a dropped
        # report are carried to the next one.
        self._pending_finished: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def send(self, report: RankReport) -> bool:
        if self._pending_finished:
            lengths, prompts, exact = zip(*self._pending_finished)
            own_exact = report.exact("finished")  # (read before the lengths grow)
            report.finished_lengths = np.concatenate(lengths + (report.finished_lengths,))
            report.finished_prompts = np.concatenate(prompts + (report.finished_prompts,))
            report.finished_exact = np.concatenate(exact + (own_exact,))
            self._pending_finished = []
        try:
            self._sock.send(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: seen, not flooded
                logger.warning("dp rank %d: balancer report dropped (%d so far): the DP controller is not "
                               "reading them as fast as this rank sends; it places on older loads meanwhile",
                               self.dp_rank, self.dropped)
            if report.finished_lengths.size:
                self._pending_finished.append((report.finished_lengths, report.finished_prompts,
                                               report.exact("finished")))
            return False

    def close(self) -> None:
        self._sock.close(linger=0)


_REPORT_INTS = ("dp_rank", "step", "received", "free_slots", "slot_limit")
# arrays read side by side: each group's arrays have one entry per request
_REPORT_ARRAYS = (("run_kv", "run_generated", "run_cap"), ("wait_prompt", "wait_cap"),
                  ("finished_lengths",))


def malformed(rep: RankReport) -> str | None:
    """What makes a decoded report unusable (a field of the wrong type, columns of
    different lengths), or None. The controller reads these fields without checks."""
    for k in _REPORT_INTS:
        v = getattr(rep, k, None)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            return f"field {k!r} is {v!r}, not an integer"
    for names in _REPORT_ARRAYS:
        sizes = []
        for k in names:
            a = getattr(rep, k, None)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
                return f"field {k!r} is not a 1-D integer array"
            sizes.append(a.shape[0])
        if len(set(sizes)) > 1:
            return f"fields {', '.join(names)} have {', '.join(map(str, sizes))} entries, not one per request"
    return None


def recv_reports(sock: zmq.Socket) -> list[RankReport]:
    """Drain every report waiting on the PULL socket (non-blocking)."""
    out = []
    while True:
        try:
            raw = sock.recv(flags=zmq.NOBLOCK)
        except zmq.Again:
            return out
        try:
            obj = pickle.loads(raw)
        except Exception:  # a stray peer must not take the controller down
            logger.warning("dropping an undecodable balancer report (%d bytes)", len(raw))
            continue
        if not isinstance(obj, RankReport):
            continue
        bad = malformed(obj)
        if bad:  # (one bad sender must not take the controller, and every request with it, down)
            logger.warning("dropping a malformed balancer report from DP rank %r: %s",
                           getattr(obj, "dp_rank", "?"), bad)
            continue
        out.append(obj)
