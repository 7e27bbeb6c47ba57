"""kvlane.policy: the pure decision core (topology and paths, credit leases, pair scoring, sessions,
feedback, planner, simulator). Runs inside the policy service or the simulator; never opens a socket,
never reads a clock (time is an argument), never imports vLLM or torch."""

from .config import PolicyConfig
from .core import Policy
from .topology import load_topology

__all__ = ["Policy", "PolicyConfig", "load_topology"]
