"""Workloads: profiles, arrivals, multi-turn sessions and the JSONL trace format."""

import json

import pytest
from kvlane.policy.sim import (
    PROFILES,
    SimConfig,
    WorkloadError,
    generate,
    get_profile,
    parse_trace,
    percentile,
    session_rate_for_load,
    synchronized,
)
from kvlane.policy.sim.workload import dump_trace
from kvlane.policy.topology import load_topology


def test_seed_profiles_are_there_with_the_seed_lengths():
    assert {n: (p.prompt_tokens, p.output_tokens) for n, p in PROFILES.items()} == {
        "deep-thinking": (16_000, 8_000), "coding-agent": (24_000, 6_000), "repo-heavy": (32_000, 4_000),
        "cached-32k": (32_000, 6_000)}
    assert PROFILES["cached-32k"].cache_hit == 0.4
    with pytest.raises(WorkloadError, match="unknown workload 'chat'.*coding-agent"):
        get_profile("chat")


def test_generation_is_seeded_and_sessions_grow_their_context():
    prof = get_profile("coding-agent")
    a = generate(prof, requests=200, session_rate=2.0, seed=7)
    b = generate(prof, requests=200, session_rate=2.0, seed=7)
    assert a == b
    assert a.requests == 200
    for s in a.sessions:
        ctx = 0
        for t in s.turns:
            assert t.context_tokens == ctx
            assert (t.arrival is not None) == (t.index == 0)
            ctx += t.new_tokens + t.output_tokens
    firsts = [s.turns[0].arrival for s in a.sessions]
    assert firsts == sorted(firsts)
    # mean of the first-turn prompts is near the profile's 24K (log-normal, 50+ samples)
    mean = sum(s.turns[0].new_tokens for s in a.sessions) / len(a.sessions)
    assert 18_000 < mean < 30_000


def test_bursty_arrivals_come_in_clumps_at_the_same_instant():
    prof = get_profile("repo-heavy")
    wl = generate(prof, requests=300, session_rate=4.0, seed=1, arrivals="bursty", burst_size=6, multi_turn=False)
    starts = [s.turns[0].arrival for s in wl.sessions]
    distinct = len(set(starts))
    assert distinct < len(starts) / 3  # mean clump of 6 sessions
    poisson = generate(prof, requests=300, session_rate=4.0, seed=1, multi_turn=False)
    assert len({s.turns[0].arrival for s in poisson.sessions}) == 300


def test_bad_generation_parameters_are_named():
    prof = get_profile("coding-agent")
    with pytest.raises(WorkloadError, match="requests"):
        generate(prof, requests=0, session_rate=1.0)
    with pytest.raises(WorkloadError, match="session_rate"):
        generate(prof, requests=5, session_rate=0.0)
    with pytest.raises(WorkloadError, match="arrivals"):
        generate(prof, requests=5, session_rate=1.0, arrivals="uniform")  # type: ignore[arg-type]


def test_trace_sessions_become_turns_with_deltas():
    lines = [
        '# a comment',
        json.dumps({"t": 0.0, "session": "a", "prompt_tokens": 1000, "output_tokens": 100}),
        json.dumps({"t": 0.5, "prompt_tokens": 300, "output_tokens": 10, "id": "solo"}),
        json.dumps({"t": 2.0, "session": "a", "prompt_tokens": 1600, "output_tokens": 50, "cached_tokens": 200}),
        "",
    ]
    wl = parse_trace(lines)
    assert [s.session_id for s in wl.sessions] == ["a", "solo"]
    t0, t1 = wl.sessions[0].turns
    assert (t0.context_tokens, t0.new_tokens) == (0, 1000)
    assert (t1.context_tokens, t1.new_tokens, t1.cached_tokens) == (1100, 500, 200)
    assert t1.arrival == 2.0 and t1.request_id == "r4"
    assert wl.sessions[1].turns[0].request_id == "solo"
    # round trip through dump_trace keeps the lengths
    again = parse_trace(dump_trace(wl))
    assert [t.prompt_tokens for t in again.turns()] == [t.prompt_tokens for t in wl.turns()]


@pytest.mark.parametrize("line,msg", [
    ('{"t": 1, "prompt_tokens": 10}', r"trace:1: output_tokens: Field required"),
    ('{"t": -1, "prompt_tokens": 10, "output_tokens": 1}', r"trace:1: t: Input should be greater"),
    ('{"t": 1, "prompt_tokens": 10, "output_tokens": 1, "colour": "red"}', r"trace:1: colour: Extra"),
    ('[1, 2]', r"trace:1: expected a JSON object"),
    ('{"t": 1,', r"trace:1: not valid JSON"),
    ('{"t": 1, "prompt_tokens": 10, "output_tokens": 1, "cached_tokens": 11}', r"cached_tokens 11 > prompt"),
])
def test_bad_trace_lines_name_line_and_field(line, msg):
    with pytest.raises(WorkloadError, match=msg):
        parse_trace([line])


def test_empty_trace_and_duplicate_ids_are_refused():
    with pytest.raises(WorkloadError, match="no requests"):
        parse_trace(["", "# nothing"])
    rec = '{"t": 0, "prompt_tokens": 5, "output_tokens": 1, "id": "x"}'
    with pytest.raises(WorkloadError, match="trace:2: duplicate request id 'x'"):
        parse_trace([rec, rec])


def test_synchronized_requests_arrive_together():
    wl = synchronized(3, prompt_tokens=100, output_tokens=5, at=2.0)
    assert [t.arrival for t in wl.turns()] == [2.0, 2.0, 2.0]
    assert all(t.session_id is None for t in wl.turns())


def test_load_scales_the_session_rate_linearly():
    topo = load_topology("fattree:k=4,oversub=1,gpus_per_node=2")
    prof = get_profile("coding-agent")
    r5 = session_rate_for_load(prof, 0.5, topo, SimConfig())
    r9 = session_rate_for_load(prof, 0.9, topo, SimConfig())
    assert r9 / r5 == pytest.approx(0.9 / 0.5)
    # 5 prefill engines, each computing a 24K first turn in 0.02 + 24,000/20,000 s: 5/1.22 sessions/s at load 1
    assert session_rate_for_load(prof, 1.0, topo, SimConfig()) == pytest.approx(5 / 1.22)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([], 50) != percentile([], 50)  # NaN
