"""Fuzz campaign against the policy service's request decoding and dispatch, longer than the unit tests' runs.

Each input is one frame body: msgpack decode -> envelope -> the op's body schema -> `PolicyService.dispatch`
on a real policy (every op except the long poll). A finding is any exception other than the service's own
client errors, or an `internal` error reply. Runs in this process only: no sockets, no other process touched.

    python benchmarks/fuzz_policy_frames.py                 # random mutations of valid frames, 20 s
    python benchmarks/fuzz_policy_frames.py --seconds 120
    python benchmarks/fuzz_policy_frames.py --atheris -- -max_total_time=60   # coverage-guided (pip install atheris)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

import msgpack

try:
    import atheris
except ImportError:  # optional
    atheris = None

if atheris is not None and "--atheris" in sys.argv:
    with atheris.instrument_imports(include=["kvlane"]):
        from kvlane.integration.policy_service import PolicyService
        from kvlane.integration.policy_service import protocol as P
        from kvlane.policy.core import Policy
        from kvlane.policy.topology import load_topology
        from kvlane.policy.types import EngineInfo, PolicyError, Role
else:
    from kvlane.integration.policy_service import PolicyService
    from kvlane.integration.policy_service import protocol as P
    from kvlane.policy.core import Policy
    from kvlane.policy.topology import load_topology
    from kvlane.policy.types import EngineInfo, PolicyError, Role

MAX_FRAME = 1 << 20
SEEDS: list[dict[str, Any]] = [
    {"v": 1, "id": 1, "op": "ping", "body": {}},
    {"v": 1, "id": 2, "op": "register_engine", "body": {"engine_id": "p9", "role": "prefill", "gpus": ["n0.g2"]}},
    {"v": 1, "id": 3, "op": "report_load", "body": {"engine_id": "p0", "queue_depth": 2, "memory_pressure": 0.5}},
    {"v": 1, "id": 4, "op": "select_pair", "body": {"request_id": "r1", "session_id": "s1", "prompt_tokens": 100}},
    {"v": 1, "id": 5, "op": "acquire_lease", "body": {"transfer_id": "t1", "prefill": "p0", "decode": "d0",
                                                      "bytes": 1 << 20}},
    {"v": 1, "id": 6, "op": "release_lease", "body": {"lease_id": "L-1", "outcome": {
        "lease_id": "L-1", "ok": True, "bytes": 10, "seconds": 0.1, "ranks": [
            {"rank": 0, "path": "local", "bytes": 10, "seconds": 0.1, "ok": True}]}}},
    {"v": 1, "id": 7, "op": "snapshot", "body": {"max_paths": 2, "hottest": 1}},
    {"v": 1, "id": 8, "op": "announce", "body": {"transfer_id": "t1", "payload": {"block_ids": [1, 2], "k": b"x"}}},
    {"v": 1, "id": 9, "op": "register_rank", "body": {"engine_id": "p0", "rank": 0, "descriptor": b"d"}},
    {"v": 1, "id": 10, "op": "get_ranks", "body": {"engine_id": "p0"}},
    {"v": 1, "id": 11, "op": "list_engines", "body": {}},
    {"v": 1, "id": 12, "op": "remove_engine", "body": {"engine_id": "p9"}},
]


class Target:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.service = PolicyService(Policy(load_topology("loopback:gpus=4")), clock=lambda: 1000.0)
        for i, (name, role) in enumerate((("p0", Role.PREFILL), ("d0", Role.DECODE))):
            self.service.policy.register_engine(EngineInfo(engine_id=name, role=role, gpus=[f"n0.g{i}"],
                                                           kv_bytes_per_token=1024), 0.0)
        self.counts = {"inputs": 0, "refused": 0, "served": 0, "policy_errors": 0, "findings": 0}

    def one(self, data: bytes) -> None:
        self.counts["inputs"] += 1
        try:
            env = P.parse_request(P.decode_body(data, MAX_FRAME))
        except P.BadRequest:
            self.counts["refused"] += 1
            return
        if env.op == "await_announce":  # a long poll; its schema is still checked
            try:
                P.parse_body(P.AwaitAnnounceBody, env.body)
            except P.BadRequest:
                self.counts["refused"] += 1
            return
        try:
            reply = self.loop.run_until_complete(self.service.dispatch(env.op, env.body))
            P.encode_frame(P.ok_reply(env.id, reply), MAX_FRAME)
            self.counts["served"] += 1
        except PolicyError as exc:
            if getattr(exc, "code", "") == "internal":
                self.counts["findings"] += 1
                raise AssertionError(f"internal error for {env.op} {str(env.body)[:300]}: {exc}") from exc
            self.counts["policy_errors"] += 1
        if self.service.policy.ledger.active():  # keep the ledger small: expire everything now and then
            self.service.policy.expire(1e12)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif op == 2 and buf:
            del buf[rng.randrange(len(buf))]
        elif op == 3 and buf:
            cut = rng.randrange(len(buf))
            buf = buf[:cut]
        else:
            buf += rng.choice(SEEDS_BYTES)[: rng.randrange(1, 20)]
    return bytes(buf)


SEEDS_BYTES = [msgpack.packb(s, use_bin_type=True) for s in SEEDS]


def random_campaign(seconds: float, seed: int) -> None:
    target = Target()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        target.one(mutate(rng, rng.choice(SEEDS_BYTES)))
    elapsed = time.perf_counter() - t0
    c = target.counts
    print(f"{'mode':<8} {'seconds':>8} {'inputs':>8} {'inputs/s':>9} {'refused':>8} {'served':>7} "
          f"{'policy err':>10} {'findings':>8}")
    print(f"{'random':<8} {elapsed:>8.1f} {c['inputs']:>8} {c['inputs'] / elapsed:>9.0f} {c['refused']:>8} "
          f"{c['served']:>7} {c['policy_errors']:>10} {c['findings']:>8}")
    print(f"served / inputs = {c['served'] / max(1, c['inputs']):.3f} (mutations that stay valid reach the policy)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--atheris", action="store_true", help="coverage-guided with atheris (args after -- go to it)")
    args, rest = ap.parse_known_args()
    if not args.atheris:
        random_campaign(args.seconds, args.seed)
        return
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris")
    target = Target()
    libfuzzer_args = [sys.argv[0], *[a for a in rest if a != "--"]]
    if not any(a.startswith("-max_total_time") or a.startswith("-runs") for a in libfuzzer_args):
        libfuzzer_args.append(f"-max_total_time={int(args.seconds)}")
    if not any(not a.startswith("-") for a in libfuzzer_args[1:]):  # no corpus given: start from the seeds
        import tempfile

        corpus = tempfile.mkdtemp(prefix="kvlane-fuzz-corpus-")
        for i, seed in enumerate(SEEDS_BYTES):
            with open(f"{corpus}/seed{i}", "wb") as fh:
                fh.write(seed)
        libfuzzer_args.append(corpus)
        print(f"corpus: {corpus} (seeded with {len(SEEDS_BYTES)} valid frames)")
    atheris.Setup(libfuzzer_args, target.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
