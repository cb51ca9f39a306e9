"""The balancer's Prometheus metrics (plugin/metrics.py) as SGLang's /metrics reads them.

prometheus_client picks its multiprocess mode when first imported, so each side
runs in its own interpreter, as under SGLang: two DP ranks and a DP controller
write to one PROMETHEUS_MULTIPROC_DIR, and a fourth process reads it the way
SGLang's /metrics route does (`MultiProcessCollector`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sglang_ext.plugin.metrics import parse_metrics

pytest.importorskip("prometheus_client")

REPO = Path(__file__).resolve().parents[1]

RANK = """
import json, sys
from types import SimpleNamespace
import numpy as np
from sglang_ext.plugin.config import BalancerConfig
from sglang_ext.plugin.telemetry_bridge import open_telemetry
rank, log_dir = int(sys.argv[1]), sys.argv[2]
cfg = BalancerConfig(policy="bfio", metrics=True, log_dir=log_dir)
tel = open_telemetry(cfg, rank, source="test", server_args=SimpleNamespace(served_model_name="tiny"))
rng = np.random.default_rng(rank)
for i in range(40 + 7 * rank):
    t = float(rng.uniform(0.01, 0.03))
    tel.record(step=i, batch_size=int(rng.integers(0, 9)), kv_tokens=int(rng.integers(0, 5000)),
               predicted_cost_s=t, step_time_s=t, idle_s=float(rng.uniform(0, t)), idle_source="predicted")
tel.close()
"""

CONTROLLER = """
from types import SimpleNamespace
from sglang_ext.plugin.config import BalancerConfig
from sglang_ext.plugin.metrics import CONTROLLER_COUNTERS, controller_metrics
m = controller_metrics(BalancerConfig(policy="bfio", metrics=True), SimpleNamespace(served_model_name="tiny"))
stats = dict.fromkeys(CONTROLLER_COUNTERS, 0)
stats.update(paused=0, prepared=0)  # (counters of the stats line that are not exported)
for turn in range(30):
    stats["dispatched"] += 3
    stats["placements"] += 1
    stats["reports"] += 2
    stats["pinned"] += turn % 5 == 0
    stats["pool_deadline"] += turn % 7 == 0
    m.sync(stats, pool_depth=turn % 4)
    m.sync(stats, pool_depth=turn % 4)  # (a turn with nothing new adds nothing)
    m.placement_call(2e-4 if turn % 2 else 3e-3)
"""

READ = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def _run(code: str, prom_dir: Path, *args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def dashboard_metric_names(prefix: str = "sglang_ext:") -> set[str]:
    """The metric names the shipped Grafana dashboard queries (docs/grafana)."""
    text = json.dumps(json.loads((REPO / "docs" / "grafana" / "sglang_ext.json").read_text()))
    return {n for n in re.findall(r"(sglang(?:_ext)?:[a-z_]+)", text) if n.startswith(prefix)}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ranks_and_controller_show_on_one_metrics_page(tmp_path):
    prom, logs = tmp_path / "prom", tmp_path / "telemetry"
    prom.mkdir()
    for rank in (0, 1):
        _run(RANK, prom, str(rank), str(logs))
    _run(CONTROLLER, prom)
    s = parse_metrics(_run(READ, prom).stdout)

    for rank in (0, 1):
        lines = _lines(logs / f"rank{rank}.jsonl")
        at = frozenset({("model_name", "tiny"), ("dp_rank", str(rank))})
        assert s[("sglang_ext:steps_total", at)] == len(lines) == 40 + 7 * rank
        for name, field in (("step_seconds", "step_time_s"), ("barrier_idle_seconds", "idle_s"),
                            ("energy_joules", "energy_j")):
            assert s[(f"sglang_ext:{name}_total", at)] == pytest.approx(sum(r[field] for r in lines), rel=1e-9)
        # the gauges hold the rank's last step (each rank its own series)
        assert s[("sglang_ext:running_requests", at)] == lines[-1]["batch_size"]
        assert s[("sglang_ext:kv_tokens", at)] == lines[-1]["kv_tokens"]

    at = frozenset({("model_name", "tiny"), ("balancer", "bfio")})
    expect = {"requests_placed": 90, "requests_pinned": 6, "requests_placed_at_pool_deadline": 5,
              "placement_calls": 30, "placement_calls_on_previous_estimate": 0, "rank_reports": 60}
    assert {k: s[(f"sglang_ext:{k}_total", at)] for k in expect} == expect
    assert s[("sglang_ext:pooled_requests", at)] == 29 % 4
    assert s[("sglang_ext:placement_seconds_count", at)] == 30
    assert s[("sglang_ext:placement_seconds_bucket", at | {("le", "0.00025")})] == 15
    assert s[("sglang_ext:placement_seconds_sum", at)] == pytest.approx(15 * 2e-4 + 15 * 3e-3)
    # every series the shipped dashboard queries is one the plugin makes
    queried = dashboard_metric_names()
    assert len(queried) >= 8 and queried <= {name for name, _ in s}


def test_metrics_stay_off_without_the_flag_or_the_directory(tmp_path):
    # --enable-metrics off: nothing is made; on but with no multiprocess directory (values
    # that would never reach /metrics): off with a warning, and serving goes on.
    code = """
    import logging
    from types import SimpleNamespace
    from sglang_ext.plugin.config import BalancerConfig
    from sglang_ext.plugin.metrics import controller_metrics, rank_metrics
    logging.basicConfig(level=logging.WARNING)
    sa = SimpleNamespace(served_model_name="tiny")
    assert rank_metrics(BalancerConfig(policy="bfio"), sa, 0) is None
    assert controller_metrics(BalancerConfig(policy="bfio"), sa) is None
    assert rank_metrics(BalancerConfig(policy="bfio", metrics=True), sa, 0) is None
    """
    out = _run(code, tmp_path, env_extra={"PROMETHEUS_MULTIPROC_DIR": ""})
    assert "--enable-metrics without PROMETHEUS_MULTIPROC_DIR; balancer metrics off" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_parse_metrics_reads_our_samples_only():
    text = "\n".join([
        "# HELP sglang_ext:steps_total Forward steps of this DP rank.",
        "# TYPE sglang_ext:steps_total counter",
        'sglang_ext:steps_total{dp_rank="0",model_name="a \\"quoted\\" name"} 12.0',
        'sglang_ext:steps_total{dp_rank="1",model_name="m"} 3.0',
        'sglang:num_running_reqs{dp_rank="0"} 5.0',
        "sglang_ext:pooled_requests 2.0",
        'sglang_ext:step_seconds_total{dp_rank="1",model_name="m"} 2.0',
        'sglang_ext:barrier_idle_seconds_total{dp_rank="1",model_name="m"} 0.5',
    ])
    s = parse_metrics(text)
    assert s[("sglang_ext:steps_total", frozenset({("dp_rank", "0"), ("model_name", 'a \\"quoted\\" name')}))] == 12
    assert s[("sglang_ext:pooled_requests", frozenset())] == 2
    assert not any(name.startswith("sglang:") for name, _ in s) and len(s) == 5
