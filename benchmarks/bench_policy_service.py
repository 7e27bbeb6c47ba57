"""What the policy service costs on top of the policy: one select_pair called directly on `Policy`, through
`EmbeddedPolicy` (schema + msgpack, no socket), over TCP with `PolicyClient` (sequential, with HMAC auth,
and 16 calls in flight), and from a plain thread with `SyncPolicyClient`; plus `ping` (the bare round trip).

Run: .venv/bin/python benchmarks/bench_policy_service.py [--calls 2000] [--quick]

All rows run in one process in the same run on 127.0.0.1, on a 4-GPU loopback fabric (2 prefill, 2 decode
engines; queue limits lifted so every call decides). Wall-clock on a shared machine: trust the ratios, not
the absolute numbers; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from collections.abc import Awaitable, Callable

from kvlane.integration.policy_service import (
    EmbeddedPolicy,
    PolicyClient,
    PolicyServer,
    PolicyService,
    SyncPolicyClient,
)
from kvlane.policy.config import PolicyConfig, SelectionConfig
from kvlane.policy.core import Policy
from kvlane.policy.topology import load_topology
from kvlane.policy.types import EngineInfo, PairRequest, Role

SECRET = b"bench-secret"


def make_policy() -> Policy:
    cfg = PolicyConfig(selection=SelectionConfig(max_prefill_queue=10**9, max_decode_queue=10**9))
    policy = Policy(load_topology("loopback:gpus=4"), cfg)
    for i, (eid, role) in enumerate([("p0", Role.PREFILL), ("p1", Role.PREFILL), ("d0", Role.DECODE),
                                     ("d1", Role.DECODE)]):
        policy.register_engine(EngineInfo(engine_id=eid, role=role, gpus=[f"n0.g{i}"], kv_bytes_per_token=2048),
                               0.0)
    return policy


def req(i: int) -> PairRequest:
    return PairRequest(request_id=f"r{i}", prompt_tokens=1000)


class Row:
    def __init__(self, name: str, per_call_s: list[float], wall_s: float, calls: int) -> None:
        self.name, self.per_call_s, self.wall_s, self.calls = name, per_call_s, wall_s, calls

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_call_s) * 1e6

    @property
    def p99_us(self) -> float:
        xs = sorted(self.per_call_s)
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6

    @property
    def rate(self) -> float:
        return self.calls / self.wall_s


async def seq(name: str, calls: int, fn: Callable[[int], Awaitable[object]]) -> Row:
    for i in range(min(50, calls)):  # warm up (connect, caches)
        await fn(-i - 1)
    lat = []
    t0 = time.perf_counter()
    for i in range(calls):
        a = time.perf_counter()
        await fn(i)
        lat.append(time.perf_counter() - a)
    return Row(name, lat, time.perf_counter() - t0, calls)


async def concurrent(name: str, calls: int, inflight: int, fn: Callable[[int], Awaitable[object]]) -> Row:
    lat: list[float] = []

    async def worker(k: int) -> None:
        for i in range(k, calls, inflight):
            a = time.perf_counter()
            await fn(i)
            lat.append(time.perf_counter() - a)

    await fn(-1)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return Row(name, lat, time.perf_counter() - t0, calls)


async def main(calls: int) -> list[Row]:
    rows = []
    direct = make_policy()
    clock = [1.0]

    async def call_direct(i: int) -> object:
        clock[0] += 1e-6
        return direct.select_pair(req(i), clock[0])

    rows.append(await seq("Policy.select_pair (direct, no service)", calls, call_direct))

    async with EmbeddedPolicy(make_policy()) as emb:
        rows.append(await seq("EmbeddedPolicy.select_pair", calls, lambda i: emb.select_pair(req(i))))

    async with PolicyServer(PolicyService(make_policy()), "127.0.0.1", 0) as srv:
        async with PolicyClient(srv.address, secret=None) as c:
            rows.append(await seq("TCP ping (round trip only)", calls, lambda i: c.ping()))
            rows.append(await seq("TCP select_pair", calls, lambda i: c.select_pair(req(i))))
            rows.append(await concurrent("TCP select_pair, 16 in flight (µs incl. queue)", calls, 16, lambda i: c.select_pair(req(i))))
        address = srv.address

        # the sync client: blocking calls from a plain thread, server on this loop
        lat: list[float] = []
        wall = [0.0]

        def thread_body() -> None:
            with SyncPolicyClient(address, secret=None) as sc:
                for i in range(50):
                    sc.select_pair(req(-i - 1))
                t0 = time.perf_counter()
                for i in range(calls):
                    a = time.perf_counter()
                    sc.select_pair(req(i))
                    lat.append(time.perf_counter() - a)
                wall[0] = time.perf_counter() - t0

        t = threading.Thread(target=thread_body)
        t.start()
        await asyncio.to_thread(t.join)
        rows.append(Row("SyncPolicyClient.select_pair (plain thread)", lat, wall[0], calls))

    async with PolicyServer(PolicyService(make_policy()), "127.0.0.1", 0, secret=SECRET) as srv:
        async with PolicyClient(srv.address, secret=SECRET) as c:
            rows.append(await seq("TCP select_pair, HMAC auth", calls, lambda i: c.select_pair(req(i))))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="200 calls per row")
    args = ap.parse_args()
    calls = 200 if args.quick else args.calls
    rows = asyncio.run(main(calls))
    base = rows[0].median_us
    print(f"load average {os.getloadavg()[0]:.2f}; {calls} calls per row")
    print(f"{'path':<46} {'median µs':>10} {'p99 µs':>10} {'calls/s':>10} {'× direct':>9}")
    for r in rows:
        print(f"{r.name:<46} {r.median_us:>10.1f} {r.p99_us:>10.1f} {r.rate:>10.0f} {r.median_us / base:>9.1f}")
