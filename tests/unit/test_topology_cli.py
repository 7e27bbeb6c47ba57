"""`kvlane topo inspect|paths|plot` and `kvlane plan tiles` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import kvlane.integration.cli.plan_tiles  # noqa: F401  (registers `plan tiles` on the plan group)
import pytest
from kvlane.integration.cli.plan import app as plan_app
from kvlane.integration.cli.topo import app as topo_app
from kvlane.policy.topology import GENERATORS
from typer.testing import CliRunner

runner = CliRunner()


def test_inspect_zcube_16k_json() -> None:
    r = runner.invoke(topo_app, ["inspect", "zcube:n=128,k=2", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    # 128² GPUs on 2048 8-GPU nodes, 2×128 switches, 2·16,384 access + 128² bipartite links, diameter 2
    assert (s["gpus"], s["nodes"], s["switches"], s["links"], s["diameter_hops"]) == (16384, 2048, 256, 49152, 2)
    assert s["link_kinds"] == {"gpu-access": 32768, "inter-switch": 16384}
    assert s["params"]["n"] == 128 and s["params"]["k"] == 2


def test_inspect_table_and_help() -> None:
    r = runner.invoke(topo_app, ["inspect", "railfly:rails=8,radix=128"])
    assert r.exit_code == 0 and "968" in r.output and "inter-group" in r.output
    h = runner.invoke(topo_app, ["inspect", "--help"], env={"COLUMNS": "200"})
    assert h.exit_code == 0
    for g in GENERATORS.values():
        assert f"{g.name}:" in h.output
        for p in g.params:
            assert f"{p.name}: " in h.output, (g.name, p.name)


def test_inspect_bad_spec_exits_2_with_reason() -> None:
    r = runner.invoke(topo_app, ["inspect", "zcube:n=4,q=1"])
    assert r.exit_code == 2 and "unknown parameter 'q'" in r.output


def test_paths_json() -> None:
    r = runner.invoke(topo_app, ["paths", "zcube:n=32,k=2", "n0.g0", "n100.g3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    # n0.g0 = GPU 0 → (A0, B0); n100.g3 = GPU 803 → (A25, B3)
    assert [(p["name"], p["switches"]) for p in out["paths"]] == [
        ("zcube-path1", ["A0", "B3"]), ("zcube-path2", ["B0", "A25"])]
    assert out["locality"] == "same-cell"
    bad = runner.invoke(topo_app, ["paths", "loopback:gpus=2", "n0.g0", "n0.g9"])
    assert bad.exit_code == 2 and "unknown GPU 'n0.g9'" in bad.output


def test_plot_with_load(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"A0--B1": 0.9, "n0.g0.p0--A0": 0.3}))
    out = tmp_path / "fabric.png"
    r = runner.invoke(topo_app, ["plot", "zcube:n=4,k=2,gpus_per_node=2", "-o", str(out), "--load", str(load)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 8 hosts + 8 switches; host–switch links merged per pair: each host's 2 GPUs share one A switch and
    # reach 2 B switches → 3 edges per host = 24, plus 16 bipartite = 40
    assert "8 hosts, 8 switches, 40 edges, 2 with load" in r.output


def test_plot_refuses_large_and_bad_load(tmp_path: Path) -> None:
    r = runner.invoke(topo_app, ["plot", "zcube:n=128,k=2", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "too many to draw" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"A0--B1": 1.5}))
    r = runner.invoke(topo_app, ["plot", "zcube:n=4,k=2,gpus_per_node=2", "-o", str(tmp_path / "x.png"),
                                 "--load", str(bad)])
    assert r.exit_code == 2 and "'A0--B1': utilisation must be a number in 0..1" in r.output
    bad.write_text(json.dumps({"A0--B9": 0.5}))
    r = runner.invoke(topo_app, ["plot", "zcube:n=4,k=2,gpus_per_node=2", "-o", str(tmp_path / "x.png"),
                                 "--load", str(bad)])
    assert r.exit_code == 2 and "unknown link 'A0--B9'" in r.output


def test_plan_tiles_json() -> None:
    r = runner.invoke(plan_app, ["tiles", "--nodes", "128", "--ratio", "3:2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    # default topology: the ZCube(n,2) cell with n² = 128·8 = 1024 → n = 32
    assert out["topology"] == "zcube:n=32,k=2,gpus_per_node=8"
    assert (out["tiles"], out["flex"], out["prefill_nodes"], out["decode_nodes"]) == (25, 3, 75, 50)
    assert len(out["switch_balance"]) == 64
    r = runner.invoke(plan_app, ["tiles", "--nodes", "128", "--ratio", "1:1", "--tile", "4P+4D", "--json",
                                 "--topology", "zcube:n=32,k=2"])
    assert json.loads(r.output)["tiles"] == 16
    r = runner.invoke(plan_app, ["tiles", "--nodes", "100"])
    assert r.exit_code == 2 and "not a square ZCube(n,2) cell; pass --topology" in r.output
    r = runner.invoke(plan_app, ["tiles", "--topology", "railfly:rails=8,radix=128", "--ratio", "5:3"])
    assert r.exit_code == 0 and "5P+3D" in r.output


def test_export_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "t.yaml"
    r = runner.invoke(topo_app, ["export", "railfly:rails=4,radix=8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(topo_app, ["inspect", str(out), "--json"])
    s = json.loads(r.output)
    # 5 hosts × 4 GPUs, 4 rail switches, 20 access + 6 inter-group links, diameter 2
    assert (s["gpus"], s["switches"], s["links"], s["diameter_hops"]) == (20, 4, 26, 2)
    assert s["link_kinds"] == {"gpu-access": 20, "inter-group": 6}
