"""`kvlane topo ...`: inspect fabrics (YAML files or generators), list candidate paths, draw small fabrics.

Runs in the user's shell process only; everything it prints comes from `kvlane.policy.topology`. Bad input
exits with status 2 and a message naming what is wrong. matplotlib is imported only by `plot`.
"""

from __future__ import annotations

import json
from pathlib import Path as FsPath
from typing import Annotated, Any

import typer
import yaml
from kvlane.policy.topology import Topology, TopologyError, generators_help, load_topology
from kvlane.policy.topology.loader import topology_to_dict
from rich.console import Console
from rich.table import Table

#: `plot` refuses fabrics with more drawn vertices (hosts + switches) than this.
MAX_PLOT_VERTICES = 2000

SPEC_HELP = "A topology YAML file, or a generator spec name:k=v,... (e.g. zcube:n=32,k=2; see `inspect --help`)."
GENERATORS_EPILOG = "Generators (spec = name:k=v,k=v):\n\n" + generators_help()

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _load(spec: str) -> Topology:
    try:
        return load_topology(spec)
    except TopologyError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail raises


def _epilog() -> str:
    # click rewraps paragraphs unless they start with \b; keep one generator per block, lines as written
    return "\n\n".join("\b\n" + block for block in GENERATORS_EPILOG.split("\n\n"))


@app.command("inspect", epilog=_epilog())
def inspect_cmd(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts (GPUs, nodes, switches, links by kind), ports, diameter and generator parameters of a fabric."""
    topo = _load(spec)
    try:
        summary = topo.summary()
    except TopologyError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(summary))
        return
    table = Table(title=f"{summary['name']}  ({spec})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("gpus", "nodes", "switches", "links", "diameter_hops", "cells", "tiles"):
        table.add_row(key, f"{summary[key]:,}")
    for kind, n in summary["link_kinds"].items():
        table.add_row(f"links: {kind}", f"{n:,}")
    table.add_row("NIC ports per GPU", ", ".join(f"{k} ({v:,} GPUs)" for k, v in summary["ports_per_gpu"].items()))
    table.add_row("ports per switch", f"{summary['switch_ports']['min']}–{summary['switch_ports']['max']}")
    for k, v in summary["params"].items():
        table.add_row(f"param {k}", str(v))
    Console().print(table)


def _path_dict(topo: Topology, p: Any) -> dict[str, Any]:
    return {"name": p.name, "hops": p.hops, "bottleneck_gbps": p.bottleneck_gbps, "switches": list(p.switches),
            "src_nic": p.src_nic, "dst_nic": p.dst_nic, "links": list(p.links)}


@app.command("export")
def export_cmd(
    spec: Annotated[str, typer.Argument(help=SPEC_HELP)],
    output: Annotated[FsPath | None, typer.Option("-o", "--output", help="YAML file to write (default: stdout).")
                      ] = None,
) -> None:
    """Write a fabric as a topology YAML file (a starting point to edit). Generator-specific path names
    (zcube-path1, rail3, ...) are not carried over: a YAML file names routes by NIC port pair."""
    topo = _load(spec)
    if topo.num_links > 200_000:
        _fail(f"{topo.name}: {topo.num_links:,} links is too large to export as YAML (limit 200,000)")
    text = f"# exported by `kvlane topo export {spec}`\n" + yaml.safe_dump(topology_to_dict(topo), sort_keys=False)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}: {topo.num_gpus} GPUs, {topo.num_switches} switches, {topo.num_links} links")


@app.command("paths")
def paths_cmd(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    src_gpu: str = typer.Argument(..., help="Source GPU id, e.g. n0.g3."),
    dst_gpu: str = typer.Argument(..., help="Destination GPU id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Candidate paths from SRC_GPU to DST_GPU, best first (fewest switches, then widest bottleneck)."""
    topo = _load(spec)
    try:
        paths = topo.paths(src_gpu, dst_gpu)
        locality = topo.locality(src_gpu, dst_gpu).value
    except TopologyError as exc:
        _fail(str(exc))
        return
    out = {"src": src_gpu, "dst": dst_gpu, "locality": locality, "paths": [_path_dict(topo, p) for p in paths]}
    if as_json:
        typer.echo(json.dumps(out))
        return
    table = Table(title=f"{src_gpu} → {dst_gpu}  ({locality})")
    for col in ("path", "hops", "Gbps", "switches", "src NIC", "dst NIC"):
        table.add_column(col)
    for p in paths:
        table.add_row(p.name, str(p.hops), f"{p.bottleneck_gbps:g}", " → ".join(p.switches) or "-", p.src_nic,
                      p.dst_nic)
    Console().print(table)


def read_load(path: FsPath, topo: Topology) -> dict[str, float]:
    """A load file: JSON {link_id: utilisation 0..1}. Errors name the bad key."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{path}: expected a JSON object {{link_id: utilisation}}")
    out: dict[str, float] = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
            raise TopologyError(f"{path}: {k!r}: utilisation must be a number in 0..1, got {v!r}")
        topo.link(k)  # raises "unknown link ..."
        out[k] = float(v)
    return out


def plot_topology(topo: Topology, out: FsPath, load: dict[str, float] | None = None) -> dict[str, int]:
    """Draw hosts and switches (GPU access links merged per host–switch pair; the merged edge shows its
    busiest link). Returns counts of what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    vertices = len(topo.nodes) + topo.num_switches
    if vertices > MAX_PLOT_VERTICES:
        raise TopologyError(f"{topo.name}: {vertices:,} hosts + switches is too many to draw (limit "
                            f"{MAX_PLOT_VERTICES:,}); use a smaller generator, e.g. zcube:n=8,k=2")
    g = nx.Graph()
    node_of_port = {}
    for nd in topo.nodes:
        g.add_node(nd, kind="host")
        for gpu in topo.gpus_of(nd):
            for port in topo.ports_of(gpu):
                node_of_port[port] = nd
    for s in topo.switches:
        g.add_node(s, kind="switch")
    edges: dict[tuple[str, str], list[str]] = {}

    def vertex(x: str) -> str:  # a switch, a host, or the host of a NIC port / GPU
        return x if x in g else node_of_port.get(x) or topo.node_of(x)

    for ln in topo.links:
        a, b = vertex(ln.a), vertex(ln.b)
        if a == b:
            continue  # NVLink inside a host
        edges.setdefault((a, b) if a <= b else (b, a), []).append(ln.id)
    for (a, b), ids in edges.items():
        util = max((load.get(i, -1.0) for i in ids), default=-1.0) if load else -1.0
        g.add_edge(a, b, util=util, kind=topo.link(ids[0]).kind)
    # layers: hosts 0, switches 1 + hops from the nearest host-attached switch
    attached = {b for (a, b) in edges if g.nodes[a]["kind"] == "host"} | {
        a for (a, b) in edges if g.nodes[b]["kind"] == "host"}
    sw_graph = g.subgraph(topo.switches)
    layer = {nd: 0 for nd in topo.nodes}
    dist = nx.multi_source_dijkstra_path_length(sw_graph, attached, weight=None) if attached else {}
    for s in topo.switches:
        layer[s] = 1 + int(dist.get(s, 0))
    if max(layer.values()) >= 2:   # a tree-like fabric (fat-tree, ROFT): hosts at the bottom, tiers above
        rows: dict[int, list[str]] = {}
        for v in [*topo.nodes, *topo.switches]:   # construction order keeps pods / rail groups together
            rows.setdefault(layer[v], []).append(v)
        pos = {v: ((i + 0.5) / len(row) - 0.5, float(lay)) for lay, row in rows.items() for i, v in enumerate(row)}
    else:                          # flat fabrics (ZCube, RailFly, torus, dragonfly, expanders)
        pos = nx.spring_layout(g, seed=0)
    fig, ax = plt.subplots(figsize=(min(40, 6 + vertices / 8), 8))
    cmap = plt.get_cmap("RdYlGn_r")
    loaded = [(a, b) for a, b, d in g.edges(data=True) if d["util"] >= 0]
    unloaded = [(a, b) for a, b, d in g.edges(data=True) if d["util"] < 0]
    nx.draw_networkx_edges(g, pos, edgelist=unloaded, edge_color="#b0b0b0", width=0.6, ax=ax)
    if loaded:
        coll = nx.draw_networkx_edges(g, pos, edgelist=loaded, edge_color=[g.edges[e]["util"] for e in loaded],
                                      edge_cmap=cmap, edge_vmin=0.0, edge_vmax=1.0, width=2.0, ax=ax)
        fig.colorbar(coll, ax=ax, label="link utilisation")
    hosts = [n for n in g if g.nodes[n]["kind"] == "host"]
    nx.draw_networkx_nodes(g, pos, nodelist=hosts, node_color="#4a90d9", node_size=60, node_shape="s", ax=ax)
    nx.draw_networkx_nodes(g, pos, nodelist=topo.switches, node_color="#e0a030", node_size=120, ax=ax)
    if vertices <= 80:
        nx.draw_networkx_labels(g, pos, font_size=7, ax=ax)
    ax.set_title(f"{topo.name}: {len(hosts)} hosts, {topo.num_switches} switches, {topo.num_links} links")
    ax.set_axis_off()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"hosts": len(hosts), "switches": topo.num_switches, "edges": g.number_of_edges(),
            "loaded_edges": len(loaded)}


@app.command("plot")
def plot_cmd(
    spec: Annotated[str, typer.Argument(help=SPEC_HELP)],
    output: Annotated[FsPath, typer.Option("-o", "--output", help="Image file to write (png, svg, pdf).")],
    load: Annotated[FsPath | None, typer.Option("--load", help="JSON {link_id: utilisation 0..1} to colour links.")
                    ] = None,
) -> None:
    """Draw a small fabric (at most 2,000 hosts + switches); links coloured by load when --load is given."""
    topo = _load(spec)
    try:
        util = read_load(load, topo) if load is not None else None
        drawn = plot_topology(topo, output, util)
    except TopologyError as exc:
        _fail(str(exc))
        return
    except ImportError as exc:
        _fail(f"plotting needs matplotlib (pip install 'kvlane[plot]'): {exc}")
        return
    typer.echo(f"wrote {output}: {drawn['hosts']} hosts, {drawn['switches']} switches, {drawn['edges']} edges"
               + (f", {drawn['loaded_edges']} with load" if util is not None else ""))
