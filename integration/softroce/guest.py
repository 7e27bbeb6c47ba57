"""Inside the soft-RoCE guest: the boot script that creates the two rxe devices, and the small helpers the
guest-side tests use (am I in the guest, rxe packet counters). The boot script runs as root in the VM;
the helpers run in test processes in the VM and only read /sys; nothing here runs on the host's network.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

#: Set in every process of a guest run; the guest-side tests skip without it.
GUEST_ENV = "KVLANE_SOFTROCE_GUEST"
#: The run's log directory (read-write in the guest, kept on the host).
LOG_ENV = "KVLANE_SOFTROCE_LOG"
READY_MARK = "KVLANE_GUEST_READY"
SETUP_MARK = "KVLANE_RXE_READY"

#: (rxe device, dummy netdev, address). Two devices = a host with two NIC ports (ZCube path 1 / path 2).
#: 198.18.0.0/15 is the benchmarking range (RFC 2544); the VM has no NIC to the outside, so nothing
#: addressed here can leave the guest.
RXE_LINKS = (("rxe0", "d0", "198.18.0.1/24"), ("rxe1", "d1", "198.18.1.1/24"))
IB_SYSFS = Path("/sys/class/infiniband")


def boot_script(command: list[str], *, repo: Path, log_dir: Path, env: dict[str, str]) -> str:
    """The shell script the guest runs: rxe setup, then `command` in `repo`; its exit code goes to
    `<log_dir>/rc` (the harness's source of truth, whatever the VM's own exit status is)."""
    if not command:
        raise ValueError("no command to run in the guest")
    lines = [
        "#!/bin/sh",
        f'echo "{READY_MARK} uptime=$(cut -d" " -f1 /proc/uptime)"',
        f"rc_file={shlex.quote(str(log_dir / 'rc'))}",
        'fail() { echo "kvlane-softroce: $*" >&2; echo 97 > "$rc_file"; exit 97; }',
        "modprobe rdma_rxe || fail 'modprobe rdma_rxe failed'",
        "ip link set lo up",
    ]
    for dev, netdev, addr in RXE_LINKS:
        lines += [
            f"ip link add {netdev} type dummy || fail 'ip link add {netdev}'",
            f"ip link set {netdev} mtu 9000 || fail 'mtu {netdev}'",
            f"ip addr add {addr} dev {netdev} || fail 'ip addr {netdev}'",
            f"ip link set {netdev} up || fail 'up {netdev}'",
            f"rdma link add {dev} type rxe netdev {netdev} || fail 'rdma link add {dev}'",
        ]
    # A port turns ACTIVE shortly after its netdev is up; wait (max ~10 s) so the command sees it.
    devs = " ".join(d for d, _, _ in RXE_LINKS)
    lines += [
        f"for d in {devs}; do n=0; until grep -q ACTIVE {IB_SYSFS}/$d/ports/1/state 2>/dev/null; do"
        "  n=$((n+1)); [ $n -gt 100 ] && fail \"$d port not ACTIVE\"; sleep 0.1; done; done",
        f'echo "{SETUP_MARK} uptime=$(cut -d" " -f1 /proc/uptime)"',
    ]
    for key, value in sorted(env.items()):
        if not key.replace("_", "").isalnum():
            raise ValueError(f"bad environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines += [
        f"cd {shlex.quote(str(repo))} || fail 'cd {repo}'",
        shlex.join(command),
        'echo $? > "$rc_file"',
    ]
    return "\n".join(lines) + "\n"


def in_guest() -> bool:
    """True in a process started by `kvlane softroce run` with both rxe devices present."""
    return os.environ.get(GUEST_ENV) == "1" and all((IB_SYSFS / d).is_dir() for d, _, _ in RXE_LINKS)


def hw_counter(device: str, name: str, port: int = 1) -> int:
    """One rxe packet counter (rxe has `hw_counters/sent_pkts`, `rcvd_pkts`; no byte counters)."""
    path = IB_SYSFS / device / "ports" / str(port) / "hw_counters" / name
    return int(path.read_text().strip())


def packet_counters(devices: tuple[str, ...] = ("rxe0", "rxe1")) -> dict[str, tuple[int, int]]:
    """{device: (sent_pkts, rcvd_pkts)} for each device."""
    return {d: (hw_counter(d, "sent_pkts"), hw_counter(d, "rcvd_pkts")) for d in devices}
