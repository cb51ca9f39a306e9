"""argparse types shared by `sglang-ext` and the scripts: a bad value is
reported by argparse with the flag's name (exit status 2, no traceback)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .errors import UsageError


def number(kind, ok, need: str):
    """argparse type: parse with `kind`, then require ok(value) (message: need).
    Floats must be finite: an inf or nan would pass a bound check (or fail none)
    and then break arithmetic far from the flag (an inf pool deadline, a nan load)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {v}")
        return v

    return parse


positive_int = number(int, lambda v: v > 0, "positive")
nonneg_int = number(int, lambda v: v >= 0, ">= 0")
positive_float = number(float, lambda v: v > 0, "positive")
nonneg_float = number(float, lambda v: v >= 0, ">= 0")


# Upper bounds on sizes: past them a run would not finish or its arrays would not fit
# in memory (a (G, H) projection per call at H = 1e9), so a typo is refused at the flag.
MAX_RANKS = 4096  # DP ranks G (deployments run 8 to 256)
MAX_BATCH = 1 << 16  # running requests per rank B
MAX_HORIZON = 100_000  # lookahead steps H (the pool tail's default is 2,000)
MAX_REPEAT = 1000  # --trace-repeat

rank_count = number(int, lambda v: 1 <= v <= MAX_RANKS, f"between 1 and {MAX_RANKS}")
batch_size = number(int, lambda v: 1 <= v <= MAX_BATCH, f"between 1 and {MAX_BATCH}")
horizon_steps = number(int, lambda v: 0 <= v <= MAX_HORIZON, f"between 0 and {MAX_HORIZON}")
repeat_count = number(int, lambda v: 1 <= v <= MAX_REPEAT, f"between 1 and {MAX_REPEAT}")


def comma_list(item):
    """argparse type: a comma-separated list, each entry parsed by `item`."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"empty entry in {text!r}")
        return [item(p) for p in parts]  # item's errors name the bad entry

    return parse


def grid_cell(text: str) -> tuple[int, int]:
    """argparse type: a GxB cell (ranks x running-request slots per rank), e.g. 256x72."""
    try:
        G, B = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GxB such as 32x72, got {text!r}") from None
    if not (1 <= G <= MAX_RANKS and 1 <= B <= MAX_BATCH):
        raise argparse.ArgumentTypeError(f"G must be 1..{MAX_RANKS} and B 1..{MAX_BATCH}, got {text!r}")
    return G, B


def existing_file(text: str) -> Path:
    """argparse type: a file that exists."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return p


TIMED_SUFFIXES = (".csv", ".jsonl")  # traces with arrival times (Azure, Mooncake)


def trace_file(trace_dir: Path, timed: bool = False):
    """argparse type: a trace file, as a path or a name under `trace_dir`
    (the scripts pass the repository's data/traces); `timed`: one with arrival
    times, for online runs (not the paper's length-only .json)."""

    def parse(text: str) -> Path:
        for p in (Path(text), Path(trace_dir) / text):
            if p.is_file():
                if timed and p.suffix.lower() not in TIMED_SUFFIXES:
                    raise argparse.ArgumentTypeError(
                        f"{text!r} has no arrival times (an online run needs an Azure .csv or a Mooncake .jsonl)")
                return p
        shipped = ", ".join(sorted(f.name for f in Path(trace_dir).glob("*") if f.is_file() and f.suffix != ".md"))
        raise argparse.ArgumentTypeError(f"no such trace file: {text!r} (in {trace_dir}: {shipped})")

    return parse


def _writable(text: str, want_dir: bool) -> str:
    """text, if a file (or, want_dir, a directory) can be written there: checked before a
    run, so a long benchmark does not end in an unwritable path and lose its results."""
    p = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    if p.exists() and p.is_dir() != want_dir:
        raise argparse.ArgumentTypeError(f"{text!r} is {'not ' if want_dir else ''}a directory")
    if p.exists():  # (of the right kind: overwritten, or written into)
        if not os.access(p, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is not writable")
        return text
    above = p.parent
    while not above.exists():  # (the run creates the missing directories)
        above = above.parent
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(above)!r} is not a directory")
    if not os.access(above, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(above)!r} is not writable")
    return text


def output_file(text: str) -> str:
    """argparse type: a file to write (its missing directories are created)."""
    return _writable(text, want_dir=False)


def output_dir(text: str) -> str:
    """argparse type: a directory to write into (created if missing)."""
    return _writable(text, want_dir=True)


def write_json(path: str, doc, indent: int = 2) -> None:
    """Write `doc` as JSON to an output_file path, its directory made. A failed write or
    close (a full disk, /dev/full) raises an OSError with no file name: it is given one,
    so the error line names the path."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=indent)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise


def saved_rows(path: Path, strings: tuple = (), numbers: tuple = (), nullable: tuple = ()) -> list[dict]:
    """The rows a script's --json wrote, read back for --summary-from: a list of
    objects, each with the `strings` and `numbers` fields (`nullable` ones may also be
    null or left out). A file of another shape is one error naming the file, row and
    field, not a traceback from deep in the summary."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON file written by --json ({exc})") from None
    if not isinstance(doc, list):
        raise UsageError(f"{path}: expected the list of rows a --json run writes, got a JSON {type(doc).__name__}")
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise UsageError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        checks = [(k, str, False) for k in strings] + [(k, (int, float), False) for k in numbers]
        for key, kind, may_be_null in checks + [(k, (int, float), True) for k in nullable]:
            value = row.get(key)
            if value is None and may_be_null:
                continue
            if value is None or isinstance(value, bool) or not isinstance(value, kind):
                what = "missing" if key not in row else f"not a {'string' if kind is str else 'number'} ({value!r})"
                raise UsageError(f"{path}: row {i}: field {key!r}: {what}")
    return doc


def _plot_formats() -> dict[str, str]:
    """The file types matplotlib can save, by extension (backend_bases, not pyplot: no GUI
    backend is chosen while the flags are parsed)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return FigureCanvasBase.get_supported_filetypes()


def plot_file(text: str) -> str:
    """argparse type: an output_file whose extension matplotlib can write (without one,
    matplotlib adds .png): a typo such as .pgn is refused before the run, not after it."""
    ext = Path(text).suffix[1:].lower()
    formats = _plot_formats()
    if ext and ext not in formats:
        raise argparse.ArgumentTypeError(
            f"cannot plot to {text!r}: matplotlib writes no .{ext} files (use one of {', '.join(sorted(formats))})")
    return output_file(text)


def server_url(text: str) -> str:
    """argparse type: an http(s) base URL with a host, e.g. http://127.0.0.1:30000 (a typo
    would otherwise turn into one failed request per trace row)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(text)
        port = u.port  # (raises ValueError when not a number in range)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT (or https://), got {text!r}")
    del port
    return text.rstrip("/")


def _valid(text: str, check) -> str:
    """text, if check(text) raises no ValueError; else argparse's error with its message."""
    try:
        check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def estimator_spec(text: str) -> str:
    """argparse type: oracle, noisy:<delta>, cap, empirical or empirical-prompt."""
    from .estimators import make_estimator

    return _valid(text, lambda t: make_estimator(t, seed=0))


def policy_spec(text: str) -> str:
    """argparse type: a POLICY[:key=val...] spec of a registered policy."""
    from .policies import parse_policy_spec

    return _valid(text, parse_policy_spec)


def cost_preset_name(text: str) -> str:
    """argparse type: a cost preset name (sglang_ext.cost.PRESETS)."""
    from .cost import cost_preset

    return _valid(text, cost_preset)


def power_preset_name(text: str) -> str:
    """argparse type: a power preset name (sglang_ext.cost.POWER_PRESETS)."""
    from .cost import power_preset

    return _valid(text, power_preset)


#: the online traces the scripts replay by default
ONLINE_TRACES = "azure_conv_2023.csv,azure_code_2023.csv,mooncake_conversation.jsonl"


def add_online_grid(ap: argparse.ArgumentParser, trace_dir: Path) -> None:
    """--traces, --ranks, --batch: the (trace, G) cells an online script runs."""
    ap.add_argument("--traces", type=comma_list(trace_file(trace_dir, timed=True)), default=ONLINE_TRACES,
                    help="Comma list of timed trace files (.csv or .jsonl; names under data/traces, or paths).")
    ap.add_argument("--ranks", type=comma_list(rank_count), default="8,32", help="Comma list of DP ranks G.")
    ap.add_argument("--batch", type=batch_size, default=72, help="Max running requests per rank B.")
    ap.add_argument("--trace-repeat", type=repeat_count, default=1,
                    help="Replay each trace this many times back to back (same rate): a longer run, so its "
                         "steady state outweighs the drain after the last arrival.")


def require_device(ap: argparse.ArgumentParser, device: str) -> None:
    """--device cuda where torch sees no CUDA device: argparse's exit 2, before any work."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device")


def repeat_note(k: int) -> str:
    """The words a script's header adds for --trace-repeat (nothing for one pass)."""
    return "" if k == 1 else f", each trace replayed {k} times back to back"


def run_specs(text: str):
    """argparse type: a comma list of POLICY[:key=val...]@BINDING (sim/runs.py)."""
    from .sim.runs import parse_runs  # the policies load only when a script parses its flags

    try:
        return parse_runs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_deep_queue(ap: argparse.ArgumentParser, runs: str = "total_tokens@immediate,jsq@pool,bfio@pool") -> None:
    """--requests-per-rank, --max-pool-wait, --runs: the deep-queue setup of the
    saturated runs (a long replay, a pool deadline above any queueing delay)."""
    ap.add_argument("--requests-per-rank", type=positive_int, default=1000, help="N = min(trace, this * G).")
    ap.add_argument("--max-pool-wait", type=positive_float, default=600.0, help="Pool binding deadline, seconds.")
    ap.add_argument("--runs", type=run_specs, default=runs, help="Comma list of POLICY[:key=val...]@BINDING.")


def add_online_model(ap: argparse.ArgumentParser, power: bool = True) -> None:
    """--estimator, --cost-preset, --power-preset, --max-prompt-len: what an online run assumes."""
    ap.add_argument("--estimator", type=estimator_spec, default="oracle",
                    help="Output-length estimator: oracle, noisy:<delta>, cap, empirical or empirical-prompt "
                         "(empirical learned per prompt-length bucket).")
    ap.add_argument("--cost-preset", type=cost_preset_name, default="paper-dsv3", help="Step-time model.")
    if power:
        ap.add_argument("--power-preset", type=power_preset_name, default="h100", help="Power model for J/token.")
    ap.add_argument("--max-prompt-len", type=positive_int, default=32768, help="Clip prompts to this context limit.")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None,
                    help="Every request's max_new_tokens, as a server or its clients set it: longer outputs stop "
                         "there, and the cap estimator reads it (needed with --estimator cap). Default: no cap.")


def check_online_model(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks across the flags of `add_online_model` (argparse's exit 2 naming them)."""
    if args.estimator == "cap" and args.max_new_tokens is None:
        ap.error("--estimator cap: give --max-new-tokens (traces carry no max_new_tokens of their own)")


LOG_LEVELS = ("debug", "info", "warning", "error")  # --log-level's choices, lower case


def error_line(exc: BaseException) -> str:
    """The one-line message of a bad-input error. An OSError (a path that cannot be read
    or written, e.g. --json /dev/full/x.json) is "PATH: reason", without the errno prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is None:  # (a failed write or close names no file)
            return exc.strerror
        where = str(exc.filename)
        if exc.filename2 is not None:  # (rename, link: both paths)
            where += f" -> {exc.filename2}"
        return f"{where}: {exc.strerror}"
    return str(exc)


def call_main(main, prog: str | None = None) -> int:
    """Run main() and return its exit status. Bad input that gets past argparse (a
    malformed trace line, a bad saved file, an unwritable output path) is one line on
    stderr naming the file and field, status 2, no traceback."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly (before OSError, its base)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as exc:  # (UsageError and TraceError are ValueErrors)
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
        return 2


def run_main(main, prog: str | None = None) -> None:
    """Run a script's main() and exit with its status (see call_main)."""
    sys.exit(call_main(main, prog))
