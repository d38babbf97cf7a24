"""The ``stylequeue`` command: one parser, with subcommands registered by the modules that own them.

Each ``register(subparsers)`` adds its subcommands and sets ``func``; heavy imports (torch, FastAPI,
Celery) happen inside the handlers so ``stylequeue --help`` stays fast and the API image needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Modules that contribute subcommands, in help order.
COMMAND_MODULES = ("worker.cli_engine", "api.cli", "worker.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylequeue", description="Batch neural style transfer: engine, API, workers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # The API image has no torch: commands whose module cannot import are simply absent.
            if exc.name and exc.name.split(".")[0] in {"torch", "torchvision", "celery"}:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
