"""Summaries and plots of one or more runs (`sglang-ext report DIR [DIR2 ...]`).

A run directory holds telemetry (`rank<g>.jsonl`, rotated `rank<g>.jsonl.N`,
in DIR or one level below, e.g. DIR/telemetry/) and/or replay output
(`requests.jsonl`, `summary.json`, in DIR or one level below). Either may be
absent, not both.

Per run it prints: idle fraction (sum of idle / sum of step time over all ranks
and steps, as recorded; and as the cost model implies from `predicted_cost_s`,
sum_g (max_g pred - pred_g) / sum_g T, immune to timing noise), joules per
output token, throughput, TTFT and TPOT p50/p99, and the KV balance (mean
over steps of mean_g L_g / max_g L_g, the TensorRT-LLM measure), and the
idle fraction the server's own /metrics gave over the replay
(`server_metrics` of summary.json: the only idle figure of a remote server
whose telemetry files are out of reach). When the replay recorded its time window, telemetry is restricted to
it, so server warm-up and health checks do not dilute the numbers.

Plots (matplotlib, Agg): idle per step per rank, power per rank and KV tokens
per rank over time; with several runs, one column per run with shared y axes;
and each rank's idle fraction as grouped bars, one bar per run.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .argtypes import output_dir, output_file, write_json
from .errors import UsageError
from .telemetry import rank_files

logger = logging.getLogger(__name__)

_RANK_RE = re.compile(r"^rank(\d+)\.jsonl$")
_NUMERIC = ("step", "wall_time", "batch_size", "kv_tokens", "predicted_cost_s", "step_time_s", "idle_s",
            "energy_j", "power_w")
_REQUIRED = _NUMERIC + ("idle_source", "energy_source")
_REQUIRED_SET = frozenset(_REQUIRED)
# null in these means "not recorded": predicted_cost_s on a real GPU (no cost model),
# energy_j/power_w on NVML lines never settled (killed server). The others are always written.
_NULLABLE = frozenset(("predicted_cost_s", "energy_j", "power_w"))
# Fields read from summary.json and requests.jsonl lines; each may be absent or null
# (not recorded, e.g. no start_unix from an older replay, no ttft_s of a failed request).
_SUMMARY_NUMBERS = ("wall_time_s", "start_unix", "end_unix", "output_tokens", "sent", "ok", "failed", "retries")
_SUMMARY_OBJECTS = ("failure_reasons", "ttft_s", "tpot_s", "latency_s")
_LATENCIES = ("ttft_s", "tpot_s", "latency_s")
_REQUEST_NUMBERS = ("tokens_received",) + _LATENCIES
_NUMBER_TYPES = frozenset((int, float))  # (not bool: true is no number)
_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max: beyond it (or inf, nan) a number breaks the sums
# Plots stay readable and fast on long runs: above this many steps, a rank's line
# is the mean per step in this many equal time bins (raw per-step lines of 4
# ranks overlap into a solid band).
_MAX_PLOT_POINTS = 300


@dataclass
class RunData:
    name: str
    path: Path
    telemetry: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # rank -> column -> array
    energy_sources: set = field(default_factory=set)
    idle_sources: dict = field(default_factory=dict)
    requests: list[dict] | None = None
    summary: dict | None = None
    window: tuple[float, float] | None = None  # unix seconds of the replay, when known


# -- loading ---------------------------------------------------------------------------------


def _shown(v) -> str:
    """v as JSON, shortened, for a message."""
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(v) -> bool:
    """A finite JSON number (true/false are not numbers; json also parses NaN, Infinity
    and integers too large for a float, which would poison or break the arrays)."""
    return type(v) in _NUMBER_TYPES and -_FLOAT_MAX <= v <= _FLOAT_MAX


def _need_number(v, where: str, field_name: str, nullable: bool = True) -> None:
    """Raise naming the field unless v is a finite number (or, nullable, null)."""
    if not (_is_number(v) or (nullable and v is None)):
        kind = "a finite number" if type(v) in _NUMBER_TYPES else "a number"  # (NaN, Infinity, 1e999 parse)
        raise UsageError(f"{where}: field {field_name!r} must be {kind}{' or null' if nullable else ''}, "
                         f"got {_shown(v)}")


def _need_object(v, where: str) -> None:
    """Raise unless v is a JSON object (`where` names the file, and the field if any)."""
    if not isinstance(v, dict):
        raise UsageError(f"{where} must be a JSON object, got {_shown(v)}")


def _read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; a directory (or unreadable file) in its place is named as bad input."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _candidates(d: Path) -> list[Path]:
    """DIR first, then its immediate subdirectories (sorted, for determinism)."""
    return [d, *sorted(p for p in d.iterdir() if p.is_dir())]


def _check_telemetry_line(rec, where: str) -> None:
    """Raise naming what is wrong in a telemetry line, if anything: every field report
    reads present, of its type (nulls only where _NULLABLE allows them)."""
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: not a JSON object")
    for k in _REQUIRED:
        if k not in rec:
            raise UsageError(f"{where}: field {k!r} missing")
    for k in _NUMERIC:
        _need_number(rec[k], where, k, nullable=k in _NULLABLE)
    for k in ("idle_source", "energy_source"):
        if not isinstance(rec[k], str):
            raise UsageError(f"{where}: field {k!r} must be a string, got {_shown(rec[k])}")


def _load_rank(files: list[str], run: RunData) -> dict[str, np.ndarray] | None:
    cols: dict[str, list] = {k: [] for k in _NUMERIC}
    columns = list(cols.items())
    for fname in files:
        lines = _read_bytes(fname).splitlines()
        for i, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                if i == len(lines):  # a server killed mid-write leaves a torn last line
                    logger.warning("%s:%d: truncated last line skipped", fname, i)
                    continue
                raise UsageError(f"{fname}:{i}: invalid JSON") from None
            # Inline quick tests, as files run to millions of lines; on a miss
            # _check_telemetry_line names the field (or passes an allowed null).
            if type(rec) is not dict or not rec.keys() >= _REQUIRED_SET:
                _check_telemetry_line(rec, f"{fname}:{i}")
            for k, col in columns:
                v = rec[k]
                if type(v) not in _NUMBER_TYPES or not -_FLOAT_MAX <= v <= _FLOAT_MAX:
                    _check_telemetry_line(rec, f"{fname}:{i}")
                    v = math.nan
                col.append(v)
            idle_source, energy_source = rec["idle_source"], rec["energy_source"]
            if type(idle_source) is not str or type(energy_source) is not str:
                _check_telemetry_line(rec, f"{fname}:{i}")
            run.energy_sources.add(energy_source)
            run.idle_sources[idle_source] = run.idle_sources.get(idle_source, 0) + 1
    if not cols["step"]:
        return None
    out = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    order = np.argsort(out["wall_time"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def _load_telemetry(run: RunData) -> None:
    for cand in _candidates(run.path):
        ranks = sorted(int(m.group(1)) for p in cand.iterdir() if (m := _RANK_RE.match(p.name)))
        # rotated-only ranks (rank0.jsonl.1 without rank0.jsonl) still count
        ranks += sorted({int(m.group(1)) for p in cand.iterdir()
                         if (m := re.match(r"^rank(\d+)\.jsonl\.\d+$", p.name))} - set(ranks))
        loaded = {}
        for g in sorted(ranks):
            cols = _load_rank(rank_files(cand / f"rank{g}.jsonl"), run)
            if cols is not None:
                loaded[g] = cols
        if loaded:
            run.telemetry = loaded
            return


def _load_summary(path: Path) -> dict:
    """summary.json, checked: an object whose fields report reads have their types."""
    raw = _read_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise UsageError(f"{path}: invalid JSON ({exc})") from None
    _need_object(doc, f"{path}:")
    for k in _SUMMARY_NUMBERS:
        _need_number(doc.get(k), str(path), k)
    for k in _SUMMARY_OBJECTS:
        if doc.get(k) is not None:
            _need_object(doc[k], f"{path}: field {k!r}")
    for k in _LATENCIES:
        for q in ("p50", "p99"):
            _need_number((doc.get(k) or {}).get(q), str(path), f"{k}.{q}")
    if doc.get("server_metrics") is not None:  # (the server's /metrics over the replay; null without)
        _need_object(doc["server_metrics"], f"{path}: field 'server_metrics'")
        for k in ("idle_fraction", "energy_j_per_output_token"):
            _need_number(doc["server_metrics"].get(k), str(path), f"server_metrics.{k}")
    return doc


def _load_requests(path: Path) -> list[dict]:
    """requests.jsonl, one result object a line, checked like the summary."""
    rows = []
    for i, raw in enumerate(_read_bytes(path).splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(raw)
        except ValueError:
            raise UsageError(f"{where}: invalid JSON") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: not a JSON object")
        if row.get("ok") is not None and type(row["ok"]) is not bool:
            raise UsageError(f"{where}: field 'ok' must be true or false, got {_shown(row['ok'])}")
        for k in _REQUEST_NUMBERS:
            _need_number(row.get(k), where, k)
        rows.append(row)
    return rows


def _load_replay(run: RunData) -> None:
    for cand in _candidates(run.path):
        req, summ = cand / "requests.jsonl", cand / "summary.json"
        if not (req.exists() or summ.exists()):
            continue
        if summ.exists():
            run.summary = _load_summary(summ)
        if req.exists():
            run.requests = _load_requests(req)
        if run.summary and run.summary.get("start_unix") and run.summary.get("end_unix"):
            run.window = (float(run.summary["start_unix"]), float(run.summary["end_unix"]))
        return


def load_run(d: str | os.PathLike, name: str | None = None) -> RunData:
    path = Path(d)
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory (a run directory holds rank*.jsonl or requests.jsonl)"
                         if path.exists() else f"{path}: no such run directory")
    run = RunData(name or path.name or str(path), path)
    _load_telemetry(run)
    _load_replay(run)
    if not run.telemetry and not run.requests and not run.summary:
        raise UsageError(
            f"{path}: no telemetry (rank*.jsonl) or replay output (requests.jsonl, summary.json) in it "
            "or its subdirectories"
        )
    return run


# -- metrics ---------------------------------------------------------------------------------


def _windowed(run: RunData) -> dict[int, dict[str, np.ndarray]]:
    """Telemetry inside the replay window (all of it when no window is known)."""
    if run.window is None:
        return run.telemetry
    lo, hi = run.window
    hi += 1.0  # the last steps' lines are stamped just after the last response
    out = {}
    for g, cols in run.telemetry.items():
        m = (cols["wall_time"] >= lo) & (cols["wall_time"] <= hi)
        if m.any():
            out[g] = {k: v[m] for k, v in cols.items()}
    return out or run.telemetry  # clocks disagree (other host): better all than nothing


def _pcts(values) -> tuple[float | None, float | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return None, None
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def _aligned(tel: dict[int, dict[str, np.ndarray]], column: str) -> np.ndarray | None:
    """(G, S) matrix of `column` over the step ids present on every rank, or None."""
    if len(tel) < 2:
        return None
    common = None
    for cols in tel.values():
        s = np.unique(cols["step"])
        common = s if common is None else np.intersect1d(common, s, assume_unique=True)
    if common is None or common.size == 0:
        return None
    rows = []
    for cols in tel.values():
        steps, idx = np.unique(cols["step"], return_index=True)  # first line of a repeated step id
        rows.append(cols[column][idx[np.searchsorted(steps, common)]])
    return np.vstack(rows)


def step_wall_clock(tel: dict[int, dict[str, np.ndarray]]) -> tuple[int, float, float] | None:
    """The decode steps with requests that directly follow the step before them on
    every rank: how many, their median wall-clock length (from the previous step's end
    to theirs, the latest rank's) and their median barrier step as modelled
    (`step_time_s`), in seconds. None without such a step (or with fewer than 2 ranks).
    On a host that runs the ranks on its CPU the difference is the host's own work
    around each step."""
    step = _aligned(tel, "step")
    if step is None:
        return None
    end = _aligned(tel, "wall_time").max(axis=0)
    model = _aligned(tel, "step_time_s")[0]
    busy = _aligned(tel, "batch_size").sum(axis=0)
    ok = (np.diff(step[0]) == 1) & (busy[1:] > 0)
    if not ok.any():
        return None
    return int(ok.sum()), float(np.median(np.diff(end)[ok])), float(np.median(model[1:][ok]))


def model_idle_fraction(tel: dict[int, dict[str, np.ndarray]]) -> float | None:
    """Idle fraction implied by the cost model: sum_g (max_g pred - pred_g) / sum_g T.

    Independent of timing noise (a CPU-bound stand-in on a small host measures
    OS scheduling delays as barrier wait), so it is reported next to the
    recorded one. None when there is no prediction (real GPU) or one rank."""
    pred = _aligned(tel, "predicted_cost_s")
    if pred is None or np.isnan(pred).any():
        return None
    step = _aligned(tel, "step_time_s")
    idle = pred.max(axis=0, keepdims=True) - pred
    total = float(step.sum())
    return float(idle.sum()) / total if total > 0 else None


def kv_balance(tel: dict[int, dict[str, np.ndarray]]) -> float | None:
    """Mean over steps present on every rank of mean_g(KV) / max_g(KV)."""
    kv = _aligned(tel, "kv_tokens")
    if kv is None:
        return None
    top = kv.max(axis=0)
    m = top > 0
    return float(np.mean(kv.mean(axis=0)[m] / top[m])) if m.any() else None


def compute_metrics(run: RunData) -> dict:
    tel = _windowed(run)
    m: dict = {"run": run.name, "dir": str(run.path)}
    rank_step = {g: float(np.sum(c["step_time_s"])) for g, c in sorted(tel.items())}
    rank_idle = {g: float(np.sum(c["idle_s"])) for g, c in sorted(tel.items())}
    step_time, idle = sum(rank_step.values()), sum(rank_idle.values())
    energy = sum(float(np.nansum(c["energy_j"])) for c in tel.values())
    m["ranks"] = len(tel)
    m["steps"] = max((len(c["step"]) for c in tel.values()), default=0)
    m["telemetry_window"] = "replay" if (run.window and tel is not run.telemetry) else "all"
    m["idle_fraction"] = idle / step_time if step_time > 0 else None
    # each rank's idle over its own step time (ranks that logged no time left out)
    m["rank_idle_fraction"] = {str(g): rank_idle[g] / t for g, t in rank_step.items() if t > 0}
    m["idle_fraction_model"] = model_idle_fraction(tel)
    m["idle_sources"] = dict(run.idle_sources)
    m["energy_j"] = energy if tel else None
    m["energy_sources"] = sorted(run.energy_sources)
    m["unsettled_energy_lines"] = int(sum(np.isnan(c["energy_j"]).sum() for c in tel.values()))
    m["kv_balance"] = kv_balance(tel)
    # what the server's own /metrics said of the replay window (a remote server's only idle figure)
    server = (run.summary or {}).get("server_metrics") or {}
    m["idle_fraction_server"] = server.get("idle_fraction")
    m["joules_per_token_server"] = server.get("energy_j_per_output_token")

    reqs = run.requests or []
    ok = [r for r in reqs if r.get("ok")]
    if reqs:
        # Every token the server produced cost energy, including those of failed attempts.
        tokens = int(sum(r.get("tokens_received") or 0 for r in reqs))
        m["tokens_source"] = "replay"
    elif tel:
        # Without replay output: each running request makes one token per decode step.
        tokens = int(sum(float(np.sum(c["batch_size"])) for c in tel.values()))
        m["tokens_source"] = "telemetry (sum of batch sizes)"
    else:
        tokens, m["tokens_source"] = int((run.summary or {}).get("output_tokens") or 0), "summary"
    m["output_tokens"] = tokens
    m["joules_per_token"] = energy / tokens if (tel and tokens > 0) else None

    wall = (run.summary or {}).get("wall_time_s")
    if not wall and tel:
        wall = max(float(c["wall_time"].max()) for c in tel.values()) - min(
            float(c["wall_time"].min()) for c in tel.values())
    ok_tokens = int(sum(r.get("tokens_received") or 0 for r in ok)) if reqs else tokens
    m["wall_time_s"] = wall
    m["throughput_tok_s"] = ok_tokens / wall if wall else None
    m["requests"] = len(reqs) if reqs else (run.summary or {}).get("sent")
    m["ok"] = len(ok) if reqs else (run.summary or {}).get("ok")
    m["failed"] = (len(reqs) - len(ok)) if reqs else (run.summary or {}).get("failed")
    if run.summary:
        m["failure_reasons"] = run.summary.get("failure_reasons", {})
        m["retries"] = run.summary.get("retries")
    for key in ("ttft_s", "tpot_s", "latency_s"):
        if reqs:
            p50, p99 = _pcts(r.get(key) for r in ok)
        else:
            s = (run.summary or {}).get(key) or {}
            p50, p99 = s.get("p50"), s.get("p99")
        m[f"{key[:-2]}_p50_s"], m[f"{key[:-2]}_p99_s"] = p50, p99
    return m


def _f(x, fmt="{:.1f}", scale=1.0) -> str:
    if x is None:
        return "-"
    return fmt.format(x * scale if scale != 1.0 else x)


def format_table(metrics: list[dict]) -> str:
    head = ("| run | ranks | steps | idle % | idle % (model) | idle % (/metrics) | J / token | energy source | tok/s "
            "| TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ok / failed | KV balance |")
    rows = [head, "|" + "---|" * 13]
    for m in metrics:
        rows.append(
            f"| {m['run']} | {m['ranks']} | {m['steps']} | {_f(m['idle_fraction'], '{:.1f}', 100)} "
            f"| {_f(m.get('idle_fraction_model'), '{:.1f}', 100)} "
            f"| {_f(m.get('idle_fraction_server'), '{:.1f}', 100)} "
            f"| {_f(m['joules_per_token'], '{:.3f}')} | {', '.join(m['energy_sources']) or '-'} "
            f"| {_f(m['throughput_tok_s'])} "
            f"| {_f(m['ttft_p50_s'], scale=1e3)} / {_f(m['ttft_p99_s'], scale=1e3)} "
            f"| {_f(m['tpot_p50_s'], '{:.2f}', 1e3)} / {_f(m['tpot_p99_s'], '{:.2f}', 1e3)} "
            f"| {_f(m['ok'], '{}')} / {_f(m['failed'], '{}')} | {_f(m['kv_balance'], '{:.3f}')} |"
        )
    return "\n".join(rows)


# -- plots -----------------------------------------------------------------------------------


def _downsample(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of y in equal time bins (vectorised) when there are too many points to draw."""
    if t.size <= _MAX_PLOT_POINTS:
        return t, y
    edges = np.linspace(t[0], t[-1], _MAX_PLOT_POINTS + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, _MAX_PLOT_POINTS - 1)
    ok = ~np.isnan(y)
    cnt = np.bincount(idx[ok], minlength=_MAX_PLOT_POINTS)
    sums = np.bincount(idx[ok], weights=y[ok], minlength=_MAX_PLOT_POINTS)
    keep = cnt > 0
    centers = (edges[:-1] + edges[1:]) / 2
    return centers[keep], sums[keep] / cnt[keep]


FIGURES = (
    # file name, column, y scale, y label, title
    ("idle_per_rank.png", "idle_s", 1e3, "barrier idle per step (ms)", "idle per step"),
    ("power.png", "power_w", 1.0, "power (W)", "power per rank"),
    ("kv_tokens.png", "kv_tokens", 1.0, "KV tokens", "KV tokens per rank"),
)


def plot_runs(runs: list[RunData], metrics: list[dict], out: str | os.PathLike) -> list[str]:
    """The figures of the runs (and of their `compute_metrics`) under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    n = len(runs)
    for fname, col, scale, ylabel, title in FIGURES:
        fig, axes = plt.subplots(1, n, sharey=True, squeeze=False, figsize=(1.5 + 5 * n, 3.8))
        for ax, run in zip(axes[0], runs):
            tel = _windowed(run)
            if not tel:
                ax.text(0.5, 0.5, "no telemetry", ha="center", va="center", transform=ax.transAxes)
            else:
                t0 = min(float(c["wall_time"].min()) for c in tel.values())
                binned = False
                for g, c in sorted(tel.items()):
                    x, y = _downsample(c["wall_time"] - t0, c[col] * scale)
                    binned |= x.size < c[col].size
                    ax.plot(x, y, lw=0.9, label=f"rank {g}")
                if binned:
                    ax.text(0.01, 0.98, f"mean per step in {_MAX_PLOT_POINTS} time bins", fontsize=7,
                            va="top", transform=ax.transAxes, color="0.4")
                if len(tel) <= 16:
                    ax.legend(fontsize=7, loc="upper right")
            label = title
            if col == "power_w" and run.energy_sources:
                label += f" ({', '.join(sorted(run.energy_sources))})"
            ax.set_title(f"{run.name}: {label}", fontsize=9)
            ax.set_xlabel("time (s)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    paths.append(_plot_rank_idle(plt, metrics, out / "idle_fraction_by_rank.png"))
    return paths


def _plot_rank_idle(plt, metrics: list[dict], path: Path) -> str:
    """Grouped bars: each rank's idle fraction, one bar per run, and each run's value over
    all ranks as a dashed line (which rank waits, and how much each policy saves)."""
    per_run = [(m["run"], {int(g): v for g, v in m["rank_idle_fraction"].items()}, m["idle_fraction"])
               for m in metrics]
    ranks = sorted({g for _, fr, _ in per_run for g in fr})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.35 * len(ranks) * max(len(per_run), 1)), 3.8))
    if not ranks:
        ax.text(0.5, 0.5, "no telemetry", ha="center", va="center", transform=ax.transAxes)
    else:
        width = 0.8 / len(per_run)
        x = np.arange(len(ranks))
        top = max([v for _, fr, _ in per_run for v in fr.values()] + [0.0])
        ax.set_ylim(0, 100 * top * 1.3 + 1e-9)  # (headroom for the legend)
        for k, (name, fr, overall) in enumerate(per_run):
            bars = ax.bar(x - 0.4 + width * (k + 0.5), [100 * fr.get(g, np.nan) for g in ranks], width,
                          label=name)
            if overall is not None:
                ax.axhline(100 * overall, ls="--", lw=0.9, color=bars.patches[0].get_facecolor())
        ax.set_xticks(x, [str(g) for g in ranks] if len(ranks) <= 32 else
                      [str(g) if i % max(1, len(ranks) // 16) == 0 else "" for i, g in enumerate(ranks)])
        ax.legend(fontsize=7, loc="upper right", ncol=min(len(per_run), 4))
    ax.set_xlabel("DP rank")
    ax.set_ylabel("barrier idle (% of step time)")
    ax.set_title("idle per rank (dashed: all ranks)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- entry points ----------------------------------------------------------------------------


def _unique_names(dirs: list[str]) -> list[str]:
    names = [Path(d).name or d for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(d)) for d in dirs]  # same basename twice: use the full paths


def _plots_dir(dirs: list[str], out: str | None) -> str:
    """--out, or its default: checked like the flag (the default one is not, and a run
    directory may hold a file named `plots` or be read-only)."""
    default = out is None
    if default:
        out = str(Path(dirs[0]) / "plots") if len(dirs) == 1 else "report"
    try:
        return output_dir(out)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--out{f' (default {out})' if default else ''}: {exc}") from None


def report(dirs: list[str], out: str | None = None, json_out: str | None = None,
           plots: bool = True) -> tuple[list[dict], list[str]]:
    """Load, measure and plot runs; returns (metrics per run, plot paths)."""
    if not dirs:
        raise UsageError("no run directory given")
    runs = [load_run(d, name) for d, name in zip(dirs, _unique_names(dirs))]
    metrics = [compute_metrics(r) for r in runs]
    paths = plot_runs(runs, metrics, _plots_dir(dirs, out)) if plots else []
    if json_out:
        write_json(json_out, {"runs": metrics, "plots": paths})
    return metrics, paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="run directories (telemetry rank*.jsonl and/or replay requests.jsonl, summary.json)")
    p.add_argument("--out", type=output_dir, default=None,
                   help="directory for the PNG plots (default DIR/plots for one run, ./report for several)")
    p.add_argument("--json", type=output_file, default=None, metavar="OUT", help="also write the metrics as JSON to this file")
    p.add_argument("--no-plots", action="store_true", help="print the table only")


def main(args: argparse.Namespace) -> int:
    metrics, paths = report(args.dirs, args.out, args.json, plots=not args.no_plots)
    print(format_table(metrics))
    for m in metrics:
        notes = []
        if m["energy_sources"] and any(s.startswith("model:") for s in m["energy_sources"]):
            notes.append("energy from the power model, not measured")
        if m.get("idle_sources") and "predicted" in m["idle_sources"]:
            notes.append(f"idle partly predicted ({m['idle_sources'].get('predicted', 0)} lines)")
        if m.get("failure_reasons"):
            notes.append(f"failures: {m['failure_reasons']}")
        if m["unsettled_energy_lines"]:
            notes.append(f"{m['unsettled_energy_lines']} lines without energy")
        if notes:
            print(f"- {m['run']}: " + "; ".join(notes))
    for p in paths:
        print(f"plot: {p}")
    if args.json:
        print(f"metrics: {args.json}")
    return 0
