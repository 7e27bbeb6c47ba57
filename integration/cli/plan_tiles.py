"""`kvlane plan tiles`: affinity-tile placement of P/D nodes on a fabric (seed §6).

Runs in the user's shell process only; the placement itself is `kvlane.policy.topology.plan_tiles`.
Prints a table, or JSON with `--json`; bad input exits with status 2 and a message naming what is wrong.
"""

from __future__ import annotations

import json
import math

import typer
from kvlane.integration.cli.plan import app
from kvlane.policy.topology import Topology, TopologyError, load_topology, plan_tiles
from rich.console import Console
from rich.table import Table


def default_cell(nodes: int, gpus_per_node: int = 8) -> str:
    """The ZCube(n,2) cell holding exactly `nodes` 8-GPU nodes (n² = 8·nodes), e.g. 128 → zcube:n=32,k=2."""
    n = math.isqrt(nodes * gpus_per_node)
    if n * n != nodes * gpus_per_node:
        raise TopologyError(f"{nodes} nodes × {gpus_per_node} GPUs is not a square ZCube(n,2) cell; "
                            "pass --topology")
    return f"zcube:n={n},k=2,gpus_per_node={gpus_per_node}"


@app.command("tiles")
def tiles_cmd(
    nodes: int | None = typer.Option(None, "--nodes", help="Nodes to place (the topology's first N; default all)."),
    ratio: str = typer.Option("3:2", "--ratio", help="Tile composition P:D, e.g. 3:2 (3P+2D), 5:3, 4:4."),
    tile: str | None = typer.Option(None, "--tile", help="Tile size for a reduced ratio, e.g. 4P+4D with 1:1."),
    topology: str | None = typer.Option(None, "--topology",
                                        help="YAML file or generator spec; default: the ZCube(n,2) cell of --nodes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (tiles, flex, per-switch balance)."),
) -> None:
    """Affinity tiles of pP+dD nodes plus flex nodes, spread so every switch sees about the global P:D."""
    try:
        if topology is None:
            if nodes is None:
                raise TopologyError("give --nodes or --topology")
            topology = default_cell(nodes)
        topo: Topology = load_topology(topology)
        pl = plan_tiles(topo, nodes=nodes, ratio=ratio, tile=tile)
    except TopologyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    out = {"topology": topology, "nodes": len(pl.roles), **pl.to_dict()}
    if as_json:
        typer.echo(json.dumps(out))
        return
    table = Table(title=f"affinity tiles on {topology}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("nodes", "tile", "tiles", "flex", "prefill_nodes", "decode_nodes", "target_p_fraction",
                "max_switch_deviation", "mean_switch_deviation", "method"):
        table.add_row(key, str(out[key]))
    table.add_row("flex nodes", ", ".join(pl.flex) or "-")
    Console().print(table)
    worst = sorted(pl.switches, key=lambda s: -s.deviation)[:8]
    t2 = Table(title="switches furthest from the target P fraction")
    for col in ("switch", "P ports", "D ports", "P fraction", "deviation"):
        t2.add_column(col, justify="right")
    for s in worst:
        t2.add_row(s.switch, str(s.prefill_ports), str(s.decode_ports), f"{s.p_fraction:.3f}", f"{s.deviation:.3f}")
    Console().print(t2)
