"""RDMA device discovery from a fake sysfs tree, the NIC map, and pyverbs' raise-on-no-device case."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvlane.transport import rdma_devices as rd


def _fake_port(root: Path, dev: str, netdev: str, state: str = "4: ACTIVE") -> None:
    port = root / dev / "ports" / "1"
    (port / "gids").mkdir(parents=True)
    (port / "gid_attrs" / "types").mkdir(parents=True)
    (port / "gid_attrs" / "ndevs").mkdir(parents=True)
    (root / dev / "node_guid").write_text("001a:feff:fe39:e25a\n")
    (port / "state").write_text(state + "\n")
    (port / "link_layer").write_text("Ethernet\n")
    (port / "rate").write_text("10 Gb/sec (1X QDR)\n")
    (port / "gids" / "0").write_text("fe80:0000:0000:0000:021a:feff:fe39:e25a\n")
    (port / "gids" / "1").write_text("0000:0000:0000:0000:0000:ffff:c612:0001\n")
    (port / "gids" / "2").write_text("0000:0000:0000:0000:0000:0000:0000:0000\n")  # empty slot
    (port / "gid_attrs" / "types" / "0").write_text("RoCE v2\n")
    (port / "gid_attrs" / "types" / "1").write_text("RoCE v2\n")
    (port / "gid_attrs" / "ndevs" / "0").write_text(netdev + "\n")
    (port / "gid_attrs" / "ndevs" / "1").write_text(netdev + "\n")


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> tuple[Path, Path]:
    ib, net = tmp_path / "infiniband", tmp_path / "net"
    _fake_port(ib, "rxe0", "d0")
    _fake_port(ib, "rxe1", "d1", state="1: DOWN")
    for nd, mtu in (("d0", "9000"), ("d1", "1500")):
        (net / nd).mkdir(parents=True)
        (net / nd / "mtu").write_text(mtu + "\n")
    return ib, net


def test_sysfs_lists_ports_with_state_mtu_rate_and_gids(fake_sysfs: tuple[Path, Path]) -> None:
    devs = rd.discover_sysfs(*fake_sysfs)
    assert [d.name for d in devs] == ["rxe0", "rxe1"]
    p0 = devs[0].ports[0]
    assert (p0.ucx_name, p0.state, p0.link_layer, p0.rate_gbps, p0.netdev) == ("rxe0:1", "ACTIVE", "Ethernet", 10.0, "d0")
    # MTU 9000 on the netdev → RoCE MTU 4096; MTU 1500 → 1024 (2048 + headers does not fit).
    assert p0.active_mtu == 4096 and devs[1].ports[0].active_mtu == 1024
    assert [(g.index, g.type) for g in p0.gids] == [(0, "RoCE v2"), (1, "RoCE v2")]  # empty slot 2 dropped
    assert p0.gids[1].gid == "0000:0000:0000:0000:0000:ffff:c612:0001"
    assert devs[1].ports[0].state == "DOWN"


def test_no_sysfs_means_no_devices(tmp_path: Path) -> None:
    assert rd.discover_sysfs(tmp_path / "absent") == []


def test_nic_map_maps_topology_ports_and_names_what_is_wrong(fake_sysfs: tuple[Path, Path]) -> None:
    devs = rd.discover_sysfs(*fake_sysfs)
    m = rd.map_nic_ports(devs, {"h0.g0.nic0": "rxe0:1"})
    assert m["h0.g0.nic0"].device == "rxe0"
    with pytest.raises(rd.RdmaMappingError, match=r"rxe1:1 is DOWN"):
        rd.map_nic_ports(devs, {"h0.g0.nic1": "rxe1:1"})
    assert rd.map_nic_ports(devs, {"h0.g0.nic1": "rxe1:1"}, require_active=False)["h0.g0.nic1"].port == 1
    with pytest.raises(rd.RdmaMappingError, match=r"no RDMA port mlx5_0:1 .*have: rxe0:1, rxe1:1"):
        rd.map_nic_ports(devs, {"n": "mlx5_0:1"})
    with pytest.raises(rd.RdmaMappingError, match="not 'device:port'"):
        rd.map_nic_ports(devs, {"n": "rxe0"})
    with pytest.raises(rd.RdmaMappingError, match="both map to rxe0:1"):
        rd.map_nic_ports(devs, {"a": "rxe0:1", "b": "rxe0:1"})


def test_pyverbs_raising_on_no_device_is_an_empty_list() -> None:
    pv = rd._load_pyverbs()
    if pv is None:
        pytest.skip("python3-pyverbs not installed")
    if rd.SYSFS.is_dir() and any(rd.SYSFS.iterdir()):
        pytest.skip("this host has RDMA devices")
    assert rd.discover_pyverbs(pv) == []
    assert rd.discover("pyverbs") == ("pyverbs", [])


def test_bad_source_is_refused() -> None:
    with pytest.raises(ValueError, match="prefer must be"):
        rd.discover("verbs")
