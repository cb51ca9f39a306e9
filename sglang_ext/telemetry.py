"""Per-step idle and energy telemetry of one DP rank, as JSON lines.

One `StepTelemetry` per DP rank (the scheduler patch and the stand-in backend
create it); `record()` is called once per decode/prefill step and appends one
line to `<log_dir>/rank<dp_rank>.jsonl`, and hands it to `on_line` (the rank's
Prometheus counters under `--enable-metrics`) once its energy is known. Schema
and semantics: docs/telemetry.md.

It sits on the scheduler's hot path, so it is built to be cheap: no fsync, a
large write buffer, a flush every `flush_every` lines or `flush_interval_s`
seconds (so a live report still sees recent steps) and on close, and no NVML
call except every `nvml_every` steps.

Energy comes from NVML's cumulative energy counter when `pynvml` imports and
the GPU supports it; otherwise (CPU machines, the stand-in backend, old GPUs)
from a `PowerModel`, and every line says which (`energy_source`).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .cost import PowerModel, power_preset

logger = logging.getLogger(__name__)

try:  # orjson is an SGLang dependency and ~5x faster than json for this
    import orjson as _orjson

    def _dumps(obj: dict) -> bytes:
        return _orjson.dumps(obj) + b"\n"

except ImportError:  # pragma: no cover - exercised only without orjson
    import json as _json

    def _dumps(obj: dict) -> bytes:
        return (_json.dumps(obj, separators=(",", ":")) + "\n").encode()


IDLE_SOURCES = ("measured", "predicted")
FIELDS = (
    "step", "wall_time", "dp_rank", "batch_size", "kv_tokens", "predicted_cost_s", "step_time_s",
    "idle_s", "idle_source", "busy_s", "energy_j", "energy_source", "power_w", "source",
)


@dataclass
class _NvmlCounter:
    """NVML's total-energy counter of one GPU (millijoules since driver load)."""

    nvml: object  # the pynvml module
    handle: object
    device: int

    def read_mj(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))


def _cuda_device_uuid() -> str | None:
    """UUID of this process's current CUDA device, if torch already initialised CUDA.

    NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES (and maybe in another
    order), so matching by UUID is the only reliable way to find "our" GPU.
    Never imports torch itself: telemetry must not initialise CUDA."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        pass
    return None


def _open_nvml(dp_rank: int, device: int | None) -> _NvmlCounter | None:
    """The energy counter of this rank's GPU, or None (no pynvml, no GPU, unsupported)."""
    try:
        import pynvml  # nvidia-ml-py
    except Exception:  # ImportError, or a broken install
        logger.debug("pynvml not importable; energy from the power model")
        return None
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if count < 1:
            return None
        handle = None
        if device is None:
            uuid = _cuda_device_uuid()
            if uuid is not None:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                    device = int(pynvml.nvmlDeviceGetIndex(handle))
                except Exception:  # noqa: BLE001
                    handle = None
        if handle is None:
            # Without a CUDA context, rank i on GPU i is SGLang's default layout for tp=1.
            device = dp_rank % count if device is None else int(device)
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        counter = _NvmlCounter(pynvml, handle, int(device))
        counter.read_mj()  # raises NVMLError_NotSupported before Volta
        return counter
    except Exception as exc:  # noqa: BLE001 - NVMLError_* of every kind
        logger.info("NVML energy counter unavailable (%s); energy from the power model", exc)
        return None


class StepTelemetry:
    """Writes one JSON line per scheduler step for one DP rank.

    Args:
        log_dir: directory for `rank<dp_rank>.jsonl` (created if missing); None: no
            file, the lines only go to `on_line`.
        dp_rank: this rank's DP index.
        power_model: a `PowerModel`, a preset name, or None for `power_preset("h100")`;
            used when NVML is unavailable (and to fill gaps if NVML fails later).
        nvml_every: read the NVML counter every this many steps; the energy
            delta is spread over the steps since the previous read, in
            proportion to their step times. Lines wait in memory until then.
        max_bytes: rotate the file once it would exceed this size
            (`rank0.jsonl` -> `rank0.jsonl.1` -> `.2` ...; `.1` is the newest backup).
        source: free label copied into every line ("sglang", "standin", ...).
        backups: rotated files kept per rank (None: keep all).
        flush_every / flush_interval_s: flush the buffer after this many lines
            or seconds, whichever comes first.
        nvml_device: NVML device index; None finds the current CUDA device (or dp_rank).
        use_nvml: False forces the power model.
        on_line: called with each line once complete (its energy known), before it is
            written; an exception there is logged once and the line still written.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None,
        dp_rank: int,
        *,
        power_model: PowerModel | str | None = None,
        nvml_every: int = 1,
        max_bytes: int = 64 << 20,
        source: str = "sglang",
        backups: int | None = 20,
        flush_every: int = 256,
        flush_interval_s: float = 1.0,
        nvml_device: int | None = None,
        use_nvml: bool = True,
        on_line: Callable[[dict], None] | None = None,
    ):
        if isinstance(power_model, str):
            power_model = power_preset(power_model)
        self.power_model: PowerModel = power_model or power_preset("h100")
        self.dp_rank = int(dp_rank)
        self.source = str(source)
        self.nvml_every = max(1, int(nvml_every))
        self.max_bytes = max(1024, int(max_bytes))
        self.backups = backups
        self.flush_every = max(1, int(flush_every))
        self.flush_interval_s = float(flush_interval_s)
        self.on_line = on_line
        self._warned_sink = False
        self._model_label = f"model:{self.power_model.name}"
        self.log_dir = self.path = self._file = None
        if log_dir is not None:
            self.log_dir = os.fspath(log_dir)
            os.makedirs(self.log_dir, exist_ok=True)
            self.path = os.path.join(self.log_dir, f"rank{self.dp_rank}.jsonl")
            self._file = open(self.path, "ab", buffering=1 << 20)
        self._size = 0 if self._file is None else self._file.tell()
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._closed = False
        self._warned_clip = False

        self._nvml = _open_nvml(self.dp_rank, nvml_device) if use_nvml else None
        self._pending: list[dict] = []  # lines waiting for the next NVML read
        if self._nvml is not None:
            self._last_mj = self._nvml.read_mj()
            self._last_read_t = time.monotonic()
            logger.info("rank %d: energy from NVML device %d", self.dp_rank, self._nvml.device)
        # Normal interpreter exit (scheduler shutdown) must not lose the buffer.
        atexit.register(self.close)

    @property
    def energy_source(self) -> str:
        return "nvml" if self._nvml is not None else self._model_label

    # -- hot path ---------------------------------------------------------------------------

    def record(
        self,
        *,
        step: int,
        batch_size: int,
        kv_tokens: int,
        predicted_cost_s: float,
        step_time_s: float,
        idle_s: float,
        idle_source: str,
    ) -> dict:
        """Log one step and return its line as a dict.

        With NVML and `nvml_every > 1`, `energy_j`/`power_w` stay None in the
        returned dict until the step that reads the counter (the same dict is
        then completed and written)."""
        if idle_source not in IDLE_SOURCES:
            raise ValueError(f"idle_source must be one of {IDLE_SOURCES}, got {idle_source!r}")
        step_time_s = float(step_time_s)
        idle_s = float(idle_s)
        # Clip instead of raising: a clock hiccup must not take down the scheduler.
        if step_time_s < 0.0 or idle_s < 0.0 or idle_s > step_time_s:
            if not self._warned_clip:
                logger.warning(
                    "rank %d step %s: idle_s=%r / step_time_s=%r out of range; clipping (warned once)",
                    self.dp_rank, step, idle_s, step_time_s,
                )
                self._warned_clip = True
            step_time_s = max(step_time_s, 0.0)
            idle_s = min(max(idle_s, 0.0), step_time_s)
        busy_s = step_time_s - idle_s
        batch_size = int(batch_size)
        rec = {
            "step": int(step),
            "wall_time": time.time(),
            "dp_rank": self.dp_rank,
            "batch_size": batch_size,
            "kv_tokens": int(kv_tokens),
            # None (JSON null) when the caller has no prediction (NaN): keeps the file strict JSON.
            "predicted_cost_s": None if predicted_cost_s is None or predicted_cost_s != predicted_cost_s
            else float(predicted_cost_s),
            "step_time_s": step_time_s,
            "idle_s": idle_s,
            "idle_source": idle_source,
            "busy_s": busy_s,
            "energy_j": None,
            "energy_source": None,
            "power_w": None,
            "source": self.source,
        }
        if self._nvml is None:
            self._model_energy(rec)
            self._write(rec)
        else:
            self._pending.append(rec)
            if len(self._pending) >= self.nvml_every:
                self._settle_nvml()
        return rec

    def _model_energy(self, rec: dict) -> None:
        pm = self.power_model
        t = rec["step_time_s"]
        if rec["batch_size"] == 0:
            energy = pm.idle_w * t  # nothing to run: idle power for the whole step
        else:
            energy = pm.busy_w * rec["busy_s"] + pm.wait_w * rec["idle_s"]
        rec["energy_j"] = energy
        rec["energy_source"] = self._model_label
        rec["power_w"] = energy / t if t > 0 else (pm.idle_w if rec["batch_size"] == 0 else pm.busy_w)

    def _settle_nvml(self) -> None:
        """Read the counter and spread its delta over the pending lines, then write them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            mj = self._nvml.read_mj()
        except Exception as exc:  # noqa: BLE001 - GPU fell off the bus, driver reset ...
            logger.warning("rank %d: NVML read failed (%s); power model from now on", self.dp_rank, exc)
            self._nvml = None
            mj = None
        now = time.monotonic()
        delta_j = None if mj is None else (mj - self._last_mj) / 1000.0
        if delta_j is not None and delta_j < 0:  # counter reset: this interval is unknown
            delta_j = None
        if delta_j is None:
            for rec in pending:
                self._model_energy(rec)
        else:
            # Weight by step time: a long step drew more of the interval's energy.
            weights = [rec["step_time_s"] for rec in pending]
            total = sum(weights)
            if total <= 0:
                weights, total = [1.0] * len(pending), float(len(pending))
            elapsed = now - self._last_read_t
            power = delta_j / elapsed if elapsed > 0 else 0.0
            for rec, w in zip(pending, weights):
                rec["energy_j"] = delta_j * w / total
                rec["energy_source"] = "nvml"
                rec["power_w"] = power
        if mj is not None:
            self._last_mj, self._last_read_t = mj, now
        for rec in pending:
            self._write(rec)

    def _write(self, rec: dict) -> None:
        if self.on_line is not None:
            try:
                self.on_line(rec)
            except Exception:  # noqa: BLE001 - a metrics bug must not stop the log or the rank
                if not self._warned_sink:
                    logger.exception("rank %d: the step line's consumer failed (logged once)", self.dp_rank)
                    self._warned_sink = True
        if self._file is None:
            return
        line = _dumps(rec)
        if self._size + len(line) > self.max_bytes and self._size > 0:
            self._rotate()
        self._file.write(line)
        self._size += len(line)
        self._unflushed += 1
        if self._unflushed >= self.flush_every or (
            time.monotonic() - self._last_flush >= self.flush_interval_s
        ):
            self.flush()

    # -- housekeeping -----------------------------------------------------------------------

    def flush_due(self) -> None:
        """Flush lines older than `flush_interval_s` (a rank gone idle calls this: the
        lines are otherwise flushed only when the next one is written)."""
        if self._unflushed and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Hand the buffer to the OS (no fsync: a crash of the machine may lose the tail)."""
        if not self._closed and self._file is not None:
            self._file.flush()
        self._unflushed = 0
        self._last_flush = time.monotonic()

    def _rotate(self) -> None:
        self._file.close()
        keep = self.backups
        # Find the highest existing backup so that keep=None keeps everything.
        n = 1
        while os.path.exists(f"{self.path}.{n}"):
            n += 1
        for i in range(n - 1, 0, -1):
            src = f"{self.path}.{i}"
            if keep is not None and i >= keep:
                os.remove(src)
            else:
                os.replace(src, f"{self.path}.{i + 1}")
        if keep is None or keep > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self._file = open(self.path, "ab", buffering=1 << 20)
        self._size = 0
        self._unflushed = 0

    def close(self) -> None:
        """Settle pending NVML lines, flush and close (idempotent)."""
        if self._closed:
            return
        try:
            if self._nvml is not None:
                self._settle_nvml()
            if self._file is not None:
                self._file.flush()
                self._file.close()
        finally:
            self._closed = True
            if self._nvml is not None:
                try:
                    self._nvml.nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001
                    pass
            try:
                atexit.unregister(self.close)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "StepTelemetry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rank_files(rank_path: str | os.PathLike) -> list[str]:
    """A rank's files oldest first: rank0.jsonl.N ... rank0.jsonl.1, rank0.jsonl."""
    rank_path = os.fspath(rank_path)
    backups = []
    n = 1
    while os.path.exists(f"{rank_path}.{n}"):
        backups.append(f"{rank_path}.{n}")
        n += 1
    return [*reversed(backups), rank_path] if os.path.exists(rank_path) else list(reversed(backups))
