"""Fast tests of the SGLang plugin pieces without a server: CLI flags, the controller's
dispatch/pool/in-flight logic with a fake controller, and the scheduler patch's reports
with a fake scheduler. The real thing runs in test_e2e_server.py (slow)."""
from __future__ import annotations

import argparse
import gc
import logging
import time
from array import array
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from sglang_ext.plugin import config
from sglang_ext.patches.controller import read_stats, request_row
from sglang_ext.plugin.protocol import RankReport, recv_reports, request_types

pytest.importorskip("sglang")


# ---- CLI -----------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--dist-init-addr", default=None)
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--enable-metrics", action="store_true")  # (SGLang's own flag)
    config.add_cli_args(None, parser)
    args = parser.parse_args(argv)
    server_args = SimpleNamespace()
    config.from_cli_args(server_args, None, args)
    return getattr(server_args, "_balancer", None)


def test_cli_defaults_and_values():
    cfg = _parse(["--dp-size", "4", "--balancer", "bfio"])
    assert (cfg.policy, cfg.horizon, cfg.binding, cfg.device, cfg.estimator) == ("bfio", 20, "immediate", "auto", "empirical-prompt")
    assert cfg.report_addr.startswith("ipc://")
    cfg = _parse(["--dp-size", "4", "--balancer", "power_of_two", "--balancer-horizon", "0",
                  "--balancer-binding", "pool", "--balancer-estimator", "empirical"])
    assert (cfg.horizon, cfg.binding, cfg.estimator) == (0, "pool", "empirical")
    assert cfg.prefill_weight == 0.0
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-prefill-weight", "8"]).prefill_weight == 8.0
    assert (cfg.scenarios, cfg.full_wait) == (0, False)
    cfg = _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-scenarios", "8", "--balancer-full-wait"])
    assert (cfg.scenarios, cfg.full_wait) == (8, True)
    assert (cfg.variant, _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-variant", "paper"]).variant) == (
        "default", "paper")
    from sglang_ext.policies.bfio import ONLINE_POOL_TAIL

    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).pool_tail == ONLINE_POOL_TAIL
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-pool-tail", "0"]).pool_tail == 0.0
    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).pool_tail_horizon == 2000
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-pool-tail-horizon", "8000"]).pool_tail_horizon == 8000
    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).inline_refit is False
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-inline-refit"]).inline_refit is True
    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).stats_interval_s == 60.0
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-stats-interval", "0"]).stats_interval_s == 0.0
    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).view_lag == 1
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-view-lag", "0"]).view_lag == 0
    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).cpu_threads == 1
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-cpu-threads", "0"]).cpu_threads == 0
    assert _parse(["--dp-size", "4", "--balancer", "bfio"]).metrics is False
    assert _parse(["--dp-size", "4", "--balancer", "bfio", "--enable-metrics"]).metrics is True


def test_cli_without_balancer_changes_nothing():
    assert _parse(["--dp-size", "4"]) is None


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        _parse(["--balancer", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "bfio" in err
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-horizon", "-1"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-horizon", "1000000000"])
    assert "--balancer-horizon: must be between 0 and 100000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-prefill-weight", "-2"])
    assert "--balancer-prefill-weight" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="only apply with --balancer"):
        _parse(["--balancer-horizon", "5"])
    with pytest.raises(SystemExit, match="--balancer-full-wait only apply"):
        _parse(["--balancer-full-wait"])
    with pytest.raises(SystemExit, match="--balancer-inline-refit only apply"):
        _parse(["--balancer-inline-refit"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-variant", "papr"])
    assert "--balancer-variant" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--balancer-variant only apply"):
        _parse(["--balancer-variant", "paper"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-pool-tail", "-0.5"])
    assert "--balancer-pool-tail" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--balancer-pool-tail only apply"):
        _parse(["--balancer-pool-tail", "0.1"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-pool-tail-horizon", "0"])
    assert "--balancer-pool-tail-horizon" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-scenarios", "-1"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-stats-interval", "-5"])
    assert "--balancer-stats-interval" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--balancer-stats-interval only apply"):
        _parse(["--balancer-stats-interval", "10"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-view-lag", "-1"])
    assert "--balancer-view-lag" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--balancer-view-lag only apply"):
        _parse(["--balancer-view-lag", "2"])
    with pytest.raises(SystemExit):
        _parse(["--balancer", "bfio", "--balancer-cpu-threads", "-1"])
    assert "--balancer-cpu-threads" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--balancer-cpu-threads only apply"):
        _parse(["--balancer-cpu-threads", "2"])
    # an infinite deadline would overflow the controller's poll timeout once a request is pooled
    for flag, value in [("--balancer-pool-max-wait", "inf"), ("--balancer-prefill-weight", "nan"),
                        ("--balancer-sim-time-scale", "inf"), ("--balancer-seed", "-1")]:
        with pytest.raises(SystemExit):
            _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-binding", "pool", flag, value])
        err = capsys.readouterr().err
        assert flag in err and ("must be a finite number" in err or "must be >= 0" in err)


def test_cli_flag_combinations_that_cannot_run_exit_2_with_the_flag_named(capsys, tmp_path):
    for argv, needle in [
        (["--balancer-horizon", "5"], "--balancer-horizon only apply with --balancer"),
        (["--dp-size", "4", "--nnodes", "2", "--balancer", "bfio"], "needs --dist-init-addr"),
        (["--dp-size", "4", "--nnodes", "2", "--dist-init-addr", "10.0.0.1", "--balancer", "bfio"],
         "--dist-init-addr '10.0.0.1': expected HOST:PORT"),
    ]:
        with pytest.raises(SystemExit) as exc:
            _parse(argv)
        assert exc.value.code == 2, argv
        assert needle in capsys.readouterr().err
    for bad in ("localhost:5000", "tcp://localhost", "tcp://h:99999", "ipc://", "udp://h:1"):
        with pytest.raises(SystemExit) as exc:
            _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-report-addr", bad])
        assert exc.value.code == 2
        assert "--balancer-report-addr" in capsys.readouterr().err
    for good in ("tcp://10.0.0.1:6000", "tcp://[fd00::1]:6000", "ipc:///tmp/reports"):
        assert _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-report-addr", good]).report_addr == good
    # the telemetry directory is checked before the server starts, not when a rank first writes
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-log", str(blocker)])
    assert exc.value.code == 2
    assert "--balancer-log" in capsys.readouterr().err
    cfg = _parse(["--dp-size", "4", "--balancer", "bfio", "--balancer-log", str(tmp_path / "new" / "telemetry")])
    assert cfg.log_dir == str(tmp_path / "new" / "telemetry")


def test_cli_multinode_report_addr_is_tcp():
    cfg = _parse(["--dp-size", "4", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:5000", "--balancer", "bfio"])
    assert cfg.report_addr == f"tcp://10.0.0.1:{5000 + config.REPORT_PORT_DELTA}"
    cfg = _parse(["--dp-size", "4", "--nnodes", "2", "--dist-init-addr", "[fd00::1]:5000", "--balancer", "bfio"])
    assert cfg.report_addr == f"tcp://[fd00::1]:{5000 + config.REPORT_PORT_DELTA}"
    with pytest.raises(SystemExit, match=r"--dist-init-addr '10.0.0.1:65400'.*port 65597.*past 65535") as exc:
        _parse(["--dp-size", "4", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:65400", "--balancer", "bfio"])
    assert exc.value.code == 2


# ---- controller ------------------------------------------------------------------------------


@pytest.fixture
def fake_controller(monkeypatch, tmp_path):
    import sglang.srt.managers.io_struct as io_struct

    sent = []
    monkeypatch.setattr(io_struct, "sock_send", lambda sock, obj: sent.append((sock, obj)))
    # The controller sends each request as the bytes SGLang's sock_send would send; the
    # test requests (SimpleNamespaces) travel as pickle, as under SGLANG_USE_PICKLE_IPC.
    monkeypatch.setattr(io_struct, "_USE_PICKLE_IPC", True)

    def make(policy="total_tokens", binding="immediate", max_wait=0.5, ranks=4, device="cpu", **cfg_kw):
        from sglang_ext.patches.controller import BalancedDispatch

        ctrl = SimpleNamespace(workers=[_Rank(g) for g in range(ranks)], _active_workers=list(range(ranks)),
                               context=zmq.Context.instance())
        cfg = config.BalancerConfig(policy=policy, binding=binding, pool_max_wait_s=max_wait, device=device,
                                    report_addr=f"ipc://{tmp_path}/rep-{policy}-{binding}", **cfg_kw)
        bal = BalancedDispatch(ctrl, cfg)
        return bal, sent

    yield make


class _Rank:
    """Rank g's socket: decodes what the controller sends, as the rank would, and hands
    it to `io_struct.sock_send(g, request)`, which each test captures (or breaks)."""

    def __init__(self, g: int):
        self.g = g

    def send(self, data: bytes, flags: int = 0) -> None:
        from sglang.srt.managers import io_struct

        from sglang_ext.plugin.protocol import decode_request

        io_struct.sock_send(self.g, decode_request(data))


def request_rows(reqs) -> np.ndarray:
    """What the controller reads of each request, as `_candidates` takes it."""
    return np.array([request_row(r) for r in reqs], dtype=np.int64).reshape(-1, 3)


def _break_sends(monkeypatch, rids: set) -> set:
    """Make the send of every request whose rid is in `rids` fail (clear the set returned
    to mend them), with a retry time long enough that a test's checks run within it."""
    from sglang.srt.managers import io_struct

    from sglang_ext.patches import controller

    real = io_struct.sock_send

    def send(sock, obj):
        if obj.rid in rids:
            raise zmq.ZMQError()
        real(sock, obj)

    monkeypatch.setattr(io_struct, "sock_send", send)
    monkeypatch.setattr(controller, "SEND_RETRY_S", 5.0)
    return rids


def _req(prompt, max_new=16, pin=None, rid="r", ignore_eos=False):
    return SimpleNamespace(rid=rid, input_ids=[1] * prompt, routed_dp_rank=pin,
                           sampling_params=SimpleNamespace(max_new_tokens=max_new, ignore_eos=ignore_eos))


def test_burst_is_spread_by_in_flight_accounting(fake_controller):
    bal, sent = fake_controller("total_tokens")
    for _ in range(8):
        bal.dispatch(_req(100))
    ranks = [g for g, _ in sent]
    assert sorted(np.bincount(ranks, minlength=4)) == [2, 2, 2, 2]
    assert [len(q) for q in bal.inflight] == [2, 2, 2, 2]
    # a report acknowledging rank 0's two requests clears them from flight (once it is estimated)
    bal.on_reports([RankReport(dp_rank=0, step=1, received=2, free_slots=70, run_kv=np.array([100, 100]),
                               run_generated=np.array([1, 1]), run_cap=np.array([16, 16]))])
    assert bal.unacked(0) == [] and len(bal.unacked(1)) == 2
    view = bal.build_view()
    assert len(bal.inflight[0]) == 0
    assert view.kv_tokens[0] == 200 and view.num_requests[0] == 2
    # prompts not prefilled yet: the in-flight ones, plus a rank's reported waiting queue
    assert view.pending_prefill.tolist() == [0, 200, 200, 200]
    bal.on_reports([RankReport(dp_rank=1, step=1, received=2, free_slots=70, wait_prompt=np.array([100, 100]),
                               wait_cap=np.array([16, 16]))])
    assert bal.build_view().pending_prefill.tolist() == [0, 200, 200, 200]


def test_a_failing_metrics_export_changes_no_placement(fake_controller, caplog):
    # A metrics write that fails (a full disk under the multiprocess directory) is logged
    # once and turns the metrics off: every request still goes where the policy puts it.
    from sglang_ext.plugin.metrics import ControllerMetrics

    class Broken:
        def __init__(self, *args, **kwargs):
            pass

        def labels(self, **labels):
            return self

        def _fail(self, *args):
            raise OSError(28, "No space left on device")

        inc = set = observe = _fail

    bal, sent = fake_controller("bfio", binding="pool", max_wait=60)
    ref, _ = fake_controller("bfio", binding="pool", max_wait=60)  # (the same `sent` list)
    bal.metrics = ControllerMetrics(SimpleNamespace(Counter=Broken, Gauge=Broken, Histogram=Broken), "bfio", "m")
    with caplog.at_level(logging.INFO):
        for b in (bal, ref):
            b.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=2) for g in range(4)])
            for i in range(10):
                b.dispatch(_req(10 + 37 * i, max_new=8 + i, rid=f"r{i}"))
            b.release_pool()
            b.metrics is None or b.metrics.sync(b.stats, len(b.pool))
    placed = [(g, r.rid) for g, r in sent]
    assert len(placed) == 16 and placed[:8] == placed[8:]
    assert bal.metrics.off
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("metrics off from now on" in m for m in msgs) == 1
    assert not any("falling back" in m for m in msgs)


def test_pinned_request_is_honoured_and_counted(fake_controller):
    bal, sent = fake_controller("bfio")
    bal.dispatch(_req(50, pin=3))
    assert sent[-1][0] == 3 and len(bal.inflight[3]) == 1 and bal.stats["pinned"] == 1


def test_a_pin_to_a_rank_gone_inactive_is_placed_by_the_policy(fake_controller, caplog):
    # Elastic EP: the rank a client pinned went down before the request came. Stock
    # raises and the request is never answered; here the policy places it.
    bal, sent = fake_controller("bfio")
    bal.ctrl._active_workers = [0, 1, 2]
    with caplog.at_level("WARNING"):
        bal.dispatch(_req(50, pin=3, rid="p"))
    assert len(sent) == 1 and sent[0][0] in (0, 1, 2) and sent[0][1].rid == "p"
    assert bal.stats["pinned"] == 0 and "pinned to DP rank 3, which is not active" in caplog.text


@pytest.mark.parametrize("binding", ["immediate", "pool"])
def test_a_pinned_request_whose_send_fails_is_retried_at_its_pin(fake_controller, monkeypatch, binding):
    # Stock sends a pinned request itself and a failed send raises out of dispatch: lost.
    bal, sent = fake_controller("bfio", binding=binding, max_wait=60.0)
    broken = _break_sends(monkeypatch, {"pin"})
    for g in range(4):
        bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=8)])
    bal.dispatch(_req(10, pin=2, rid="pin"))
    bal.dispatch(_req(10, rid="free"))
    assert bal.stats["pinned"] == 1 and [p.rid for p in bal.pool][0] == "pin" and bal.pool[0].pin is not None
    broken.clear()
    bal._retry_after = time.monotonic()
    bal.release_pool()  # the policy fills free slots: never with the pinned one, which goes to rank 2
    assert sorted((r.rid, g) for g, r in sent if r.rid == "pin") == [("pin", 2)]
    assert sorted(r.rid for _, r in sent) == ["free", "pin"] and not bal.pool
    assert bal.stats["pinned"] == 1 and sum(map(len, bal.inflight)) == 2


@pytest.mark.parametrize("variant", ["default", "paper"])
def test_pool_fills_free_slots_then_deadline_places_the_rest(fake_controller, variant):
    bal, sent = fake_controller("bfio", binding="pool", max_wait=0.05, variant=variant)
    assert bal.policy.variant == variant
    for g in range(4):
        bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=1)])
    for i in range(10):
        bal.dispatch(_req(10 + i, rid=f"r{i}"))
    assert not sent  # held until the loop releases
    bal.release_pool()
    assert len(sent) == 4 and len(bal.pool) == 6
    assert sorted(g for g, _ in sent) == [0, 1, 2, 3]
    assert 0 < bal.poll_timeout_ms() <= 51
    time.sleep(0.06)
    bal.release_pool()
    assert len(sent) == 10 and not bal.pool and bal.stats["pool_deadline"] == 6
    assert sorted(r.rid for _, r in sent) == sorted(f"r{i}" for i in range(10))  # each exactly once


def test_cuda_device_falls_back_to_cpu_when_unusable(fake_controller):
    import torch

    bal, sent = fake_controller("bfio", device="cuda")
    assert bal.device == ("cuda" if torch.cuda.is_available() else "cpu")
    bal.dispatch(_req(10))
    assert len(sent) == 1


def test_auto_device_projects_on_the_gpu_only_for_many_ranks(fake_controller, monkeypatch):
    import torch

    from sglang_ext.patches import controller as patch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU server
    assert patch._resolve_device("auto", 32) == "cpu"  # small: the CPU path is faster
    assert patch._resolve_device("auto", patch.AUTO_CUDA_MIN_RANKS) == "cuda"
    assert patch._resolve_device("cuda", 4) == "cuda" and patch._resolve_device("cpu", 256) == "cpu"
    bal, _ = fake_controller("bfio", device="auto")  # 4 ranks: no CUDA probe, cpu
    assert bal.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert patch._resolve_device("auto", 256) == "cpu"


def test_policy_failure_falls_back_instead_of_losing_the_request(fake_controller, monkeypatch):
    bal, sent = fake_controller("bfio")
    monkeypatch.setattr(bal.policy, "assign", lambda *a, **k: 1 / 0)
    bal.dispatch(_req(10))
    assert len(sent) == 1
    # A burst read in one turn falls back as a whole, spread by what each request adds
    # (rank 0 is down, rank 1 reported the most tokens; what was just sent counts).
    bal.ctrl._active_workers = [1, 2, 3]
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=4, run_kv=np.array([kv]),
                               run_generated=np.array([1]), run_cap=np.array([50]))
                    for g, kv in enumerate((0, 5000, 100, 120))])
    bal._arrivals = []
    for i in range(6):
        bal.dispatch(_req(100, rid=f"b{i}"))
    bal.place_arrivals()
    assert len(sent) == 7 and [g for g, _ in sent[1:]] == [2, 3, 2, 3, 2, 3]


# ---- scheduler patch ---------------------------------------------------------------------------


class _FakeReq:
    def __init__(self, seqlen, generated, cap, done=False, prompt=None, ignore_eos=False):
        self.seqlen = seqlen
        self.output_ids = [7] * generated
        self.origin_input_ids = [1] * (prompt if prompt is not None else seqlen - generated)
        self.sampling_params = SimpleNamespace(max_new_tokens=cap, ignore_eos=ignore_eos)
        self._done = done

    def finished(self):
        return self._done


def _one_step_report(monkeypatch, tmp_path, dp_rank, running, waiting, rids=()):
    """The report the scheduler patch sends after one step on a fake scheduler."""
    from sglang_ext.patches import scheduler as patch

    addr = f"ipc://{tmp_path}/reports"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(addr)
    try:
        monkeypatch.setattr(patch, "_rank_info", lambda: (dp_rank, True))
        cfg = config.BalancerConfig(policy="bfio", report_addr=addr)
        sched = SimpleNamespace(server_args=SimpleNamespace(_balancer=cfg), max_running_requests=8,
                                running_batch=SimpleNamespace(reqs=running), waiting_queue=waiting)
        for rid in rids:
            patch.after_handle_request(None, sched, SimpleNamespace(rid=rid))
        patch.after_process_batch_result(None, sched, SimpleNamespace(reqs=running))
        deadline, reports = time.monotonic() + 5, []
        while not reports and time.monotonic() < deadline:
            reports = recv_reports(pull)
            time.sleep(0.01)
        return reports[-1]
    finally:
        pull.close(linger=0)


def test_scheduler_patch_reports_each_step(monkeypatch, tmp_path):
    running = [_FakeReq(110, 10, 64), _FakeReq(55, 5, 32, ignore_eos=True)]
    done = _FakeReq(40, 8, 8, done=True, ignore_eos=True)
    rep = _one_step_report(monkeypatch, tmp_path, 2, running + [done], [_FakeReq(30, 0, 16, prompt=30)],
                           rids=("a", "HEALTH_CHECK_x", "b"))
    assert (rep.dp_rank, rep.step, rep.received, rep.free_slots) == (2, 1, 2, 8 - 2 - 1)
    assert rep.run_kv.tolist() == [110, 55] and rep.run_generated.tolist() == [10, 5]
    assert rep.run_cap.tolist() == [64, 32] and rep.wait_prompt.tolist() == [30]
    assert rep.finished_lengths.tolist() == [8] and rep.finished_prompts.tolist() == [32]
    assert rep.run_exact.tolist() == [False, True] and rep.wait_exact.tolist() == [False]
    assert rep.finished_exact.tolist() == [True]


def test_report_columns_follow_the_running_set_from_step_to_step(monkeypatch):
    # The caps and ignore_eos flags are kept from the last step while the same requests
    # run; a request joining or leaving must show at once, the lengths every step.
    from sglang_ext.patches import scheduler as patch

    monkeypatch.setattr(patch, "_rank_info", lambda: (0, True))
    st = patch._RankState(SimpleNamespace(reporting=False, log_dir=None, metrics=False))
    a, b, c = _FakeReq(110, 10, 64), _FakeReq(55, 5, 32), _FakeReq(20, 1, 16, ignore_eos=True)
    sched = SimpleNamespace(max_running_requests=8, running_batch=SimpleNamespace(reqs=[a, b]), waiting_queue=[])
    rep = patch._build_report(sched, st, None)
    assert rep.run_cap.tolist() == [64, 32] and rep.run_exact.tolist() == [False, False]
    a.seqlen, a.output_ids = 111, a.output_ids + [7]
    rep = patch._build_report(sched, st, None)
    assert rep.run_kv.tolist() == [111, 55] and rep.run_generated.tolist() == [11, 5]
    sched.running_batch.reqs = [b, c]  # a left, c joined
    rep = patch._build_report(sched, st, None)
    assert rep.run_kv.tolist() == [55, 20] and rep.run_cap.tolist() == [32, 16]
    assert rep.run_exact.tolist() == [False, True]
    sched.running_batch.reqs = []
    rep = patch._build_report(sched, st, None)
    assert rep.run_kv.shape == rep.run_cap.shape == rep.run_exact.shape == (0,)


def test_waiting_rows_follow_the_queue_however_it_changes(monkeypatch):
    # The waiting requests' rows are kept while they wait; admissions at the head,
    # arrivals at the tail, a reorder, a removal from the middle, an emptied queue:
    # the report must read as if every row were read afresh.
    from sglang_ext.patches import scheduler as patch

    monkeypatch.setattr(patch, "_rank_info", lambda: (0, True))
    st = patch._RankState(SimpleNamespace(reporting=False, log_dir=None, metrics=False))
    pool = [_FakeReq(0, 0, 16 + i, prompt=100 + i, ignore_eos=i % 3 == 0) for i in range(12)]
    sched = SimpleNamespace(max_running_requests=64, running_batch=SimpleNamespace(reqs=[]), waiting_queue=[])
    queues = [pool[:5], pool[:5], pool[2:8], pool[2:8] + pool[8:10], pool[9:3:-1], pool[4:6] + pool[7:9], [],
              pool[10:], pool[:1], pool[1:2]]
    for q in queues:
        sched.waiting_queue = list(q)
        rep = patch._build_report(sched, st, None)
        assert rep.wait_prompt.tolist() == [len(r.origin_input_ids) for r in q]
        assert rep.wait_cap.tolist() == [r.sampling_params.max_new_tokens for r in q]
        assert rep.wait_exact.tolist() == [r.sampling_params.ignore_eos for r in q]


def test_an_aborted_answer_leaves_the_rank_but_teaches_no_length(monkeypatch, tmp_path):
    # A client gone or a timeout cuts an answer short: its length is not where it would
    # have ended, so the report leaves it out of the finished lengths the estimator learns.
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_MATCHED_TOKEN

    aborted, natural = _FakeReq(13, 3, 64, done=True), _FakeReq(29, 9, 64, done=True)
    aborted.finished_reason, natural.finished_reason = FINISH_ABORT("client gone"), FINISH_MATCHED_TOKEN(2)
    rep = _one_step_report(monkeypatch, tmp_path, 0, [aborted, natural], [])
    assert rep.finished_lengths.tolist() == [9] and rep.finished_prompts.tolist() == [20]
    assert rep.run_kv.size == 0 and rep.free_slots == 8  # both left the rank


def test_reports_travel_over_ipv6_tcp():
    # a multi-node server on IPv6 (--dist-init-addr [fd00::1]:5000) reports over tcp://[host]:port
    import zmq

    from sglang_ext.plugin.protocol import ReportSender, allow_ipv6

    pull = zmq.Context.instance().socket(zmq.PULL)
    allow_ipv6(pull, "tcp://[::1]:0")
    pull.bind("tcp://[::1]:0")
    addr = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    assert addr.startswith("tcp://[::1]:")
    sender = ReportSender(addr, dp_rank=3)
    report = RankReport(dp_rank=3, step=7, free_slots=2, received=0,
                        run_kv=np.array([5], np.int64), run_generated=np.array([1], np.int64),
                        run_cap=np.array([9], np.int64), wait_prompt=np.zeros(0, np.int64))
    got, deadline = [], time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        sender.send(report)
        time.sleep(0.01)
        got = recv_reports(pull)
    assert got and (got[0].dp_rank, got[0].step, got[0].run_kv.tolist()) == (3, 7, [5])
    pull.close(linger=0)


def test_scheduler_steps_reach_the_metrics_without_a_log_dir(monkeypatch, tmp_path):
    # --enable-metrics alone (no --balancer-log): every step's line goes to the rank's
    # counters, and no file is written.
    from sglang_ext.patches import scheduler as patch
    from sglang_ext.plugin import metrics

    seen, made = [], []

    def fake_rank_metrics(cfg, server_args, dp_rank):
        made.append((dp_rank, server_args.served_model_name))
        return SimpleNamespace(observe=seen.append) if cfg.metrics else None

    monkeypatch.setattr(metrics, "rank_metrics", fake_rank_metrics)
    monkeypatch.setattr(patch, "_rank_info", lambda: (3, True))
    monkeypatch.setattr(patch, "_PROCESS_STATE", None)
    monkeypatch.chdir(tmp_path)
    cfg = config.BalancerConfig(policy="bfio", metrics=True)  # (no report address: --dp-size 1, no reports)
    running = [_FakeReq(110, 10, 64), _FakeReq(55, 5, 32)]
    sched = SimpleNamespace(server_args=SimpleNamespace(_balancer=cfg, served_model_name="tiny"),
                            max_running_requests=8, running_batch=SimpleNamespace(reqs=running), waiting_queue=[])
    for _ in range(3):
        patch.after_process_batch_result(None, sched, SimpleNamespace(reqs=running))
    assert made == [(3, "tiny")] and sched._sglang_ext.sender is None
    assert [(r["step"], r["dp_rank"], r["batch_size"], r["kv_tokens"]) for r in seen] == [
        (1, 3, 2, 165), (2, 3, 2, 165), (3, 3, 2, 165)]
    assert all(r["energy_j"] > 0 and 0 <= r["idle_s"] <= r["step_time_s"] for r in seen)
    assert list(tmp_path.iterdir()) == []


def test_scheduler_patch_is_inert_without_balancer():
    from sglang_ext.patches import scheduler as patch

    sched = SimpleNamespace(server_args=SimpleNamespace())
    assert patch.after_handle_request(None, sched, SimpleNamespace(rid="a")) is None
    assert patch.after_process_batch_result(None, sched, SimpleNamespace(reqs=[])) is None
    assert sched.__dict__["_sglang_ext"] is False


def test_abort_of_a_pooled_request_places_it_before_the_abort(fake_controller):
    from sglang.srt.managers.io_struct import AbortReq

    bal, sent = fake_controller("bfio", binding="pool", max_wait=60)
    for g in range(4):
        bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=0)])
    bal.dispatch(_req(10, rid="keep"))
    bal.dispatch(_req(10, rid="gone"))
    bal._place_aborted_from_pool(AbortReq(rid="gone"))
    assert [r.rid for _, r in sent] == ["gone"] and [p.rid for p in bal.pool] == ["keep"]


def test_ipc_ledger_records_and_removes_sglang_ipc_files(tmp_path, monkeypatch):
    import tempfile
    from types import SimpleNamespace

    from sglang_ext.plugin import ipc_cleanup
    from sglang_ext.plugin.config import BalancerConfig

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = [tmp_path / f"tmp{i}" for i in range(3)]
    for f in files:
        f.write_text("")
    port_args = SimpleNamespace(tokenizer_ipc_name=f"ipc://{files[0]}", scheduler_input_ipc_name=f"ipc://{files[1]}",
                                rpc_ipc_name=f"ipc://{files[2]}", metrics_ipc_name="tcp://127.0.0.1:5")
    off = SimpleNamespace(_balancer=None)
    ipc_cleanup.after_port_args_init(port_args, off)  # plugin off: records nothing
    assert not (tmp_path / "sglang_ext_ipc_4242.txt").exists()
    on = SimpleNamespace(_balancer=BalancerConfig(policy="bfio", launcher_pid=4242))
    ipc_cleanup.after_port_args_init(port_args, on)
    assert (tmp_path / "sglang_ext_ipc_4242.txt").read_text().split() == [str(f) for f in files]
    assert ipc_cleanup.remove_recorded(4242) == 3
    assert not any(f.exists() for f in files) and not (tmp_path / "sglang_ext_ipc_4242.txt").exists()


@pytest.mark.parametrize("scenarios", [0, 4])
def test_view_lists_every_request_with_the_estimate_it_would_get_alone(fake_controller, scenarios):
    # build_view estimates every request of every rank in one call; each must get what
    # a call for that request alone gives (same estimator state). The policies read
    # the requests in any order, so they are compared as a set.
    from sglang_ext.plugin.cluster_state import remaining_steps

    bal, _ = fake_controller("bfio", estimator="empirical-prompt", scenarios=scenarios)
    rng = np.random.default_rng(3)
    reports = []
    for g in (0, 2, 3):  # rank 1 has not reported yet
        n, w = (4, 2) if g else (0, 1)
        gen = rng.integers(1, 200, n)
        reports.append(RankReport(dp_rank=g, step=1, received=0, free_slots=60, slot_limit=72,
                                  run_kv=gen + rng.integers(1, 3000, n), run_generated=gen,
                                  run_cap=gen + rng.integers(1, 900, n), run_exact=np.arange(n) % 3 == 0,
                                  wait_prompt=rng.integers(1, 3000, w), wait_cap=rng.integers(1, 900, w),
                                  finished_lengths=rng.integers(1, 600, 30),
                                  finished_prompts=rng.integers(1, 3000, 30)))
    bal.on_reports(reports)
    for g, prompt in ((1, 700), (1, 20), (3, 2500)):
        bal._record_sent(g, request_row(_req(prompt, max_new=4000 if prompt == 20 else 300, ignore_eos=prompt == 20)))
    view = bal.build_view()

    expected = []  # (rank, kv, generated, cap, prompt, exact), one per request
    for g in range(4):
        expected += [(g, p, 0, c, p, e) for p, c, e in bal.inflight[g]]
        rep = bal.reports[g]
        if rep is not None:
            expected += [(g, *row) for row in zip(rep.run_kv, rep.run_generated, rep.run_cap, rep.run_prompt,
                                                   rep.exact("run"))]
            expected += [(g, p, 0, c, p, False) for p, c in zip(rep.wait_prompt, rep.wait_cap)]
    k = bal._scenarios
    alone = [remaining_steps(bal.estimator, np.array([gen]), np.array([cap]), k, np.array([p]), np.array([e]))
             for _, _, gen, cap, p, e in expected]
    rem = np.atleast_2d(view.req_remaining)  # (k or 1, n)
    got = sorted(zip(view.req_rank.tolist(), view.req_kv.tolist(), map(tuple, rem.T.tolist())))
    want = sorted((r[0], int(r[1]), tuple(np.ravel(a).tolist())) for r, a in zip(expected, alone))
    assert got == want
    assert view.req_remaining.shape == ((k, len(expected)) if k else (len(expected),))
    assert view.kv_tokens.tolist() == [sum(r[1] for r in expected if r[0] == g) for g in range(4)]
    assert view.num_requests.tolist() == np.bincount([r[0] for r in expected], minlength=4).tolist()
    assert view.free_slots.tolist() == [60, 72 - 2, 60, 60 - 1]


def test_view_reuses_the_reports_until_the_next_batch_and_sees_every_send(fake_controller):
    # The reported requests are estimated once per batch of reports; what was sent
    # since, and the next batch, must still show in the next view.
    bal, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    run = dict(run_kv=np.array([400, 900]), run_generated=np.array([10, 300]), run_cap=np.array([2000, 2000]))
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72, **run,
                               finished_lengths=np.array([20, 40]), finished_prompts=np.array([100, 100]))
                    for g in range(4)])
    first = bal.build_view()
    bal._record_sent(2, request_row(_req(500, max_new=64)))
    second = bal.build_view()
    assert second.kv_tokens.tolist() == [1300, 1300, 1800, 1300] and second.num_requests.tolist() == [2, 2, 3, 2]
    assert second.free_slots.tolist() == [70, 70, 69, 70] and second.pending_prefill.tolist() == [0, 0, 500, 0]
    assert len(second.req_rank) == len(first.req_rank) + 1 == 9
    assert np.array_equal(second.req_remaining[1:], first.req_remaining)  # same reports, same estimates
    # the next batch: long answers finished; rank 2 acknowledged its request
    bal.on_reports([RankReport(dp_rank=g, step=2, received=int(g == 2), free_slots=70, slot_limit=72, **run,
                               finished_lengths=np.full(40, 1900), finished_prompts=np.full(40, 100))
                    for g in range(4)])
    third = bal.build_view()
    assert len(third.req_rank) == 8 and third.kv_tokens.tolist() == [1300] * 4
    assert (third.req_remaining > first.req_remaining).all()  # learnt from the new batch


def test_idle_loop_estimates_the_reports_before_the_next_arrival(fake_controller):
    # What the reports say is estimated once per batch, ahead of the arrival when the loop
    # is idle; the arrival then places exactly as it would have without it.
    run = dict(run_kv=np.array([400, 900, 50]), run_generated=np.array([10, 300, 5]),
               run_cap=np.array([2000, 2000, 100]))

    def batch(step, length):
        return [RankReport(dp_rank=g, step=step, received=0, free_slots=70 - g, slot_limit=72, **run,
                           finished_lengths=np.full(8, length + 50 * g), finished_prompts=np.full(8, 100))
                for g in range(4)]

    # (lazy estimates the newest reports before each placement: view_lag=0)
    lazy, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True, view_lag=0)
    eager, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)  # (same `sent` list)
    assert not eager.prepare()  # nothing reported yet
    for step, length in ((1, 30), (2, 900), (3, 200)):
        lazy.on_reports(batch(step, length))
        eager.on_reports(batch(step, length))
        assert eager._behind.all() and eager.prepare() and not eager.prepare()  # once per batch
        state = eager._reported
        for i in range(3):
            lazy.dispatch(_req(100 + 400 * i, max_new=500 + 300 * i))
            eager.dispatch(_req(100 + 400 * i, max_new=500 + 300 * i))
            assert sent[-1][0] == sent[-2][0]  # the same rank
        assert eager._reported is state  # the arrivals reused it
        assert np.array_equal(lazy._reported.req_remaining, state.req_remaining)
    assert len(sent) == 18 and len({g for g, _ in sent}) > 1
    assert eager.stats["prepared"] == 3 and lazy.stats["prepared"] == 0


def test_an_arrival_before_the_estimate_is_placed_on_the_previous_one_plus_all_sent_since(fake_controller):
    # Reports came, the idle loop has not estimated them yet: a request placed on arrival
    # reads the previous estimate plus every request sent since (those the new reports
    # acknowledge included: the previous reports do not hold them), while no rank is more
    # than view_lag reports ahead of it; a pool release or a rank further ahead estimates first.
    lag, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    now, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True, view_lag=0)

    def batch(step, received, kvs):
        return [RankReport(dp_rank=g, step=step, received=received[g], free_slots=72 - len(kv), slot_limit=72,
                           run_kv=np.array(kv, np.int64), run_generated=np.ones(len(kv), np.int64),
                           run_cap=np.full(len(kv), 2000), finished_lengths=np.full(4, 300),
                           finished_prompts=np.full(4, 100)) for g, kv in enumerate(kvs)]

    for b in (lag, now):
        b.on_reports(batch(1, [0] * 4, [[400, 900], [300], [2000, 100, 100], [50]]))
        assert b.prepare()
        for g, prompt in ((0, 500), (1, 700), (1, 20), (3, 1000)):
            b._record_sent(g, request_row(_req(prompt, max_new=300)))
        # the next step: rank 1 acknowledges its two (running now), rank 0's 900 finished
        b.on_reports(batch(2, [0, 2, 0, 0], [[401], [301, 701, 21], [2001, 101, 101], [51]]))
    first = lag._reported
    assert lag.unacked(1) == [] and len(lag.inflight[1]) == 2  # acknowledged, still counted
    view = lag.build_view(lagged_ok=True)
    assert lag._reported is first and lag._behind.tolist() == [1] * 4  # not estimated again
    assert lag.estimator._seen.size == 16  # nor learned from: the fit the estimate was made with
    # the requests: step 1's, then the four sent since (rank 1's two included)
    assert sorted(zip(view.req_rank.tolist(), view.req_kv.tolist())) == [
        (0, 400), (0, 500), (0, 900), (1, 20), (1, 300), (1, 700), (2, 100), (2, 100), (2, 2000), (3, 50), (3, 1000)]
    # the per-rank totals need no estimate: the newest reports' plus what they have not acknowledged
    assert view.kv_tokens.tolist() == [401 + 500, 1023, 2203, 51 + 1000]
    assert view.num_requests.tolist() == [2, 3, 3, 2] and view.free_slots.tolist() == [70, 69, 69, 70]
    newest = now.build_view(lagged_ok=True)  # view_lag=0: the newest reports, estimated first
    assert newest.kv_tokens.tolist() == view.kv_tokens.tolist() and now.inflight[1] == deque()
    assert newest.free_slots.tolist() == view.free_slots.tolist()
    assert sorted(zip(newest.req_rank.tolist(), newest.req_kv.tolist())) == [
        (0, 401), (0, 500), (1, 21), (1, 301), (1, 701), (2, 101), (2, 101), (2, 2001), (3, 51), (3, 1000)]
    assert lag.build_view().kv_tokens.tolist() == newest.kv_tokens.tolist()  # asked for the newest: estimated
    assert lag.estimator._seen.size == 32
    assert lag._reported is not first and lag.inflight[1] == deque() and not lag._behind.any()

    # Arrivals: counted as placed on the previous estimate; the idle loop then estimates.
    for b in (lag, now):
        b.on_reports(batch(3, [0, 2, 0, 0], [[402], [302, 702, 22], [2002, 102, 102], [52]]))
    second = lag._reported
    lag.dispatch(_req(100, max_new=300))
    now.dispatch(_req(100, max_new=300))
    assert lag.stats["lagged"] == 1 and now.stats["lagged"] == 0 and lag._reported is second
    assert lag.prepare() and lag._reported is not second and lag.stats["lagged"] == 1
    # two reports ahead (the loop never went idle): estimated before the arrival is placed
    for step in (4, 5):
        lag.on_reports(batch(step, [0, 2, 0, 0], [[403], [303, 703, 23], [2003, 103, 103], [53]]))
    third = lag._reported
    lag.dispatch(_req(100, max_new=300))
    assert lag.stats["lagged"] == 1 and lag._reported is not third and len(sent) == 3
    # a pool release never reads a lagging estimate
    pool, _ = fake_controller("bfio", binding="pool", estimator="empirical-prompt", inline_refit=True)
    pool.on_reports(batch(1, [0] * 4, [[400, 900], [300], [2000, 100, 100], [50]]))
    pool.prepare()
    first = pool._reported
    pool.on_reports(batch(2, [0] * 4, [[401], [301], [2001], [51]]))
    pool.dispatch(_req(100, max_new=300))
    pool.release_pool()
    assert pool._reported is not first and pool.stats["lagged"] == 0


def test_an_idle_estimate_pauses_for_a_message_and_goes_on_where_it_stopped(fake_controller):
    # The idle loop asks between the estimate's stages whether a message waits: if one
    # does it stops there (the arrival is placed on the previous estimate), and the next
    # idle turn goes on from that stage; reports that came meanwhile start it over. The
    # estimates it ends with are those of an estimate never paused.
    paused, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    straight, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)  # (same `sent`)

    def batch(step):
        rng = np.random.default_rng(step)
        out = []
        for g in range(4):
            n = int(rng.integers(1, 6))
            gen = rng.integers(1, 200, n)
            out.append(RankReport(dp_rank=g, step=step, received=0, free_slots=72 - n, slot_limit=72,
                                  run_kv=rng.integers(10, 3000, n) + gen, run_generated=gen, run_cap=np.full(n, 2000),
                                  finished_lengths=rng.integers(1, 900, 6), finished_prompts=rng.integers(10, 3000, 6)))
        return out

    def after(k):  # a message comes after the k-th question
        asked = []
        return lambda: asked.append(1) or len(asked) >= k

    for b in (paused, straight):
        b.on_reports(batch(1))
        assert b.prepare()
    first = paused._reported
    for b in (paused, straight):
        b.on_reports(batch(2))
    for k in range(4):  # a message at each question: after the totals, what runs, the fit, the estimates
        assert not paused.prepare(interrupted=after(1)) and paused.prepare_due()
        assert paused._reported is first  # (the projection, the last stage, is the new estimate's own)
        assert paused.estimator._seen.size == 24  # (step 2's lengths: learned with it)
        # placed meanwhile on the previous estimate, as it would be had it not started
        paused.dispatch(_req(300 + k, max_new=500))
        straight.dispatch(_req(300 + k, max_new=500))
        assert sent[-1][0] == sent[-2][0]
    assert paused.stats["paused"] == 4 and paused.stats["lagged"] == 4
    assert first.projection_cache and not paused._totals.projection_cache  # (the one in progress: not projected yet)
    assert paused.prepare() and not paused.prepare_due() and straight.prepare()
    assert paused.estimator._seen.size == straight.estimator._seen.size == 48  # each length learned once
    assert np.array_equal(paused._reported.req_remaining, straight._reported.req_remaining)
    # the projection went into the new estimate's cache, and equals one computed afresh
    assert paused._reported.projection_cache.keys() == straight._reported.projection_cache.keys() != set()
    for key, got in paused._reported.projection_cache.items():  # (counts, and the cost kept with them)
        want = straight._reported.projection_cache[key]
        assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want))

    # paused after the fit, then the next step's reports: it goes on (adopted one report
    # behind, as a placement may use it) rather than throw its stages away, and the next
    # estimate takes the newest; each finished length is learned once all the same
    for b in (paused, straight):
        b.on_reports(batch(3))
    assert not paused.prepare(interrupted=after(3)) and straight.prepare()
    for b in (paused, straight):
        b.on_reports(batch(4))
    assert paused.prepare() and paused._behind.tolist() == [1, 1, 1, 1] and paused.prepare_due()
    assert np.array_equal(paused._reported.req_kv, straight._reported.req_kv)  # (batch 3's)
    assert np.array_equal(paused._reported.req_remaining, straight._reported.req_remaining)
    for b in (paused, straight):
        b.dispatch(_req(700, max_new=400))  # (a lagged view of the same requests: the same rank)
    assert sent[-1][0] == sent[-2][0]
    assert paused.prepare() and straight.prepare() and not paused._behind.any()
    assert np.array_equal(paused._reported.req_kv, straight._reported.req_kv)  # (batch 4's)
    assert np.array_equal(paused._reported.req_remaining, straight._reported.req_remaining)
    assert paused.estimator._seen.size == straight.estimator._seen.size == 96
    assert [len(q) for q in paused.inflight] == [len(q) for q in straight.inflight]

    # overtaken by more reports than a placement may lag behind: started over on the newest
    for b in (paused, straight):
        b.on_reports(batch(5))
    assert not paused.prepare(interrupted=after(3)) and straight.prepare()
    for step in (6, 7):
        for b in (paused, straight):
            b.on_reports(batch(step))
    assert straight.prepare() and paused.prepare() and not paused._behind.any()
    assert np.array_equal(paused._reported.req_kv, straight._reported.req_kv)  # (batch 7's)
    assert np.array_equal(paused._reported.req_remaining, straight._reported.req_remaining)
    assert paused.estimator._seen.size == straight.estimator._seen.size == 168

    # a placement that may not lag goes on with the paused estimate
    pool, _ = fake_controller("bfio", binding="pool", estimator="empirical-prompt", inline_refit=True)
    pool.on_reports(batch(1))
    assert not pool.prepare(interrupted=after(1)) and pool._reported is None
    pool.dispatch(_req(100, max_new=300))
    pool.release_pool()
    assert pool._reported is not None and pool._estimate is None and pool.stats["lagged"] == 0


def test_an_overtaken_estimate_adopted_one_step_behind_sees_every_request_once(fake_controller):
    # An idle estimate paused for an arrival, then the next step's reports (each
    # acknowledging what was sent before it): the estimate goes on and is adopted one
    # report behind. Its view must hold each request once: in its reports, or in flight
    # past what they acknowledge (the reports that overtook it must not cut the
    # in-flight rows it still needs). The reference estimated the same reports before
    # the next ones came.
    paused, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    ref, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)

    def batch(b, step):
        rng = np.random.default_rng(step)
        out = []
        for g in range(4):
            n = int(rng.integers(1, 6))
            gen = rng.integers(1, 200, n)
            out.append(RankReport(dp_rank=g, step=step, received=int(b.sent[g]), free_slots=72 - n, slot_limit=72,
                                  run_kv=rng.integers(10, 3000, n) + gen, run_generated=gen,
                                  run_cap=np.full(n, 2000), finished_lengths=rng.integers(1, 900, 3),
                                  finished_prompts=rng.integers(10, 3000, 3)))
        return out

    def arrivals(b, prompts):
        for p in prompts:
            b.dispatch(_req(p, max_new=300))

    for b in (paused, ref):
        arrivals(b, [100, 200, 300, 400])
        b.on_reports(batch(b, 1))
        assert b.prepare()
        arrivals(b, [500, 600, 700])
        b.on_reports(batch(b, 2))  # (acknowledges the three)
    asked = []
    assert not paused.prepare(interrupted=lambda: asked.append(1) or len(asked) >= 2)
    for b in (paused, ref):  # placed on the first step's estimate (one report behind)
        arrivals(b, [800, 900, 1000, 1100, 1200])
    assert [g for g, _ in sent[-10:-5]] == [g for g, _ in sent[-5:]] and paused.stats["lagged"] == 5
    assert ref.prepare()  # (the reference estimates the second step's reports before the third come)
    for b in (paused, ref):
        b.on_reports(batch(b, 3))  # acknowledges the five; two reports past the paused one's last estimate
    assert paused.prepare() and paused._behind.tolist() == ref._behind.tolist() == [1, 1, 1, 1]
    views = [b.build_view(lagged_ok=True) for b in (paused, ref)]
    for field in ("req_rank", "req_kv", "req_remaining", "free_slots", "kv_tokens", "num_requests"):
        assert np.array_equal(getattr(views[0], field), getattr(views[1], field)), field
    # each request once: the second step's reports plus the five in flight past their acknowledgements
    assert views[0].req_rank.shape[0] == sum(len(r.run_kv) for r in batch(ref, 2)) + 5
    for b in (paused, ref):
        assert b.prepare()
    assert np.array_equal(paused._reported.req_remaining, ref._reported.req_remaining)
    assert [len(q) for q in paused.inflight] == [len(q) for q in ref.inflight] == [0, 0, 0, 0]
    assert paused.estimator._seen.size == ref.estimator._seen.size == 36

    # under pool binding a release reads the newest reports: the idle loop starts over
    pool, _ = fake_controller("bfio", binding="pool", estimator="empirical-prompt", inline_refit=True)
    pool.on_reports(batch(pool, 1))
    asked.clear()
    assert not pool.prepare(interrupted=lambda: asked.append(1) or len(asked) >= 2)
    pool.on_reports(batch(pool, 2))
    assert pool.prepare() and not pool._behind.any()
    assert np.array_equal(pool._reported.req_kv, np.concatenate([r.run_kv for r in batch(pool, 2)]))


@pytest.mark.parametrize("fails", ["at once", "after its counts"])
def test_a_failing_projection_in_the_estimate_only_costs_the_next_placement_the_work(fake_controller, caplog, fails):
    # The estimate's last stages let the policy project the estimated requests into the
    # new estimate's cache (bfio: the counts, then the cost); when that fails, at once or
    # after the counts, the estimate still stands (logged) with what was computed, and
    # the next placement computes the rest itself, with the same result as a controller
    # whose projection worked.
    bad, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    good, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    reps = [RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                       run_kv=np.array([400 + 300 * g, 80]), run_generated=np.array([10, 3]),
                       run_cap=np.array([2000, 2000])) for g in range(4)]
    real = bad.policy.warm_stages

    def broken(view, must_place):
        if fails == "after its counts":
            next(real(view, must_place))  # (the counts)
            yield
        raise RuntimeError("projection broke")

    bad.policy.warm_stages = broken
    with caplog.at_level(logging.ERROR):
        for b in (bad, good):
            b.on_reports(reps)
            assert b.prepare()
    assert "projection of the reported requests failed" in caplog.text and "projection broke" in caplog.text
    assert len(bad._reported.projection_cache) == (0 if fails == "at once" else 1)
    assert len(good._reported.projection_cache) == 2  # (the counts, and the cost kept beside them)
    for prompt in (500, 20, 1200):
        bad.dispatch(_req(prompt, max_new=300))
        good.dispatch(_req(prompt, max_new=300))
        assert sent[-1][0] == sent[-2][0]
    assert bad._reported.projection_cache.keys() == good._reported.projection_cache.keys()  # (kept by the placement)


def test_an_estimate_paused_at_every_stage_ends_as_one_never_paused(fake_controller):
    # A message at every question between two stages (the totals, what runs, the
    # reported requests, the refit's steps, the estimates, the projection's counts and
    # cost): each call runs one stage, and the estimate it ends with is the one made
    # without a pause, its projection included.
    paused, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    straight, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    rng = np.random.default_rng(5)
    for step in (1, 2):
        reps = []
        for g in range(4):
            n = int(rng.integers(1, 6))
            gen = rng.integers(1, 200, n)
            reps.append(RankReport(dp_rank=g, step=step, received=0, free_slots=72 - n, slot_limit=72,
                                   run_kv=rng.integers(10, 3000, n) + gen, run_generated=gen,
                                   run_cap=np.full(n, 2000), finished_lengths=rng.integers(1, 900, 6),
                                   finished_prompts=rng.integers(10, 3000, 6)))
        for b in (paused, straight):
            b.on_reports(reps)
    asked = []
    assert straight.prepare(interrupted=lambda: asked.append(1) and False)
    pauses = 0
    while not paused.prepare(interrupted=lambda: True):
        pauses += 1
    assert pauses == len(asked) >= 8 and paused.stats["paused"] == pauses
    assert np.array_equal(paused._reported.req_remaining, straight._reported.req_remaining)
    assert paused._reported.projection_cache.keys() == straight._reported.projection_cache.keys() != set()
    for key, got in paused._reported.projection_cache.items():
        want = straight._reported.projection_cache[key]
        assert all(np.array_equal(x, y) for x, y in zip(got, want))
    for prompt in (40, 900):
        paused.dispatch(_req(prompt, max_new=400))
        straight.dispatch(_req(prompt, max_new=400))
        assert sent[-1][0] == sent[-2][0]


def test_the_controller_pins_torch_threads_for_its_cpu_projection(fake_controller):
    # A parallel torch op waits for its slowest thread: the controller projecting on the
    # CPU runs torch on --balancer-cpu-threads threads (default 1); 0 leaves torch's
    # setting, and a policy that projects nothing leaves it too.
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fake_controller("bfio")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        fake_controller("bfio", cpu_threads=0)
        assert torch.get_num_threads() == 2
        fake_controller("total_tokens")
        assert torch.get_num_threads() == 2
        fake_controller("bfio", cpu_threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def restore_gc():
    import gc

    threshold = gc.get_threshold()
    yield gc
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _StopLoop(Exception):
    pass


def _run_loop_until_first_turn(bal) -> None:
    """The controller's event loop, stopped where its first turn begins."""
    def stop():
        raise _StopLoop

    bal.ctrl.soft_watchdog = SimpleNamespace(feed=stop)
    bal.ctrl.recv_from_tokenizer = bal.ctrl.context.socket(zmq.PULL)
    try:
        with pytest.raises(_StopLoop):
            bal.event_loop()
    finally:
        bal.ctrl.recv_from_tokenizer.close(linger=0)


def test_the_loop_takes_the_startup_heap_out_of_full_collections(fake_controller, restore_gc, monkeypatch, caplog):
    # A full collection walks every tracked object (the imports alone: ~620k, a ~260 ms
    # stall): the loop freezes what exists when it starts, so later passes skip it.
    gc = restore_gc
    bal, _ = fake_controller("total_tokens")
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    _run_loop_until_first_turn(bal)
    assert gc.get_freeze_count() > 100_000  # (sglang and torch are imported here)
    assert all(o is not bal for o in gc.get_objects())  # the controller itself: out of every pass

    # A freeze that fails is logged, and the loop runs all the same.
    import sglang.srt.utils.common as sglang_common

    def broken(*args, **kwargs):
        raise RuntimeError("no freeze here")

    gc.unfreeze()
    monkeypatch.setattr(sglang_common, "freeze_gc", broken)
    again, _ = fake_controller("total_tokens", binding="pool")
    with caplog.at_level(logging.ERROR):
        _run_loop_until_first_turn(again)
    assert gc.get_freeze_count() == 0 and "freezing the garbage collector failed" in caplog.text


def test_sglang_freeze_gc_request_freezes_the_controller_and_goes_on(fake_controller, restore_gc):
    # SGLang's post-warm-up /freeze_gc reaches the ranks through this controller: it
    # freezes here too, with the thresholds it carries, and is forwarded as before.
    from sglang.srt.managers.io_struct import FreezeGCReq

    gc = restore_gc
    bal, _ = fake_controller("total_tokens")
    forwarded = []
    bal.ctrl._request_dispatcher = forwarded.append
    gc.unfreeze()
    msg = FreezeGCReq(gc_threshold=[1234, 11, 12])
    bal._dispatch_one(msg)
    assert forwarded == [msg]
    assert gc.get_freeze_count() > 100_000 and gc.get_threshold() == (1234, 11, 12)
    gc.unfreeze()
    bal._dispatch_one(FreezeGCReq())  # (no thresholds: they stay)
    assert gc.get_freeze_count() > 0 and gc.get_threshold() == (1234, 11, 12)


def test_gc_warning_threshold_reaches_the_controller(fake_controller, monkeypatch, caplog, restore_gc):
    # --gc-warning-threshold-secs logs SGLang's long collections in its tokenizer manager;
    # with a balancer the controller's process logs its own too.
    from sglang_ext.patches import controller

    gc = restore_gc
    bal, _ = fake_controller("total_tokens")
    callbacks = list(gc.callbacks)
    for warn_s in (0.0, 1e-9):
        server_args = SimpleNamespace(_balancer=bal.cfg, gc_warning_threshold_secs=warn_s)
        monkeypatch.setattr(bal.cfg, "report_addr", bal.cfg.report_addr + f"-{warn_s:g}")
        ctrl = SimpleNamespace(**vars(bal.ctrl))
        try:
            with caplog.at_level(logging.WARNING):
                caplog.clear()
                controller.after_init(None, ctrl, server_args)
                gc.collect()
        finally:
            ctrl._sglang_ext_balancer.close()
            added = [cb for cb in gc.callbacks if cb not in callbacks]
            for cb in added:
                gc.callbacks.remove(cb)
        assert len(added) == (warn_s > 0)
        assert ("LONG GARBAGE COLLECTION DETECTED" in caplog.text) == (warn_s > 0)


def test_the_idle_loop_pauses_its_estimate_when_a_message_comes(fake_controller):
    # wait_for_messages hands prepare a question that polls for a message from the
    # tokenizer: one that comes while it estimates stops it at the next stage, and the
    # next idle turn goes on.
    bal, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                               run_kv=np.array([400, 80]), run_generated=np.array([10, 3]),
                               run_cap=np.array([2000, 2000])) for g in range(4)])

    class Poller:  # nothing waits when the loop goes idle; messages come as it estimates
        def __init__(self, answers):
            self.answers = list(answers)

        def poll(self, timeout):
            return self.answers.pop(0) if self.answers else []

    tokenizer = bal.ctrl.recv_from_tokenizer = object()  # (the controller's socket from the tokenizer)
    poller = Poller([[], [(bal.sock, zmq.POLLIN)], [(tokenizer, zmq.POLLIN)], []])  # (the last: the wait after)
    bal.wait_for_messages(poller)
    # a report waiting did not pause it (it would start it over); the tokenizer's message did
    assert not poller.answers and bal.stats["paused"] == 1 and bal.stats["prepared"] == 0 and bal.prepare_due()
    bal.wait_for_messages(Poller([]))
    assert bal.stats["prepared"] == 1 and not bal.prepare_due()


@pytest.mark.parametrize("policy,kw", [
    ("bfio", {}), ("bfio", {"scenarios": 8}), ("bfio", {"prefill_weight": 0.0625}), ("bfio", {"full_wait": True}),
    ("bfio", {"variant": "paper"}), ("total_tokens", {}), ("jsq", {}), ("total_requests", {}), ("round_robin", {}), ("power_of_two", {}),
    ("fcfs", {})])
def test_arrivals_placed_together_land_where_one_call_each_would_put_them(fake_controller, policy, kw):
    # A burst read in one turn of the loop is placed in one policy call; each request
    # must land where one call per request (each seeing the ones before it in flight)
    # puts it, over random states: ranks filling up, every rank full, one rank down.
    rng = np.random.default_rng(7)
    placed_together = 0
    for trial in range(8):
        G = int(rng.integers(2, 7))
        one, sent = fake_controller(policy, estimator="empirical-prompt", inline_refit=True, ranks=G, **kw)
        burst, _ = fake_controller(policy, estimator="empirical-prompt", inline_refit=True, ranks=G, **kw)
        if trial % 4 == 3:
            for bal in (one, burst):
                bal.ctrl._active_workers = list(range(1, G))
        for step in range(1, 4):
            reports = []
            for g in range(G):
                n, w = int(rng.integers(0, 6)), int(rng.integers(0, 3))
                gen = rng.integers(1, 300, n)
                reports.append(RankReport(
                    dp_rank=g, step=step, received=0, free_slots=int(rng.integers(0, 3)) * (trial % 4 != 2),
                    slot_limit=8, run_kv=gen + rng.integers(1, 2000, n), run_generated=gen,
                    run_cap=gen + rng.integers(1, 900, n), wait_prompt=rng.integers(1, 2000, w),
                    wait_cap=rng.integers(1, 900, w), finished_lengths=rng.integers(1, 600, 6),
                    finished_prompts=rng.integers(1, 2000, 6)))
            one.on_reports(reports)
            burst.on_reports(reports)
            reqs = [_req(int(p), max_new=int(m), rid=f"{trial}-{step}-{i}", ignore_eos=bool(i % 5 == 4))
                    for i, (p, m) in enumerate(zip(rng.integers(1, 3000, 9), rng.integers(1, 900, 9)))]
            start = len(sent)
            for r in reqs:
                one.dispatch(r)
            alone = [g for g, _ in sent[start:]]
            calls = burst.stats["placements"]
            burst._arrivals = []
            for r in reqs:
                burst.dispatch(r)
            assert len(sent) == start + len(reqs)  # collected, not sent yet
            burst.place_arrivals()
            assert [r.rid for _, r in sent[start + len(reqs):]] == [r.rid for r in reqs]  # arrival order
            assert [g for g, _ in sent[start + len(reqs):]] == alone
            placed_together += burst.stats["placements"] - calls == 1
            assert [list(q) for q in burst.inflight] == [list(q) for q in one.inflight]
    together = burst.policy.places_arrivals_together
    assert placed_together == (24 if together else 0) and together == (not kw.get("full_wait"))


def test_loop_places_a_burst_together_and_never_lets_an_abort_overtake_it(fake_controller, monkeypatch):
    # The loop reads the tokenizer socket to the end: arrivals are placed in one call,
    # but before any other message is passed on (an abort must follow its request).
    from sglang.srt.managers import io_struct
    from sglang.srt.managers.io_struct import AbortReq

    bal, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                               run_kv=np.array([400 * (g + 1)]), run_generated=np.array([10]),
                               run_cap=np.array([2000])) for g in range(4)])
    from sglang_ext.patches import controller

    from sglang.srt.managers.data_parallel_controller import DataParallelController

    # What counts as a request: exactly the types SGLang's own dispatcher routes to its
    # request dispatch (one request, or a batch), nothing it sends to every rank.
    stock = SimpleNamespace(**{k: object() for k in (
        "dispatching_with_trace", "dispatch_batch_generate", "dispatch_batch_embedding", "send_to_all_workers",
        "update_active_ranks", "send_control_message")})
    DataParallelController.init_dispatcher(stock)
    routed = {stock.dispatching_with_trace, stock.dispatch_batch_generate, stock.dispatch_batch_embedding}
    mapping = stock._request_dispatcher._mapping
    assert set(request_types()) == {ty for ty, fn in mapping.items() if fn in routed}
    assert not controller._is_request(AbortReq(rid="b"))
    monkeypatch.setattr(controller, "_is_request", lambda msg: isinstance(msg, SimpleNamespace))
    msgs = deque([_req(300, rid="a"), _req(50, rid="b"), AbortReq(rid="b"), _req(900, rid="c"), _req(10, rid="d")])

    def recv(sock, flags=0):
        if not msgs:
            raise zmq.ZMQError()
        return msgs.popleft()

    def dispatcher(msg):
        if isinstance(msg, AbortReq):
            sent.append(("all", msg))
        else:
            bal.dispatch(msg)

    monkeypatch.setattr(io_struct, "sock_recv", recv)
    bal.ctrl.recv_from_tokenizer, bal.ctrl._request_dispatcher = None, dispatcher
    bal.read_requests()
    assert [getattr(m, "rid", None) for _, m in sent] == ["a", "b", "b", "c", "d"]
    assert sent[2][0] == "all" and bal.stats["placements"] == 2 and bal.stats["dispatched"] == 4
    assert bal._arrivals is None  # (collecting only while the loop reads)

    # A policy that places each request in its own call (bfio with full_wait): each is
    # sent as it is read, in the same order.
    one, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True, full_wait=True)
    one.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72) for g in range(4)])
    sent.clear()
    msgs.extend([_req(300, rid="e"), AbortReq(rid="e"), _req(50, rid="f"), _req(900, rid="g")])
    one.ctrl.recv_from_tokenizer, one.ctrl._request_dispatcher = None, lambda m: (
        sent.append(("all", m)) if isinstance(m, AbortReq) else one.dispatch(m))
    one.read_requests()
    assert [getattr(m, "rid", None) for _, m in sent] == ["e", "e", "f", "g"]
    assert one.stats["placements"] == 3 and one._arrivals is None


def test_a_failed_send_in_a_burst_costs_the_others_nothing(fake_controller, monkeypatch, caplog):
    from sglang.srt.managers import io_struct

    bal, sent = fake_controller("total_tokens")
    real = io_struct.sock_send

    def send(sock, obj):
        if obj.rid == "bad":
            raise zmq.ZMQError()
        real(sock, obj)

    monkeypatch.setattr(io_struct, "sock_send", send)
    bal._arrivals = []
    for rid in ("a", "bad", "c"):
        bal.dispatch(_req(10, rid=rid))
    with caplog.at_level(logging.ERROR):
        bal.place_arrivals()
    assert [r.rid for _, r in sent] == ["a", "c"]
    assert any("failed to send request bad; retrying" in r.message for r in caplog.records)
    # not lost: sent once, by the immediate rule, once the retry time has come
    bal.release_pool()
    assert [r.rid for _, r in sent] == ["a", "c"]
    monkeypatch.setattr(io_struct, "sock_send", real)
    time.sleep(0.11)
    bal.release_pool()
    assert [r.rid for _, r in sent] == ["a", "c", "bad"] and not bal.pool
    monkeypatch.setattr(io_struct, "sock_send", send)
    bal._arrivals = None  # (a request placed alone, outside a burst: the same)
    bal.dispatch(_req(10, rid="bad"))
    assert [p.rid for p in bal.pool] == ["bad"]


def test_failed_estimate_in_the_idle_loop_is_logged_once_and_the_arrival_still_placed(
        fake_controller, monkeypatch, caplog):
    bal, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                               run_kv=np.array([400]), run_generated=np.array([10]), run_cap=np.array([2000]),
                               finished_lengths=np.array([20]), finished_prompts=np.array([100]))
                    for g in range(4)])
    monkeypatch.setattr(bal.estimator, "remaining", lambda *a, **k: 1 / 0)
    with caplog.at_level(logging.ERROR):
        assert not bal.prepare() and not bal.prepare()  # not retried before the next reports
    assert sum("estimating the ranks' reports failed" in r.message for r in caplog.records) == 1
    bal.dispatch(_req(10))  # the placement retries, fails, and falls back: the request still goes
    assert len(sent) == 1 and bal.stats["prepared"] == 0
    # with every estimate failing, the in-flight deques still drop what the reports acknowledge
    for step in range(2, 6):
        for _ in range(4):
            bal.dispatch(_req(10))
        bal.on_reports([RankReport(dp_rank=g, step=step, received=int(bal.sent[g]), free_slots=70, slot_limit=72)
                        for g in range(4)])
        assert sum(len(q) for q in bal.inflight) == 0
    assert len(sent) == 17 and bal.stats["prepared"] == 0


def test_loop_estimates_a_whole_step_at_once_a_partial_one_after_a_quiet_spell(fake_controller, monkeypatch):
    # The real wait of the event loop, on the real report socket.
    from sglang_ext.patches import controller
    from sglang_ext.plugin.protocol import ReportSender

    monkeypatch.setattr(controller, "IDLE_POLL_MS", 50)  # (the watchdog wake-up; short for the test)
    bal, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    poller = zmq.Poller()
    poller.register(bal.sock, zmq.POLLIN)
    senders = [ReportSender(bal.cfg.report_addr, g) for g in range(4)]

    def send(ranks, step):
        for g in ranks:
            senders[g].send(RankReport(dp_rank=g, step=step, received=0, free_slots=70, slot_limit=72,
                                       run_kv=np.array([400]), run_generated=np.array([10]),
                                       run_cap=np.array([2000])))
        got = []
        while len(got) < len(ranks):  # (delivery over ipc is asynchronous)
            bal.wait_for_messages(poller)
            got += recv_reports(bal.sock)
        bal.on_reports(got)

    try:
        send(range(4), 1)  # every rank: estimated at once, then the wait goes on
        t = time.monotonic()
        bal.wait_for_messages(poller)
        assert bal.stats["prepared"] == 1 and bal._reported is not None
        assert time.monotonic() - t >= 0.04  # it still waited for a message after estimating
        bal.wait_for_messages(poller)
        assert bal.stats["prepared"] == 1  # nothing new: nothing estimated again

        send([0, 2], 2)  # part of a step, then a quiet spell: estimated after it
        assert bal._behind.tolist() == bal._fresh.tolist() == [True, False, True, False]
        bal.wait_for_messages(poller)
        assert bal.stats["prepared"] == 2 and not bal._fresh.any()

        send([1], 3)
        senders[3].send(RankReport(dp_rank=3, step=3, received=0, free_slots=70, slot_limit=72))
        time.sleep(0.05)  # a message already waiting: the loop reads it first
        bal.wait_for_messages(poller)
        assert bal.stats["prepared"] == 2 and bal._behind.any()
        bal.on_reports(recv_reports(bal.sock))
        bal.wait_for_messages(poller)  # ranks 1 and 3 of step 3, then quiet
        assert bal.stats["prepared"] == 3 and not bal._fresh.any()
    finally:
        for s in senders:
            s.close()


def test_stats_line_counts_what_the_controller_did_since_the_last_one(fake_controller, caplog):
    bal, sent = fake_controller("bfio", binding="pool", max_wait=60, stats_interval_s=10)
    t0 = bal._stats_since
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=1) for g in range(4)])
    for i in range(6):
        bal.dispatch(_req(10 + i, rid=f"r{i}"))
    bal.dispatch(_req(10, pin=2, rid="pinned"))
    bal.release_pool()  # one placement call: 3 placed (rank 2's slot went to the pinned one), 3 stay pooled
    with caplog.at_level(logging.INFO, logger="sglang_ext.patches.controller"):
        assert not bal.log_stats(now=t0 + 9)  # not yet
        assert bal.log_stats(now=t0 + 10)
        assert not bal.log_stats(now=t0 + 25)  # nothing placed since: an idle server logs nothing
        bal.dispatch(_req(10, pin=1, rid="pinned2"))
        assert bal.log_stats(now=t0 + 40)
    lines = [r.getMessage() for r in caplog.records if "sglang-ext balancer, last" in r.getMessage()]
    stats = read_stats("\n".join(["noise"] + lines))  # what the demo and operators' tools read back
    assert [(x["seconds"], x["placed"], x["pinned"], x["pooled"], x["reports"], x["calls"], x["lagged"])
            for x in stats] == [(10, 4, 1, 3, 4, 1, 0), (15, 1, 1, 3, 0, 0, 0)]
    assert 0 < stats[0]["p50_ms"] <= stats[0]["p99_ms"] <= stats[0]["max_ms"] and stats[1]["p50_ms"] is None
    assert len(lines) == 2 and len(sent) == 5  # 3 from the pool (rank 2's slot went to a pinned one), 2 pinned
    assert lines[0].startswith("sglang-ext balancer, last 10 s: requests placed 4 (pinned 1, at the pool "
                               "deadline 0), pooled now 3; reports 4 (estimated while idle 0, paused for a message "
                               "0); placement calls 1 (on the previous estimate 0), decision time p50 ")
    # the quiet interval closed at 25 s; the next line covers what came after it
    assert lines[1] == ("sglang-ext balancer, last 15 s: requests placed 1 (pinned 1, at the pool deadline 0), "
                        "pooled now 3; reports 0 (estimated while idle 0, paused for a message 0); placement calls 0 "
                        "(on the previous estimate 0)")
    quiet, _ = fake_controller("total_tokens", stats_interval_s=0)
    quiet.dispatch(_req(10))
    assert not quiet.log_stats(now=time.monotonic() + 1e6)


def test_controller_refits_in_a_worker_thread_unless_told_inline(fake_controller):
    # By default the dispatch loop does not wait for a large refit: the batch that makes
    # one due is estimated from the previous fit, and a later batch from the new one.
    run = dict(run_kv=np.array([400, 900]), run_generated=np.array([10, 300]), run_cap=np.array([4000, 4000]))

    def batch(step, length):
        return [RankReport(dp_rank=g, step=step, received=0, free_slots=70, slot_limit=72, **run,
                           finished_lengths=np.full(40, length), finished_prompts=np.full(40, 100))
                for g in range(4)]

    views = {}
    for inline in (True, False):
        bal, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=inline)
        assert bal.estimator.background is not inline
        bal.estimator.background_min_entries = 0  # (a fit this small stays inline by default)
        out = []
        for step, length in ((1, 30), (2, 3000), (3, 3000)):
            bal.on_reports(batch(step, length))
            out.append(bal.build_view().req_remaining.copy())
            if bal.estimator._pending is not None:
                bal.estimator._pending.result()  # the worker is done before the next batch
        views[inline] = out
    assert (views[True][1] > views[True][0]).all()  # inline: learnt from batch 2 at once
    assert np.array_equal(views[False][1], views[True][0])  # worker: batch 2 from batch 1's fit
    # the worker's fit of batches 1-2 is adopted at batch 3 (which starts the next refit)
    assert (views[False][2] > views[False][1]).all() and np.array_equal(views[False][2], views[True][1])


def test_a_batch_of_reports_teaches_the_estimator_as_one_report_at_a_time(fake_controller):
    # on_reports hands the estimator a batch's finished lengths in one call; the fit
    # must be the one per-report calls would give, reports without prompts included.
    from sglang_ext.estimators import make_estimator

    rng = np.random.default_rng(5)
    reports = [RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                          finished_lengths=rng.integers(1, 900, 30),
                          finished_prompts=rng.integers(1, 4000, 30) if g != 1 else np.zeros(0, np.int64),
                          finished_exact=np.arange(30) % 7 == 0)
               for g in range(4)]
    for with_prompts in (reports[::2], reports):  # every report with prompts; one without
        bal, _ = fake_controller("bfio", estimator="empirical-prompt")
        bal.on_reports(with_prompts)
        assert bal.estimator._seen.size == 0  # learned when the reports are estimated
        assert bal.prepare()
        one_by_one = make_estimator("empirical-prompt")
        for rep in with_prompts:
            natural = ~rep.exact("finished")
            prompts = rep.finished_prompts[natural] if rep.finished_prompts.size else None
            one_by_one.observe(rep.finished_lengths[natural], prompts)
        assert np.array_equal(bal.estimator._seen, one_by_one._seen)
        assert np.array_equal(bal.estimator._seen_bin, one_by_one._seen_bin)
        probe = np.array([1, 50, 300, 3000])
        assert np.array_equal(bal.estimator.initial(probe, None, None), one_by_one.initial(probe, None, None))


def test_scenarios_reach_the_policy_from_the_empirical_estimator(fake_controller):
    bal, sent = fake_controller("bfio", estimator="empirical", scenarios=4)
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                               finished_lengths=np.array([5, 10, 50, 400])) for g in range(4)])
    bal.on_reports([RankReport(dp_rank=0, step=2, received=0, free_slots=69, slot_limit=72,
                               run_kv=np.array([300]), run_generated=np.array([20]), run_cap=np.array([64]))])
    view = bal.build_view()
    assert view.req_remaining.shape == (4, 1) and view.slot_limit == 72
    # what runs now reaches the estimator as lower bounds on the lengths
    assert bal.estimator._running.tolist() == [20]
    # quantiles of the finished lengths above 20 (50, 400), capped by max_new_tokens - generated
    assert view.req_remaining[:, 0].tolist() == [30, 30, 44, 44]
    cands = bal._candidates(request_rows([_req(100, max_new=300), _req(50, max_new=8)]))
    assert cands.output_est.shape == (2, 4) and cands.output_est[1].max() <= 8
    bal.dispatch(_req(100))
    assert len(sent) == 1


def test_full_wait_sends_a_request_where_a_slot_frees_first(fake_controller):
    def reports():
        light = dict(run_kv=np.array([10, 10]), run_generated=np.array([0, 0]), run_cap=np.array([100, 100]))
        heavy = dict(run_kv=np.array([5000, 5000]), run_generated=np.array([99, 0]), run_cap=np.array([100, 100]))
        return [RankReport(dp_rank=g, step=1, received=0, free_slots=0, slot_limit=2, **(heavy if g == 2 else light))
                for g in range(4)]

    for full_wait, want_rank_2 in ((True, True), (False, False)):
        bal, sent = fake_controller("bfio", full_wait=full_wait)
        bal.on_reports(reports())
        bal.dispatch(_req(100))
        assert (sent[-1][0] == 2) == want_rank_2


def test_prompt_estimator_learns_from_reported_prompts(fake_controller):
    bal, sent = fake_controller("bfio", estimator="empirical-prompt")
    # short prompts got short answers, long prompts long ones
    short = dict(finished_lengths=np.full(40, 10), finished_prompts=np.full(40, 100))
    long_ = dict(finished_lengths=np.full(40, 400), finished_prompts=np.full(40, 3000))
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                               **(short if g % 2 else long_)) for g in range(4)])
    # a running request's prompt is its KV less what it generated
    bal.on_reports([RankReport(dp_rank=0, step=2, received=0, free_slots=69, slot_limit=72,
                               run_kv=np.array([3005]), run_generated=np.array([5]), run_cap=np.array([4096]))])
    view = bal.build_view()
    assert bal.estimator._running_bin.tolist() == bal.estimator.prompt_bin(np.array([3000]), 1).tolist()
    # its bucket's residual life (400 - 5), a little shrunk towards the pooled fit;
    # the pooled fit alone would say about 200
    assert 370 <= view.req_remaining[0] <= 395
    cands = bal._candidates(request_rows([_req(100, max_new=4096), _req(3000, max_new=4096)]))
    assert cands.output_est[0] <= 20 and cands.output_est[1] >= 370
    bal.dispatch(_req(100))
    assert len(sent) == 1


def test_report_sender_carries_finished_lengths_and_prompts_past_a_dropped_report(tmp_path, caplog):
    from sglang_ext.plugin.protocol import ReportSender

    addr = f"ipc://{tmp_path}/late"
    sender = ReportSender(addr, dp_rank=0)  # nobody listens yet: reports queue up to the high-water mark
    with caplog.at_level(logging.WARNING, logger="sglang_ext.plugin.protocol"):
        for step in range(100000):
            if not sender.send(RankReport(dp_rank=0, step=step, received=0, free_slots=1)):
                break
    assert sender.dropped == 1
    assert [r.getMessage() for r in caplog.records if "report dropped (1 so far)" in r.getMessage()]
    first = RankReport(dp_rank=0, step=-1, received=0, free_slots=1, finished_exact=np.array([True, False]),
                       finished_lengths=np.array([7, 9]), finished_prompts=np.array([70, 90]))
    assert not sender.send(first)  # still full: dropped, its finished requests kept
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(addr)
    deadline, carried = time.monotonic() + 10, []
    while not carried and time.monotonic() < deadline:
        sender.send(RankReport(dp_rank=0, step=-2, received=0, free_slots=1,
                               finished_lengths=np.array([3]), finished_prompts=np.array([30])))
        time.sleep(0.01)
        carried = [r for r in recv_reports(pull) if r.finished_lengths.size]
    rep = carried[0]
    # the dropped report's lengths come first, each still beside its prompt
    assert rep.finished_lengths.tolist()[:2] == [7, 9]
    assert rep.finished_prompts.tolist() == (10 * rep.finished_lengths).tolist()
    assert rep.finished_exact.tolist()[:2] == [True, False] and not rep.finished_exact[2:].any()
    sender.close()
    pull.close(linger=0)


# ---- stand-in model: answers that end by EOS ---------------------------------------------


def test_standin_ends_answers_by_eos_at_their_hidden_length():
    """The stand-in's model ends an answer with EOS at the length a replay put in
    custom_params (hidden from the balancer), or at max_new_tokens if that comes
    first; under ignore_eos, or without the key, it runs to max_new_tokens. The
    finished lengths it reports (to the controller's estimator) are the true ones."""
    from sglang_ext.plugin.protocol import ANSWER_LEN_KEY
    from sglang_ext.plugin.standin import EOS_TOKEN_ID, SimReq, StandinScheduler, answer_len

    def sp(max_new, answer=None, ignore_eos=False):
        custom = None if answer is None else {ANSWER_LEN_KEY: answer}
        return SimpleNamespace(max_new_tokens=max_new, custom_params=custom, ignore_eos=ignore_eos)

    assert answer_len(sp(8, 3)) == 3 and answer_len(sp(8)) is None and answer_len(sp(8, 3, ignore_eos=True)) is None
    assert answer_len(SimpleNamespace(max_new_tokens=8)) is None  # no custom_params at all
    for bad in (0, -2, "5", 2.5, True):
        with pytest.raises(ValueError, match=ANSWER_LEN_KEY):
            answer_len(sp(8, bad))

    rank = object.__new__(StandinScheduler)  # the step logic only: no sockets
    rank.vocab, rank._outbox = 32000, []
    rank.finished_lengths, rank.finished_prompts, rank.finished_exact = [], [], []
    reqs = {"eos": SimReq("eos", 10, max_new=8, stream=True, http_worker_ipc=None, answer_len=3),
            "cut": SimReq("cut", 20, max_new=4, stream=False, http_worker_ipc=None, answer_len=9),
            "forced": SimReq("forced", 30, max_new=5, stream=False, http_worker_ipc=None, ignore_eos=True)}
    rank.running = list(reqs.values())
    finished = {}
    for _ in range(6):
        rank._advance()
        for r, toks, fin in rank._outbox:
            if fin is not None:
                finished[r.rid] = (r.generated, fin, list(r.tokens))
        rank._outbox = []
    assert not rank.running
    assert finished["eos"][:2] == (3, {"type": "stop", "matched": EOS_TOKEN_ID})
    assert finished["eos"][2][-1] == EOS_TOKEN_ID and EOS_TOKEN_ID not in finished["eos"][2][:-1]
    assert finished["cut"][:2] == (4, {"type": "length", "length": 4})
    assert finished["forced"][:2] == (5, {"type": "length", "length": 5})
    assert EOS_TOKEN_ID not in finished["cut"][2] + finished["forced"][2]
    assert sorted(zip(rank.finished_prompts, rank.finished_lengths, rank.finished_exact)) == \
        [(10, 3, False), (20, 4, False), (30, 5, True)]


def test_ignore_eos_requests_run_to_their_cap_and_teach_the_estimator_nothing(fake_controller):
    """Under ignore_eos a request's length is its max_new_tokens (how benchmark
    clients force lengths): it is projected so whatever the estimator guesses, and
    its forced length is kept out of what the estimator learns of natural answers."""
    bal, _ = fake_controller("bfio")  # the default estimator: empirical-prompt
    assert bal.estimator.name == "empirical-prompt"
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72,
                               finished_lengths=np.array([10] * 20 + [900] * 20),
                               finished_prompts=np.full(40, 100),
                               finished_exact=np.array([False] * 20 + [True] * 20)) for g in range(4)])
    bal.prepare()
    assert bal.estimator._seen.tolist() == [10] * 80
    cands = bal._candidates(request_rows([_req(100, max_new=500, ignore_eos=True), _req(100, max_new=500)]))
    assert cands.output_est.tolist()[0] == 500 and cands.output_est[1] <= 20
    bal.on_reports([RankReport(dp_rank=0, step=2, received=0, free_slots=68, slot_limit=72,
                               run_kv=np.array([105, 105]), run_generated=np.array([5, 5]),
                               run_cap=np.array([300, 300]), run_exact=np.array([True, False]))])
    view = bal.build_view()
    assert view.req_remaining.tolist()[0] == 295 and view.req_remaining[1] <= 20
    # the forced request is no lower bound on natural lengths either
    assert bal.estimator._running.tolist() == [5]
    # in flight: its flag travels with it until the rank acknowledges it
    bal.dispatch(_req(100, max_new=400, ignore_eos=True))
    assert max(int(v) for v in bal.build_view().req_remaining) == 400
    # a report from a sender without the flags reads as "none forced"
    old = RankReport(dp_rank=1, step=3, received=0, free_slots=70, run_kv=np.array([50]),
                     run_generated=np.array([2]), run_cap=np.array([64]))
    old.run_exact = np.zeros(0, bool)
    assert old.exact("run").tolist() == [False]


def test_forced_flags_are_read_per_report_whatever_each_sender_sent(fake_controller):
    # The estimate joins every report's ignore_eos flags at once when each report has
    # one bool per request (what the ranks' scheduler sends); a report without flags,
    # or with a miscounted one, reads as none forced, flags of another type are read
    # as bools, and every report's flags land on its own requests.
    bal, _ = fake_controller("bfio", ranks=4)
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=72, slot_limit=72,
                               finished_lengths=np.full(20, 10), finished_prompts=np.full(20, 100))
                    for g in range(4)])
    bal.prepare()  # (natural answers of 10 tokens: an unforced request is estimated far below its cap)

    def rep(step, g, n_run, n_wait, run_exact=None, wait_exact=None):
        kw = {k: v for k, v in (("run_exact", run_exact), ("wait_exact", wait_exact)) if v is not None}
        return RankReport(dp_rank=g, step=step, received=0, free_slots=10, slot_limit=72,
                          run_kv=np.full(n_run, 102), run_generated=np.full(n_run, 2),
                          run_cap=np.full(n_run, 300 + g), wait_prompt=np.full(n_wait, 100),
                          wait_cap=np.full(n_wait, 500 + g), **kw)

    cases = [
        ([rep(2, 0, 3, 1, np.array([True, False, True]), np.array([True])),
          rep(2, 1, 2, 0, np.array([False, True]), np.zeros(0, bool)),
          rep(2, 2, 1, 2, np.array([False]), np.array([False, True])),
          rep(2, 3, 0, 1, np.zeros(0, bool), np.array([False]))],
         {0: [298, None, 298, 500], 1: [None, 299], 2: [None, None, 502], 3: [None]}),
        ([rep(3, 0, 3, 1, np.array([True, False, True]), np.array([True])),
          rep(3, 1, 2, 0),  # no flags sent
          rep(3, 2, 1, 2, np.array([True, True]), np.array([0, 1])),  # miscounted; ints
          rep(3, 3, 0, 1, None, np.array([True]))],
         {0: [298, None, 298, 500], 1: [None, None], 2: [None, None, 502], 3: [503]}),
    ]
    for reps, want in cases:
        bal.on_reports(reps)
        view = bal.build_view()
        rank, remaining = np.asarray(view.req_rank), np.asarray(view.req_remaining)
        for g, expect in want.items():
            got = remaining[rank == g].tolist()
            assert len(got) == len(expect), (g, got)
            for x, e in zip(got, expect):
                assert x == e if e is not None else 1 <= x <= 50, (g, got, expect)


def test_the_per_rank_totals_kept_as_reports_come_are_the_newest_reports_sums(fake_controller):
    # The totals an arrival reads are kept per rank as reports come: they must equal the
    # newest report's numbers recomputed from its requests, whatever the order of the
    # reports, a stale one (ignored), a rank that never reported (its defaults) and
    # arrays that are not int64; and the estimate concatenates the same requests.
    from sglang_ext.plugin.cluster_state import DEFAULT_CAPACITY

    bal, _ = fake_controller("bfio", ranks=5)
    rng = np.random.default_rng(3)
    newest = {}
    for step in range(1, 40):
        g = int(rng.integers(0, 4))  # (rank 4 never reports)
        n_run, n_wait = int(rng.integers(0, 6)), int(rng.integers(0, 3))
        dtype = (np.int64, np.int32)[step % 2]
        rep = RankReport(dp_rank=g, step=step, received=step, free_slots=int(rng.integers(0, 9)),
                         run_kv=rng.integers(1, 1 << 31, n_run).astype(dtype),
                         run_generated=np.ones(n_run, np.int64), run_cap=np.full(n_run, 64),
                         wait_prompt=rng.integers(1, 1 << 31, n_wait).astype(dtype), wait_cap=np.full(n_wait, 64),
                         slot_limit=int(rng.integers(0, 3)) * 8)
        bal.on_reports([rep])
        newest[g] = rep
        if step % 7 == 0:  # a stale report (older step, fewer received) changes nothing
            bal.on_reports([RankReport(dp_rank=g, step=step - 5, received=0, free_slots=99,
                                       run_kv=np.array([10 ** 9]), run_generated=np.ones(1, np.int64),
                                       run_cap=np.full(1, 64))])
        t = bal._newest_totals()
        for r in range(5):
            rp = newest.get(r)
            kv = int(np.sum(rp.run_kv, dtype=np.int64)) if rp else 0
            pend = int(np.sum(rp.wait_prompt, dtype=np.int64)) if rp else 0
            assert t.free[r] == (rp.free_slots if rp else DEFAULT_CAPACITY)
            assert (t.kv[r], t.pending[r], t.num[r]) == (kv + pend, pend, (rp.num_requests if rp else 0))
        limits = [rp.slot_limit for rp in newest.values() if rp.slot_limit > 0]
        assert t.slot_limit == (max(limits) if limits else None)
        assert t.kv.dtype == np.int64 and t.free.dtype == np.int64
    reps, run_kv, _, wait_prompt, run_rank, wait_rank = bal._concatenated()
    assert np.bincount(run_rank, weights=run_kv, minlength=5)[:4].tolist() == [
        float(np.sum(newest[r].run_kv, dtype=np.int64)) for r in range(4)]
    assert np.bincount(wait_rank, minlength=5).tolist() == [newest[r].wait_prompt.size for r in range(4)] + [0]


def test_warm_up_at_startup_changes_no_placement_and_never_fails_the_start(fake_controller, monkeypatch, caplog):
    # A tiny placement on a made-up view when the controller starts (torch's first calls
    # are slow); the controller's own state is not touched, so placements are the same.
    from sglang_ext.patches.controller import BalancedDispatch

    calls = []
    real = BalancedDispatch._warm_up
    monkeypatch.setattr(BalancedDispatch, "_warm_up", lambda self: calls.append(1) or real(self))
    warm, sent = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    assert calls == [1] and warm._reported is None and warm.stats["placements"] == 0
    monkeypatch.setattr(BalancedDispatch, "_warm_up", lambda self: None)
    cold, _ = fake_controller("bfio", estimator="empirical-prompt", inline_refit=True)
    rng = np.random.default_rng(7)
    for step in range(1, 4):
        reps = [RankReport(dp_rank=g, step=step, received=0, free_slots=70, slot_limit=72,
                           run_kv=rng.integers(10, 3000, 3), run_generated=rng.integers(1, 9, 3),
                           run_cap=np.full(3, 2000), finished_lengths=rng.integers(1, 500, 4),
                           finished_prompts=rng.integers(10, 3000, 4)) for g in range(4)]
        for b in (warm, cold):
            b.on_reports(reps)
        for i in range(3):
            for b in (warm, cold):
                b.dispatch(_req(100 + 300 * i, max_new=400))
            assert sent[-1][0] == sent[-2][0]
    assert len({g for g, _ in sent}) > 1

    def broken(self, *a, **k):
        raise RuntimeError("no projection today")

    monkeypatch.setattr(BalancedDispatch, "_warm_up", real)
    monkeypatch.setattr(type(warm.policy), "assign", broken)
    with caplog.at_level(logging.WARNING, logger="sglang_ext.patches.controller"):
        fake_controller("bfio")  # starts all the same
    assert "warming up the bfio policy failed (no projection today)" in caplog.text


@pytest.mark.parametrize("binding", ["immediate", "pool"])
def test_requests_read_while_no_rank_is_active_wait_for_one_in_order(fake_controller, monkeypatch, binding):
    # Elastic EP can leave no active rank for a while: stock raises and loses the
    # request. Here requests and aborts wait, in order, and go on once a rank is back;
    # the message that brings it back is not held behind them.
    from sglang.srt.managers import io_struct
    from sglang.srt.managers.io_struct import AbortReq

    from sglang_ext.patches import controller

    class RanksBack:
        pass

    bal, sent = fake_controller("bfio", binding=binding, max_wait=0.0, estimator="empirical-prompt",
                                inline_refit=True)
    bal.on_reports([RankReport(dp_rank=g, step=1, received=0, free_slots=70, slot_limit=72) for g in range(4)])
    monkeypatch.setattr(controller, "_is_request", lambda msg: isinstance(msg, SimpleNamespace))
    msgs = deque()
    monkeypatch.setattr(io_struct, "sock_recv", lambda sock, flags=0: msgs.popleft() if msgs else (_ for _ in ()).throw(zmq.ZMQError()))

    def dispatcher(msg):
        if isinstance(msg, RanksBack):
            bal.ctrl._active_workers = [0, 1, 2, 3]
            sent.append(("ctl", msg))
        elif isinstance(msg, AbortReq):
            sent.append(("all", msg))
        else:
            bal.dispatch(msg)

    bal.ctrl.recv_from_tokenizer, bal.ctrl._request_dispatcher = None, dispatcher
    if binding == "pool":  # one request already pooled when the ranks go
        bal.dispatch(_req(70, rid="p"))
    bal.ctrl._active_workers = []
    msgs.extend([_req(300, rid="a"), AbortReq(rid="a"), _req(50, rid="b")])
    bal.read_requests()
    bal.release_pool()  # (pool: nothing to release to; waits without spinning)
    assert sent == [] and len(bal._held) == 3
    assert bal.poll_timeout_ms() == controller.IDLE_POLL_MS
    msgs.extend([_req(10, rid="c"), RanksBack(), _req(20, rid="d")])
    bal.read_requests()
    bal.release_pool()
    assert isinstance(sent[0][1], RanksBack) and not bal._held and not bal.pool
    order = [getattr(m, "rid", None) for _, m in sent[1:]]
    if binding == "pool":  # an aborted pooled request is placed before its abort goes on
        assert order[:2] == ["a", "a"] and sent[2][0] == "all"
        assert sorted(order[2:]) == ["b", "c", "d", "p"]
    else:
        assert order == ["a", "a", "b", "c", "d"] and sent[2][0] == "all"
    assert all(g in range(4) for g, _ in sent[1:] if g != "all")


# ---- faults on the live path: nothing lost, nothing sent twice ---------------------------------


def test_a_malformed_report_is_dropped_not_fatal(tmp_path, caplog):
    # One bad sender (a field of the wrong type, columns of different lengths) must not
    # take the controller's loop, and the server with it, down: its report is dropped.
    import pickle

    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/r")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"ipc://{tmp_path}/r")
    good = RankReport(dp_rank=1, step=3, received=2, free_slots=4, run_kv=np.array([5]), run_generated=np.array([1]),
                      run_cap=np.array([9]))
    bad = [RankReport(dp_rank=0, step=1, received=None, free_slots=1),
           RankReport(dp_rank=0, step=1, received=0, free_slots=1, run_kv=[5, 6]),
           RankReport(dp_rank=0, step=1, received=0, free_slots=1, run_kv=np.array([5, 6]),
                      run_generated=np.array([1]), run_cap=np.array([9, 9]))]
    for rep in bad + [good]:
        push.send(pickle.dumps(rep))
    got, deadline = [], time.monotonic() + 5
    with caplog.at_level("WARNING"):
        while len(got) < 1 and time.monotonic() < deadline:
            got += recv_reports(pull)
            time.sleep(0.01)
    push.close(linger=0)
    pull.close(linger=0)
    assert [(r.dp_rank, r.step) for r in got] == [(1, 3)]
    assert "field 'received' is None" in caplog.text and "'run_kv' is not a 1-D integer array" in caplog.text
    assert "have 2, 1, 2 entries" in caplog.text


def test_a_pooled_request_whose_send_fails_stays_pooled_and_goes_once(fake_controller, monkeypatch):
    from sglang_ext.patches import controller

    bal, sent = fake_controller("bfio", binding="pool", max_wait=0.0)
    broken = _break_sends(monkeypatch, {"p1"})
    for i in range(4):
        bal.dispatch(_req(10 + i, rid=f"p{i}"))
    bal.release_pool()
    assert sorted(r.rid for _, r in sent) == ["p0", "p2", "p3"] and [p.rid for p in bal.pool] == ["p1"]
    assert bal.poll_timeout_ms() == controller.IDLE_POLL_MS  # (no hot loop of failures: the retry is 5 s off)
    broken.clear()
    bal.release_pool()  # before the retry time: nothing tried
    assert [p.rid for p in bal.pool] == ["p1"]
    bal._retry_after = time.monotonic()  # the retry time has come
    bal.release_pool()
    assert sorted(r.rid for _, r in sent) == ["p0", "p1", "p2", "p3"] and not bal.pool


@pytest.mark.parametrize("bad", ["too_few", "past_G", "minus_one", "empty"])
def test_a_policy_answer_that_is_not_a_rank_per_request_falls_back(fake_controller, monkeypatch, bad):
    bal, sent = fake_controller("bfio")
    bal.ctrl._active_workers = [0, 1, 2]  # rank 3 down: -1 must not wrap around to it
    answers = {"too_few": lambda n: [0] * (n - 1), "past_G": lambda n: [9] * n, "minus_one": lambda n: [-1] * n,
               "empty": lambda n: []}
    monkeypatch.setattr(bal.policy, "assign", lambda view, cands, must_place: answers[bad](len(cands.prompt_len)))
    bal._arrivals = []
    for i in range(5):
        bal.dispatch(_req(100, rid=f"b{i}"))
    bal.place_arrivals()
    assert sorted(r.rid for _, r in sent) == [f"b{i}" for i in range(5)]
    assert all(g in (0, 1, 2) for g, _ in sent)
    pool, psent = fake_controller("bfio", binding="pool", max_wait=60.0)
    monkeypatch.setattr(pool.policy, "assign", lambda view, cands, must_place: answers[bad](len(cands.prompt_len)))
    for i in range(3):
        pool.dispatch(_req(100, rid=f"q{i}"))
    pool.release_pool()  # a bad answer to a pool call leaves them pooled for the deadline
    assert len(pool.pool) == 3 and not [r for _, r in psent if r.rid.startswith("q")]


def test_an_abort_sends_its_pooled_requests_where_it_will_be_read_after_them(fake_controller):
    # Under DP attention stock sends an abort to the first rank only: the pooled requests
    # it hits go there, ahead of it on the same socket. It matches rids by prefix, as
    # the scheduler does. Without DP attention (every rank gets the abort) the rule places them.
    from sglang.srt.managers.io_struct import AbortReq

    bal, sent = fake_controller("bfio", binding="pool", max_wait=60.0)
    bal.ctrl.control_message_step, bal.ctrl._active_workers = 4, [1, 2, 3]
    for rid in ("chat-1", "chat-2", "other"):
        bal.dispatch(_req(100, rid=rid))
    bal._place_aborted_from_pool(AbortReq(rid="chat-"))
    assert [(g, r.rid) for g, r in sent] == [(1, "chat-1"), (1, "chat-2")]
    assert [p.rid for p in bal.pool] == ["other"]
    bal.ctrl.control_message_step = 1
    bal._place_aborted_from_pool(AbortReq(abort_all=True))
    assert sent[-1][1].rid == "other" and sent[-1][0] in (1, 2, 3) and not bal.pool


def test_a_pooled_request_goes_out_as_the_bytes_stock_would_have_sent(fake_controller, monkeypatch):
    # Encoded while stock's dispatch call runs (its time_stats wrapped for the send: stock
    # puts the raw one back after the call), sent later: under msgpack IPC the rank
    # decodes the whole request, time stats included. Pooled as bytes, it holds nothing
    # the garbage collector walks but its own record.
    from sglang.srt.managers import io_struct
    from sglang.srt.managers.data_parallel_controller import DataParallelController
    from sglang.srt.observability.req_time_stats import DPControllerReqTimeStats
    from sglang.srt.sampling.sampling_params import SamplingParams

    monkeypatch.setattr(io_struct, "_USE_PICKLE_IPC", False)
    bal, sent = fake_controller("bfio", binding="pool", max_wait=0.0)
    req = io_struct.TokenizedGenerateReqInput(
        rid="t", input_text="", input_ids=array("q", range(50)), input_embeds=None, mm_inputs=None, token_type_ids=None,
        sampling_params=SamplingParams(max_new_tokens=7), return_logprob=False, logprob_start_len=-1,
        top_logprobs_num=0, token_ids_logprob=None, stream=True)
    bal.ctrl.dispatching, bal.ctrl.refresh_load_budget_on_dispatch = bal.dispatch, False
    DataParallelController.dispatching_with_trace(bal.ctrl, req)
    (pooled,) = bal.pool
    assert isinstance(req.time_stats, DPControllerReqTimeStats)  # (the raw one, back on the object)
    assert pooled.rid == "t" and pooled.row == (50, 7, False) and pooled.pin is None
    assert not any(gc.is_tracked(x) for x in (pooled.data, pooled.rid))
    bal.release_pool()
    ((g, got),) = sent
    assert g in range(4) and not bal.pool and got.rid == "t" and list(got.input_ids) == list(range(50))
    assert got.sampling_params.max_new_tokens == 7
    assert isinstance(io_struct.unwrap_from_pickle(got.time_stats), DPControllerReqTimeStats)


def test_a_pin_dropped_after_a_failed_send_is_dropped_from_the_bytes_sent(fake_controller, monkeypatch, caplog):
    # A pinned request whose send failed waits at the head of the pool; if its rank is
    # gone by the retry, the policy places it, and the request the rank reads carries no pin.
    bal, sent = fake_controller("total_tokens", binding="pool", max_wait=60.0)
    broken = _break_sends(monkeypatch, {"pin"})
    bal.dispatch(_req(10, rid="pin", pin=2))
    assert not sent and [(p.rid, p.pin) for p in bal.pool] == [("pin", 2)]
    broken.clear()
    bal.ctrl._active_workers = [0, 1, 3]
    bal._retry_after = 0.0
    with caplog.at_level(logging.WARNING):
        bal.release_pool()
    ((g, got),) = sent
    assert g in (0, 1, 3) and got.rid == "pin" and got.routed_dp_rank is None and not bal.pool
    assert any("pinned to DP rank 2, which is not active" in r.message for r in caplog.records)


@pytest.mark.parametrize("scenarios", [0, 3])
def test_requests_in_flight_go_in_front_of_the_reported_ones_as_a_concatenation_would(scenarios):
    # The reported requests sit at the end of buffers with room in front, where each view
    # writes its in-flight ones: the arrays a concatenation gives, without copying the
    # reported ones; more than the room holds, a concatenation.
    from sglang_ext.plugin.cluster_state import _Reported

    rng = np.random.default_rng(3)
    shape = (scenarios,) if scenarios else ()
    rep = _Reported(free=np.zeros(4, np.int64), kv=np.zeros(4, np.int64), num=np.zeros(4, np.int64),
                    pending=np.zeros(4, np.int64), slot_limit=None)
    reported = [rng.integers(0, 4, 50), rng.integers(1, 900, 50), rng.integers(1, 90, shape + (50,))]
    rep.set_requests(req_rank=reported[0], req_kv=reported[1])
    rep.set_requests(req_remaining=reported[2])
    for f in (5, 0, 2, rep.FRONT, rep.FRONT + 1, 7):
        ours = [rng.integers(0, 4, f), rng.integers(1, 900, f), rng.integers(1, 90, shape + (f,))]
        got = rep.with_in_flight(*ours)
        for g, a, x in zip(got, ours, reported):
            assert np.array_equal(g, np.concatenate([a, x], axis=-1))
        shares = all(np.shares_memory(g, x) for g, x in zip(got, (rep.req_rank, rep.req_kv, rep.req_remaining)))
        assert shares == (f <= rep.FRONT)
    assert all(np.array_equal(x, y) for x, y in zip((rep.req_rank, rep.req_kv, rep.req_remaining), reported))


def test_the_active_mask_follows_the_controllers_list(fake_controller):
    bal, _ = fake_controller("bfio")
    first = bal._active_mask()
    assert first.tolist() == [True] * 4 and bal._active_mask() is first and not first.flags.writeable
    bal.ctrl._active_workers = [0, 2]
    assert bal._active_mask().tolist() == [True, False, True, False]
    bal.ctrl._active_workers.append(3)  # (changed in place, as the stock controller does)
    assert bal._active_mask().tolist() == [True, False, True, True]


def test_standin_freezes_its_heap_at_sglang_freeze_gc(restore_gc):
    # The real scheduler freezes its process at SGLang's post-warm-up /freeze_gc (with the
    # thresholds it carries); the stand-in takes it the same way.
    from sglang.srt.managers.io_struct import FreezeGCReq

    from sglang_ext.plugin.standin import StandinScheduler

    gc = restore_gc
    rank = object.__new__(StandinScheduler)  # the message handling only: no sockets
    rank.dp_rank, rank.control_from_leader = 0, False
    gc.unfreeze()
    rank._handle(FreezeGCReq(gc_threshold=[999, 9, 9]))
    assert gc.get_freeze_count() > 100_000 and gc.get_threshold() == (999, 9, 9)
