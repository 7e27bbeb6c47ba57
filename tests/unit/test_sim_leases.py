"""Denied leases in the simulator: with `lease_retry="wakeup"` a denied transfer waits in its decode engine's FIFO
queue and starts the instant a lease on that D ends (no polling gap, no overtaking); `"poll"` asks again after
`retry_after`. Worked by hand on a star of 100 Gbps links (12.5e9 B/s) with one stream credit per D."""

import pytest
from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.sim import CostModel, SimConfig, Simulator, make_policy, synchronized
from kvlane.policy.sim.workload import Session, Turn, Workload
from kvlane.policy.topology import Topology

COST = CostModel(prefill_tokens_per_s=10_000.0, prefill_overhead_s=0.0, decode_tokens_per_s=100.0,
                 kv_bytes_per_token=1000, decode_kv_bytes=1 << 40)


def incast(n_p: int) -> Topology:
    t = Topology("star")
    t.add_switch("s")
    for i in range(n_p + 1):
        t.add_node(f"n{i}", 1, role_hint="prefill" if i < n_p else "decode")
        t.add_port(f"n{i}.g0", "p0", "s", 100.0)
    return t


def run(policy: str, workload: Workload, n_p: int, lease_retry: str) -> Simulator:
    topo = incast(n_p)
    pcfg = PolicyConfig(credits=CreditConfig(max_streams=1))
    sim = Simulator(topo, make_policy(policy, topo, credits=True, config=pcfg),
                    SimConfig(cost=COST, lease_retry=lease_retry))  # type: ignore[arg-type]
    res = sim.run(workload)
    assert res.summary["completed"] == workload.requests
    assert res.summary["d_ingress_max"] == 1
    return sim


@pytest.mark.parametrize("policy", ["kvlane", "least-loaded"])
def test_waiters_start_the_instant_the_previous_lease_ends(policy):
    # 3 P finish 200,000-token prefills together (20 s); each KV is 2e8 B = 16 ms at 12.5e9 B/s. One stream
    # credit: the transfers run back to back, each granted exactly when the previous one's last byte lands.
    sim = run(policy, synchronized(3, prompt_tokens=200_000, output_tokens=5), 3, "wakeup")
    reqs = sorted(sim.requests, key=lambda r: r.lease_granted)
    assert [r.lease_granted for r in reqs] == pytest.approx([20.0, 20.016, 20.032])
    assert [r.kv_transfer_s for r in reqs] == pytest.approx([0.016] * 3)
    for a, b in zip(reqs, reqs[1:], strict=False):
        assert b.lease_granted == a.transfer_end
    # the second asks and is denied; the third finds a queue and waits behind it without asking; on the first
    # release the second starts and the third is denied once more; on the second release the third starts.
    assert sum(r.denials for r in reqs) == 2


def staggered() -> Workload:
    # Each P its own request (3 P). Transfers above 64 MiB (67,109 tokens) are "reserved": they need the credit.
    turns = [Turn("a", None, 0, 0.0, 0.0, 0, 300_000, 5),    # prefill 0-30 s, KV 3e8 B: 30.000-30.024 s
             Turn("b", None, 0, 23.0, 0.0, 0, 70_000, 5),    # prefill ends 30.0 s (just after a asks): denied
             Turn("c", None, 0, 23.01, 0.0, 0, 70_000, 5)]   # prefill ends 30.01 s: queues behind b, no ask
    return Workload("staggered", tuple(Session(t.request_id, (t,)) for t in turns))


def test_a_later_prefill_does_not_overtake_a_waiter():
    sim = run("least-loaded", staggered(), 3, "wakeup")
    by = {r.turn.request_id: r for r in sim.requests}
    assert by["a"].lease_granted == pytest.approx(30.0)
    assert by["b"].lease_granted == by["a"].transfer_end == pytest.approx(30.024)
    assert by["c"].lease_granted == by["b"].transfer_end == pytest.approx(30.024 + 7e7 / 12.5e9)
    # b was refused once at 30.0; c never asked while b waited, and was refused once when it was woken
    # behind b (the one credit went to b first)
    assert by["b"].denials == 1 and by["c"].denials == 1


def test_poll_mode_asks_again_after_retry_after():
    # The same incast with polling: every transfer still completes with one stream at a time, but a waiter only
    # learns of the free credit on its next poll, and re-asks count as denials.
    sim = run("least-loaded", synchronized(3, prompt_tokens=200_000, output_tokens=5), 3, "poll")
    reqs = sorted(sim.requests, key=lambda r: r.lease_granted)
    assert [r.kv_transfer_s for r in reqs] == pytest.approx([0.016] * 3)
    for a, b in zip(reqs, reqs[1:], strict=False):
        assert b.lease_granted >= a.transfer_end
    assert sum(r.denials for r in reqs) >= 2
