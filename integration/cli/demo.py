"""`kvlane demo ...`: self-contained demos. `pd` runs the 1P1D demo (kvlane.integration.demo) in the user's
process and stops every child it started before returning; it never binds anything but loopback."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def pd(
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Where the tiny model is built "
                                          "(default $KVLANE_CACHE or ~/.cache/kvlane)."),
    log_dir: str | None = typer.Option(None, "--log-dir", help="Logs of every process (default: a new temp dir)."),
    max_tokens: int = typer.Option(24, "--max-tokens", min=1, max=512, help="Tokens generated per request."),
    reference: str = typer.Option(
        "prefill", "--reference",
        help="Single-engine greedy output to compare with: 'prefill' (the P engine called directly), "
             "'separate' (an extra plain engine started first) or 'none'."),
    plain: bool = typer.Option(False, "--plain", help="Engines without KVLaneConnector (plumbing check only)."),
    transport: str | None = typer.Option(None, "--transport",
                                         help="KVLaneConnector transport backend (its `transport` key: auto, tcp, ucx)."),
    startup_timeout: float = typer.Option(600.0, "--startup-timeout", min=10.0, help="Seconds an engine may take to start."),
) -> None:
    """1 prefill + 1 decode vLLM engine (CPU, tiny offline Llama) with KVLaneConnector, the policy service
    and the router; a few requests incl. a 2-turn session; compared with a single engine."""
    from kvlane.integration.demo import DemoOptions, run_pd_demo
    from kvlane.integration.launch import ProcessDied, StartTimeout

    if reference not in ("prefill", "separate", "none"):
        raise typer.BadParameter(f"{reference!r}: expected prefill, separate or none", param_hint="--reference")
    logging.basicConfig(level=logging.WARNING)
    opts = DemoOptions(log_dir=Path(log_dir) if log_dir else None, max_tokens=max_tokens, reference=reference, plain=plain,  # type: ignore[arg-type]
                       startup_timeout=startup_timeout)
    if transport:
        if plain:
            raise typer.BadParameter("--transport needs the connector; drop --plain", param_hint="--transport")
        opts.connector_extra["transport"] = transport
    if cache_dir is not None:
        opts.cache_dir = Path(cache_dir)
    try:
        result = run_pd_demo(opts, say=lambda s: typer.echo(s))
    except KeyboardInterrupt:
        typer.echo("interrupted; all processes stopped.", err=True)
        raise typer.Exit(130) from None
    except (ProcessDied, StartTimeout, RuntimeError, OSError) as exc:
        typer.echo(f"demo failed: {exc}\nall processes stopped.", err=True)
        raise typer.Exit(1) from None
    matches = result.matches()
    if matches is not None and not all(matches):
        raise typer.Exit(2)
