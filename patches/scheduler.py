"""Scheduler patch: per-step load reports (and telemetry) from each DP group's rank 0.

Hooks (registered by `sglang_ext.plugin.load`; each is a no-op unless the
server was launched with --balancer or --balancer-log):
- AFTER `Scheduler.handle_generate_request` / `handle_embedding_request`: count
  received requests, so the controller can tell which of the requests it sent
  are still in flight;
- AFTER `Scheduler.process_batch_result` (once a step; in overlap mode for the
  previous step): send a `RankReport` and record telemetry (the JSON lines of
  --balancer-log, the counters of --enable-metrics);
- AFTER `Scheduler.on_idle`: report too, throttled, so the controller learns
  about freed slots and newly received requests while the rank is idle, and
  flush the telemetry lines of the last busy steps once they are due;
- AROUND `SchedulerDPAttnAdapter.maybe_prepare_mlp_sync_batch`: time spent in the
  per-step cross-rank sync under DP attention, i.e. the measured barrier idle.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from sglang_ext.plugin.config import get_config
from sglang_ext.plugin.protocol import RankReport, ReportSender, is_health_check_rid, runs_to_cap
from sglang_ext.plugin.telemetry_bridge import open_telemetry

logger = logging.getLogger(__name__)

#: an idle rank re-reports at most this often unless its state changed
IDLE_REPORT_INTERVAL_S = 0.25

#: the state of this process's scheduler (one per process); the DP-attention
#: adapter hook has no back-reference to its Scheduler and reads it here
_PROCESS_STATE: "_RankState | None" = None


class _RankState:
    """Per scheduler-process state, attached to the Scheduler as `_sglang_ext`."""

    def __init__(self, cfg, server_args=None):
        self.cfg = cfg
        self.received = 0
        self.step = 0
        self.sender = None
        self.telemetry = None
        self.sync_wait_s = 0.0
        self.last_step_t = time.perf_counter()
        self.last_idle_report = 0.0
        self.last_key = None
        # the last report's running (cap, ignore_eos) and waiting (prompt, cap, ignore_eos) rows
        self.run_fixed = _KeptRows(_fixed, 2)
        self.wait_rows = _KeptRows(_wait_row, 3)
        self.finished_pending: list[tuple[int, int, bool]] = []  # (output length, prompt length, ignore_eos)
        dp_rank, leader = _rank_info()
        self.dp_rank = dp_rank
        self.leader = leader
        if leader and cfg.reporting:
            self.sender = ReportSender(cfg.report_addr, dp_rank)
        if leader and (cfg.log_dir or cfg.metrics):
            self.telemetry = open_telemetry(cfg, dp_rank, server_args=server_args)


def _rank_info() -> tuple[int, bool]:
    """(DP rank, whether this process is rank 0 of its DP group)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        dp_rank = getattr(par, "dp_rank", None)
        if dp_rank is None:
            dp_rank = getattr(par, "attn_dp_rank", 0) or 0
        attn_tp_rank = getattr(par, "attn_tp_rank", 0) or 0
        pp_rank = getattr(par, "pp_rank", 0) or 0
        return int(dp_rank), attn_tp_rank == 0 and pp_rank == 0
    except Exception:  # noqa: BLE001  (older layouts: report as rank 0 rather than crash the scheduler)
        logger.exception("sglang-ext: could not read the DP rank; reporting as rank 0")
        return 0, True


def _state(scheduler) -> _RankState | None:
    st = scheduler.__dict__.get("_sglang_ext")
    if st is not None:
        return st if st is not False else None
    server_args = getattr(scheduler, "server_args", None)
    cfg = get_config(server_args)
    if cfg is None or not (cfg.reporting or cfg.log_dir or cfg.metrics):
        scheduler.__dict__["_sglang_ext"] = False
        return None
    global _PROCESS_STATE
    st = _RankState(cfg, server_args)
    scheduler.__dict__["_sglang_ext"] = st
    _PROCESS_STATE = st
    return st


def _cap(req) -> int:
    value = getattr(getattr(req, "sampling_params", None), "max_new_tokens", None)
    return int(value) if value is not None else 128


def _aborted(req) -> bool:
    """Ended by an abort (a client gone, a timeout): its length is where it was cut, not
    where the answer would have ended, so it must not teach the length estimator."""
    return type(getattr(req, "finished_reason", None)).__name__ == "FINISH_ABORT"


def _fixed(req) -> tuple[int, int]:
    """(max_new_tokens, ignore_eos) of a request: fixed for its life."""
    return _cap(req), int(runs_to_cap(req))


def _wait_row(req) -> tuple[int, int, int]:
    return (len(req.origin_input_ids), *_fixed(req))


class _KeptRows:
    """Per-request rows that stay fixed while a request stays in a list (its cap and
    ignore_eos flag while it runs; its prompt too while it waits), kept from one
    report to the next. From one step to the next such a list mostly loses requests
    at its head (admitted from the queue) and gains them at its tail (arrivals, a
    prefill joining the running batch), or stays the same: the rows of those still
    there are kept and only the new ones read (each ~0.5 us; a saturated rank may
    hold thousands waiting). Any other change (a finish mid-batch, a policy that
    reorders the queue) reads them all. Requests compare by identity."""

    def __init__(self, row, width: int):
        self.row, self.width = row, width
        self.reqs: list = []
        self.rows = np.zeros((0, width), dtype=np.int64)

    def _read(self, reqs: list) -> np.ndarray:
        return np.array([self.row(r) for r in reqs], dtype=np.int64).reshape(len(reqs), self.width)

    def of(self, reqs: list) -> np.ndarray:
        old, rows = self.reqs, None
        if reqs and old:
            try:
                k = old.index(reqs[0])
            except ValueError:
                k = -1
            kept = len(old) - k
            if k >= 0 and kept <= len(reqs) and reqs[:kept] == old[k:]:
                rows = self.rows[k:] if kept == len(reqs) else np.concatenate([self.rows[k:], self._read(reqs[kept:])])
        self.reqs, self.rows = reqs, self._read(reqs) if rows is None else rows
        return self.rows


def _build_report(scheduler, st: _RankState, batch) -> RankReport:
    running = list(getattr(scheduler.running_batch, "reqs", []) or [])
    # A prefill batch's requests join running_batch only at the next step.
    if batch is not None and batch is not scheduler.running_batch:
        seen = {id(r) for r in running}
        running += [r for r in batch.reqs if id(r) not in seen and not r.finished()]
    running = [r for r in running if not r.finished()]
    waiting = list(scheduler.waiting_queue)
    cap_running = int(getattr(scheduler, "max_running_requests", 0) or 0)
    fixed = st.run_fixed.of(running)
    wait = st.wait_rows.of(waiting)
    done = np.array(st.finished_pending, dtype=np.int64).reshape(-1, 3)  # (output, prompt, ignore_eos)
    return RankReport(
        dp_rank=st.dp_rank,
        step=st.step,
        received=st.received,
        free_slots=max(cap_running - len(running) - len(waiting), 0),
        run_kv=np.array([r.seqlen for r in running], dtype=np.int64),
        run_generated=np.array([len(r.output_ids) for r in running], dtype=np.int64),
        run_cap=fixed[:, 0].copy(),
        wait_prompt=wait[:, 0].copy(),
        wait_cap=wait[:, 1].copy(),
        finished_lengths=done[:, 0].copy(),
        finished_prompts=done[:, 1].copy(),
        run_exact=fixed[:, 1].astype(bool),
        wait_exact=wait[:, 2].astype(bool),
        finished_exact=done[:, 2].astype(bool),
        slot_limit=cap_running,
    )


# ---- hooks ---------------------------------------------------------------------------------


def after_handle_request(result, self, recv_req, *args, **kwargs):
    st = _state(self)
    if st is not None and not is_health_check_rid(getattr(recv_req, "rid", None)):
        st.received += 1
    return None


def after_process_batch_result(result, self, batch, *args, **kwargs):
    st = _state(self)
    if st is None or not st.leader:
        return None
    try:
        now = time.perf_counter()
        step_time, st.last_step_t = now - st.last_step_t, now
        st.step += 1
        for r in getattr(batch, "reqs", []) or []:
            if r.finished() and not getattr(r, "_sglang_ext_counted", False):
                r._sglang_ext_counted = True
                if not _aborted(r):
                    st.finished_pending.append((len(r.output_ids), len(r.origin_input_ids), runs_to_cap(r)))
        report = _build_report(self, st, batch)
        st.finished_pending = []
        if st.sender is not None:
            st.sender.send(report)
        if st.telemetry is not None:
            wait, st.sync_wait_s = st.sync_wait_s, 0.0
            st.telemetry.record(
                step=st.step, batch_size=int(report.run_kv.shape[0]), kv_tokens=int(report.run_kv.sum()),
                # no cost model on a real GPU: the prediction is null, the wait is timed
                predicted_cost_s=float("nan"), step_time_s=step_time, idle_s=wait, idle_source="measured",
            )
    except Exception:  # noqa: BLE001  (a reporting bug must never stop serving)
        logger.exception("sglang-ext: step report failed")
    return None


def after_on_idle(result, self, *args, **kwargs):
    st = _state(self)
    if st is None or not st.leader:
        return None
    if st.telemetry is not None:
        st.telemetry.flush_due()  # (the last busy steps' lines, for a live report)
    if st.sender is None:
        return None
    now = time.monotonic()
    key = (st.received, len(self.waiting_queue), len(getattr(self.running_batch, "reqs", []) or []))
    if key == st.last_key and now - st.last_idle_report < IDLE_REPORT_INTERVAL_S:
        return None
    st.last_key, st.last_idle_report = key, now
    try:
        report = _build_report(self, st, None)
        st.finished_pending = []
        st.sender.send(report)
    except Exception:  # noqa: BLE001
        logger.exception("sglang-ext: idle report failed")
    return None


def around_mlp_sync(original, self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return original(self, *args, **kwargs)
    finally:
        if _PROCESS_STATE is not None:
            _PROCESS_STATE.sync_wait_s += time.perf_counter() - t0
