"""Trace loaders: Azure 2023 CSV, Mooncake JSONL, and the paper's length JSON.

Every loader returns a `Trace` of numpy arrays (arrival time in seconds from
the first request, or None for length-only files; prompt and output lengths).
Bad rows raise `TraceError` naming file, line and field; with `skip_bad=True`
they are dropped instead and counted in `Trace.skipped`.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import TraceError

logger = logging.getLogger(__name__)

# Lengths are token counts held as int64 and summed over a rank's requests; a
# count above int32 is a corrupt row, not a prompt (no model has that context).
MAX_TOKENS = 2**31 - 1


@dataclass
class Trace:
    name: str
    prompt_len: np.ndarray  # (N,) int64
    output_len: np.ndarray  # (N,) int64
    arrival_s: np.ndarray | None = None  # (N,) float64 seconds from the first request
    skipped: int = 0
    skip_reasons: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.prompt_len.shape[0])

    @property
    def timed(self) -> bool:
        return self.arrival_s is not None

    def subset(self, index: np.ndarray) -> "Trace":
        arr = None if self.arrival_s is None else self.arrival_s[index]
        return Trace(self.name, self.prompt_len[index], self.output_len[index], arr, self.skipped, self.skip_reasons)

    def head(self, n: int | None) -> "Trace":
        return self if n is None or n >= len(self) else self.subset(np.arange(n))

    def window(self, start: int, n: int) -> "Trace":
        """Rows [start, start + n), arrival times counted from the window's first request."""
        w = self.subset(np.arange(start, min(start + n, len(self))))
        if w.arrival_s is not None and len(w):
            w.arrival_s = w.arrival_s - w.arrival_s[0]
        return w

    def repeat(self, k: int) -> "Trace":
        """`k` copies back to back: a longer replay of the same traffic, so a
        run's steady state outweighs the drain at its end. Each copy starts one
        mean inter-arrival gap after the previous copy's last request, which
        keeps the recorded rate (and so the load a rate scale gives)."""
        if k < 1:
            raise ValueError(f"repeat count must be at least 1, got {k}")
        if k == 1:
            return self
        arr = None
        if self.arrival_s is not None:
            t = self.arrival_s - self.arrival_s[0]
            span = float(t[-1])
            period = span + (span / (len(t) - 1) if len(t) > 1 and span > 0 else 1.0)
            arr = (t[None, :] + period * np.arange(k)[:, None]).ravel()
        return Trace(self.name, np.tile(self.prompt_len, k), np.tile(self.output_len, k), arr,
                     self.skipped, dict(self.skip_reasons))


class _Rows:
    """Collects validated rows; raises or skips on the first bad field."""

    def __init__(self, path: Path, skip_bad: bool, timed: bool):
        self.path, self.skip_bad, self.timed = path, skip_bad, timed
        self.t: list[float] = []
        self.p: list[int] = []
        self.o: list[int] = []
        self.skipped = 0
        self.reasons: dict[str, int] = {}

    def bad(self, line: int, fld: str, why: str) -> None:
        msg = f"{self.path}:{line}: field {fld!r}: {why}"
        if not self.skip_bad:
            raise TraceError(msg)
        self.skipped += 1
        key = f"{fld}: {why.split(' (')[0]}"
        self.reasons[key] = self.reasons.get(key, 0) + 1
        logger.debug("skipping %s", msg)

    def length(self, line: int, fld: str, raw) -> int | None:
        if raw is None or raw == "":
            self.bad(line, fld, "missing")
            return None
        if isinstance(raw, bool):
            self.bad(line, fld, f"not an integer ({raw!r})")
            return None
        try:
            value = int(raw) if not isinstance(raw, float) else None
            if value is None and float(raw).is_integer():
                value = int(raw)
        except (TypeError, ValueError):
            value = None
        if value is None:
            self.bad(line, fld, f"not an integer ({raw!r})")
            return None
        if value <= 0:
            self.bad(line, fld, f"must be positive (got {value})")
            return None
        if value > MAX_TOKENS:
            self.bad(line, fld, f"too large (got {value}, at most {MAX_TOKENS})")
            return None
        return value

    def add(self, line: int, t, p, o, t_field: str) -> None:
        if self.timed:
            if t is None:
                return
            if self.t and t < self.t[-1]:
                self.bad(line, t_field, f"timestamp goes backwards ({t} after {self.t[-1]})")
                return
            self.t.append(t)
        self.p.append(p)
        self.o.append(o)

    def build(self, name: str) -> Trace:
        if not self.p:
            raise TraceError(f"{self.path}: no valid requests")
        arr = None
        if self.timed:
            arr = np.asarray(self.t, dtype=np.float64)
            arr -= arr[0]
        if self.skipped:
            logger.warning("%s: skipped %d bad rows (%s)", self.path, self.skipped, self.reasons)
        return Trace(name, np.asarray(self.p, dtype=np.int64), np.asarray(self.o, dtype=np.int64), arr,
                     self.skipped, dict(self.reasons))


@contextmanager
def _reading(path: Path):
    """Open a trace as UTF-8 text; a directory, an unreadable file, bytes that
    are not UTF-8 or a CSV field past the csv module's limit become one
    TraceError naming the file (and the line where it can be found)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            yield fh
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace file") from None
    except PermissionError:
        raise TraceError(f"{path}: permission denied") from None
    except UnicodeDecodeError:
        raise TraceError(_not_utf8(path)) from None
    except csv.Error as exc:
        raise TraceError(f"{path}: unreadable CSV ({exc})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _not_utf8(path: Path) -> str:
    # The decoder reads in chunks, so the line it failed on is found from the bytes.
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    return f"{path}: not UTF-8 text"


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float's range
        return False


def _azure_time(raw: str) -> float:
    # "2023-11-16 18:15:46.6805900": 7 fractional digits, more than strptime's %f takes.
    head, _, frac = raw.strip().partition(".")
    if frac and not frac.isdigit():  # float() would take "5e999" (inf) or "nan"
        raise ValueError(frac)
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: Path, skip_bad: bool = False) -> Trace:
    rows = _Rows(path, skip_bad, timed=True)
    with _reading(path) as fh:
        reader = csv.DictReader(fh)
        need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
        if not reader.fieldnames:
            raise TraceError(f"{path}: empty file (expected a header line {','.join(need)})")
        missing = [c for c in need if c not in reader.fieldnames]
        if missing:
            raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)} (expected {', '.join(need)})")
        try:
            for i, row in enumerate(reader, start=2):
                _azure_row(rows, i, row)
        except csv.Error as exc:
            # line_num counts the lines read before the failing one.
            raise TraceError(f"{path}:{reader.line_num + 1}: unreadable CSV ({exc})") from None
    return rows.build(path.stem)


def _azure_row(rows: _Rows, i: int, row: dict) -> None:
    raw_t = row.get("TIMESTAMP")
    t = None
    if not raw_t:
        rows.bad(i, "TIMESTAMP", "missing")
    else:
        try:
            t = _azure_time(raw_t)
        except ValueError:
            rows.bad(i, "TIMESTAMP", f"not a timestamp ({raw_t!r})")
    if t is None:
        return
    p = rows.length(i, "ContextTokens", row.get("ContextTokens"))
    o = rows.length(i, "GeneratedTokens", row.get("GeneratedTokens")) if p else None
    if p and o:
        rows.add(i, t, p, o, "TIMESTAMP")


def load_mooncake_jsonl(path: Path, skip_bad: bool = False) -> Trace:
    rows = _Rows(path, skip_bad, timed=True)
    with _reading(path) as fh:
        for i, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.bad(i, "<line>", f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(rec, dict):
                rows.bad(i, "<line>", "not a JSON object")
                continue
            raw_t = rec.get("timestamp")
            if raw_t is None:
                rows.bad(i, "timestamp", "missing")
                continue
            if (isinstance(raw_t, bool) or not isinstance(raw_t, (int, float))
                    or not _finite(raw_t) or raw_t < 0):
                rows.bad(i, "timestamp", f"not a finite non-negative number ({raw_t!r})")
                continue
            p = rows.length(i, "input_length", rec.get("input_length"))
            o = rows.length(i, "output_length", rec.get("output_length")) if p else None
            if p and o:
                rows.add(i, float(raw_t) / 1000.0, p, o, "timestamp")  # ms -> s
    return rows.build(path.stem)


def load_length_json(path: Path, skip_bad: bool = False) -> Trace:
    """The paper's files: {"data": [{"input_length", "output_length"}, ...]}. Line
    numbers in errors are the record's index (the files are pretty-printed)."""
    try:
        with _reading(path) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise TraceError(f"{path}: field 'data': missing or not a list")
    rows = _Rows(path, skip_bad, timed=False)
    for i, rec in enumerate(data):
        where = f"record {i}"
        if not isinstance(rec, dict):
            rows.bad(where, "data[]", "not an object")
            continue
        p = rows.length(where, "input_length", rec.get("input_length"))
        o = rows.length(where, "output_length", rec.get("output_length")) if p else None
        if p and o:
            rows.add(where, None, p, o, "")
    return rows.build(path.stem)


def load_trace(path: str | Path, skip_bad: bool = False) -> Trace:
    """Load any supported trace by extension (.csv Azure, .jsonl Mooncake, .json lengths)."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_azure_csv(path, skip_bad)
    if suffix == ".jsonl":
        return load_mooncake_jsonl(path, skip_bad)
    if suffix == ".json":
        return load_length_json(path, skip_bad)
    raise TraceError(f"{path}: unknown trace format {suffix!r} (expected .csv, .jsonl or .json)")


def paper_order(trace: Trace, n: int | None, seed: int = 42) -> Trace:
    """The paper's request order: valid rows permuted by
    default_rng(seed).choice(len, size=n, replace=False)."""
    total = len(trace)
    n = total if n is None else n
    if n > total:
        raise TraceError(f"{trace.name}: asked for {n} requests, trace has {total}")
    idx = np.random.default_rng(seed).choice(total, size=n, replace=False)
    return trace.subset(idx)
