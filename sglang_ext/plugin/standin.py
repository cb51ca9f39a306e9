"""GPU-free stand-in for SGLang's scheduler process (--balancer-sim-backend PRESET).

It speaks the real scheduler protocol (design.md section 6), so the stock
launcher, tokenizer manager, HTTP server and DP controller run unchanged:

- `load_plugins()`, then `publish(server_args, role="scheduler", ranks=...)`;
- PULL requests from `port_args.scheduler_input_ipc_name`, PUSH
  `BatchTokenIDOutput` to `port_args.tokenizer_ipc_name` (--skip-tokenizer-init),
  a DEALER on `rpc_ipc_name`, the ready message on the pipe (outputs go as the
  detokenizer's `BatchStrOutput`, see `_flush_outbox`);
- admits up to `max_running` requests per rank, runs steps whose duration comes
  from the cost model (`CostModel.step_time` plus prefill per prompt token),
  sleeping `duration * time_scale`;
- synchronises all DP ranks every step with a real collective, a gloo
  all-reduce (MAX) of the model step times; each rank's barrier idle follows
  as max - own (logged as idle_source "predicted");
- streams one token per step per request and finishes each at max_new_tokens,
  or earlier with EOS at the answer length a replay passes in custom_params
  (`ANSWER_LEN_KEY`), unless ignore_eos: the balancer then knows only the cap,
  as with a real model;
- reports per step through the same `ReportSender` as the scheduler patch;
- under DP attention, takes control messages (aborts, ...) as SGLang's
  schedulers do: the DP controller sends them to the first DP group only, whose
  leader broadcasts them to every rank each step (`_control_from_leader`).

Simplifications (why: only placement and barrier timing matter here): prefill and
decode share a step (SGLang separates them unless mixed chunking is on); no
prefix cache, no chunked prefill, no stop strings, no logprobs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from sglang_ext.plugin.config import BalancerConfig, get_config
from sglang_ext.plugin.protocol import (ANSWER_LEN_KEY, RankReport, ReportSender, is_health_check_rid,
                                        request_types, runs_to_cap)
from sglang_ext.plugin.telemetry_bridge import open_telemetry

logger = logging.getLogger(__name__)

#: an idle rank waits this long on its input socket before the next (empty) collective
IDLE_POLL_MS = 20
#: an idle rank re-reports at most this often unless its state changed
IDLE_REPORT_INTERVAL_S = 0.25
DEFAULT_CONTEXT_LEN = 4096
DEFAULT_VOCAB = 32000
EOS_TOKEN_ID = 2  # the stand-in model's end of answer (Llama's id; left out of the text, as special tokens are)


@dataclass
class SimReq:
    rid: str
    prompt_len: int
    max_new: int
    stream: bool
    http_worker_ipc: str | None
    generated: int = 0
    sent: int = 0  # tokens already streamed
    health: bool = False
    answer_len: int | None = None  # the stand-in model emits EOS as this token (None: it runs to max_new)
    ignore_eos: bool = False  # as the request asked (the balancer then knows its length: max_new)
    tokens: list[int] = field(default_factory=list)

    @property
    def kv(self) -> int:
        return self.prompt_len + self.generated

    @property
    def end(self) -> int:
        """Tokens this request generates: its answer, cut at max_new_tokens."""
        return self.max_new if self.answer_len is None else min(self.answer_len, self.max_new)

    def finish_reason(self) -> dict:
        if self.answer_len is not None and self.answer_len <= self.max_new:
            return {"type": "stop", "matched": EOS_TOKEN_ID}
        return {"type": "length", "length": self.max_new}


def answer_len(sampling_params) -> int | None:
    """The answer length a replay asks the stand-in model for (custom_params
    `ANSWER_LEN_KEY`), None if absent or under ignore_eos. ValueError if malformed."""
    custom = getattr(sampling_params, "custom_params", None)
    if not isinstance(custom, dict) or ANSWER_LEN_KEY not in custom:
        return None
    value = custom[ANSWER_LEN_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"custom_params.{ANSWER_LEN_KEY} must be a whole number >= 1, got {value!r}")
    return None if getattr(sampling_params, "ignore_eos", False) else value


def around_launch_scheduler_processes(original, cls, server_args, port_args, run_scheduler_process_func, *args,
                                      **kwargs):
    """AROUND hook on Engine._launch_scheduler_processes: launch the stand-in instead.

    One hook covers both launch paths: plain DP (the controller spawns schedulers
    with this function) and DP attention (the engine pre-launches them)."""
    cfg = get_config(server_args)
    if cfg is not None and cfg.sim_backend:
        run_scheduler_process_func = run_standin_scheduler
    return original(cls, server_args, port_args, run_scheduler_process_func, *args, **kwargs)


def _control_from_leader(server_args) -> bool:
    """Whether control messages reach only the first DP group's leader, which then
    broadcasts them to every rank: SGLang's way under DP attention unless local control
    broadcast is on (DataParallelController.control_message_step, and the scheduler's
    RequestReceiver._broadcast_reqs_across_ranks)."""
    if not getattr(server_args, "enable_dp_attention", False):
        return False
    try:
        from sglang.srt.runtime_context import get_parallel

        return not get_parallel().enable_dp_attention_local_control_broadcast
    except Exception:  # noqa: BLE001  (no parallel context published: SGLang's default)
        return True


def _model_limits(server_args) -> tuple[int, int]:
    """(context length, vocab size) from the model directory's config.json."""
    context_len, vocab = DEFAULT_CONTEXT_LEN, DEFAULT_VOCAB
    path = os.path.join(str(server_args.model_path), "config.json")
    try:
        with open(path) as f:
            conf = json.load(f)
        context_len = int(conf.get("max_position_embeddings") or context_len)
        vocab = int(conf.get("vocab_size") or vocab)
    except (OSError, ValueError):
        logger.warning("stand-in: cannot read %s; context %d, vocab %d", path, context_len, vocab)
    if getattr(server_args, "context_length", None):
        context_len = int(server_args.context_length)
    return context_len, vocab


class StandinScheduler:
    """One DP rank (the leader process of its DP group)."""

    def __init__(self, server_args, port_args, dp_rank: int, cfg: BalancerConfig):
        from sglang.srt.utils.network import get_zmq_socket

        from sglang_ext.cost import cost_preset

        self.cfg = cfg
        self.dp_rank = dp_rank
        self.max_running = max(1, int(cfg.sim_max_running))
        self.cost = cost_preset(cfg.sim_backend, batch=self.max_running)
        self.time_scale = float(cfg.sim_time_scale)
        self.context_len, self.vocab = _model_limits(server_args)
        self.max_req_input_len = self.context_len - 1
        self.max_total_tokens = int(getattr(server_args, "max_total_tokens", None) or
                                    self.max_running * self.context_len)

        self.ctx = zmq.Context(2)
        self.recv_from_tokenizer = get_zmq_socket(self.ctx, zmq.PULL, port_args.scheduler_input_ipc_name, False)
        self.send_to_tokenizer = get_zmq_socket(self.ctx, zmq.PUSH, port_args.tokenizer_ipc_name, False)
        # SGLang's RPC channel (weights updates etc.): connected like the real scheduler, never used.
        self.recv_from_rpc = get_zmq_socket(self.ctx, zmq.DEALER, port_args.rpc_ipc_name, False)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)

        self.waiting: deque[SimReq] = deque()
        self.running: list[SimReq] = []
        self.received = 0
        self.step = 0
        self.finished_lengths: list[int] = []
        self.finished_prompts: list[int] = []
        self.finished_exact: list[bool] = []
        self.sender = ReportSender(cfg.report_addr, dp_rank) if cfg.reporting else None
        self.telemetry = open_telemetry(cfg, dp_rank, source="standin", server_args=server_args)
        self._last_report = 0.0
        self._last_key = None
        self._outbox: list[tuple[SimReq, list[int], dict | None]] = []
        # Under DP attention: control messages the first rank read, for every rank (`_share_control`).
        self.control_from_leader = _control_from_leader(server_args)
        self._control: list = []

    def init_info(self) -> dict:
        return {
            "status": "ready",
            "max_total_num_tokens": self.max_total_tokens,
            "max_req_input_len": self.max_req_input_len,
            "startup_time": None,
        }

    # ---- input ---------------------------------------------------------------------------

    def _drain(self, timeout_ms: int) -> None:
        from sglang.srt.managers.io_struct import sock_recv

        if timeout_ms > 0 and not self.poller.poll(timeout_ms):
            return
        while True:
            try:
                msg = sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            try:
                self._handle(msg)
            except Exception:  # noqa: BLE001  (one bad message must not stop the rank)
                logger.exception("stand-in DP%d: cannot handle %s", self.dp_rank, type(msg).__name__)

    def _handle(self, msg, shared: bool = False) -> None:
        if self.control_from_leader and not shared and not isinstance(msg, request_types()):
            self._control.append(msg)  # every rank takes it at `_share_control`
            return
        from sglang.srt.managers.io_struct import (
            AbortReq,
            BatchTokenizedGenerateReqInput,
            FreezeGCReq,
            TokenizedEmbeddingReqInput,
            TokenizedGenerateReqInput,
        )

        if isinstance(msg, BatchTokenizedGenerateReqInput):
            for req in msg:
                self._handle(req)
        elif isinstance(msg, TokenizedGenerateReqInput):
            self._add(msg)
        elif isinstance(msg, TokenizedEmbeddingReqInput):
            self.received += 1
            self._finish_now(msg, "embedding requests are not supported by the sim backend")
        elif isinstance(msg, AbortReq):
            self._abort(msg)
        elif isinstance(msg, FreezeGCReq):  # (SGLang's post-warm-up /freeze_gc, as the real scheduler takes it)
            from sglang.srt.utils.common import freeze_gc

            freeze_gc(f"Scheduler (stand-in DP{self.dp_rank})", msg.gc_threshold)
        else:
            logger.debug("stand-in DP%d: ignoring %s", self.dp_rank, type(msg).__name__)

    def _add(self, msg) -> None:
        health = is_health_check_rid(msg.rid)
        if not health:
            self.received += 1
        prompt_len = len(msg.input_ids or [])
        sp = msg.sampling_params
        max_new = getattr(sp, "max_new_tokens", None)
        max_new = 128 if max_new is None else int(max_new)
        if prompt_len == 0 or prompt_len > self.max_req_input_len:
            self._finish_now(msg, f"The input ({prompt_len} tokens) must be between 1 and "
                                  f"{self.max_req_input_len} tokens (sim backend).")
            return
        try:
            answer = answer_len(sp)
        except ValueError as exc:
            self._finish_now(msg, f"{exc} (sim backend)")
            return
        req = SimReq(rid=msg.rid, prompt_len=prompt_len, max_new=max(max_new, 0), stream=bool(msg.stream),
                     http_worker_ipc=msg.http_worker_ipc, health=health, answer_len=answer,
                     ignore_eos=runs_to_cap(msg))
        self.waiting.append(req)

    def _finish_now(self, msg, message: str) -> None:
        req = SimReq(rid=msg.rid, prompt_len=len(getattr(msg, "input_ids", None) or []), max_new=0,
                     stream=False, http_worker_ipc=getattr(msg, "http_worker_ipc", None))
        self._outbox.append((req, [], {"type": "abort", "message": message, "status_code": 400,
                                       "err_type": "BadRequestError"}))

    def _abort(self, msg) -> None:
        def hit(r: SimReq) -> bool:
            return bool(msg.abort_all) or r.rid == msg.rid

        for queue_name in ("waiting", "running"):
            queue = getattr(self, queue_name)
            kept = [r for r in queue if not hit(r)]
            for r in queue:
                if hit(r):
                    self._outbox.append((r, [], {"type": "abort", "message": "Abort before finishing"}))
            setattr(self, queue_name, deque(kept) if queue_name == "waiting" else kept)

    # ---- steps ---------------------------------------------------------------------------

    def _share_control(self) -> None:
        """Under DP attention, once a step: the first rank's control messages to every
        rank (a gloo broadcast, as SGLang's schedulers broadcast theirs), each then
        taken in the order the first rank read them."""
        import torch.distributed as dist

        box = [self._control if self.dp_rank == 0 else None]
        self._control = []
        dist.broadcast_object_list(box, src=0)
        for msg in box[0] or []:
            try:
                self._handle(msg, shared=True)
            except Exception:  # noqa: BLE001  (one bad message must not stop the rank)
                logger.exception("stand-in DP%d: cannot handle %s", self.dp_rank, type(msg).__name__)

    def _admit(self) -> list[SimReq]:
        admitted = []
        kv = sum(r.kv + r.max_new - r.generated for r in self.running)
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting[0]
            if self.running and kv + r.prompt_len + r.max_new > self.max_total_tokens:
                break  # KV pool full: wait for departures
            self.waiting.popleft()
            kv += r.prompt_len + r.max_new
            self.running.append(r)
            admitted.append(r)
        return admitted

    def _local_time(self, admitted: list[SimReq]) -> float:
        decoding = [r for r in self.running if r.generated > 0]  # admitted ones are prefilled instead
        t = 0.0
        if self.running:
            n = len(decoding)
            kv = sum(r.kv for r in decoding)
            t = float(self.cost.step_time(np.array([n]), np.array([kv]))[0]) if n else 0.0
            t += self.cost.prefill_per_token * sum(r.prompt_len for r in admitted)
            t = max(t, self.cost.a)  # any step with work costs at least the fixed overhead
        return t

    def _advance(self) -> None:
        """Every running request gets one token; those at the end of their answer
        (EOS) or at max_new_tokens finish."""
        still = []
        for r in self.running:
            end = r.end
            if r.generated < end:
                eos = r.generated + 1 == r.answer_len
                r.tokens.append(EOS_TOKEN_ID if eos else 100 + (r.prompt_len + r.generated) % max(self.vocab - 100, 1))
                r.generated += 1
            if r.generated >= end:
                self._outbox.append((r, r.tokens[r.sent:], r.finish_reason()))
                r.sent = r.generated
                if not r.health:
                    self.finished_lengths.append(r.generated)
                    self.finished_prompts.append(r.prompt_len)
                    self.finished_exact.append(r.ignore_eos)
            else:
                if r.stream:
                    self._outbox.append((r, r.tokens[r.sent:], None))
                    r.sent = r.generated
                still.append(r)
        self.running = still

    def _flush_outbox(self) -> None:
        """Send this step's outputs to the tokenizer manager.

        As `BatchStrOutput`, i.e. what SGLang's detokenizer sends, rather than the
        scheduler's `BatchTokenIDOutput`: under --skip-tokenizer-init the latter has no
        text, and stock /v1/completions then fails on the missing "text". Each token
        gets a fixed text " t<id>", so both /generate and the OpenAI routes work."""
        from sglang.srt.managers.io_struct import BatchStrOutput, sock_send

        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        k = len(items)
        out = BatchStrOutput(
            rids=[r.rid for r, _, _ in items],
            http_worker_ipcs=[r.http_worker_ipc for r, _, _ in items],
            finished_reasons=[fin for _, _, fin in items],
            output_strs=["".join(f" t{t}" for t in toks if t != EOS_TOKEN_ID) for _, toks, _ in items],
            output_ids=[list(toks) for _, toks, _ in items],
            prompt_tokens=[r.prompt_len for r, _, _ in items],
            completion_tokens=[r.generated for r, _, _ in items],
            reasoning_tokens=[0] * k,
            cached_tokens=[0] * k,
            input_token_logprobs_val=None, input_token_logprobs_idx=None,
            output_token_logprobs_val=None, output_token_logprobs_idx=None,
            input_top_logprobs_val=None, input_top_logprobs_idx=None,
            output_top_logprobs_val=None, output_top_logprobs_idx=None,
            input_token_ids_logprobs_val=None, input_token_ids_logprobs_idx=None,
            output_token_ids_logprobs_val=None, output_token_ids_logprobs_idx=None,
            output_token_entropy_val=None, output_token_sampling_mask=None,
            output_hidden_states=None, routed_experts=None, indexer_topk=None,
            placeholder_tokens_idx=None, placeholder_tokens_val=None,
            retraction_counts=[0] * k,  # must be a list (design.md section 6)
            dp_ranks=[self.dp_rank] * k,
        )
        sock_send(self.send_to_tokenizer, out)

    def _report(self, force: bool) -> None:
        if self.sender is None:
            return
        now = time.monotonic()
        key = (self.received, len(self.waiting), len(self.running))
        if not force and key == self._last_key and now - self._last_report < IDLE_REPORT_INTERVAL_S:
            return
        self._last_key, self._last_report = key, now
        run = [r for r in self.running if not r.health]
        wait = [r for r in self.waiting if not r.health]
        self.sender.send(RankReport(
            dp_rank=self.dp_rank,
            step=self.step,
            received=self.received,
            free_slots=max(self.max_running - len(self.running) - len(self.waiting), 0),
            run_kv=np.fromiter((r.kv for r in run), np.int64, len(run)),
            run_generated=np.fromiter((r.generated for r in run), np.int64, len(run)),
            run_cap=np.fromiter((r.max_new for r in run), np.int64, len(run)),
            wait_prompt=np.fromiter((r.prompt_len for r in wait), np.int64, len(wait)),
            wait_cap=np.fromiter((r.max_new for r in wait), np.int64, len(wait)),
            finished_lengths=np.asarray(self.finished_lengths, dtype=np.int64),
            finished_prompts=np.asarray(self.finished_prompts, dtype=np.int64),
            run_exact=np.fromiter((r.ignore_eos for r in run), bool, len(run)),
            wait_exact=np.fromiter((r.ignore_eos for r in wait), bool, len(wait)),
            finished_exact=np.asarray(self.finished_exact, dtype=bool),
            slot_limit=self.max_running,
        ))
        self.finished_lengths, self.finished_prompts, self.finished_exact = [], [], []

    def run(self) -> None:
        import torch
        import torch.distributed as dist

        buf = torch.zeros(2, dtype=torch.float64)
        idle = True
        while True:
            # Block briefly only when the whole cluster was idle last round.
            self._drain(IDLE_POLL_MS if idle and not self.waiting else 0)
            if self.control_from_leader:
                self._share_control()
            admitted = self._admit()
            local = self._local_time(admitted)
            if local > 0:
                time.sleep(local * self.time_scale)
            buf[0], buf[1] = local, 1.0 if self.running else 0.0
            t0 = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)  # the per-step barrier across DP ranks
            waited = time.perf_counter() - t0
            step_time, idle = float(buf[0]) + self.cost.sync, buf[1] == 0.0
            if idle:
                self._flush_outbox()  # rejections and aborts found while idle
                self._report(force=False)
                if self.telemetry is not None:
                    self.telemetry.flush_due()  # (the last busy steps' lines, for a live report)
                continue
            self.step += 1
            n, kv = len(self.running), sum(r.kv for r in self.running)
            self._advance()
            self._flush_outbox()
            self._report(force=True)
            if self.telemetry is not None:
                # The barrier wait a GPU rank would see: the collective's MAX of the
                # model step times minus this rank's own. The wall-clock wait in the
                # all-reduce is also there, but on a CPU box with more ranks than
                # cores it is mostly waiting for a core, so it is only logged at debug.
                logger.debug("rank %d step %d: wall wait %.3f ms", self.dp_rank, self.step, waited * 1e3)
                self.telemetry.record(
                    step=self.step, batch_size=n, kv_tokens=kv, predicted_cost_s=local,
                    step_time_s=step_time, idle_s=max(step_time - self.cost.sync - local, 0.0),
                    idle_source="predicted",
                )

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()
        if self.sender is not None:
            self.sender.close()
        self.ctx.destroy(linger=0)


def _init_collective(cfg: BalancerConfig, server_args, dp_rank: int, num_dp: int) -> None:
    import torch.distributed as dist

    host = "127.0.0.1"
    if getattr(server_args, "dist_init_addr", None) and (getattr(server_args, "nnodes", 1) or 1) > 1:
        host = server_args.dist_init_addr.rpartition(":")[0].strip("[]")
    if host in ("127.0.0.1", "localhost"):
        # gloo otherwise binds the address the hostname resolves to, which may be unreachable here.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{cfg.sim_dist_port}", rank=dp_rank,
                            world_size=num_dp)


def run_standin_scheduler(server_args, port_args, gpu_id, tp_rank, pp_rank, dp_rank, pipe_writer,
                          display_tp_rank=None, display_dp_rank=None, display_moe_ep_rank=None):
    """Drop-in for `sglang.srt.managers.scheduler.run_scheduler_process` (same signature)."""
    import psutil
    import setproctitle
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.utils.common import configure_logger, kill_itself_when_parent_died

    kill_itself_when_parent_died()
    load_plugins()
    if dp_rank is None and "SGLANG_DP_RANK" in os.environ:
        dp_rank = int(os.environ["SGLANG_DP_RANK"])
    publish(server_args, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(server_args, tp_rank=tp_rank, pp_rank=pp_rank),
                             dp_rank=dp_rank, gpu_id=gpu_id))
    dp_rank = int(dp_rank or 0)
    prefix = f" DP{dp_rank} TP{tp_rank}"
    configure_logger(server_args, prefix=prefix)
    setproctitle.setproctitle(f"sglang::standin_scheduler{prefix.replace(' ', '_')}")
    parent = psutil.Process().parent()
    cfg = get_config(server_args)

    num_dp = int(getattr(server_args, "dp_size", 1) or 1)
    tp_size = int(getattr(server_args, "tp_size", 1) or 1)
    group_size = tp_size // num_dp if getattr(server_args, "enable_dp_attention", False) else tp_size
    leader = tp_rank % max(group_size, 1) == 0 and pp_rank == 0
    sched = None
    try:
        if not leader:
            # Other TP ranks of a DP group have nothing to simulate: ready, then wait to be killed.
            pipe_writer.send({"status": "ready", "max_total_num_tokens": 1, "max_req_input_len": 1,
                              "startup_time": None})
            signal.pause()
            return
        _init_collective(cfg, server_args, dp_rank, num_dp)
        sched = StandinScheduler(server_args, port_args, dp_rank, cfg)
        logger.info("stand-in scheduler DP%d ready: preset=%s max_running=%d time_scale=%g",
                    dp_rank, cfg.sim_backend, sched.max_running, sched.time_scale)
        pipe_writer.send(sched.init_info())
        sched.run()
    except Exception:
        logger.exception("stand-in scheduler DP%d failed", dp_rank)
        parent.send_signal(signal.SIGQUIT)
    finally:
        if sched is not None:
            sched.close()
