"""`kvlane router serve`: run the OpenAI-compatible P/D router in the foreground until SIGINT/SIGTERM.
Runs in the user's shell process, which becomes the router process; the routing itself lives in
`kvlane.integration.router`. Never binds anything but the address it is given (default loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True)


@app.command()
def serve(
    policy: str = typer.Option(..., "--policy", help="Policy service address, tcp://HOST:PORT."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind. The router has no authentication: any non-loopback address logs a WARNING."
    ),
    port: int = typer.Option(8000, min=0, max=65535, help="HTTP port (0 = pick a free one)."),
    secret_file: str | None = typer.Option(
        None, "--secret-file", help="File holding the policy service's shared secret (default: $KVLANE_SECRET)."
    ),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=1.0, help="Seconds one request may take."),
    policy_timeout: float = typer.Option(5.0, "--policy-timeout", min=0.1, help="Deadline of each policy call (s)."),
    log_level: str = typer.Option("INFO", "--log-level", help="Python logging level (DEBUG shows score breakdowns)."),
) -> None:
    """Run the router until SIGINT/SIGTERM. Logs `router listening on http://HOST:PORT` when ready."""
    from kvlane.integration.policy_service import PolicyClient, load_secret, parse_address
    from kvlane.integration.router import Router, RouterConfig
    from kvlane.integration.router import serve as run

    try:
        parse_address(policy)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from None
    try:
        secret = load_secret(secret_file)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--secret-file") from None
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def main() -> None:
        client = PolicyClient(policy, secret=secret, timeout=policy_timeout, connect_timeout=policy_timeout)
        router = Router(client, RouterConfig(policy_addr=policy, request_timeout=request_timeout,
                                             policy_timeout=policy_timeout))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await run(router, host, port, stop=stop)
        finally:
            await client.close()

    try:
        asyncio.run(main())
    except OSError as exc:
        Console(stderr=True).print(f"[red]error:[/red] cannot listen on {host}:{port}: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
