"""Topology files (YAML, validated by a pydantic schema) and the one entry point `load_topology(spec)`.

Owned by `kvlane.policy.topology`; runs in the policy service and the CLI. Pure: reads one file, never
the network. Errors name the offending field, e.g. "links[3].b: unknown switch 'sw9'".

File format:
    name: small-cell
    nodes:                       # hosts
      - {id: n0, gpus: 2, ports: [p0, p1], tile: 0, cell: 0, role_hint: prefill}
      - {id: n1, gpus: [g0, g1]}             # GPU ids become n1.g0, n1.g1; ports default to [p0]
    switches: [a0, b0]           # or [{id: a0}, ...]
    links:
      - {a: n0.g0.p0, b: a0, gbps: 200}      # NIC port wiring (kind defaults to gpu-access)
      - {a: a0, b: b0, gbps: 400, kind: inter-switch}
Every declared NIC port must be wired to exactly one switch.
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .generators import GENERATORS, generate
from .model import ROLE_HINTS, Topology, TopologyError

Ident = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_\-]+$")]
MAX_FILE_BYTES = 64 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSpec(_Strict):
    id: Ident
    gpus: Annotated[int, Field(ge=1, le=1024)] | list[Ident] = 8
    ports: list[Ident] = Field(default_factory=lambda: ["p0"], min_length=1)
    tile: Annotated[int, Field(ge=0)] | None = None
    cell: Annotated[int, Field(ge=0)] = 0
    role_hint: str | None = None

    @field_validator("role_hint")
    @classmethod
    def _role(cls, v: str | None) -> str | None:
        if v is not None and v not in ROLE_HINTS:
            raise ValueError(f"must be one of {', '.join(ROLE_HINTS)}")
        return v


class SwitchSpec(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")]


class LinkSpec(_Strict):
    a: str
    b: str
    gbps: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    kind: str | None = None
    id: str | None = None


class TopologyFile(_Strict):
    name: Ident = "topology"
    nodes: list[NodeSpec] = Field(min_length=1)
    switches: list[SwitchSpec] = Field(default_factory=list)
    links: list[LinkSpec] = Field(default_factory=list)
    #: optional names for the paths leaving on port X and arriving on port Y: {"p0-p1": "zcube-path1"};
    #: unlisted pairs are named "X" (same port name) or "X-Y"; equal-cost variants get "-1", "-2", ...
    path_names: dict[str, Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=dict)

    @field_validator("path_names")
    @classmethod
    def _unique_names(cls, v: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for pair, name in v.items():
            if "-" not in pair:
                raise ValueError(f"key {pair!r} must be '<src port>-<dst port>', e.g. p0-p1")
            if name in seen:
                raise ValueError(f"{name!r} names both {seen[name]!r} and {pair!r}")
            seen[name] = pair
        return v

    @field_validator("switches", mode="before")
    @classmethod
    def _switch_ids(cls, v: Any) -> Any:
        return [{"id": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v


_FIELDS = {f for m in (NodeSpec, SwitchSpec, LinkSpec, TopologyFile) for f in m.model_fields}


def _loc(loc: tuple[Any, ...], etype: str = "") -> str:
    """"links.3.b" style pydantic locations → "links[3].b", dropping union-branch labels."""
    out = ""
    for i, p in enumerate(loc):
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in _FIELDS or (etype == "extra_forbidden" and i == len(loc) - 1):
            out += f".{p}" if out else str(p)
    return out or "<root>"


def topology_from_dict(data: Any, source: str = "<dict>") -> Topology:
    """Validate a parsed topology document and build the Topology."""
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        doc = TopologyFile.model_validate(data)
    except ValidationError as exc:
        errs = [f"{_loc(e['loc'], e['type'])}: {e['msg']}" for e in exc.errors()]
        raise TopologyError(f"{source}: " + "; ".join(dict.fromkeys(errs))) from None
    t = Topology(doc.name, spec=source)
    if doc.path_names:
        names = dict(doc.path_names)

        def namer(sp: str, dp: str, i: int) -> str:
            base = names.get(f"{sp}-{dp}") or (sp if sp == dp else f"{sp}-{dp}")
            return base if i == 0 else f"{base}-{i}"

        t.set_router(namer=namer)
    port_names: dict[str, str] = {}  # port id -> gpu
    for i, n in enumerate(doc.nodes):
        try:
            gpus = t.add_node(n.id, n.gpus, tile=n.tile, cell=n.cell, role_hint=n.role_hint)
        except TopologyError as exc:
            raise TopologyError(f"{source}: nodes[{i}].id: {exc}") from None
        for g in gpus:
            for p in n.ports:
                port_names[f"{g}.{p}"] = g
    for i, s in enumerate(doc.switches):
        try:
            t.add_switch(s.id)
        except TopologyError as exc:
            raise TopologyError(f"{source}: switches[{i}]: {exc}") from None
    switches = set(t.switches)
    wired: dict[str, int] = {}

    def kind_of(x: str) -> str:
        if x in switches:
            return "switch"
        if x in port_names:
            return "port"
        return "gpu" if x in t._gpu_node else "unknown"

    for i, ln in enumerate(doc.links):
        ka, kb = kind_of(ln.a), kind_of(ln.b)
        for field, x, k in (("a", ln.a, ka), ("b", ln.b, kb)):
            if k == "unknown":
                what = "switch" if "." not in x else "NIC port"
                raise TopologyError(f"{source}: links[{i}].{field}: unknown {what} {x!r}")
        try:
            if ka == "port" or kb == "port":
                port, other = (ln.a, ln.b) if ka == "port" else (ln.b, ln.a)
                bad_field = "b" if ka == "port" else "a"
                if kind_of(other) != "switch":
                    raise TopologyError(f"links[{i}].{bad_field}: a NIC port must be wired to a switch, "
                                        f"got {other!r}")
                if port in wired:
                    raise TopologyError(f"links[{i}]: NIC port {port!r} is already wired by links[{wired[port]}]")
                wired[port] = i
                gpu = port_names[port]
                t.add_port(gpu, port[len(gpu) + 1:], other, ln.gbps, kind=ln.kind or "gpu-access", link_id=ln.id)
            elif ka == kb == "gpu":
                t.add_link(ln.a, ln.b, ln.gbps, kind=ln.kind or "nvlink", link_id=ln.id)
            elif ka == kb == "switch":
                t.add_link(ln.a, ln.b, ln.gbps, kind=ln.kind or "inter-switch", link_id=ln.id)
            else:
                raise TopologyError(f"links[{i}]: cannot link a GPU to a switch directly; wire one of its "
                                    f"NIC ports (e.g. {ln.a if ka == 'gpu' else ln.b}.p0)")
        except TopologyError as exc:
            msg = str(exc)
            raise TopologyError(f"{source}: {msg if msg.startswith('links[') else f'links[{i}]: {msg}'}") from None
    missing = [p for p in port_names if p not in wired]
    if missing:
        raise TopologyError(f"{source}: NIC port {missing[0]!r} is declared but not wired to any switch"
                            + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    return t


def topology_to_dict(t: Topology, path_names: dict[str, str] | None = None) -> dict[str, Any]:
    """The YAML document for `t` (inverse of `topology_from_dict`, up to the generator's custom router)."""
    nodes = []
    for nd in t.nodes:
        gpus = t.gpus_of(nd)
        entry: dict[str, Any] = {"id": nd, "gpus": len(gpus)}
        ports = [pid.rsplit(".", 1)[1] for pid in t.ports_of(gpus[0])]
        if ports != ["p0"]:
            entry["ports"] = ports
        entry.update({k: v for k, v in t.node_attrs(nd).items() if v is not None and (k != "cell" or v)})
        nodes.append(entry)
    links = [{"a": ln.a, "b": ln.b, "gbps": ln.gbps, "kind": ln.kind} for ln in t.links]
    doc: dict[str, Any] = {"name": t.name, "nodes": nodes, "switches": t.switches, "links": links}
    if path_names:
        doc["path_names"] = dict(path_names)
    return doc


def load_yaml(path: str | os.PathLike[str]) -> Topology:
    p = FsPath(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read ({exc.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise TopologyError(f"{path}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TopologyError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    topo = topology_from_dict(data, str(path))
    topo.spec = str(path)
    topo.params = {"file": str(path)}
    return topo


def load_topology(spec: str) -> Topology:
    """`spec` is a YAML file path, or a generator spec "name:k=v,k=v" (see GENERATORS / `kvlane topo inspect
    --help`). A bare generator name uses its defaults when it has no required parameter."""
    name = spec.partition(":")[0].strip()
    if name in GENERATORS and not os.path.exists(spec):
        return generate(spec)
    if spec.endswith((".yaml", ".yml")) or os.path.exists(spec):
        return load_yaml(spec)
    if ":" in spec and "/" not in name:
        return generate(spec)  # raises "unknown generator ..." naming the known ones
    raise TopologyError(f"{spec!r} is neither a topology file nor a generator spec; generators: "
                        f"{', '.join(sorted(GENERATORS))}")
