"""`sglang-ext` command line: simulate | replay | report | watch.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; modules are imported only when their command runs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sglang_ext.argtypes import LOG_LEVELS, call_main

COMMANDS = {
    "simulate": ("sglang_ext.sim.command", "Replay a trace through the barrier-synchronized DP simulator and compare policies."),
    "replay": ("sglang_ext.replay", "Send a timed trace to a live SGLang server and measure TTFT/TPOT/latency."),
    "report": ("sglang_ext.report", "Summarise telemetry and replay output of one or more runs, with plots."),
    "watch": ("sglang_ext.watch", "Watch a live server's balancer from its /metrics: each rank's barrier idle, "
                                  "power and load, and the controller's placements."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglang-ext", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="warning", type=str.lower,
                        choices=LOG_LEVELS, help="Logging level.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import lazily only the chosen command's module (argv peek keeps --help cheap).
        if name in sys.argv[1:] or "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    return call_main(lambda: module.main(args), prog=f"sglang-ext {args.command}")


if __name__ == "__main__":
    sys.exit(main())
