"""Fault injection for chaos tests: a seeded, declarative `FaultPlan` and its deterministic decision function
`plan.should(fault, key)`. Pure: built from config (the policy service reads $KVLANE_FAULTS), consulted by the
policy service (drop/delay replies, expire leases early) and by connectors (fail a transfer). Never reads a
clock, a socket or a random generator: the same plan and key always give the same answer. Off by default.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]

#: The faults a plan can inject. Control-message faults apply per policy-service op.
Fault = Literal["drop_request", "drop_reply", "delay_reply", "fail_transfer", "expire_lease"]
FAULTS: tuple[Fault, ...] = ("drop_request", "drop_reply", "delay_reply", "fail_transfer", "expire_lease")
#: Faults that concern one control message (one request to the policy service).
MESSAGE_FAULTS: tuple[Fault, ...] = ("drop_request", "drop_reply", "delay_reply")


class _Knobs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MessageFault(_Knobs):
    """Hit a control message with `probability`, for the ops listed (empty: every op)."""

    probability: Probability = 0.0
    ops: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=64)

    def applies_to(self, op: str) -> bool:
        return not self.ops or op in self.ops


class DelayFault(MessageFault):
    #: How long the reply is held back, seconds.
    delay_s: Annotated[float, Field(ge=0.0, le=600.0, allow_inf_nan=False)] = 0.5


class TransferFault(_Knobs):
    """Fail a KV transfer (key: its transfer id) with `probability`: the connector/transport that consults the
    plan reports the transfer failed instead of completing it (docs/reliability.md)."""

    probability: Probability = 0.0


class LeaseFault(_Knobs):
    """Expire a granted lease (key: its lease id) `after_s` seconds after its grant, whatever its promised
    `expires_at` (a holder that is slow, a clock that jumps): the holder's release then answers False."""

    probability: Probability = 0.0
    after_s: Annotated[float, Field(ge=0.0, le=3600.0, allow_inf_nan=False)] = 0.0


class FaultPlan(_Knobs):
    """Which faults to inject, how often, with which seed. The default plan injects nothing.

    Example (JSON or YAML, e.g. `KVLANE_FAULTS='{"seed": 7, "drop_reply": {"probability": 0.05,
    "ops": ["acquire_lease"]}}'`)."""

    seed: Annotated[int, Field(ge=0, lt=1 << 63)] = 0
    drop_request: MessageFault = MessageFault()
    drop_reply: MessageFault = MessageFault()
    delay_reply: DelayFault = DelayFault()
    fail_transfer: TransferFault = TransferFault()
    expire_lease: LeaseFault = LeaseFault()

    @property
    def enabled(self) -> bool:
        return any(self.probability(f) > 0.0 for f in FAULTS)

    def probability(self, fault: Fault) -> float:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        rule: Any = getattr(self, fault)
        return float(rule.probability)

    def should(self, fault: Fault, key: str) -> bool:
        """Inject `fault` for the thing named `key`? Deterministic: a hash of (seed, fault, key) mapped onto
        [0, 1) compared with the fault's probability, so a run is reproduced by its seed and its keys."""
        p = self.probability(fault)
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        return unit_hash(self.seed, fault, key) < p

    def message_fault(self, op: str, key: str) -> tuple[Fault, float] | None:
        """The fault (if any) to apply to one control message of `op` named `key`: (fault, delay seconds).
        Dropping the request wins over dropping the reply, which wins over delaying it."""
        for fault in MESSAGE_FAULTS:
            rule: MessageFault = getattr(self, fault)
            if rule.probability > 0.0 and rule.applies_to(op) and self.should(fault, key):
                return fault, (self.delay_reply.delay_s if fault == "delay_reply" else 0.0)
        return None


def unit_hash(seed: int, fault: str, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, fault, key): the first 8 bytes of a SHA-256."""
    digest = hashlib.sha256(f"{seed}\x00{fault}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


class FaultPlanError(ValueError):
    """A fault plan that does not parse or does not match the schema (names the field)."""


def parse_plan(text: str) -> FaultPlan:
    """A FaultPlan from JSON text (YAML is accepted when PyYAML is installed and the text is not JSON)."""
    raw: Any
    try:
        raw = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError:
            raise FaultPlanError("fault plan is not valid JSON (and PyYAML is not installed)") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FaultPlanError(f"fault plan is neither JSON nor YAML: {exc}") from None
    if raw is None:
        return FaultPlan()
    if not isinstance(raw, dict):
        raise FaultPlanError(f"fault plan must be a map, got {type(raw).__name__}")
    try:
        return FaultPlan.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise FaultPlanError("fault plan: " + "; ".join(parts)) from None
