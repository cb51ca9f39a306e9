"""scripts/demo_live.py without SGLang: the server command line and the cleanup after a stop."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_live", REPO / "scripts" / "demo_live.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_live"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_command_line(demo, tmp_path):
    cfg = demo.parse_args(["--out", str(tmp_path / "o"), "--server-args", "--balancer-horizon 10"])
    srv = demo.Server(cfg, "bfio", tmp_path / "o" / "bfio")
    try:
        cmd = srv.command()
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        flags = dict(zip(cmd[3::1], cmd[4::1]))
        assert flags["--dp-size"] == "4" and flags["--device"] == "cpu" and flags["--balancer"] == "bfio"
        assert flags["--balancer-sim-backend"] == "paper-dsv3"
        assert flags["--balancer-log"] == str(tmp_path / "o" / "bfio" / "telemetry")
        assert flags["--balancer-stats-interval"] == str(demo.STATS_INTERVAL_S)
        assert "--skip-tokenizer-init" in cmd and cmd[-2:] == ["--balancer-horizon", "10"]
        assert "--enable-metrics" in cmd
        model = Path(flags["--model-path"])
        assert (model / "config.json").exists() and REPO not in model.parents
        assert REPO not in srv.work.parents and srv.work != REPO  # never the repository root
    finally:
        srv.stop()
    assert not srv.work.exists()


def test_controller_summary_sums_the_stats_lines(demo):
    from sglang_ext.patches.controller import read_stats

    log = "\n".join([
        "INFO something else",
        "sglang-ext balancer, last 1 s: requests placed 7 (pinned 0, at the pool deadline 0), pooled now 0; "
        "reports 40 (estimated while idle 9, paused for a message 2); placement calls 7 (on the previous estimate 3), decision time p50 "
        "0.40 ms, p99 1.20 ms, max 1.30 ms",
        "sglang-ext balancer, last 1 s: requests placed 2 (pinned 2, at the pool deadline 0), pooled now 0; "
        "reports 38 (estimated while idle 10); placement calls 0 (on the previous estimate 0)",
        "sglang-ext balancer, last 1 s: requests placed 5 (pinned 0, at the pool deadline 1), pooled now 2; "
        "reports 41 (estimated while idle 8); placement calls 5, decision time p50 0.55 ms, p99 2.50 ms, max 2.70 ms",
    ])
    assert demo.controller_summary("bfio", read_stats(log)) == (
        "[bfio] controller: 14 requests placed in 12 placement calls (3 on the previous estimate); 119 rank "
        "reports, estimated 27 times "
        "while idle (2 paused for a message); decision time p50 0.40-0.55 ms over 2 windows of 1 s, p99 up to 2.50 ms, max 2.70 ms")
    assert demo.controller_summary("rr", []) == "[rr] controller: no stats line in the server log"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_stop_kills_group_and_cleans_up(demo, tmp_path):
    cfg = demo.parse_args(["--out", str(tmp_path / "o")])
    srv = demo.Server(cfg, "round_robin", tmp_path / "o" / "rr")
    srv.shm_before = demo.shm_sglang()
    ours = Path(f"/dev/shm/sglang_loads_test_ours_{os.getpid()}.shm")
    other = Path(f"/dev/shm/sglang_loads_test_other_{os.getpid()}.shm")
    # A leader with a child in the same new session (like the server and its
    # schedulers); the child holds `ours` open, as a scheduler holds its segment.
    child = f"import time; f = open({str(ours)!r}, 'wb'); f.write(b'x'); f.flush(); time.sleep(60)"
    srv.proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                 f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"],
                                start_new_session=True)
    other.write_bytes(b"x")  # another server's segment, created meanwhile
    try:
        for _ in range(100):
            if ours.exists() and ours.stat().st_size:
                break
            time.sleep(0.05)
        srv.stop()
        assert srv.proc.poll() is not None
        assert not ours.exists()
        assert other.exists()
    finally:
        for f in (ours, other):
            f.unlink(missing_ok=True)
    # Nobody left running in the group (killed children may linger as zombies
    # until the container's init reaps them).
    for _ in range(40):
        states = [Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for p in demo.group_pids(srv.proc.pid) if Path(f"/proc/{p}/stat").exists()]
        if all(st == "Z" for st in states):
            break
        time.sleep(0.05)
    assert all(st == "Z" for st in states), states


@pytest.mark.parametrize("args, needle", [
    (["--trace", "BADTRACE"], "BADTRACE:1: missing column(s)"),
    (["--server-args", "--foo 'bar"], "--server-args: No closing quotation"),
    (["--log-level", "bogus"], "--log-level: invalid choice"),
])
def test_bad_input_exits_2_naming_it_before_any_server(tmp_path, args, needle):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    args = [str(bad) if x == "BADTRACE" else x for x in args]
    needle = needle.replace("BADTRACE", str(bad))
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_live.py"), "--out", str(tmp_path / "o"), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_cpu_seconds_reads_a_process_cpu_time(demo):
    me = os.getpid()
    before = demo.cpu_seconds({me, 2**22 + 7})  # (a pid that does not exist is left out)
    assert set(before) == {me}
    assert Path(before[me][0]).name.startswith("python")  # the title: this process's argv[0]
    t = time.process_time()
    while time.process_time() - t < 0.3:  # burn 0.3 s of CPU
        pass
    used = demo.cpu_seconds({me})[me][1] - before[me][1]
    assert 0.2 <= used <= 5.0


def test_cpu_line_groups_the_servers_processes_by_role(demo):
    before = {1: ("python", 10.0), 2: ("sglang::data_parallel_controller", 5.0),
              3: ("sglang::standin_scheduler_DP0_TP0", 1.0), 4: ("sglang::standin_scheduler_DP1_TP0", 1.0),
              5: ("sglang::detokenizer", 0.5)}
    after = {1: ("python", 12.0), 2: ("sglang::data_parallel_controller", 6.0),
             3: ("sglang::standin_scheduler_DP0_TP0", 1.5), 4: ("sglang::standin_scheduler_DP1_TP0", 2.0),
             5: ("sglang::detokenizer", 0.5), 6: ("sglang::late", 3.0)}  # (6 was not there before: left out)
    before[7] = after[7] = ("/usr/bin/python3", 0.1)  # an untitled helper (multiprocessing's resource tracker)
    assert demo.cpu_line("bfio", before, after, 10.0, server_pid=1) == (
        "[bfio] CPU over the replay (10 s), % of one core: DP controller 10.0; ranks 5.0-10.0 (2, sum 15.0); "
        "server (HTTP, tokenizer) 20.0; detokenizer 0.0; other 0.0")
    assert demo.cpu_line("rr", {}, {}, 10.0, server_pid=1) == "[rr] CPU over the replay: not measured (no /proc)"


def test_step_line_compares_wall_clock_steps_with_the_cost_model(demo, tmp_path):
    import json

    tel = tmp_path / "telemetry"
    tel.mkdir()
    # Two ranks; steps 1-4 with requests end 10 ms apart on the latest rank (rank 1
    # 1 ms behind rank 0), the model's step is 6 ms; step 5 is idle (no requests) and
    # step 8 follows a gap (6, 7 missing): neither counts.
    def line(step, wall_time, batch_size, g):  # (a telemetry line, as the ranks write it)
        return dict(step=step, wall_time=wall_time, dp_rank=g, batch_size=batch_size, kv_tokens=10 * batch_size,
                    predicted_cost_s=0.005, step_time_s=0.006, idle_s=0.001, idle_source="predicted", busy_s=0.005,
                    energy_j=1.0, energy_source="model:h100", power_w=380.0, source="standin")

    for g in range(2):
        rows = [line(k, 100.0 + 0.010 * k + 0.001 * g, 1, g) for k in range(1, 5)]
        rows += [line(5, 100.5, 0, g), line(8, 103.0, 1, g)]
        (tel / f"rank{g}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot js")  # (a torn last line)
    line = demo.step_line("bfio", tmp_path)
    assert line.startswith("[bfio] decode steps with requests: 3, wall-clock p50 10.00 ms against the cost "
                           "model's 6.00 ms (4.00 ms a step of host CPU")
    assert demo.step_line("rr", tmp_path / "none") == "[rr] decode steps: no telemetry"
