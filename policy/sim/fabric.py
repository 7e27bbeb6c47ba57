"""Maps a topology's links onto the flow network: every cable is two directed links (full duplex), each with
the cable's bandwidth, and a granted path becomes the directed links it crosses from source to destination.

Owned by `kvlane.policy.sim`; runs inside the simulator. Pure: reads the topology object it is given,
never a file, socket or clock. Links enter the network lazily, the first time a path uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from .network import FlowNetwork

#: A directed link: (topology link id, 0 for a→b or 1 for b→a).
DirLink = tuple[str, int]


class LinkLike(Protocol):
    id: str
    a: str
    b: str
    gbps: float


class FabricLike(Protocol):
    """What the simulator needs from a topology (`kvlane.policy.topology.Topology` provides all of it)."""

    @property
    def nodes(self) -> list[str]: ...

    def gpus_of(self, node: str) -> list[str]: ...

    def link(self, link_id: str) -> Any: ...

    def paths(self, src_gpu: str, dst_gpu: str) -> list[Any]: ...


class SimFabric:
    """The topology's links as directed capacities (bytes/s) in a `FlowNetwork`."""

    def __init__(self, topology: FabricLike, network: FlowNetwork, *, link_scale: float = 1.0,
                 local_gbps: float = 3200.0) -> None:
        if not (link_scale > 0 and math.isfinite(link_scale)):
            raise ValueError(f"link_scale must be > 0, got {link_scale}")
        self.topology = topology
        self.network = network
        self.link_scale = link_scale
        #: Rate of a transfer whose path has no links (same node: NVLink / shared memory), in bytes/s.
        self.local_rate = local_gbps * 1e9 / 8
        self._ends: dict[str, str] = {}

    def _end(self, name: str) -> str:
        """A link endpoint as the walk sees it: a NIC port is its GPU (a relayed path goes GPU -NVLink-> sibling
        GPU -> the sibling's port), anything else is itself."""
        got = self._ends.get(name)
        if got is None:
            owner = getattr(self.topology, "gpu_of_port", None)
            got = name
            if owner is not None:
                try:
                    got = owner(name)
                except ValueError:  # TopologyError: not a port
                    pass
            self._ends[name] = got
        return got

    def capacity(self, link_id: str) -> float:
        """Bytes/s of one direction of a cable (after `link_scale`)."""
        return self.topology.link(link_id).gbps * 1e9 / 8 * self.link_scale

    def directed(self, links: Sequence[str], src_gpu: str, src_nic: str | None = None) -> list[DirLink]:
        """The directed links of a path, walking from the source GPU (or its NIC port) to the destination.

        Each cable is oriented by the endpoint the walk is at; a cable that does not touch the walk's current
        endpoint (a malformed path) raises ValueError naming it."""
        out: list[DirLink] = []
        objs = [self.topology.link(lid) for lid in links]
        if not objs:
            return out
        end = self._end
        first = objs[0]
        starts = {end(src_gpu)} | ({end(src_nic)} if src_nic else set())
        fa, fb = end(first.a), end(first.b)
        if fa in starts:
            cur = fa
        elif fb in starts:
            cur = fb
        elif len(objs) > 1:
            nxt = {end(objs[1].a), end(objs[1].b)}
            cur = fb if fa in nxt and fb not in nxt else fa
        else:
            cur = fa
        for link in objs:
            a, b = end(link.a), end(link.b)
            if a == cur:
                out.append((link.id, 0))
                cur = b
            elif b == cur:
                out.append((link.id, 1))
                cur = a
            else:
                raise ValueError(f"path from {src_gpu}: link {link.id} ({link.a}--{link.b}) does not continue "
                                 f"from {cur}")
        for key in out:
            if not self.network.has_link(key):
                self.network.add_link(key, self.capacity(key[0]))
        return out
