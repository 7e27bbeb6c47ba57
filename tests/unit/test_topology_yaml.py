"""Topology files: the shipped examples load and match their generators; bad files name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvlane.policy.topology import Locality, TopologyError, load_topology, topology_from_dict

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"


def _links(t):  # type: ignore[no-untyped-def]
    return sorted((ln.a, ln.b, ln.gbps, ln.kind) for ln in t.links)


@pytest.mark.parametrize(("fname", "spec", "figures"), [
    # ZCube(4,2): 16 GPUs, 8 switches, 16·2 access + 4·4 bipartite = 48 links, diameter 2
    ("zcube-cell-small.yaml", "zcube:n=4,k=2,gpus_per_node=2", (16, 8, 48, 2)),
    # RailFly K=4, radix 8: 5 hosts × 4 GPUs, 4 switches, 20 access + 6 inter-group = 26 links, diameter 2
    ("railfly-small.yaml", "railfly:rails=4,radix=8", (20, 4, 26, 2)),
    # fat-tree k=4: 16 hosts, 20 switches, 48 links, diameter 5
    ("fattree-small.yaml", "fattree:k=4", (16, 20, 48, 5)),
    # ROFT 8 hosts × 4 rails, radix 8: 8 leaves + 4 spines, 32 GPU + 8·4 leaf-spine = 64 links, diameter 3
    ("roft-small.yaml", "roft:nodes=8,rails=4,radix=8", (32, 12, 64, 3)),
])
def test_examples_load_and_match_their_generator(fname: str, spec: str, figures: tuple[int, ...]) -> None:
    t = load_topology(str(EXAMPLES / fname))
    assert (t.num_gpus, t.num_switches, t.num_links, t.diameter_hops()) == figures
    assert _links(t) == _links(load_topology(spec))


def test_zcube_example_paths_and_tiles() -> None:
    t = load_topology(str(EXAMPLES / "zcube-cell-small.yaml"))
    # n0.g0 = GPU 0 → (A0, B0); n5.g1 = GPU 11 → (A2, B3)
    ps = t.paths("n0.g0", "n5.g1")
    assert [(p.name, p.switches) for p in ps[:2]] == [("zcube-path1", ("A0", "B3")), ("zcube-path2", ("B0", "A2"))]
    assert t.locality("n0.g0", "n1.g0") is Locality.SAME_TILE
    assert t.node_attrs("n0")["role_hint"] == "prefill" and t.node_attrs("n1")["role_hint"] == "decode"
    assert t.summary()["tiles"] == 4


def test_loopback_example() -> None:
    t = load_topology(str(EXAMPLES / "loopback-2node.yaml"))
    assert t.nodes == ["n0", "n1"]
    ps = t.paths("n0.g0", "n1.g0")
    assert [(p.name, p.bottleneck_gbps, p.hops) for p in ps] == [("shm", 100.0, 1), ("tcp", 25.0, 1)]
    assert t.locality("n0.g0", "n1.g0") is Locality.SAME_TILE


def _doc(**over):  # type: ignore[no-untyped-def]
    doc = {
        "name": "t",
        "nodes": [{"id": "n0", "gpus": 1}, {"id": "n1", "gpus": 1}],
        "switches": ["sw0", "sw1"],
        "links": [
            {"a": "n0.g0.p0", "b": "sw0", "gbps": 100},
            {"a": "n1.g0.p0", "b": "sw1", "gbps": 100},
            {"a": "sw0", "b": "sw1", "gbps": 400},
        ],
    }
    doc.update(over)
    return doc


def test_minimal_document_builds() -> None:
    t = topology_from_dict(_doc())
    assert t.distance("n0.g0", "n1.g0").hops == 2 and t.distance("n0.g0", "n1.g0").bottleneck_gbps == 100.0
    assert t.link("sw0--sw1").kind == "inter-switch" and t.link("n0.g0.p0--sw0").kind == "gpu-access"


@pytest.mark.parametrize(("change", "message"), [
    ({"links": [*_doc()["links"], {"a": "sw0", "b": "sw9", "gbps": 1}]}, r"links\[3\]\.b: unknown switch 'sw9'"),
    ({"links": [{"a": "n0.g0.p7", "b": "sw0", "gbps": 1}]}, r"links\[0\]\.a: unknown NIC port 'n0.g0.p7'"),
    ({"links": [*_doc()["links"][:2], {"a": "sw0", "b": "sw1", "gbps": -5}]}, r"links\[2\]\.gbps: Input should be greater than 0"),
    ({"links": [*_doc()["links"], {"a": "n0.g0.p0", "b": "sw1", "gbps": 1}]}, r"links\[3\]: NIC port 'n0.g0.p0' is already wired by links\[0\]"),
    ({"links": _doc()["links"][1:]}, r"NIC port 'n0.g0.p0' is declared but not wired"),
    ({"links": [{"a": "n0.g0.p0", "b": "n1.g0.p0", "gbps": 1}]}, r"links\[0\]\.b: a NIC port must be wired to a switch"),
    ({"nodes": [{"id": "n0", "gpus": "many"}]}, r"nodes\[0\]\.gpus"),
    ({"nodes": [{"id": "n0", "gpus": 1, "role_hint": "boss"}]}, r"nodes\[0\]\.role_hint: .*prefill, decode, flex"),
    ({"nodes": [{"id": "n0", "gpus": 1, "colour": "red"}]}, r"nodes\[0\]\.colour: Extra inputs are not permitted"),
    ({"nodes": [{"id": "n0", "gpus": 1}, {"id": "n0", "gpus": 1}]}, r"nodes\[1\]\.id: duplicate node id 'n0'"),
    ({"switches": ["sw0", "sw0"]}, r"switches\[1\]: duplicate id 'sw0'"),
    ({"nodes": []}, r"nodes: List should have at least 1 item"),
    ({"path_names": {"p0-p0": "x", "p1-p1": "x"}}, r"path_names: .*'x' names both 'p0-p0' and 'p1-p1'"),
    ({"path_names": {"p0": "x"}}, r"path_names: .*must be '<src port>-<dst port>'"),
])
def test_errors_name_the_field(change: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TopologyError, match=message):
        topology_from_dict(_doc(**change), "bad.yaml")


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes:\n  - {id: n0, gpus: 1\n")
    with pytest.raises(TopologyError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_topology(str(bad))
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(str(tmp_path / "missing.yaml"))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(TopologyError, match="expected a mapping at the top level"):
        load_topology(str(lst))
