"""In the guest: kvlane lists both rxe devices through pyverbs with state, MTU, speed and GIDs, sysfs
agrees, and the two ports map onto a 2-port host's NIC ports (ZCube path 1 / path 2)."""

from __future__ import annotations

import json
import subprocess
import sys

from kvlane.transport import rdma_devices as rd


def _by_port(devices: list[rd.RdmaDevice]) -> dict[str, rd.RdmaPort]:
    return {p.ucx_name: p for d in devices for p in d.ports}


def test_pyverbs_lists_rxe0_and_rxe1_active_mtu_4096_with_their_ipv4_gids() -> None:
    source, devices = rd.discover()
    assert source == "pyverbs"
    ports = _by_port(devices)
    assert sorted(ports) == ["rxe0:1", "rxe1:1"]
    for name, netdev, ip_hex in (("rxe0:1", "d0", "c612:0001"), ("rxe1:1", "d1", "c612:0101")):
        p = ports[name]
        assert (p.state, p.active_mtu, p.link_layer, p.netdev) == ("ACTIVE", 4096, "Ethernet", netdev)
        assert p.rate_gbps is not None and p.rate_gbps > 0
        # 198.18.0.1 / 198.18.1.1 as IPv4-mapped RoCE v2 GIDs, plus the link-local one.
        assert f"0000:0000:0000:0000:0000:ffff:{ip_hex}" in {g.gid for g in p.gids}
        assert any(g.gid.startswith("fe80:") for g in p.gids)
        assert {g.type for g in p.gids} >= {"RoCE v2"}


def test_sysfs_fallback_agrees_with_pyverbs() -> None:
    _, via_verbs = rd.discover("pyverbs")
    via_sysfs = rd.discover_sysfs()
    for name, p in _by_port(via_verbs).items():
        q = _by_port(via_sysfs)[name]
        assert (q.state, q.active_mtu, q.netdev) == (p.state, p.active_mtu, p.netdev)
        assert [g.gid for g in q.gids] == [g.gid for g in p.gids]


def test_module_cli_json_lists_both_devices() -> None:
    out = subprocess.run([sys.executable, "-m", "kvlane.transport.rdma_devices", "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    doc = json.loads(out)
    assert doc["source"] == "pyverbs"
    assert sorted(d["name"] for d in doc["devices"]) == ["rxe0", "rxe1"]


def test_two_port_host_maps_path1_to_rxe0_and_path2_to_rxe1() -> None:
    _, devices = rd.discover()
    m = rd.map_nic_ports(devices, {"p0.gpu0.nicA": "rxe0:1", "p0.gpu0.nicB": "rxe1:1"})
    assert (m["p0.gpu0.nicA"].netdev, m["p0.gpu0.nicB"].netdev) == ("d0", "d1")
