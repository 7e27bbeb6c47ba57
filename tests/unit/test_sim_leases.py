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


def one_uplink() -> Topology:
    """P n0, n1 on leaf l0, D n2, n3 on leaf l1, one spine: every transfer crosses l0--s and s--l1 (8 Gbps =
    1e9 B/s, 6.4 Gbps reservable); access links 80 Gbps."""
    t = Topology("one-uplink")
    for s in ("l0", "l1", "s"):
        t.add_switch(s)
    for i, role in enumerate(["prefill", "prefill", "decode", "decode"]):
        t.add_node(f"n{i}", 1, role_hint=role)
        t.add_port(f"n{i}.g0", "p0", "l0" if i < 2 else "l1", 80.0)
    t.add_link("l0", "s", 8.0)
    t.add_link("l1", "s", 8.0)
    return t


@pytest.mark.parametrize("mode", ["wakeup", "poll"])
def test_a_link_quota_waiter_wakes_when_the_lease_on_that_link_ends(mode):
    # Two 1e8 B transfers (100,000 tokens) finish prefill together at 10 s. Each reserves 5 Gbps (the minimum
    # per stream) on the uplink, whose reservable 6.4 Gbps fits one: kvlane refuses the second on the link quota
    # (D ingress has room: 3 streams). The first alone runs at 1e9 B/s: 10.0-10.1 s. Woken on its release, the
    # second starts at 10.1 s exactly; polling asks again after retry_after = the first's expected end at its
    # reserved 5 Gbps (0.16 s), so it starts at 10.16 s.
    topo = one_uplink()
    sim = Simulator(topo, make_policy("kvlane", topo), SimConfig(cost=COST, lease_retry=mode))  # type: ignore[arg-type]
    res = sim.run(synchronized(2, prompt_tokens=100_000, output_tokens=5))
    assert res.summary["completed"] == 2 and res.summary["lease_denials"] >= 1
    first, second = sorted(sim.requests, key=lambda r: r.lease_granted)
    assert first.lease_granted == pytest.approx(10.0) and first.transfer_end == pytest.approx(10.1)
    if mode == "wakeup":
        assert second.lease_granted == first.transfer_end
        assert second.denials == 1
    else:
        assert second.lease_granted == pytest.approx(10.16)
    assert second.kv_transfer_s == pytest.approx(0.1)
