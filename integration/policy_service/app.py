"""Assembling a running policy service from operator inputs: topology spec, config file, lease ttl, secret,
ports. Used by `kvlane policy serve` (and launchers) in the policy-service process; builds the pure Policy
with a per-start lease-id prefix so ids never repeat across restarts. Never touches engines itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any, Literal

from kvlane.policy.faults import FaultPlan, parse_plan

from . import protocol as P
from .server import PolicyServer
from .service import PolicyService

log = logging.getLogger("kvlane.policy_service")

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def start_prefix(now: float | None = None) -> str:
    """A lease-id prefix unique to this start: 'L' + base36 of the start time in ms + 4 random base36 chars."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"L{_base36(ms)}{_base36(int.from_bytes(os.urandom(4), 'big') % 36**4).rjust(4, '0')}"


def load_fault_plan(env: dict[str, str] | None = None) -> FaultPlan | None:
    """The fault plan of $KVLANE_FAULTS: inline JSON (starts with `{`) or the path of a JSON/YAML file; None
    when unset or when the plan injects nothing. A bad plan raises FaultPlanError naming the field."""
    value = (env if env is not None else os.environ).get("KVLANE_FAULTS", "").strip()
    if not value:
        return None
    if not value.startswith("{"):
        with open(value, encoding="utf-8") as fh:
            value = fh.read()
    plan = parse_plan(value)
    return plan if plan.enabled else None


def build_policy(
    topology: str,
    *,
    config_file: str | None = None,
    lease_ttl_s: float | None = None,
) -> Any:
    """The pure Policy for `topology` (a generator spec such as "zcube:n=8,k=2" or a YAML path), with knobs
    from `config_file` (YAML of PolicyConfig), `lease_ttl_s` overriding credits.lease_ttl_s."""
    import yaml
    from kvlane.policy.config import PolicyConfig
    from kvlane.policy.core import Policy
    from kvlane.policy.topology import load_topology

    config = PolicyConfig()
    if config_file:
        with open(config_file, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        config = PolicyConfig.model_validate(raw)
    if lease_ttl_s is not None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease ttl must be > 0 s, got {lease_ttl_s}")
        config = config.model_copy(update={"credits": config.credits.model_copy(update={"lease_ttl_s": lease_ttl_s})})
    config = config.model_copy(update={"lease_id_prefix": start_prefix()})
    return Policy(load_topology(topology), config)


async def serve(
    policy: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 7070,
    secret: bytes | None = None,
    metrics_port: int | None = None,
    announce_ttl: float = 120.0,
    sweep_interval: float = 1.0,
    max_frame: int = P.DEFAULT_MAX_FRAME,
    ready: asyncio.Event | None = None,
    faults: FaultPlan | None | Literal["env"] = "env",
) -> None:
    """Run until SIGINT/SIGTERM (or cancellation). Logs `policy service listening on tcp://...` when ready.
    `faults="env"` takes the fault plan from $KVLANE_FAULTS (chaos testing; unset = no faults)."""
    plan = load_fault_plan() if faults == "env" else faults
    if plan is not None and plan.enabled:
        log.warning("!!! FAULT INJECTION ON (chaos testing only): %s", plan.model_dump_json(exclude_defaults=True))
    service = PolicyService(policy, announce_ttl=announce_ttl, sweep_interval=sweep_interval, faults=plan)
    server = PolicyServer(service, host, port, secret=secret, metrics_port=metrics_port, max_frame=max_frame)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    extra = f", metrics on {server.metrics_address}" if server.metrics_address else ""
    auth = "HMAC auth on" if secret is not None else "no auth"
    log.info("policy service listening on %s (%s%s)", server.address, auth, extra)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("policy service stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await server.close()
