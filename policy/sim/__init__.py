"""kvlane.policy.sim — flow-level, event-driven simulator of the policy on a fabric.

Owned by `kvlane.policy`; run by `kvlane simulate`, tests and `benchmarks/sim_*.py`, in one process. It
replaces only time and the network (max-min fair flows over the topology's links): the policy object it
drives makes every decision. Pure: simulated seconds, seeded randomness, no sockets, no clock reads.
"""

from __future__ import annotations

from typing import Any

from .baselines import BASELINES, POLICIES, make_policy, no_credit_config
from .metrics import SimResult, markdown_table, percentile, plot, render_table
from .network import Flow, FlowNetwork, NetworkError
from .simulator import CostModel, SimConfig, SimError, Simulator, plan_engines
from .workload import (
    PROFILES,
    Profile,
    Turn,
    Workload,
    WorkloadError,
    generate,
    get_profile,
    load_trace,
    mean_work,
    parse_trace,
    synchronized,
)

__all__ = [
    "BASELINES", "POLICIES", "PROFILES", "CostModel", "Flow", "FlowNetwork", "NetworkError", "Profile",
    "SimConfig", "SimError", "SimResult", "Simulator", "Turn", "Workload", "WorkloadError", "capacity",
    "generate", "get_profile", "load_trace", "make_policy", "markdown_table", "mean_work", "no_credit_config",
    "parse_trace", "percentile", "plot", "render_table", "session_rate_for_load", "simulate", "synchronized",
]


def _engine_counts(topology: Any, config: SimConfig) -> tuple[int, int]:
    roles = [role for _, role, _ in plan_engines(topology, config)]
    n_p = sum(1 for r in roles if r.can_prefill())
    return n_p, len(roles) - n_p


def capacity(profile: Profile, n_prefill: int, n_decode: int, cost: CostModel) -> dict[str, float]:
    """Session arrival rates (per second) the pools can absorb. `load` is defined on the prefill pool:
    load 1.0 = sessions arrive as fast as the prefill pool computes their first turns (the heavy ones; later
    turns are deltas). The decode pool's steady-state rate is reported alongside (memory or batch bound)."""
    turns, _, output = mean_work(profile)
    first = profile.prompt_tokens * (1 - profile.cache_hit)
    p_rate = n_prefill / (cost.prefill_overhead_s + first / cost.prefill_tokens_per_s)
    per_req_bytes = (profile.prompt_tokens + (turns - 1) / 2 * (profile.turn_new_tokens + profile.output_tokens)
                     + profile.output_tokens) * cost.kv_bytes_per_token
    conc = min(cost.decode_max_batch, cost.decode_kv_bytes / per_req_bytes)
    d_rate = n_decode * conc / (output / cost.decode_tokens_per_s)
    return {"prefill_sessions_per_s": p_rate, "decode_sessions_per_s": d_rate}


def session_rate_for_load(profile: Profile, load: float, topology: Any, config: SimConfig) -> float:
    """Sessions per second for `load` × the prefill pool's first-turn capacity (see `capacity`)."""
    if not 0.0 < load <= 2.0:
        raise SimError(f"load must be in (0, 2], got {load}")
    n_p, n_d = _engine_counts(topology, config)
    return load * capacity(profile, n_p, n_d, config.cost)["prefill_sessions_per_s"]


def simulate(
    topology: Any,
    policy: str = "kvlane",
    *,
    workload: str | Workload = "coding-agent",
    load: float = 0.7,
    requests: int = 300,
    seed: int = 0,
    arrivals: str = "poisson",
    burst_size: float = 8.0,
    credits: bool | None = None,
    config: SimConfig | None = None,
    policy_config: Any = None,
    multi_turn: bool = True,
    ecmp: str = "per-hop",
) -> SimResult:
    """One run: `topology` (a Topology or a spec string for `load_topology`), a policy by name, a workload
    (profile name, or a prepared `Workload` such as a trace) at `load` × the cluster's capacity. `ecmp`: how
    baselines route ("listed" or "per-hop", see `baselines.ECMP_MODES`)."""
    if isinstance(topology, str):
        from ..topology import load_topology

        topology = load_topology(topology)
    config = config or SimConfig()
    if isinstance(workload, str):
        prof = get_profile(workload)
        rate = session_rate_for_load(prof, load, topology, config)
        wl = generate(prof, requests=requests, session_rate=rate, seed=seed, arrivals=arrivals,  # type: ignore[arg-type]
                      burst_size=burst_size, multi_turn=multi_turn)
    else:
        wl = workload
    pol = make_policy(policy, topology, seed=seed, credits=credits, config=policy_config, ecmp=ecmp)
    name = policy if credits is None else f"{policy}{'+credits' if credits else '-credits'}"
    return Simulator(topology, pol, config, policy_name=name).run(wl)
