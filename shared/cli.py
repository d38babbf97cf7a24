"""The ``stylequeue`` command: the map of its subcommands, and the dispatcher.

``COMMANDS`` names the module that defines each subcommand. Such a module has ``SUMMARY`` (command
-> one-line help) and ``register(subparsers, names)``, which adds the named commands' parsers with
``func`` set. Only the chosen command's parser is built; the others appear in ``stylequeue --help``
by their summary. So `run`'s parser, whose options come from the engine's config (and so import
torch), is built only for `stylequeue run`, and heavy imports (torch, FastAPI, Celery) happen in
the handlers: ``stylequeue --help`` stays fast and the API image needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from shared import logs

# Every subcommand -> the module that defines it, in help order.
COMMANDS: dict[str, str] = {
    # engine: stylise on this machine, no server (worker image)
    "run": "worker.run_cli",
    "weights": "worker.run_cli",
    # server: the HTTP API, the database schema, the GPU workers, the dispatcher
    "api": "shared.server_cli",
    "migrate": "shared.server_cli",
    "keys": "shared.tenant_cli",
    "tenants": "shared.tenant_cli",
    "worker": "shared.server_cli",
    "dispatch": "shared.server_cli",
    "webhooks": "shared.server_cli",
    "reconcile": "shared.server_cli",
    "health": "shared.health_cli",
    # client: talk to a running API over HTTP
    "submit": "api.client_cli",
    "status": "api.client_cli",
    "webhook-secret": "api.client_cli",
}

# What an image may leave out: the API image has no torch (nor worker/run_cli.py, see
# deploy/Dockerfile.api). A command whose module, or what its parser needs, is missing is absent.
OPTIONAL_PACKAGES = frozenset({"torch", "torchvision", "celery"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, complete for ``command``; every other command is only its one-line entry."""
    parser = argparse.ArgumentParser(
        prog="stylequeue", description="Batch neural style transfer: engine, API, workers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
            if name == command:
                module.register(sub, [name])
            else:
                sub.add_parser(name, help=module.SUMMARY[name])
        except ModuleNotFoundError as exc:
            if not _left_out(exc, module_name):
                raise
    return parser


def _left_out(exc: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module that is missing is one this installation may lack."""
    missing = exc.name or ""
    return (
        missing.split(".")[0] in OPTIONAL_PACKAGES
        or missing == module_name
        or module_name.startswith(missing + ".")
    )


def command_of(argv: Sequence[str]) -> str | None:
    """The command word: the first argument that is not an option (the top level has flags only)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)  # STYLEQUEUE_LOG_FORMAT
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
