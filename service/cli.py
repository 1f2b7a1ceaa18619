"""Command line: ``device-rebind run | check-config | replay``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime

from service import __version__, logs
from service.config import ConfigError, load_kafka_settings, load_settings, masked
from service.events import parse_rfc3339


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
    replay = commands.add_parser(
        "replay",
        help="send dead letters or failed swaps to the input topic again, after a fix",
        description="Reads the dead-letter or rebind-failed topic, keeps the records matching "
        "the filters and produces the swaps they stand for into the input topic. Replaying the "
        "same failure twice calls the platform once.",
    )
    replay.add_argument("source", choices=("dlq", "rebind-failed"))
    replay.add_argument(
        "--error-code",
        action="append",
        default=[],
        metavar="CODE",
        help="errorCode (rebind-failed) or rebind-error-reason (dlq); repeatable",
    )
    replay.add_argument(
        "--category", action="append", default=[], help="rebind-failed category; repeatable"
    )
    replay.add_argument("--since", type=_timestamp, help="records written at or after (RFC 3339)")
    replay.add_argument("--until", type=_timestamp, help="records written before (RFC 3339)")
    replay.add_argument("--limit", type=int, help="at most this many records")
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be sent, send nothing"
    )
    return parser


def _timestamp(text: str) -> datetime:
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from exc


def _replay(args: argparse.Namespace) -> int:
    from service import replay  # noqa: PLC0415 - Kafka imports only when needed

    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        print(f"device-rebind: {exc}", file=sys.stderr)
        return 2
    filters = replay.Filters(
        error_codes=frozenset(args.error_code),
        categories=frozenset(args.category),
        since=args.since,
        until=args.until,
        limit=args.limit,
    )
    asyncio.run(replay.replay(settings, args.source, filters, dry_run=args.dry_run, out=sys.stdout))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "replay":
        return _replay(args)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"device-rebind: {exc}", file=sys.stderr)
        return 2
    logs.register_settings_secrets(settings)  # masked in every log line from now on
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
