"""The plugin's command-line flags and the config they resolve to.

Flags are added to SGLang's own parser (AFTER hook on `ServerArgs.add_cli_args`)
and read back after parsing (AFTER hook on `ServerArgs.from_cli_args`). The
result is a `BalancerConfig` stored as `server_args._balancer`: ServerArgs is a
msgspec Struct whose declared fields are validated and published, so only an
underscore attribute can be added, and it survives the pickling into SGLang's
spawned controller and scheduler processes.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass

from ..argtypes import horizon_steps, nonneg_float, nonneg_int, output_dir, positive_float, positive_int
from .ports import free_rendezvous_port

logger = logging.getLogger(__name__)

#: the policies offered on the command line (fcfs and jsq are simulation baselines)
BALANCER_CHOICES = ("round_robin", "total_requests", "total_tokens", "power_of_two", "bfio")
BINDINGS = ("immediate", "pool")
DEVICES = ("auto", "cpu", "cuda")
ESTIMATORS = ("cap", "empirical", "empirical-prompt")
#: offset from --dist-init-addr's port for the report socket on multi-node runs;
#: SGLang uses +1..+6+dp (ZMQ ports), +13 (DP-attention handshake) and +233.
REPORT_PORT_DELTA = 197


@dataclass
class BalancerConfig:
    """Everything the controller, scheduler patch and stand-in need; pickled with ServerArgs."""

    policy: str | None = None  # None: SGLang's own dispatch, the plugin stays out
    horizon: int = 20
    prefill_weight: float = 0.0  # bfio: cost of prefilling a prompt token / one KV token of decode
    scenarios: int = 0  # bfio: remaining lengths as this many equally likely scenarios (0: point guesses)
    full_wait: bool = False  # bfio: with every rank full, place where a slot frees first
    variant: str = "default"  # bfio: "paper" runs the paper's own heuristic, for comparison
    pool_tail: float = 0.002  # bfio, pool binding: weight of the long lookahead (policies.bfio.ONLINE_POOL_TAIL)
    pool_tail_horizon: int = 2000  # bfio, pool binding: steps the long lookahead covers (a request's whole life)
    binding: str = "immediate"
    pool_max_wait_s: float = 0.5
    view_lag: int = 1  # immediate placements may use an estimate this many reports per rank old
    device: str = "auto"
    estimator: str = "empirical-prompt"
    inline_refit: bool = False  # refit the learned estimator in the dispatch loop (else in a worker thread)
    cpu_threads: int = 1  # torch intra-op threads of the controller's CPU projection (0: torch's default)
    stats_interval_s: float = 60.0  # the controller logs its counters and decision times this often (0: never)
    log_dir: str | None = None
    metrics: bool = False  # SGLang's --enable-metrics: the balancer's counters on /metrics too
    report_addr: str | None = None  # PULL socket the controller binds, ranks PUSH to
    seed: int = 0
    sim_backend: str | None = None  # cost preset name: run the GPU-free stand-in scheduler
    sim_time_scale: float = 1.0
    sim_max_running: int = 72
    sim_dist_port: int | None = None  # gloo rendezvous port of the stand-in ranks
    launcher_pid: int | None = None  # names the ledger of ipc files removed at exit

    @property
    def enabled(self) -> bool:
        return self.policy is not None

    @property
    def reporting(self) -> bool:
        """Ranks report per step when the controller consumes it."""
        return self.enabled and self.report_addr is not None


def get_config(server_args) -> BalancerConfig | None:
    return getattr(server_args, "_balancer", None)


def _policy_choices() -> tuple[str, ...]:
    from sglang_ext.policies import policy_names

    registered = set(policy_names())
    return tuple(n for n in BALANCER_CHOICES if n in registered)


def _cost_presets() -> tuple[str, ...]:
    from sglang_ext.cost import PRESETS

    return tuple(PRESETS)


def add_cli_args(result, parser: argparse.ArgumentParser):
    """AFTER hook on ServerArgs.add_cli_args(parser): add the --balancer-* flags."""
    group = parser.add_argument_group("Barrier-aware DP load balancing (sglang-ext)")
    group.add_argument(
        "--balancer",
        type=str,
        default=None,
        choices=_policy_choices(),
        help="Dispatch requests to DP ranks with this sglang-ext policy instead of "
        "--load-balance-method. bfio balances the projected KV load over the next "
        "--balancer-horizon steps. Needs --dp-size > 1. Without it the plugin changes nothing.",
    )
    group.add_argument(
        "--balancer-horizon",
        metavar="H",
        type=horizon_steps,
        default=None,
        help="Number of future decode steps the bfio policy projects for a pool decision; an arriving "
        "request is weighed over its whole stay with these steps weighed more (default: 20; 0 = myopic).",
    )
    group.add_argument(
        "--balancer-prefill-weight",
        metavar="W",
        type=nonneg_float,
        default=None,
        help="bfio: cost of prefilling one prompt token relative to one KV token of a decode "
        "step (about 8 for DeepSeek-V3 on H100). The next step then carries each rank's "
        "prompts waiting for prefill, so bursts of long prompts are spread across ranks "
        "(default: 0 = decode load only). Where prefill is expensive, about a hundredth of the "
        "prefill-to-decode cost ratio measured best (16 for Llama-3-8B on A100).",
    )
    group.add_argument(
        "--balancer-scenarios",
        metavar="K",
        type=nonneg_int,
        default=None,
        help="bfio with --balancer-estimator empirical: take each request's remaining decode "
        "steps as K equally likely scenarios (quantiles of the residual life of finished "
        "requests) and project the expected load instead of the load under one guess "
        "(default: 0 = one guess; 8 is a good value).",
    )
    group.add_argument(
        "--balancer-variant",
        type=str,
        default=None,
        choices=("default", "paper"),
        help="bfio: 'paper' places with the paper's own BF-IO heuristic (its projection without "
        "KV growth, its greedy and subset-sum phases), for comparison with this package's "
        "(default: default).",
    )
    group.add_argument(
        "--balancer-full-wait",
        action="store_true",
        default=None,
        help="bfio, immediate binding: a request that arrives while every rank is full goes "
        "to the rank whose next slot frees first (predicted from its requests' remaining "
        "steps), which cuts time-to-first-token under bursts (default: off).",
    )
    group.add_argument(
        "--balancer-pool-tail",
        metavar="W",
        type=nonneg_float,
        default=None,
        help="bfio, pool binding: weight of the long lookahead (over a request's whole life, "
        "see --balancer-pool-tail-horizon) added to the pool's 20-step one, so a rank whose "
        "requests leave soon is refilled with long requests before it runs empty "
        "(default: 0.002; 0 = the pool horizon alone).",
    )
    group.add_argument(
        "--balancer-pool-tail-horizon",
        metavar="STEPS",
        type=positive_int,
        default=None,
        help="bfio, pool binding: decode steps the long lookahead covers, evenly weighted and "
        "evaluated at 16 steps past the pool horizon; set it to about the longest output the "
        "server generates (default: 2000).",
    )
    group.add_argument(
        "--balancer-binding",
        type=str,
        default=None,
        choices=BINDINGS,
        help="immediate: bind each request to a rank on arrival (SGLang's behaviour). "
        "pool: hold requests in the controller and release them as ranks report free "
        "slots, so the policy chooses among several (default: immediate).",
    )
    group.add_argument(
        "--balancer-pool-max-wait",
        metavar="SECONDS",
        type=positive_float,
        default=None,
        help="In pool binding, the longest a request may wait in the controller (seconds) "
        "before it is placed by the immediate rule (default: 0.5).",
    )
    group.add_argument(
        "--balancer-view-lag",
        metavar="REPORTS",
        type=nonneg_int,
        default=None,
        help="A request placed on arrival after new rank reports, before the controller has "
        "estimated them (it does so while idle; about 6 ms at 256 DP ranks with 64k requests "
        "running), is placed on the previous estimate plus every request sent since, as long as "
        "no rank has reported more than this many times since it; with DP attention one report "
        "is one decode step. 0 = always estimate the newest reports first (default: 1). Pool "
        "releases always read the newest.",
    )
    group.add_argument(
        "--balancer-device",
        type=str,
        default=None,
        choices=DEVICES,
        help="Where the policy's load-projection kernel runs: auto picks cuda from 256 DP ranks when "
        "available in the controller process (below that the CPU path was measured faster), else cpu (default: auto).",
    )
    group.add_argument(
        "--balancer-estimator",
        type=str,
        default=None,
        choices=ESTIMATORS,
        help="Output-length estimate used for projection: cap = max_new_tokens; "
        "empirical = residual life from the lengths of finished and running requests; "
        "empirical-prompt = the same, learned per prompt-length bucket (default: empirical-prompt). "
        "Whatever the estimate, a request under ignore_eos runs exactly to its max_new_tokens and is "
        "projected so; only answers that end by themselves teach the learned estimates.",
    )
    group.add_argument(
        "--balancer-inline-refit",
        action="store_true",
        default=None,
        help="Always refit the learned length estimate (empirical, empirical-prompt) inside the "
        "controller's dispatch loop, so the same requests and reports always give the same placements; "
        "the loop then stalls for each refit (tens of ms with answers tens of thousands of tokens long). "
        "Default: once a refit is large (answers several thousand tokens long), refit in a worker "
        "thread and estimate from the previous fit meanwhile.",
    )
    group.add_argument(
        "--balancer-cpu-threads",
        metavar="THREADS",
        type=nonneg_int,
        default=None,
        help="Threads torch may use for the DP controller's projection on the CPU (process-wide "
        "in the controller; default: 1). A parallel op waits for its slowest thread, so with "
        "another process on one of its cores a projection of 64k requests took 143 ms at p99 "
        "instead of 5.7 (2 threads against 1 on a 2-core host; scripts/bench_projection.py "
        "--contention). 0 = torch's default (one per core).",
    )
    group.add_argument(
        "--balancer-stats-interval",
        metavar="SECONDS",
        type=nonneg_float,
        default=None,
        help="Every this many seconds while it places requests, the DP controller logs one line: "
        "requests placed (pinned, placed at the pool deadline), reports read, how often it "
        "estimated them while idle, and its decision time per placement call (p50, p99, max) "
        "(default: 60; 0 = never).",
    )
    group.add_argument(
        "--balancer-log",
        type=output_dir,
        default=None,
        metavar="DIR",
        help="Write per-step telemetry of every DP rank (step time, KV tokens, barrier idle) under DIR.",
    )
    group.add_argument(
        "--balancer-report-addr",
        metavar="ADDR",
        type=report_address,
        default=None,
        help="ZMQ address the controller binds for the per-step rank reports (tcp://host:port "
        "or ipc://path). Default: an ipc path in TMPDIR on one node; with --nnodes > 1, "
        f"tcp on --dist-init-addr's host at its port + {REPORT_PORT_DELTA}.",
    )
    group.add_argument(
        "--balancer-seed",
        metavar="SEED",
        type=nonneg_int,
        default=None,
        help="Seed of randomized policies such as power_of_two (default: 0).",
    )
    group.add_argument(
        "--balancer-sim-backend",
        type=str,
        default=None,
        choices=_cost_presets(),
        help="Replace the model scheduler by a GPU-free stand-in whose step times come from "
        "this cost preset. It speaks SGLang's real scheduler protocol and synchronises the "
        "DP ranks every step through a gloo all-reduce. Use with --device cpu "
        "--skip-tokenizer-init and a model directory holding only config.json.",
    )
    group.add_argument(
        "--balancer-sim-time-scale",
        metavar="X",
        type=positive_float,
        default=None,
        help="Multiply the stand-in's simulated step times by this factor when sleeping "
        "(default: 1.0; smaller runs faster).",
    )


def report_address(text: str) -> str:
    """argparse type for --balancer-report-addr: tcp://HOST:PORT or ipc://PATH, checked
    here rather than when the controller binds it inside a subprocess."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "ipc" and rest:
        return text
    if sep and scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return text
    raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT or ipc://PATH, got {text!r}")


class FlagError(SystemExit):
    """A combination of flags that cannot run: exit status 2 (argparse's), the
    message already on stderr; str() is the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _flag_error(message: str) -> FlagError:
    # (raised after parsing, in the ServerArgs hook: no parser at hand to call .error())
    print(f"error: {message}", file=sys.stderr)
    return FlagError(message)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _default_report_addr(args: argparse.Namespace) -> str:
    nnodes = getattr(args, "nnodes", 1) or 1
    dist = getattr(args, "dist_init_addr", None)
    if nnodes > 1:
        if not dist:
            raise _flag_error("--balancer with --nnodes > 1 needs --dist-init-addr or --balancer-report-addr")
        host, _, port = dist.rpartition(":")
        if not host or not port.isdigit():
            raise _flag_error(f"--dist-init-addr {dist!r}: expected HOST:PORT (the balancer's reports go to "
                              f"PORT + {REPORT_PORT_DELTA}; or give --balancer-report-addr)")
        if int(port) + REPORT_PORT_DELTA > 65535:
            raise _flag_error(f"--dist-init-addr {dist!r}: the balancer's reports would go to port "
                              f"{int(port) + REPORT_PORT_DELTA} (PORT + {REPORT_PORT_DELTA}), past 65535; take a "
                              "lower PORT or give --balancer-report-addr")
        host = host.strip("[]")
        if ":" in host:  # IPv6: ZMQ wants it bracketed
            host = f"[{host}]"
        return f"tcp://{host}:{int(port) + REPORT_PORT_DELTA}"
    # Same directory as SGLang's own IPC files, so one TMPDIR cleanup covers both.
    return f"ipc://{tempfile.gettempdir()}/sglang_ext_balancer_{uuid.uuid4().hex[:12]}"


def from_cli_args(result, cls, args: argparse.Namespace):
    """AFTER hook on ServerArgs.from_cli_args(args): attach the BalancerConfig."""
    server_args = result
    policy = getattr(args, "balancer", None)
    sim = getattr(args, "balancer_sim_backend", None)
    if policy is None:
        needing = [
            f"--{k.replace('_', '-')}"
            for k in ("balancer_horizon", "balancer_prefill_weight", "balancer_scenarios", "balancer_full_wait",
                      "balancer_variant",
                      "balancer_pool_tail", "balancer_pool_tail_horizon", "balancer_binding", "balancer_pool_max_wait", "balancer_view_lag",
                      "balancer_device", "balancer_estimator", "balancer_inline_refit", "balancer_cpu_threads",
                      "balancer_report_addr",
                      "balancer_seed", "balancer_stats_interval")
            if getattr(args, k, None) is not None
        ]
        if needing:
            raise _flag_error(f"{', '.join(needing)} only apply with --balancer {{{','.join(_policy_choices())}}}")
        if sim is None and getattr(args, "balancer_log", None) is None:
            return None  # the plugin stays out entirely
    cfg = BalancerConfig(policy=policy)
    for field, key in (("horizon", "balancer_horizon"), ("prefill_weight", "balancer_prefill_weight"),
                       ("scenarios", "balancer_scenarios"), ("full_wait", "balancer_full_wait"),
                       ("variant", "balancer_variant"),
                       ("pool_tail", "balancer_pool_tail"), ("pool_tail_horizon", "balancer_pool_tail_horizon"),
                       ("binding", "balancer_binding"),
                       ("pool_max_wait_s", "balancer_pool_max_wait"), ("view_lag", "balancer_view_lag"),
                       ("device", "balancer_device"),
                       ("estimator", "balancer_estimator"), ("inline_refit", "balancer_inline_refit"),
                       ("cpu_threads", "balancer_cpu_threads"),
                       ("stats_interval_s", "balancer_stats_interval"),
                       ("log_dir", "balancer_log"),
                       ("seed", "balancer_seed"), ("sim_backend", "balancer_sim_backend"),
                       ("sim_time_scale", "balancer_sim_time_scale")):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, field, value)
    if cfg.log_dir is not None:
        cfg.log_dir = os.path.abspath(cfg.log_dir)
    cfg.metrics = bool(getattr(args, "enable_metrics", False))
    if cfg.enabled:
        dp_size = getattr(args, "dp_size", 1) or 1
        if dp_size < 2:
            logger.warning("--balancer %s has no effect with --dp-size %d (no DP controller)", policy, dp_size)
        else:
            cfg.report_addr = getattr(args, "balancer_report_addr", None) or _default_report_addr(args)
            if cfg.report_addr.startswith("ipc://"):
                # The controller that binds it is killed (not closed) at shutdown, so the
                # launcher, which outlives it, removes the socket file.
                atexit.register(_unlink_quietly, cfg.report_addr[len("ipc://"):])
    if cfg.enabled:
        from sglang_ext.plugin.ipc_cleanup import install_launcher_cleanup

        cfg.launcher_pid = install_launcher_cleanup()
    if cfg.sim_backend is not None:
        if getattr(args, "max_running_requests", None):
            cfg.sim_max_running = int(args.max_running_requests)
        # One rendezvous port for all stand-in ranks (SGLang gives each plain-DP rank its own nccl port).
        cfg.sim_dist_port = free_rendezvous_port()
        from sglang_ext.plugin import enable_standin_launch

        enable_standin_launch()
    server_args._balancer = cfg
    logger.info("sglang-ext balancer config: %s", cfg)
    return None
