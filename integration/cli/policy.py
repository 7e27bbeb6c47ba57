"""`kvlane policy ...`: run the policy service (`serve`) and query a running one (`snapshot`, `hot`, `ping`).
Runs in the user's shell process; `serve` becomes the policy-service process. Decides nothing itself: every
answer shown comes from the service."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True)

_SECRET_HELP = "File holding the shared secret (default: $KVLANE_SECRET; none = no auth)."


def _secret(secret_file: str | None) -> bytes | None:
    from kvlane.integration.policy_service import load_secret

    try:
        return load_secret(secret_file)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--secret-file") from None


def _fail(msg: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {msg}")
    raise typer.Exit(1)


def _query(address: str, secret_file: str | None, timeout: float, op: str, **kwargs: Any) -> Any:
    from kvlane.integration.policy_service import PolicyClient, parse_address
    from kvlane.policy.types import PolicyError

    try:
        parse_address(address)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="ADDRESS") from None
    secret = _secret(secret_file)

    async def go() -> Any:
        client = PolicyClient(address, secret=secret, timeout=timeout, connect_timeout=timeout)
        try:
            return await getattr(client, op)(**kwargs)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except PolicyError as exc:
        _fail(f"{exc.code}: {exc}")


@app.command()
def serve(
    topology: str = typer.Option(..., "--topology", "-t", help='Fabric: YAML path or generator, e.g. "zcube:n=8,k=2".'),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(7070, min=0, max=65535, help="TCP port (0 = pick a free one)."),
    secret_file: str | None = typer.Option(None, "--secret-file", help=_SECRET_HELP),
    metrics_port: int | None = typer.Option(None, "--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics here."),
    lease_ttl: float | None = typer.Option(None, "--lease-ttl", help="Lease slack in seconds (credits.lease_ttl_s)."),
    config: str | None = typer.Option(None, "--config", help="YAML file of policy knobs (PolicyConfig)."),
    announce_ttl: float = typer.Option(120.0, "--announce-ttl", min=0.001, help="Seconds an announce entry lives."),
    sweep_interval: float = typer.Option(1.0, "--sweep-interval", min=0.001, help="Seconds between expiry sweeps."),
    max_frame: int = typer.Option(1 << 20, "--max-frame", min=16, max=1 << 20, help="Largest frame body in bytes."),
    log_level: str = typer.Option("INFO", "--log-level", help="Python logging level."),
) -> None:
    """Run the policy service until SIGINT/SIGTERM."""
    from kvlane.integration.policy_service.app import build_policy, load_fault_plan
    from kvlane.integration.policy_service.app import serve as run

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    secret = _secret(secret_file)
    try:
        policy = build_policy(topology, config_file=config, lease_ttl_s=lease_ttl)
    except (OSError, ValueError) as exc:
        _fail(f"cannot build the policy: {exc}")
    try:
        faults = load_fault_plan()
    except (OSError, ValueError) as exc:
        _fail(f"bad $KVLANE_FAULTS: {exc}")
    try:
        asyncio.run(run(policy, host=host, port=port, secret=secret, metrics_port=metrics_port,
                        announce_ttl=announce_ttl, sweep_interval=sweep_interval, max_frame=max_frame,
                        faults=faults))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc}")
    except KeyboardInterrupt:
        pass


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


@app.command()
def ping(
    address: str = typer.Argument(..., help="tcp://HOST:PORT"),
    secret_file: str | None = typer.Option(None, "--secret-file", help=_SECRET_HELP),
    timeout: float = typer.Option(5.0, help="Seconds to wait."),
) -> None:
    """Check that a policy service answers; prints its clock."""
    now = _query(address, secret_file, timeout, "ping")
    typer.echo(f"ok {address} server_time={now:.3f}")


@app.command()
def snapshot(
    address: str = typer.Argument(..., help="tcp://HOST:PORT"),
    as_json: bool = typer.Option(False, "--json", help="Print the raw snapshot as JSON."),
    max_paths: int = typer.Option(100, "--max-paths", min=1, max=100_000, help="Most recently measured paths to show."),
    secret_file: str | None = typer.Option(None, "--secret-file", help=_SECRET_HELP),
    timeout: float = typer.Option(5.0, help="Seconds to wait."),
) -> None:
    """Show the policy's state: engines, loads, leases, path estimates."""
    snap = _query(address, secret_file, timeout, "snapshot", max_paths=max_paths)
    if as_json:
        typer.echo(json.dumps(snap, indent=2, sort_keys=True, default=_jsonable))
        return
    console = Console()
    known = ("engines", "leases", "credits", "paths", "hottest", "topology", "counters")
    summary = {k: v for k, v in snap.items() if not isinstance(v, (dict, list))}
    summary.update({f"counters.{k}": v for k, v in (snap.get("counters") or {}).items()})
    topo = snap.get("topology")
    if isinstance(topo, dict):
        summary.update({f"topology.{k}": v for k, v in topo.items() if not isinstance(v, (dict, list))})
    t = Table(title=f"policy @ {address}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    now = snap.get("now") if isinstance(snap.get("now"), (int, float)) else None
    for k, v in summary.items():
        if k == "now" and now is not None and now > 1e9:
            v = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
        t.add_row(k, _cell(v))
    console.print(t)
    sections: list[tuple[str, Any]] = [(key, snap.get(key)) for key in ("engines", "leases")]
    credits = snap.get("credits")
    sections.append(("reserved links", credits.get("links") if isinstance(credits, dict) else None))
    sections.append(("measured paths", snap.get("paths")))
    # anything this version of the CLI does not know, shown generically
    sections += [(k, v) for k, v in snap.items() if k not in known and isinstance(v, (dict, list))]
    for title, value in sections:
        if isinstance(value, (dict, list)):
            if value:
                console.print(_table(title, value, now))
            else:
                console.print(f"[dim]{title}: none[/dim]")


@app.command()
def hot(
    address: str = typer.Argument(..., help="tcp://HOST:PORT"),
    top: int = typer.Option(10, "--top", "-n", min=1, max=10_000, help="Rows per table."),
    secret_file: str | None = typer.Option(None, "--secret-file", help=_SECRET_HELP),
    timeout: float = typer.Option(5.0, help="Seconds to wait."),
) -> None:
    """The hottest links (by reserved credit) and paths (measured slower than the fabric says, or failing)."""
    snap = _query(address, secret_file, timeout, "snapshot", max_paths=1, hottest=top)
    hottest = snap.get("hottest")
    if not isinstance(hottest, dict):
        _fail(f"{address}: the snapshot has no 'hottest' section (is this a kvlane policy?)")
    console = Console()
    links_info = ((snap.get("credits") or {}).get("links") or {}) if isinstance(snap.get("credits"), dict) else {}
    t = Table(title="hottest links (reserved share of reservable bandwidth)")
    t.add_column("link", style="bold")
    t.add_column("reserved", justify="right")
    t.add_column("reserved Gbps", justify="right")
    for row in hottest.get("links_by_load") or []:
        frac = float(row.get("reserved_fraction", 0.0))
        gbps = (links_info.get(row.get("link")) or {}).get("reserved_gbps")
        style = "red" if frac >= 0.9 else "yellow" if frac >= 0.5 else ""
        t.add_row(str(row.get("link")), f"[{style}]{frac:.0%}[/{style}]" if style else f"{frac:.0%}",
                  "" if gbps is None else f"{gbps:.3g}")
    if not t.row_count:
        t.add_row("(no link has credit reserved)", "", "")
    console.print(t)
    t = Table(title="slowest paths (static / measured bandwidth)")
    t.add_column("path", style="bold")
    t.add_column("links")
    t.add_column("slowdown", justify="right")
    t.add_column("measured Gbps", justify="right")
    t.add_column("static Gbps", justify="right")
    t.add_column("failures", justify="right")
    for row in hottest.get("paths_by_slowdown") or []:
        t.add_row(str(row.get("path")), " ".join(map(str, row.get("links") or [])), f"{row.get('slowdown', 1.0):.2f}x",
                  _cell(row.get("gbps")), _cell(row.get("static_gbps")), str(row.get("failures", 0)))
    if not t.row_count:
        t.add_row("(every measured path at its static speed)", "", "", "", "", "")
    console.print(t)


def _cell(v: Any, column: str = "", now: float | None = None) -> str:
    """One table cell. Times (columns ending in `_at`) are shown relative to the snapshot's `now`."""
    if column.endswith("_at") and isinstance(v, (int, float)) and now is not None:
        return f"{v - now:+.3f} s"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=_jsonable, sort_keys=True)[:80]
    return str(v)


def _table(title: str, value: dict | list, now: float | None = None) -> Table:
    """A map of maps or a list of maps becomes rows with one column per key; anything else key/value rows."""
    rows: list[tuple[str | None, dict]] = []
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        rows = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = [(None, v) for v in value]
    t = Table(title=f"{title} ({len(value)})")
    if rows:
        cols: list[str] = []
        for _, r in rows:
            cols.extend(c for c in r if c not in cols)
        if rows[0][0] is not None:
            t.add_column("id", style="bold")
        for c in cols:
            t.add_column(c)
        for name, r in rows:
            cells = [_cell(r.get(c, ""), c, now) for c in cols]
            t.add_row(*(([name] if name is not None else []) + cells))
        return t
    t.add_column("key" if isinstance(value, dict) else "#", style="bold")
    t.add_column("value")
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        t.add_row(str(k), _cell(v))
    return t
