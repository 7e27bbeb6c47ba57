"""RDMA device discovery: which verbs devices and ports this host has (state, MTU, link speed, GIDs), read
with pyverbs (Debian's python3-pyverbs) or, without it, from /sys/class/infiniband; and the mapping of
those ports onto the topology's NIC port ids. Runs in any kvlane process at start-up (and as
`python -m kvlane.transport.rdma_devices`); it only reads, never opens a QP or moves data.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

SYSFS = Path("/sys/class/infiniband")
#: Where Debian installs python3-pyverbs (built for CPython 3.11); used when `import pyverbs` fails.
DEBIAN_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")

_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
_IBV_MTU = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
#: ibv_port_attr.active_speed code → Gb/s per lane; active_width code → lanes (verbs.h).
_SPEED_GBPS = {0: 0.0, 1: 2.5, 2: 5.0, 4: 10.0, 8: 10.3125, 16: 14.0625, 32: 25.78125, 64: 53.125, 128: 106.25}
_WIDTH_LANES = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}
_LINK_LAYER = {0: "Unspecified", 1: "InfiniBand", 2: "Ethernet"}


@dataclass(frozen=True)
class Gid:
    index: int
    gid: str  # 32 hex digits in 8 colon-separated groups, as sysfs and ibv_devinfo print them
    type: str | None = None  # "RoCE v2", "IB/RoCE v1" (sysfs gid_attrs) where known


@dataclass(frozen=True)
class RdmaPort:
    device: str
    port: int
    state: str  # "ACTIVE", "DOWN", ...
    active_mtu: int | None  # bytes (256..4096); None if unknown
    link_layer: str  # "Ethernet" (RoCE) or "InfiniBand"
    rate_gbps: float | None
    netdev: str | None  # RoCE: the Ethernet device under the port
    gids: tuple[Gid, ...] = field(default_factory=tuple)

    @property
    def ucx_name(self) -> str:
        """The name UCX_NET_DEVICES takes, e.g. `rxe0:1`."""
        return f"{self.device}:{self.port}"


@dataclass(frozen=True)
class RdmaDevice:
    name: str
    node_guid: str | None
    ports: tuple[RdmaPort, ...]


class RdmaMappingError(ValueError):
    """The NIC map names a device/port this host lacks, or one that is not ACTIVE."""


def _load_pyverbs() -> ModuleType | None:
    """`pyverbs`, or Debian's copy loaded by location (no sys.path change), or None."""
    try:
        import pyverbs  # type: ignore[import-not-found]

        return pyverbs
    except ImportError:
        pass
    if sys.version_info[:2] != (3, 11):
        return None
    spec = importlib.machinery.PathFinder.find_spec("pyverbs", [str(DEBIAN_DIST_PACKAGES)])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyverbs"] = module
    try:
        spec.loader.exec_module(module)
        import pyverbs.device  # noqa: F401  (the compiled part; fails if the ABI does not fit)
    except ImportError:
        sys.modules.pop("pyverbs", None)
        return None
    return module


def _fmt_gid(raw: str) -> str:
    h = raw.replace(":", "").lower()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _sysfs_gid_type(root: Path, device: str, port: int, index: int) -> str | None:
    return _read(root / device / "ports" / str(port) / "gid_attrs" / "types" / str(index))


def _sysfs_netdev(root: Path, device: str, port: int) -> str | None:
    ndevs = root / device / "ports" / str(port) / "gid_attrs" / "ndevs"
    for gid_index in sorted(ndevs.glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30):
        if (name := _read(gid_index)) is not None:
            return name
    return None


def _valid_gid(g: str) -> bool:
    return g.replace(":", "").strip("0") != ""


def _sysfs_gids(root: Path, device: str, port: int) -> tuple[Gid, ...]:
    gids = []
    gdir = root / device / "ports" / str(port) / "gids"
    for entry in sorted(gdir.glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30):
        value = _read(entry)
        if entry.name.isdigit() and value and _valid_gid(value):
            gids.append(Gid(int(entry.name), _fmt_gid(value), _sysfs_gid_type(root, device, port, int(entry.name))))
    return tuple(gids)


def _roce_mtu(netdev_mtu: int) -> int | None:
    """Largest IB MTU that fits the Ethernet MTU with RoCE v2 headers (what rxe and RoCE NICs report)."""
    fits = [m for m in _IBV_MTU.values() if m + 100 <= netdev_mtu]
    return max(fits) if fits else None


def _parse_rate(text: str | None) -> float | None:
    # sysfs `rate`: "10 Gb/sec (4X QDR)" or "2.5 Gb/sec (1X SDR)"
    if not text:
        return None
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return None


def discover_sysfs(root: Path = SYSFS, net_root: Path = Path("/sys/class/net")) -> list[RdmaDevice]:
    """Devices from sysfs alone. MTU: for RoCE derived from the netdev MTU (sysfs has no MTU file)."""
    if not root.is_dir():
        return []
    devices = []
    for dev_dir in sorted(root.iterdir()):
        name = dev_dir.name
        ports = []
        for port_dir in sorted((dev_dir / "ports").glob("*")):
            if not port_dir.name.isdigit():
                continue
            port = int(port_dir.name)
            state_text = _read(port_dir / "state") or ""  # "4: ACTIVE"
            state = state_text.split(":", 1)[1].strip() if ":" in state_text else state_text or "UNKNOWN"
            link_layer = _read(port_dir / "link_layer") or "Unspecified"
            netdev = _sysfs_netdev(root, name, port)
            mtu = None
            if netdev and (nmtu := _read(net_root / netdev / "mtu")) and nmtu.isdigit():
                mtu = _roce_mtu(int(nmtu))
            ports.append(RdmaPort(device=name, port=port, state=state, active_mtu=mtu, link_layer=link_layer,
                                  rate_gbps=_parse_rate(_read(port_dir / "rate")), netdev=netdev,
                                  gids=_sysfs_gids(root, name, port)))
        guid = _read(dev_dir / "node_guid")
        devices.append(RdmaDevice(name=name, node_guid=guid, ports=tuple(ports)))
    return devices


def discover_pyverbs(pyverbs: ModuleType, root: Path = SYSFS) -> list[RdmaDevice]:
    """Devices through verbs (ibv_query_port / ibv_query_gid). pyverbs raises where no device exists
    (no /sys/class/infiniband); that is an empty list here."""
    import pyverbs.device as vdev  # type: ignore[import-not-found]
    from pyverbs.pyverbs_error import PyverbsError  # type: ignore[import-not-found]

    try:
        listed = vdev.get_device_list()
    except PyverbsError:
        return []
    devices = []
    for d in listed:
        name = d.name.decode() if isinstance(d.name, bytes) else str(d.name)
        ports = []
        with vdev.Context(name=name) as ctx:
            attr = ctx.query_device()
            for port in range(1, attr.phys_port_cnt + 1):
                pa = ctx.query_port(port)
                gids = []
                for index in range(pa.gid_tbl_len):
                    try:
                        g = str(ctx.query_gid(port, index))
                    except PyverbsError:
                        continue  # empty slot (RoCE GID tables are sparse)
                    if _valid_gid(g):
                        gids.append(Gid(index, _fmt_gid(g), _sysfs_gid_type(root, name, port, index)))
                speed = _SPEED_GBPS.get(pa.active_speed)
                lanes = _WIDTH_LANES.get(pa.active_width)
                ports.append(RdmaPort(
                    device=name, port=port, state=_PORT_STATES.get(pa.state, str(pa.state)),
                    active_mtu=_IBV_MTU.get(pa.active_mtu), link_layer=_LINK_LAYER.get(pa.link_layer, "Unspecified"),
                    rate_gbps=speed * lanes if speed is not None and lanes is not None else None,
                    netdev=_sysfs_netdev(root, name, port), gids=tuple(gids),
                ))
        guid = d.guid.decode() if isinstance(getattr(d, "guid", None), bytes) else getattr(d, "guid", None)
        devices.append(RdmaDevice(name=name, node_guid=_read(root / name / "node_guid") or guid, ports=tuple(ports)))
    return devices


def discover(prefer: str = "auto") -> tuple[str, list[RdmaDevice]]:
    """(source, devices): source is "pyverbs" or "sysfs". prefer="sysfs" skips pyverbs."""
    if prefer not in ("auto", "pyverbs", "sysfs"):
        raise ValueError(f"prefer must be auto, pyverbs or sysfs, got {prefer!r}")
    if prefer != "sysfs":
        pv = _load_pyverbs()
        if pv is not None:
            return "pyverbs", discover_pyverbs(pv)
        if prefer == "pyverbs":
            raise RuntimeError("pyverbs is not importable (install Debian's python3-pyverbs; CPython 3.11)")
    return "sysfs", discover_sysfs()


def map_nic_ports(devices: list[RdmaDevice], nic_map: dict[str, str], *, require_active: bool = True
                  ) -> dict[str, RdmaPort]:
    """Topology NIC port id → the RDMA port it is cabled as, from a config map of
    `{nic_port_id: "device:port"}` (e.g. `{"p0.gpu0.nic0": "rxe0:1"}`)."""
    ports = {p.ucx_name: p for d in devices for p in d.ports}
    out: dict[str, RdmaPort] = {}
    seen: dict[str, str] = {}
    for nic, target in nic_map.items():
        dev, sep, num = target.partition(":")
        if not dev or not sep or not num.isdigit():
            raise RdmaMappingError(f"NIC {nic!r}: {target!r} is not 'device:port' (e.g. 'mlx5_0:1')")
        if target in seen:
            raise RdmaMappingError(f"NICs {seen[target]!r} and {nic!r} both map to {target}")
        seen[target] = nic
        port = ports.get(target)
        if port is None:
            have = ", ".join(sorted(ports)) or "none"
            raise RdmaMappingError(f"NIC {nic!r}: no RDMA port {target} on this host (have: {have})")
        if require_active and port.state != "ACTIVE":
            raise RdmaMappingError(f"NIC {nic!r}: {target} is {port.state}, not ACTIVE")
        out[nic] = port
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="List RDMA devices (pyverbs, else sysfs).")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--source", choices=["auto", "pyverbs", "sysfs"], default="auto")
    args = ap.parse_args(argv)
    source, devices = discover(args.source)
    if args.json:
        print(json.dumps({"source": source, "devices": [asdict(d) for d in devices]}, indent=1))
        return 0
    if not devices:
        print(f"no RDMA devices ({source})")
    for d in devices:
        for p in d.ports:
            gids = ", ".join(f"[{g.index}] {g.gid}" + (f" {g.type}" if g.type else "") for g in p.gids)
            print(f"{p.ucx_name:<12} {p.state:<7} mtu {p.active_mtu} {p.link_layer} {p.rate_gbps} Gb/s "
                  f"netdev {p.netdev}  gids: {gids}  ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
