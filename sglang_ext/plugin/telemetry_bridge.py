"""Open the per-rank step telemetry when --balancer-log or --enable-metrics is set.

The imports are guarded: telemetry is optional for serving, and a failure to
open the log or the metrics must never keep a scheduler from starting.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def open_telemetry(cfg, dp_rank: int, source: str = "sglang", server_args=None):
    """A `StepTelemetry` for this rank: its lines to `rank<dp_rank>.jsonl` under
    --balancer-log, and to the rank's Prometheus counters under --enable-metrics;
    None when neither is on (or neither can open)."""
    from sglang_ext.plugin.metrics import rank_metrics

    metrics = rank_metrics(cfg, server_args, dp_rank)
    if not cfg.log_dir and metrics is None:
        return None
    try:
        from sglang_ext.telemetry import StepTelemetry
    except ImportError:
        logger.warning("sglang-ext: sglang_ext.telemetry is unavailable; --balancer-log and the rank metrics off")
        return None
    on_line = None if metrics is None else metrics.observe
    try:
        return StepTelemetry(cfg.log_dir, dp_rank, source=source, on_line=on_line)
    except Exception:  # noqa: BLE001
        logger.exception("sglang-ext: cannot open telemetry under %s", cfg.log_dir)
    if cfg.log_dir and metrics is not None:  # (the metrics without the file, rather than neither)
        try:
            return StepTelemetry(None, dp_rank, source=source, on_line=on_line)
        except Exception:  # noqa: BLE001
            logger.exception("sglang-ext: cannot open the rank's metrics")
    return None
