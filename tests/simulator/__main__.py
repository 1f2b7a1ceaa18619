"""``python -m tests.simulator``: run the platform simulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from tests.simulator.certs import generate_certs
from tests.simulator.server import Simulator, server_ssl_context
from tests.simulator.state import FLOW_WINDOW_S, SimConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.simulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate-limit-per-minute", type=int, default=100)
    p.add_argument(
        "--flow-window-seconds",
        type=float,
        default=float(os.environ.get("SIMULATOR_FLOW_WINDOW_SECONDS", FLOW_WINDOW_S)),
        help="length of the sliding flow-control window (s); env SIMULATOR_FLOW_WINDOW_SECONDS",
    )
    p.add_argument("--token-ttl", type=int, default=3600, help="access token lifetime (s)")
    p.add_argument("--refresh-token-ttl", type=int, default=86400)
    p.add_argument("--token-type", default="bearer")
    p.add_argument("--error-shape", choices=["documented", "gateway", "mixed"], default="mixed")
    p.add_argument("--repeat-put-mode", choices=["ok", "duplicate"], default="ok")
    p.add_argument("--unauthorized-status", type=int, choices=[200, 403], default=200)
    p.add_argument("--tls-dir", default=None, help="dir with (or to receive) ca.pem/server.pem/...")
    p.add_argument("--require-client-cert", action="store_true")
    p.add_argument("--seed-demo", action="store_true")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    config = SimConfig(
        rate_limit_per_minute=args.rate_limit_per_minute,
        flow_window_seconds=args.flow_window_seconds,
        token_ttl=args.token_ttl,
        refresh_token_ttl=args.refresh_token_ttl,
        token_type=args.token_type,
        error_shape=args.error_shape,
        repeat_put_mode=args.repeat_put_mode,
        unauthorized_status=args.unauthorized_status,
    )
    ctx = None
    if args.tls_dir:
        paths = generate_certs(args.tls_dir, overwrite=False)
        ctx = server_ssl_context(
            paths.server_cert,
            paths.server_key,
            paths.ca,
            require_client_cert=args.require_client_cert,
        )
    sim = Simulator(args.host, args.port, config=config, ssl_context=ctx, seed_demo=args.seed_demo)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = await sim.start()
    sys.stdout.write(f"SIMULATOR_URL={url}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
