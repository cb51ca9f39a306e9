#!/usr/bin/env python3
"""Live demo: the real SGLang server on the GPU-free stand-in backend, one policy after another.

For each policy (default round_robin, then bfio; `POLICY:key=value` adds
`--balancer-key value`, e.g. `bfio:estimator=empirical-prompt`) it starts

    <python> -m sglang.launch_server --model-path <tmp>/model --dp-size 4 --skip-tokenizer-init
        --device cpu --port P --balancer POLICY --balancer-sim-backend paper-dsv3
        --balancer-sim-time-scale X --balancer-log RUNDIR/telemetry --enable-metrics

in a temporary working directory (never the repository root), waits for
/health, replays the same slice of a timed trace (first --requests requests,
arrivals compressed so they span --arrival-span seconds; the replay also reads
the server's /metrics before and after, for one line of the barrier idle as
a dashboard would show it; and the CPU each of the server's processes used
meanwhile, in % of one core: what the balancer costs its DP controller), stops the server
(its whole process group) and removes what it left behind (its TMPDIR with the
IPC sockets, and the /dev/shm segments its processes held). Then it prints the
comparison table of `sglang-ext report` and the plot paths.

    .venv/bin/python scripts/demo_live.py [--requests 300] [--arrival-span 40] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sglang_ext.argtypes import LOG_LEVELS, nonneg_float, nonneg_int, output_dir, positive_float, positive_int  # noqa: E402
from sglang_ext.patches.controller import read_stats  # noqa: E402
from sglang_ext.plugin.ports import free_server_port  # noqa: E402
from sglang_ext.replay import ReplayConfig, replay, server_metrics_line  # noqa: E402
from sglang_ext.errors import UsageError  # noqa: E402
from sglang_ext.report import format_table, load_run, report, step_wall_clock  # noqa: E402

logger = logging.getLogger("demo_live")

#: the servers' controllers log their stats this often (seconds): the demo sums them up
STATS_INTERVAL_S = 1

DEFAULT_TRACES = (REPO / "data/traces/azure_conv_2023.csv", Path("/work/shared/traces/azure_conv_2023.csv"))

# A tiny Llama-shaped config: the stand-in never loads weights, but SGLang's
# launcher still parses the model config (context length, architecture).
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass
class DemoConfig:
    python: str
    trace: str
    out: Path
    policies: list[str]
    requests: int = 300
    arrival_span_s: float = 40.0
    time_scale: float | None = None  # None: derived from arrival_span_s
    sim_backend: str = "paper-dsv3"
    sim_time_scale: float = 1.0
    dp_size: int = 4
    max_prompt_len: int = 8192
    max_output_len: int | None = 512
    health_timeout_s: float = 300.0
    request_timeout_s: float = 120.0
    model_path: str | None = None
    server_args: list[str] | None = None
    max_new_tokens: int | None = None  # hide the lengths: replay --max-new-tokens


class _Refuse(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def balancer_flags(spec: str) -> list[str]:
    """'bfio:estimator=empirical-prompt' -> the server's --balancer flags, checked
    against the plugin's own flag parser (ValueError naming what is wrong)."""
    from sglang_ext.plugin.config import add_cli_args

    name, *params = spec.split(":")
    flags = ["--balancer", name]
    for param in params:
        key, eq, value = param.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"{spec!r}: {param!r} is not key=value")
        flags.append("--balancer-" + key.replace("_", "-"))
        if value != "true":  # key=true: a switch (e.g. full_wait=true)
            flags.append(value)
    parser = _Refuse(add_help=False)
    add_cli_args(None, parser)
    parser.parse_args(flags)
    return flags


def rundir_name(spec: str) -> str:
    return spec.replace(":", "_").replace("=", "-")  # no colon: SGLang refuses one in a model path


def default_python() -> str:
    venv = REPO / ".venv/bin/python"
    return str(venv) if venv.exists() else sys.executable


def default_trace() -> str:
    for p in DEFAULT_TRACES:
        if p.exists():
            return str(p)
    return str(DEFAULT_TRACES[0])


def shm_sglang() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("sglang", "sgl_shm"))}
    except FileNotFoundError:
        return set()


def group_pids(pgid: int) -> set[int]:
    """Live processes in process group `pgid` (the server and everything it spawned)."""
    pids = set()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ")".
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.add(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def cpu_seconds(pids) -> dict[int, tuple[str, float]]:
    """CPU time (user + system, seconds) each live process has used so far, with its
    title: SGLang names its processes (`sglang::data_parallel_controller`,
    `sglang::scheduler_DP0_TP0`, ...), the server's own process keeps its command
    line. Linux /proc; a process gone meanwhile is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            out[pid] = (title, (int(fields[11]) + int(fields[12])) / tick)  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return out


def _role(pid: int, title: str, server_pid: int) -> str:
    if pid == server_pid:
        return "server (HTTP, tokenizer)"
    if "data_parallel_controller" in title:
        return "DP controller"
    if "scheduler" in title:
        return "ranks"
    if "detokenizer" in title:
        return "detokenizer"
    return title.removeprefix("sglang::") if title.startswith("sglang::") else "other"


def cpu_line(policy: str, before: dict, after: dict, seconds: float, server_pid: int) -> str:
    """One line: each of the server's processes' CPU over `seconds` (between the two
    `cpu_seconds` snapshots) in % of one core, grouped by role (the ranks as a range;
    "other": untitled helpers such as multiprocessing's resource tracker)."""
    roles: dict[str, list[float]] = {}
    for pid, (title, used) in after.items():
        if pid in before and seconds > 0:
            roles.setdefault(_role(pid, title, server_pid), []).append(100 * (used - before[pid][1]) / seconds)
    parts = []
    for role in ("DP controller", "ranks", "server (HTTP, tokenizer)", "detokenizer", *sorted(roles)):
        vals = roles.pop(role, None)
        if vals is None:
            continue
        if len(vals) == 1:
            parts.append(f"{role} {vals[0]:.1f}")
        else:
            parts.append(f"{role} {min(vals):.1f}-{max(vals):.1f} ({len(vals)}, sum {sum(vals):.1f})")
    if not parts:
        return f"[{policy}] CPU over the replay: not measured (no /proc)"
    return f"[{policy}] CPU over the replay ({seconds:.0f} s), % of one core: " + "; ".join(parts)


def step_line(policy: str, rundir: Path) -> str:
    """One line from the ranks' telemetry in `rundir` (`report.step_wall_clock`): decode
    steps with requests, and their median wall-clock length against the median barrier
    step of the stand-in's cost model. On a shared CPU host the difference is the CPU
    work of the ranks, the controller and the server around the modelled step: what a
    policy's controller costs shows up there, not in the model."""
    try:
        steps = step_wall_clock(load_run(rundir).telemetry)
    except UsageError:
        steps = None
    if steps is None:
        return f"[{policy}] decode steps: no telemetry"
    n, wall, cost = steps[0], steps[1] * 1e3, steps[2] * 1e3
    return (f"[{policy}] decode steps with requests: {n}, wall-clock p50 {wall:.2f} ms against the cost "
            f"model's {cost:.2f} ms ({wall - cost:.2f} ms a step of host CPU: ranks, controller and server share "
            f"{os.cpu_count()} cores)")


def shm_used_by(pids: set[int]) -> set[str]:
    """/dev/shm files that these processes hold open or mapped: exactly the server's
    own segments, so that a cleanup never touches another server's (tests running
    beside the demo create theirs at the same time)."""
    found = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    found.add(target.split(" (deleted)")[0])
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                i = line.find("/dev/shm/")
                if i >= 0:
                    found.add(line[i:].split(" (deleted)")[0])
        except OSError:
            pass
    return found


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class Server:
    """One SGLang server in its own process group, working dir and TMPDIR."""

    def __init__(self, cfg: DemoConfig, policy: str, rundir: Path):
        self.cfg, self.policy, self.rundir = cfg, policy, rundir
        self.port = free_server_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix=f"sglang-demo-{rundir_name(policy)}-"))
        self.log = rundir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.shm_before: set[str] = set()

    def command(self) -> list[str]:
        model = self.cfg.model_path
        if model is None:
            model_dir = self.work / "model"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(TINY_CONFIG, indent=1))
            model = str(model_dir)
        return [
            self.cfg.python, "-m", "sglang.launch_server",
            "--model-path", model, "--dp-size", str(self.cfg.dp_size), "--skip-tokenizer-init",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
            *balancer_flags(self.policy), "--balancer-sim-backend", self.cfg.sim_backend,
            "--balancer-sim-time-scale", str(self.cfg.sim_time_scale),
            "--balancer-log", str(self.rundir / "telemetry"),
            "--balancer-stats-interval", str(STATS_INTERVAL_S), "--enable-metrics",
            *(self.cfg.server_args or []),
        ]

    def start(self) -> None:
        cmd = self.command()
        tmp = self.work / "tmp"
        tmp.mkdir()
        # Own TMPDIR: SGLang's IPC sockets land there, so cleanup is one rmtree.
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
        self.shm_before = shm_sglang()
        self.rundir.mkdir(parents=True, exist_ok=True)
        (self.rundir / "server_cmd.txt").write_text(shlex.join(cmd) + "\n")
        logger.info("starting %s", shlex.join(cmd))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.cfg.health_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server ({self.policy}) exited with {self.proc.returncode} before becoming "
                                   f"healthy; last lines of {self.log}:\n{log_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"server ({self.policy}) not healthy after {self.cfg.health_timeout_s:.0f} s; "
                           f"last lines of {self.log}:\n{log_tail(self.log)}")

    def stop(self) -> None:
        owned: set[str] = set()
        pids: set[int] = set()
        if self.proc is not None and self.proc.poll() is None:
            pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
            pids = group_pids(pgid)
            owned = shm_used_by(pids)
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                logger.warning("server did not stop on SIGTERM; SIGKILL to its process group")
            except ProcessLookupError:
                pass
            try:  # stragglers (spawned schedulers) that outlived the leader
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.error("server process %d did not exit", self.proc.pid)
        # Only what this server created: segments its processes held, plus new
        # pid-stamped ones (sgl_shm_<kind>_<pid>_<rand>) of its pids. Other
        # servers' /dev/shm files stay, even if they appeared meanwhile.
        for name in shm_sglang() - self.shm_before:
            parts = name.split("_")
            stamped = name.startswith("sgl_shm_") and len(parts) >= 4 and parts[-2].isdigit() and int(parts[-2]) in pids
            if stamped:
                owned.add(f"/dev/shm/{name}")
        for path in owned:
            if path.startswith("/dev/shm/") and os.path.basename(path).startswith(("sglang", "sgl_shm")):
                try:
                    os.remove(path)
                    logger.info("removed %s", path)
                except OSError:
                    pass
        shutil.rmtree(self.work, ignore_errors=True)  # its TMPDIR: the IPC socket files


def controller_summary(policy: str, stats: list[dict]) -> str:
    """One line from a server's controller stats lines (`read_stats`)."""
    if not stats:
        return f"[{policy}] controller: no stats line in the server log"
    total = {k: sum(x[k] or 0 for x in stats) for k in ("placed", "calls", "lagged", "reports", "prepared", "paused")}
    line = (f"[{policy}] controller: {total['placed']} requests placed in {total['calls']} placement calls "
            f"({total['lagged']} on the previous estimate); "
            f"{total['reports']} rank reports, estimated {total['prepared']} times while idle "
            f"({total['paused']} paused for a message)")
    timed = [x for x in stats if x["p50_ms"] is not None]
    if timed:
        line += (f"; decision time p50 {min(x['p50_ms'] for x in timed):.2f}-{max(x['p50_ms'] for x in timed):.2f} ms "
                 f"over {len(timed)} windows of {STATS_INTERVAL_S} s, p99 up to {max(x['p99_ms'] for x in timed):.2f} "
                 f"ms, max {max(x['max_ms'] for x in timed):.2f} ms")
    return line


def run_policy(cfg: DemoConfig, policy: str, time_scale: float) -> Path:
    rundir = cfg.out / rundir_name(policy)
    if rundir.exists():
        shutil.rmtree(rundir)  # stale telemetry would be appended to
    server = Server(cfg, policy, rundir)
    try:
        server.start()
        took = server.wait_healthy()
        print(f"[{policy}] server healthy after {took:.0f} s at {server.url}", flush=True)
        group = group_pids(server.proc.pid)  # (start_new_session: the group id is the leader's pid)
        cpu_before, t0 = cpu_seconds(group), time.monotonic()
        summary = replay(ReplayConfig(
            url=server.url, trace=cfg.trace, out=str(rundir), time_scale=time_scale,
            max_requests=cfg.requests, max_prompt_len=cfg.max_prompt_len, max_output_len=cfg.max_output_len,
            max_new_tokens=cfg.max_new_tokens, retries=2, timeout=cfg.request_timeout_s, rid_prefix=f"demo-{policy}",
        ))
        print(f"[{policy}] ok {summary['ok']}/{summary['sent']}, failed {summary['failed']} "
              f"{summary['failure_reasons'] or ''}, wall {summary['wall_time_s']:.1f} s", flush=True)
        print(f"[{policy}] {server_metrics_line(summary['server_metrics']) or 'no server /metrics'}", flush=True)
        print(cpu_line(policy, cpu_before, cpu_seconds(group), time.monotonic() - t0, server.proc.pid), flush=True)
        time.sleep(1.5)  # let the ranks flush their telemetry and the controller its stats (1 s) before stopping
    finally:
        server.stop()
    if server.log.exists():
        print(controller_summary(policy, read_stats(server.log.read_text(errors="replace"))), flush=True)
    print(step_line(policy, rundir), flush=True)
    return rundir


def parse_args(argv=None) -> DemoConfig:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--python", default=default_python(), help="interpreter with SGLang and sglang-ext installed")
    ap.add_argument("--trace", default=default_trace(), help="timed trace to replay")
    ap.add_argument("--requests", type=positive_int, default=300, help="replay the first N requests of the trace")
    ap.add_argument("--arrival-span", type=positive_float, default=40.0,
                    help="scale arrival times so the slice's arrivals span this many seconds")
    ap.add_argument("--time-scale", type=nonneg_float, default=None,
                    help="multiply arrival times by this instead (overrides --arrival-span)")
    ap.add_argument("--policies", default="round_robin,bfio",
                    help="comma-separated --balancer policies, in order; POLICY:key=value also passes "
                         "--balancer-key value (e.g. bfio:estimator=empirical-prompt)")
    ap.add_argument("--dp-size", type=positive_int, default=4, help="DP ranks of the server")
    ap.add_argument("--sim-backend", default="paper-dsv3", help="stand-in cost preset (--balancer-sim-backend)")
    ap.add_argument("--sim-time-scale", type=positive_float, default=1.0,
                    help="stand-in step-time multiplier (--balancer-sim-time-scale); smaller runs faster")
    ap.add_argument("--max-prompt-len", type=positive_int, default=8192, help="clip prompts to this many tokens")
    ap.add_argument("--max-output-len", type=nonneg_int, default=512,
                    help="clip outputs to this many tokens (bounds the run's tail); 0 = no clipping")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None,
                    help="hide the output lengths from the server: every request asks for up to this many tokens "
                         "and the stand-in model ends it with EOS at its recorded length (replay --max-new-tokens)")
    ap.add_argument("--health-timeout", type=positive_float, default=300.0, help="seconds to wait for /health")
    ap.add_argument("--request-timeout", type=positive_float, default=120.0,
                    help="replay: longest silence between stream chunks before a retry")
    ap.add_argument("--model-path", default=None, help="model directory (default: a temp dir with a tiny config.json)")
    ap.add_argument("--server-args", default="", help="extra server flags, one shell-quoted string")
    ap.add_argument("--out", type=output_dir, default=None, help="output directory (default runs/demo-<time>)")
    ap.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
                    help="Logging level.")
    a = ap.parse_args(argv)
    policies = [p for p in a.policies.split(",") if p]
    if not policies:
        ap.error("--policies: give at least one policy")
    for spec in policies:
        try:
            balancer_flags(spec)
        except ValueError as exc:
            ap.error(f"--policies {spec}: {exc}")
    if len({rundir_name(p) for p in policies}) != len(policies):
        ap.error("--policies: each policy at most once")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(a.out or REPO / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    try:
        server_args = shlex.split(a.server_args)
    except ValueError as exc:
        ap.error(f"--server-args: {exc}")
    return DemoConfig(
        python=a.python, trace=a.trace, out=out, policies=policies,
        requests=a.requests, arrival_span_s=a.arrival_span, time_scale=a.time_scale, sim_backend=a.sim_backend,
        sim_time_scale=a.sim_time_scale, dp_size=a.dp_size, max_prompt_len=a.max_prompt_len,
        max_output_len=a.max_output_len or None, health_timeout_s=a.health_timeout,
        request_timeout_s=a.request_timeout, model_path=a.model_path, server_args=server_args,
        max_new_tokens=a.max_new_tokens,
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if not Path(cfg.trace).exists():
        print(f"demo_live: error: trace {cfg.trace} not found (--trace)", file=sys.stderr)
        return 2
    from sglang_ext.traces import load_trace

    try:  # (a bad trace is one line naming file, line and field, before any server starts)
        trace = load_trace(cfg.trace).head(cfg.requests)
    except (ValueError, OSError) as exc:
        print(f"demo_live: error: --trace: {exc}", file=sys.stderr)
        return 2
    span = float(trace.arrival_s[-1]) if trace.arrival_s is not None else 0.0
    scale = cfg.time_scale if cfg.time_scale is not None else (cfg.arrival_span_s / span if span > 0 else 0.0)
    print(f"trace {cfg.trace}: {len(trace)} requests over {span:.0f} s recorded; time scale {scale:.3f} "
          f"-> arrivals over {span * scale:.0f} s; outputs clipped to {cfg.max_output_len}", flush=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    rundirs = []
    for policy in cfg.policies:
        try:
            rundirs.append(run_policy(cfg, policy, scale))
        except RuntimeError as exc:
            print(f"demo_live: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    metrics, plots = report([str(d) for d in rundirs], out=str(cfg.out / "compare"),
                            json_out=str(cfg.out / "metrics.json"))
    print()
    print(format_table(metrics))
    for p in plots:
        print(f"plot: {p}")
    print(f"metrics: {cfg.out / 'metrics.json'}; server logs: {', '.join(str(d / 'server.log') for d in rundirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
