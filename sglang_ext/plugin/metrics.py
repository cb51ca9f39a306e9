"""Prometheus metrics of the balancer, on SGLang's own `/metrics` (with `--enable-metrics`).

SGLang serves `/metrics` from its HTTP process by reading every process's
metric files in `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess
mode; the launcher sets the directory before it starts its subprocesses). So a
metric this plugin makes in the DP controller or in a scheduler shows up there
next to SGLang's `sglang:*` ones, with no extra port or endpoint:

- every DP rank, from the same per-step lines as `--balancer-log`:
  `sglang_ext:steps_total`, `sglang_ext:step_seconds_total`,
  `sglang_ext:barrier_idle_seconds_total` (their ratio is the rank's idle
  fraction), `sglang_ext:energy_joules_total`, and the last step's
  `sglang_ext:running_requests` and `sglang_ext:kv_tokens`;
- the DP controller: requests placed (pinned by a client, placed at the pool
  deadline), placement calls and their time (`sglang_ext:placement_seconds`), rank
  reports read, and the requests waiting in the pool.

prometheus_client is imported only here, in the controller and scheduler
processes: it picks its multiprocess value class when first imported, so the
launcher (which loads the plugin before it sets the directory) must not import
it early. The metrics are not registered in this process's default registry
(`registry=None`): in multiprocess mode their values live in the directory's
files, which `/metrics` reads, and a second instance (a test, a benchmark)
does not collide with the first. Names and labels: docs/telemetry.md.
"""
from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

#: seconds; a placement call takes ~0.1-30 ms (docs/benchmarks.md section 2)
PLACEMENT_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)

#: the controller's counters (`ClusterState.stats` keys) exported as counters
CONTROLLER_COUNTERS = {
    "dispatched": ("sglang_ext:requests_placed_total", "Requests the DP controller sent to a rank."),
    "pinned": ("sglang_ext:requests_pinned_total", "Requests a client pinned to a rank (routed_dp_rank)."),
    "pool_deadline": ("sglang_ext:requests_placed_at_pool_deadline_total",
                      "Pooled requests placed by the immediate rule after waiting --balancer-pool-max-wait."),
    "placements": ("sglang_ext:placement_calls_total", "Calls of the placement policy."),
    "lagged": ("sglang_ext:placement_calls_on_previous_estimate_total",
               "Placement calls made on the previous estimate (--balancer-view-lag)."),
    "reports": ("sglang_ext:rank_reports_total", "Per-step reports read from the DP ranks."),
}


def _prometheus():
    """The prometheus_client module in multiprocess mode, or None (not installed, or no
    `PROMETHEUS_MULTIPROC_DIR`: values kept in this process alone would never reach
    `/metrics`)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning("sglang-ext: --enable-metrics without PROMETHEUS_MULTIPROC_DIR; balancer metrics off")
        return None
    try:
        import prometheus_client
    except ImportError:
        logger.warning("sglang-ext: prometheus_client is not installed; balancer metrics off")
        return None
    return prometheus_client


def _model_name(server_args) -> str:
    return str(getattr(server_args, "served_model_name", None) or getattr(server_args, "model_path", "") or "")


class RankMetrics:
    """One DP rank's per-step counters; `observe` takes a telemetry line (telemetry.FIELDS)."""

    def __init__(self, prom, dp_rank: int, model_name: str):
        labels = dict(model_name=model_name, dp_rank=str(int(dp_rank)))
        names = list(labels)

        def counter(name, doc):
            return prom.Counter(name, doc, names, registry=None).labels(**labels)

        def gauge(name, doc):
            return prom.Gauge(name, doc, names, registry=None, multiprocess_mode="mostrecent").labels(**labels)

        self.steps = counter("sglang_ext:steps", "Forward steps of this DP rank.")
        self.step_s = counter("sglang_ext:step_seconds", "Time of this rank's steps, barrier wait included (s).")
        self.idle_s = counter("sglang_ext:barrier_idle_seconds",
                              "Time this rank waited at the per-step barrier for slower ranks (s).")
        self.energy = counter("sglang_ext:energy_joules",
                              "Energy of this rank's GPU (NVML) or of the stated power model (J).")
        self.running = gauge("sglang_ext:running_requests", "Requests in this rank's last step.")
        self.kv = gauge("sglang_ext:kv_tokens", "KV tokens of the requests in this rank's last step.")

    def observe(self, rec: dict) -> None:
        self.steps.inc()
        self.step_s.inc(rec["step_time_s"])
        self.idle_s.inc(rec["idle_s"])
        if rec["energy_j"] is not None:
            self.energy.inc(rec["energy_j"])
        self.running.set(rec["batch_size"])
        self.kv.set(rec["kv_tokens"])


def _make(cfg, what: str, build):
    """build(prometheus_client) under --enable-metrics, else None; never raises (metrics
    must not keep a scheduler or the controller from starting)."""
    if not cfg.metrics:
        return None
    prom = _prometheus()
    if prom is None:
        return None
    try:
        return build(prom)
    except Exception:  # noqa: BLE001
        logger.exception("sglang-ext: cannot create the %s's metrics", what)
        return None


def rank_metrics(cfg, server_args, dp_rank: int) -> RankMetrics | None:
    """This rank's metrics under --enable-metrics, else None."""
    return _make(cfg, "rank", lambda prom: RankMetrics(prom, dp_rank, _model_name(server_args)))


class ControllerMetrics:
    """The DP controller's counters, mirrored from its `stats` dict once per loop turn
    (a few dict reads when nothing changed), the pool's depth and the placement time.
    A failure here (a full disk under the metrics directory) is logged once and turns
    the metrics off: it must neither stop the loop nor change a placement."""

    def __init__(self, prom, balancer: str, model_name: str):
        labels = dict(model_name=model_name, balancer=balancer)
        names = list(labels)
        self.counters = {key: prom.Counter(name.removesuffix("_total"), doc, names, registry=None).labels(**labels)
                         for key, (name, doc) in CONTROLLER_COUNTERS.items()}
        self.exported = dict.fromkeys(CONTROLLER_COUNTERS, 0)
        self.pooled = prom.Gauge("sglang_ext:pooled_requests", "Requests waiting in the balancer's pool.",
                                 names, registry=None, multiprocess_mode="mostrecent").labels(**labels)
        self.placement_s = prom.Histogram("sglang_ext:placement_seconds", "Time of one placement call (s).",
                                          names, registry=None, buckets=PLACEMENT_BUCKETS).labels(**labels)
        self._pool_depth = None
        self.off = False

    def _failed(self) -> None:
        logger.exception("sglang-ext: exporting the controller's metrics failed; metrics off from now on")
        self.off = True

    def sync(self, stats: dict, pool_depth: int) -> None:
        if self.off:
            return
        try:
            for key, counter in self.counters.items():
                new = stats[key] - self.exported[key]
                if new > 0:
                    counter.inc(new)
                    self.exported[key] = stats[key]
            if pool_depth != self._pool_depth:
                self.pooled.set(pool_depth)
                self._pool_depth = pool_depth
        except Exception:  # noqa: BLE001
            self._failed()

    def placement_call(self, seconds: float) -> None:
        if self.off:
            return
        try:
            self.placement_s.observe(seconds)
        except Exception:  # noqa: BLE001
            self._failed()


def controller_metrics(cfg, server_args) -> ControllerMetrics | None:
    """The controller's metrics under --enable-metrics, else None."""
    return _make(cfg, "controller", lambda prom: ControllerMetrics(prom, str(cfg.policy), _model_name(server_args)))


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, prefix: str = "sglang_ext:") -> dict[tuple[str, frozenset], float]:
    """{(name, frozenset of (label, value)): value} of the samples in a `/metrics` page
    (Prometheus text format) whose name starts with `prefix`."""
    out = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        m = _SAMPLE.fullmatch(line)
        if m:
            out[(m.group(1), frozenset(_LABEL.findall(m.group(2) or "")))] = float(m.group(3))
    return out
