"""Command line: ``device-rebind run | check-config | topics | replay | ledger``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service import __version__, logs
from service.config import (
    ConfigError,
    KafkaOnlySettings,
    defaults,
    load_kafka_settings,
    load_settings,
    masked,
)
from service.events import INVALID_REASONS, parse_rfc3339
from service.ops_port import port_problem

PROG = "device-rebind"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Refreshes device keys on the IoT platform when devices are swapped.",
        epilog="Configuration comes from REBIND_* environment variables: "
        f"'{PROG} check-config --defaults' lists them all, the README explains them.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run",
        help="run the service (the default)",
        description="Run the service: consume swaps, refresh keys, publish outcomes. It waits "
        "(and /readyz answers 503) while Kafka cannot be reached or topics are missing, and "
        "stops on SIGTERM after finishing in-flight work.",
    )
    check = commands.add_parser(
        "check-config",
        help="validate the configuration and print it with secrets masked",
        description="Validate the REBIND_* environment as 'run' would (values, files, the HTTP "
        "port) and print the effective configuration, secrets masked. Exit 2 with one line "
        "naming every variable at fault.",
    )
    check.add_argument(
        "--format",
        choices=("env", "json"),
        default="env",
        help="env: NAME=value lines (default); json: one object",
    )
    check.add_argument(
        "--defaults",
        action="store_true",
        help="print every setting with its default instead (no variable needs to be set)",
    )
    topics = commands.add_parser(
        "topics",
        help="plan, create or check the Kafka topics the service needs",
        description="Compare the topics the service needs (names from REBIND_TOPICS__*) with "
        "the cluster, using the service's own Kafka settings. 'plan' prints what 'create' "
        "would do; 'create' creates the missing topics (co-partitioned and compacted where "
        "needed) and never changes an existing one; 'check' exits 1 when a topic is missing "
        "(but the optional urgent lane) or differs in a way that breaks the service. All three "
        "are safe to repeat.",
    )
    topics.add_argument("action", choices=("plan", "create", "check"), help="what to do")
    topics.add_argument(
        "--partitions",
        type=_positive,
        metavar="N",
        help="partitions of the input topic when it must be created (default: the existing "
        "input's count, else 6); co-partitioned topics always get the input's count",
    )
    topics.add_argument(
        "--replication-factor",
        type=_positive,
        metavar="R",
        help="replication factor of created topics (default: the broker count, at most 3)",
    )
    _replay_parser(commands)
    _swap_parser(commands)
    ledger = commands.add_parser(
        "ledger",
        help="inspect or clear a device's entry in the per-device ledger",
        description="The ledger decides which swap of a device is the latest. 'clear' prints the "
        "device's entry and writes its tombstone to the device's ledger partition, in a "
        "transaction of that input partition's transactional id: the partition's current owner "
        "is fenced as by a new owner, and the next owner reloads the ledger without the entry. "
        "Use it for a device blocked by a swap dated ahead (every later swap SUPERSEDED).",
    )
    ledger.add_argument("action", choices=("clear",), help="clear: remove the device's entry")
    ledger.add_argument("device_id", metavar="DEVICE_ID", help="the deviceId (the record key)")
    ledger.add_argument(
        "--dry-run",
        action="store_true",
        help="print what was found and would be done, write nothing",
    )
    return parser


def _replay_parser(commands: Any) -> None:
    from service.platform.errors import Category  # noqa: PLC0415 - only to list the categories

    categories = sorted(c.value for c in Category)
    reasons = ", ".join(sorted(INVALID_REASONS))
    replay = commands.add_parser(
        "replay",
        help="send dead letters or failed swaps to the input topic again, after a fix",
        description="Reads the dead-letter or rebind-failed topic, keeps the records matching "
        "the filters and produces the swaps they stand for into the input topic. Replaying the "
        "same failure twice calls the platform once. Filters are checked before connecting.",
        epilog=f"dead-letter reasons: {reasons}. rebind-failed categories: "
        f"{', '.join(categories)}.",
    )
    replay.add_argument(
        "source",
        choices=("dlq", "rebind-failed"),
        help="dlq: the dead-letter topic (REBIND_TOPICS__DEAD_LETTER); rebind-failed: the "
        "failure outcomes (REBIND_TOPICS__REBIND_FAILED)",
    )
    replay.add_argument(
        "--error-code",
        action="append",
        default=[],
        metavar="CODE",
        help="rebind-failed: the errorCode (e.g. 100403, DEADLINE_EXCEEDED); dlq: the "
        "rebind-error-reason (one of the reasons below); repeatable",
    )
    replay.add_argument(
        "--category",
        action="append",
        default=[],
        choices=categories,
        metavar="CATEGORY",
        help="rebind-failed only: the failure's category (listed below); repeatable",
    )
    replay.add_argument("--since", type=_timestamp, help="records written at or after (RFC 3339)")
    replay.add_argument("--until", type=_timestamp, help="records written before (RFC 3339)")
    replay.add_argument("--limit", type=_positive, metavar="N", help="at most N records (N >= 1)")
    replay.add_argument(
        "--fresh-time",
        action="store_true",
        help="rebind-failed only: send each swap with the current time as its CloudEvent time "
        "(and record timestamp), on purpose: it then counts as the device's latest swap. For "
        "swaps answered SWAP_TOO_OLD (older than REBIND_LEDGER__RETENTION_DAYS), which are "
        "answered SWAP_TOO_OLD again if replayed with their own time",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be sent, send nothing"
    )
    replay.set_defaults(subparser=replay)


def _swap_parser(commands: Any) -> None:
    swap = commands.add_parser(
        "swap",
        help="publish one swap by hand (support staff re-keying a device)",
        description="Build one device.swapped event, validate it with the service's own model, "
        "publish it to the deviceId's partition of the input topic (or of the urgent lane with "
        "--urgent) and print its event id. Its time is now: it is the device's latest swap. "
        "Exit 0 once sent (with --wait: once credential-updated arrives), 2 when the event is "
        "invalid, 3 when --wait sees rebind-failed, 1 on anything else (no outcome in time).",
    )
    swap.add_argument("device_id", metavar="DEVICE_ID", help="the device's deviceId")
    swap.add_argument("node_id", metavar="NODE_ID", help="the new hardware's nodeId")
    swap.add_argument("--verify-code", help="the verifyCode (default: the service uses nodeId)")
    swap.add_argument(
        "--timeout", type=int, help="seconds the verifyCode stays valid (0: never expires)"
    )
    swap.add_argument(
        "--urgent", action="store_true", help="on the urgent lane: served before the bulk lane"
    )
    swap.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=300.0,
        metavar="SECONDS",
        help="wait for the swap's outcome and print it (default 300 s)",
    )
    swap.add_argument("--source", default="/device-rebind/cli", help="the CloudEvent source")


def _swap(args: argparse.Namespace) -> int:
    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    _tool_logs(settings)
    from service import raise_swap  # noqa: PLC0415 - Kafka imports only when needed
    from service.events import InvalidEvent  # noqa: PLC0415

    try:
        value, swap = raise_swap.build(
            args.device_id,
            args.node_id,
            verify_code=args.verify_code,
            timeout=args.timeout,
            source=args.source,
        )
    except InvalidEvent as exc:
        return _fail(f"swap: invalid event ({exc.reason}): {exc.detail}")
    try:
        outcome = raise_swap.run(
            settings, value, swap, urgent=args.urgent, wait=args.wait, out=sys.stdout
        )
    except raise_swap.SwapCommandError as exc:
        return _fail(f"swap: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail(f"swap: {_one_line(exc, settings.kafka.bootstrap_servers)}", 1)
    return _swap_outcome(args.wait, outcome)


def _swap_outcome(wait: float | None, outcome: dict[str, Any] | None) -> int:
    """The exit code of ``swap``, printing the outcome it waited for."""
    from service import raise_swap  # noqa: PLC0415 - Kafka imports only when needed

    if wait is None:
        return 0
    if outcome is None:
        return _fail(f"swap: no outcome within {wait:g} s (the swap was sent)", 1)
    print(raise_swap.describe(outcome))
    return 3 if "errorCode" in outcome.get("data", {}) else 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _timestamp(text: str) -> datetime:
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from exc


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _replay(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
    if args.source == "dlq":
        if args.category:
            parser.error("--category applies to rebind-failed only (dead letters have a reason)")
        if args.fresh_time:
            parser.error("--fresh-time applies to rebind-failed only (dead letters go as is)")
        unknown = sorted(set(args.error_code) - INVALID_REASONS)
        if unknown:
            parser.error(
                f"dlq --error-code takes dead-letter reasons; unknown: {', '.join(unknown)} "
                f"(reasons: {', '.join(sorted(INVALID_REASONS))})"
            )
    if args.since is not None and args.until is not None and args.since >= args.until:
        parser.error("--since must be before --until")
    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    _tool_logs(settings)
    from service import replay  # noqa: PLC0415 - Kafka imports only when needed

    filters = replay.Filters(
        error_codes=frozenset(args.error_code),
        categories=frozenset(args.category),
        since=args.since,
        until=args.until,
        limit=args.limit,
    )
    try:
        asyncio.run(
            replay.replay(
                settings,
                args.source,
                filters,
                dry_run=args.dry_run,
                out=sys.stdout,
                fresh_time=datetime.now(UTC) if args.fresh_time else None,
            )
        )
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail(f"replay: {_one_line(exc, settings.kafka.bootstrap_servers)}", 1)
    return 0


def _ledger(args: argparse.Namespace) -> int:
    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    _tool_logs(settings)
    from service import ledger_tool  # noqa: PLC0415 - Kafka imports only when needed

    try:
        asyncio.run(
            ledger_tool.clear(settings, args.device_id, dry_run=args.dry_run, out=sys.stdout)
        )
    except ledger_tool.LedgerToolError as exc:
        return _fail(f"ledger {args.action}: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail(f"ledger {args.action}: {_one_line(exc, settings.kafka.bootstrap_servers)}", 1)
    return 0


def _tool_logs(settings: KafkaOnlySettings) -> None:
    """Logs of a command-line tool go to stderr; the Kafka client's own complaints (one per
    connection attempt) are left out: the tool ends with one line saying what went wrong."""
    logs.configure(settings.log, stream=sys.stderr)
    logs.register_secret(settings.kafka.sasl_password)
    logs.register_secret(settings.kafka.ssl_key_password)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _one_line(exc: BaseException, bootstrap: str) -> str:
    from aiokafka.errors import KafkaError  # noqa: PLC0415 - Kafka imports on demand

    from service.kafka import (  # noqa: PLC0415 - Kafka imports on demand
        KafkaAccessError,
        classify_startup_error,
    )

    if isinstance(exc, KafkaAccessError):
        return exc.reason
    if isinstance(exc, KafkaError | OSError | TimeoutError):
        return classify_startup_error(exc, bootstrap=bootstrap)[1]
    return f"{type(exc).__name__}: {exc}"


def _topics(args: argparse.Namespace) -> int:
    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    _tool_logs(settings)
    from service import topics  # noqa: PLC0415 - Kafka imports only when needed

    try:
        return asyncio.run(
            topics.run_command(
                settings.kafka,
                settings.topics,
                args.action,
                sys.stdout,
                partitions=args.partitions,
                replication_factor=args.replication_factor,
            )
        )
    except topics.TopicCreationError as exc:
        return _fail(f"topics {args.action}: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail(f"topics {args.action}: {_one_line(exc, settings.kafka.bootstrap_servers)}", 1)


def _check_config(args: argparse.Namespace) -> int:
    if args.defaults:
        table = defaults()
        if args.format == "json":
            print(json.dumps(table, indent=2))
        else:
            for name, value in table.items():
                print(f"{name}={'' if value is None else _env_value(value)}")
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    problem = port_problem(settings.http)
    if problem is not None:
        return _fail(f"invalid configuration: {problem}")
    effective = masked(settings)
    if args.format == "json":
        print(json.dumps(effective, indent=2))
    else:
        for name, value in effective.items():
            print(f"{name}={'' if value is None else _env_value(value)}")
    return 0


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command or "run"
    tools = {
        "replay": _replay,
        "topics": _topics,
        "ledger": _ledger,
        "swap": _swap,
        "check-config": _check_config,
    }
    if command in tools:
        return tools[command](args)
    try:
        settings = load_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    logs.register_settings_secrets(settings)  # masked in every log line from now on
    from service.app import run  # noqa: PLC0415 - keeps check-config free of Kafka imports

    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
