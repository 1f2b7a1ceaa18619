"""Command line: ``device-rebind run | check-config | replay``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from service import __version__
from service.config import ConfigError, load_settings, masked


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-rebind",
        description="Refreshes device keys on the IoT platform when devices are swapped.",
        epilog="Configuration comes from REBIND_* environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the service (the default)")
    check = commands.add_parser(
        "check-config", help="validate the configuration and print it with secrets masked"
    )
    check.add_argument("--format", choices=("env", "json"), default="env")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"device-rebind: {exc}", file=sys.stderr)
        return 2
    if command == "check-config":
        effective = masked(settings)
        if args.format == "json":
            print(json.dumps(effective, indent=2))
        else:
            for name, value in effective.items():
                print(f"{name}={'' if value is None else value}")
        return 0
    from service.app import run  # noqa: PLC0415 - keeps check-config free of Kafka imports

    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
