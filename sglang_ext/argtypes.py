"""argparse types shared by `sglang-ext` and the scripts: a bad value is
reported by argparse with the flag's name (exit status 2, no traceback)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UsageError


def number(kind, ok, need: str):
    """argparse type: parse with `kind`, then require ok(value) (message: need)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {v}")
        return v

    return parse


positive_int = number(int, lambda v: v > 0, "positive")
nonneg_int = number(int, lambda v: v >= 0, ">= 0")
positive_float = number(float, lambda v: v > 0, "positive")
nonneg_float = number(float, lambda v: v >= 0, ">= 0")


def comma_list(item):
    """argparse type: a comma-separated list, each entry parsed by `item`."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"empty entry in {text!r}")
        return [item(p) for p in parts]  # item's errors name the bad entry

    return parse


def existing_file(text: str) -> Path:
    """argparse type: a file that exists."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return p


def trace_file(trace_dir: Path):
    """argparse type: a trace file, as a path or a name under `trace_dir`
    (the scripts pass the repository's data/traces)."""

    def parse(text: str) -> Path:
        for p in (Path(text), Path(trace_dir) / text):
            if p.is_file():
                return p
        shipped = ", ".join(sorted(f.name for f in Path(trace_dir).glob("*") if f.is_file() and f.suffix != ".md"))
        raise argparse.ArgumentTypeError(f"no such trace file: {text!r} (in {trace_dir}: {shipped})")

    return parse


def _checked(build, what: str):
    def parse(text: str) -> str:
        try:
            build(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def estimator_spec(text: str) -> str:
    from .estimators import make_estimator

    return _checked(lambda t: make_estimator(t, seed=0), "estimator")(text)


def policy_spec(text: str) -> str:
    """argparse type: a POLICY[:key=val...] spec of a registered policy."""
    from .policies import parse_policy_spec

    try:
        parse_policy_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cost_preset_name(text: str) -> str:
    from .cost import PRESETS

    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown cost preset {text!r}; choose from {', '.join(PRESETS)}")
    return text


def power_preset_name(text: str) -> str:
    from .cost import POWER_PRESETS

    if text not in POWER_PRESETS:
        raise argparse.ArgumentTypeError(f"unknown power preset {text!r}; choose from {', '.join(POWER_PRESETS)}")
    return text


def run_main(main, prog: str | None = None) -> None:
    """Run a script's main() and exit with its status. Bad input that gets past
    argparse (a malformed trace line, a bad saved file) is one line on stderr
    naming the file and field, exit status 2, no traceback."""
    prog = prog or Path(sys.argv[0]).name
    try:
        code = main()
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(int(code or 0))
