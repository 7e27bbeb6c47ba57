"""The max-min fair flow network against closed-form answers."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvlane.policy.sim.network import FlowNetwork, NetworkError


def run_to_end(net: FlowNetwork) -> dict:
    """Drive the network until every flow finished; returns flow id -> finish time."""
    done = {}
    while net.flows:
        t = net.next_completion()
        assert math.isfinite(t)
        net.advance(t)
        for f in net.finished():
            net.remove_flow(f.flow_id)
            done[f.flow_id] = t
    return done


def test_one_flow_one_link_time_is_bytes_over_bandwidth():
    net = FlowNetwork()
    net.add_link("L", 1e9)  # 8 Gbps = 1e9 bytes/s
    net.add_flow("f", ["L"], 3e9, 0.0)
    assert run_to_end(net) == {"f": pytest.approx(3.0)}
    assert net.links["L"].carried == pytest.approx(3e9)


def test_n_flows_on_one_bottleneck_each_get_a_fair_share():
    net = FlowNetwork()
    net.add_link("L", 100.0)
    for i in range(4):
        net.add_flow(i, ["L"], 50.0, 0.0)
    net.next_completion()
    assert [net.flows[i].rate for i in range(4)] == [pytest.approx(25.0)] * 4
    # equal sizes: all finish together at 50 / 25 = 2 s
    assert run_to_end(net) == {i: pytest.approx(2.0) for i in range(4)}


def test_classic_three_link_max_min_allocation():
    # Capacities L1=10, L2=6, L3=9. Flows: A over L1+L2, B over L1, C over L2+L3, D over L3.
    # Progressive filling: fair shares L1 10/2=5, L2 6/2=3, L3 9/2=4.5 -> L2 binds first: A=C=3.
    # Residuals: L1 10-3=7 for B alone, L3 9-3=6 for D alone -> D=6, then B=7.
    # Check: every flow is the largest on a saturated link (A,C on L2=6; B on L1=10; D on L3=9).
    net = FlowNetwork()
    for key, cap in (("L1", 10.0), ("L2", 6.0), ("L3", 9.0)):
        net.add_link(key, cap)
    net.add_flow("A", ["L1", "L2"], 1e6, 0.0)
    net.add_flow("B", ["L1"], 1e6, 0.0)
    net.add_flow("C", ["L2", "L3"], 1e6, 0.0)
    net.add_flow("D", ["L3"], 1e6, 0.0)
    net.recompute()
    rates = {k: f.rate for k, f in net.flows.items()}
    assert rates == {"A": pytest.approx(3.0), "B": pytest.approx(7.0), "C": pytest.approx(3.0),
                     "D": pytest.approx(6.0)}
    assert net.link_rate("L1") == pytest.approx(10.0)
    assert net.link_rate("L2") == pytest.approx(6.0)
    assert net.link_rate("L3") == pytest.approx(9.0)


def test_rates_are_recomputed_when_a_flow_leaves():
    # One link of 1 B/s, flows of 1 and 3 bytes: both at 0.5 B/s; the small one ends at t=2 having sent 1;
    # the big one has 3-1=2 left and now runs at 1 B/s -> ends at t=4.
    net = FlowNetwork()
    net.add_link("L", 1.0)
    net.add_flow("small", ["L"], 1.0, 0.0)
    net.add_flow("big", ["L"], 3.0, 0.0)
    assert run_to_end(net) == {"small": pytest.approx(2.0), "big": pytest.approx(4.0)}


def test_late_arrival_shares_from_its_start():
    # 10 B/s link; f1 (100 B) alone for 5 s sends 50; f2 (20 B) joins at t=5: both at 5 B/s, f2 ends at t=9
    # (f1 has 50-20=30 left), then f1 alone at 10 B/s ends at t=12.
    net = FlowNetwork()
    net.add_link("L", 10.0)
    net.add_flow("f1", ["L"], 100.0, 0.0)
    net.advance(5.0)
    net.add_flow("f2", ["L"], 20.0, 5.0)
    assert run_to_end(net) == {"f2": pytest.approx(9.0), "f1": pytest.approx(12.0)}


def test_rate_cap_and_linkless_flows():
    net = FlowNetwork()
    net.add_link("L", 10.0)
    net.add_flow("capped", ["L"], 8.0, 0.0, cap=2.0)
    net.add_flow("free", ["L"], 8.0, 0.0)
    net.add_flow("local", [], 8.0, 0.0, cap=4.0)
    net.recompute()
    assert net.flows["capped"].rate == pytest.approx(2.0)
    assert net.flows["free"].rate == pytest.approx(8.0)  # takes what the capped flow leaves
    assert net.flows["local"].rate == pytest.approx(4.0)


def test_bad_use_is_refused_with_a_clear_error():
    net = FlowNetwork()
    with pytest.raises(NetworkError, match="capacity"):
        net.add_link("L", 0.0)
    net.add_link("L", 1.0)
    with pytest.raises(NetworkError, match="unknown link 'M'"):
        net.add_flow("f", ["M"], 1.0, 0.0)
    with pytest.raises(NetworkError, match="no links and no rate cap"):
        net.add_flow("f", [], 1.0, 0.0)
    net.add_flow("f", ["L"], 1.0, 0.0)
    with pytest.raises(NetworkError, match="already active"):
        net.add_flow("f", ["L"], 1.0, 0.0)
    net.advance(0.5)
    with pytest.raises(NetworkError, match="backwards"):
        net.advance(0.1)


def test_many_flows_finish_even_at_large_clock_values():
    # Float resolution: a tiny remainder at t ~ 1e6 must not stall the clock.
    net = FlowNetwork()
    net.add_link("L", 1e10)
    net.advance(1e6)
    for i in range(20):
        net.add_flow(i, ["L"], 3e8 + i * 7.77, 1e6)
    done = run_to_end(net)
    assert len(done) == 20
    assert max(done.values()) == pytest.approx(1e6 + sum(3e8 + i * 7.77 for i in range(20)) / 1e10)


@settings(max_examples=150, deadline=None)
@given(
    caps=st.lists(st.floats(min_value=1.0, max_value=100.0), min_size=1, max_size=6),
    flows=st.lists(st.tuples(st.sets(st.integers(min_value=0, max_value=5), min_size=1, max_size=4),
                             st.one_of(st.just(math.inf), st.floats(min_value=0.5, max_value=50.0))),
                   min_size=1, max_size=12),
)
def test_water_filling_is_feasible_and_max_min_fair(caps, flows):
    """Any network: no link over capacity, and every flow is either at its cap or has a bottleneck — a
    saturated link on which no other flow gets more (the definition of max-min fairness)."""
    net = FlowNetwork()
    for i, c in enumerate(caps):
        net.add_link(i, c)
    for j, (links, cap) in enumerate(flows):
        path = sorted(x for x in links if x < len(caps)) or [0]
        net.add_flow(j, path, 1e9, 0.0, cap=cap)
    net.recompute()
    for i, c in enumerate(caps):
        assert net.link_rate(i) <= c * (1 + 1e-9)
    for f in net.flows.values():
        assert f.rate > 0
        if f.rate >= f.cap * (1 - 1e-9):
            continue
        assert any(
            net.link_rate(k) >= net.links[k].capacity * (1 - 1e-9)
            and all(net.flows[o].rate <= f.rate * (1 + 1e-9) for o in net.links[k].flows)
            for k in f.links
        ), f"flow {f.flow_id} at {f.rate} has no bottleneck"
