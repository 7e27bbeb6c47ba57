"""Simulated workloads: request profiles (the seed's four), Poisson or bursty session arrivals, multi-turn
sessions with think time, and a JSONL trace format for replaying real traffic.

Owned by `kvlane.policy.sim`; used by the simulator and the `kvlane simulate` command. Pure: random numbers
come from a seeded `random.Random`, time is simulated seconds; it never reads a clock.

Trace format (one JSON object per line, blank lines and lines starting with `#` ignored):

| field | type | required | meaning |
|---|---|---|---|
| `t` | float ≥ 0 | yes | arrival time in seconds from the start of the trace |
| `prompt_tokens` | int ≥ 1 | yes | full prompt length, earlier turns' context included |
| `output_tokens` | int ≥ 1 | yes | tokens the request generates |
| `session` | string | no | session id; requests sharing it are turns of one conversation, in `t` order |
| `cached_tokens` | int ≥ 0 | no | prompt tokens the prefill engine's prefix cache already holds (not recomputed) |
| `id` | string | no | request id (default `r<line number>`) |

A later turn of a session never starts before the previous turn has finished decoding: its arrival is
`max(t, previous completion)`. Its new tokens are `prompt_tokens − (previous prompt + previous output)`
(at least 1); those are what a sticky decode engine still lacks.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class WorkloadError(ValueError):
    """A bad profile name, parameter or trace line (the message names it)."""


@dataclass(frozen=True)
class Profile:
    """Token-length distributions of one kind of traffic (means; lengths are drawn log-normally)."""

    name: str
    prompt_tokens: int
    output_tokens: int
    #: Fraction of a first turn's prompt found in the prefill engine's prefix cache (seed §4: H).
    cache_hit: float = 0.0
    #: Mean turns per session (geometric), 1 = one-shot requests.
    mean_turns: float = 4.0
    #: Mean think time between a turn's completion and the next turn (exponential), seconds.
    think_s: float = 5.0
    #: Mean new tokens a later turn appends (tool output, the user's next message).
    turn_new_tokens: int = 2000
    #: Log-normal shape of the length distributions (0 = every request has the mean length).
    sigma: float = 0.5
    #: Longest prompt (the context window); longer draws are clipped.
    max_context: int = 200_000


#: The seed's profiles (zcube-railfly-rail-fabric §4). Output means are per turn.
PROFILES: dict[str, Profile] = {
    "deep-thinking": Profile("deep-thinking", 16_000, 8_000, mean_turns=2.0, think_s=20.0, turn_new_tokens=1_000),
    "coding-agent": Profile("coding-agent", 24_000, 6_000, mean_turns=4.0, think_s=5.0, turn_new_tokens=2_000),
    "repo-heavy": Profile("repo-heavy", 32_000, 4_000, mean_turns=2.0, think_s=10.0, turn_new_tokens=4_000),
    "cached-32k": Profile("cached-32k", 32_000, 6_000, cache_hit=0.4, mean_turns=3.0, think_s=5.0,
                          turn_new_tokens=2_000),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise WorkloadError(f"unknown workload {name!r}; choose one of {', '.join(PROFILES)}") from None


@dataclass(frozen=True)
class Turn:
    """One request. `arrival` is absolute for a session's first turn (and for trace turns, as an earliest
    start); later synthetic turns arrive `think_s` after the previous turn completes."""

    request_id: str
    session_id: str | None
    index: int
    arrival: float | None
    think_s: float
    #: Tokens of the session already produced before this turn (earlier prompts and outputs).
    context_tokens: int
    new_tokens: int
    output_tokens: int
    #: Prompt tokens the prefill engine does not recompute (prefix cache).
    cached_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.new_tokens

    @property
    def compute_tokens(self) -> int:
        """Tokens the prefill engine computes. Earlier turns' context is assumed to be in its prefix cache
        (identical for every policy), so only new tokens, minus cached ones, cost compute."""
        return max(1, self.new_tokens - self.cached_tokens)


@dataclass(frozen=True)
class Session:
    session_id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]

    @property
    def requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def turns(self) -> Iterable[Turn]:
        for s in self.sessions:
            yield from s.turns


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    if sigma <= 0:
        return mean
    mu = math.log(mean) - sigma * sigma / 2
    return rng.lognormvariate(mu, sigma)


def _geometric(rng: random.Random, mean: float) -> int:
    if mean <= 1.0:
        return 1
    p = 1.0 / mean
    n = 1
    while rng.random() > p:
        n += 1
    return n


def mean_work(profile: Profile) -> tuple[float, float, float]:
    """Expected (turns, compute tokens, output tokens) per session, used to turn a load into a rate."""
    turns = max(1.0, profile.mean_turns)
    first = profile.prompt_tokens * (1 - profile.cache_hit)
    later = (turns - 1) * profile.turn_new_tokens
    return turns, first + later, turns * profile.output_tokens


ArrivalKind = Literal["poisson", "bursty"]


def generate(
    profile: Profile,
    *,
    requests: int,
    session_rate: float,
    seed: int = 0,
    arrivals: ArrivalKind = "poisson",
    burst_size: float = 8.0,
    multi_turn: bool = True,
) -> Workload:
    """Sessions arriving at `session_rate` per second until about `requests` turns exist.

    `poisson`: independent arrivals. `bursty`: clumps of a geometric number of sessions (mean `burst_size`)
    arrive at the same instant, clumps at rate `session_rate / burst_size` (same mean rate, synchronized
    prefills — the incast case).
    """
    if requests < 1:
        raise WorkloadError(f"requests must be >= 1, got {requests}")
    if not session_rate > 0 or not math.isfinite(session_rate):
        raise WorkloadError(f"session_rate must be > 0, got {session_rate}")
    if arrivals not in ("poisson", "bursty"):
        raise WorkloadError(f"arrivals must be 'poisson' or 'bursty', got {arrivals!r}")
    if arrivals == "bursty" and burst_size < 1:
        raise WorkloadError(f"burst_size must be >= 1, got {burst_size}")
    rng = random.Random(seed)
    sessions: list[Session] = []
    t = 0.0
    made = 0
    clump_left = 0
    while made < requests:
        if arrivals == "poisson":
            t += rng.expovariate(session_rate)
        elif clump_left == 0:
            t += rng.expovariate(session_rate / burst_size)
            clump_left = _geometric(rng, burst_size)
        if arrivals == "bursty":
            clump_left -= 1
        sid = f"s{len(sessions)}"
        n_turns = min(_geometric(rng, profile.mean_turns) if multi_turn else 1, requests - made)
        turns = []
        context = 0
        for i in range(n_turns):
            if i == 0:
                new = int(_lognormal(rng, profile.prompt_tokens, profile.sigma))
            else:
                new = int(_lognormal(rng, profile.turn_new_tokens, profile.sigma))
            new = max(1, min(new, profile.max_context - context - 1))
            if new < 1 or context + new >= profile.max_context:
                break
            out = max(1, int(_lognormal(rng, profile.output_tokens, profile.sigma)))
            cached = int(new * profile.cache_hit) if i == 0 else 0
            turns.append(Turn(
                request_id=f"{sid}.t{i}", session_id=sid if n_turns > 1 else None, index=i,
                arrival=t if i == 0 else None,
                think_s=0.0 if i == 0 else rng.expovariate(1.0 / profile.think_s) if profile.think_s > 0 else 0.0,
                context_tokens=context, new_tokens=new, output_tokens=out, cached_tokens=cached))
            context += new + out
        sessions.append(Session(sid, tuple(turns)))
        made += len(turns)
    return Workload(profile.name, tuple(sessions))


def synchronized(
    n: int, *, prompt_tokens: int, output_tokens: int, at: float = 0.0, name: str = "synchronized",
    waves: int = 1, interval_s: float = 10.0,
) -> Workload:
    """`waves` waves of `n` identical one-shot requests; a wave's requests arrive at the same instant (so their
    prefills complete together: the incast case), waves `interval_s` apart starting at `at`."""
    if n < 1 or waves < 1:
        raise WorkloadError(f"n and waves must be >= 1, got n={n}, waves={waves}")
    if interval_s < 0:
        raise WorkloadError(f"interval_s must be >= 0, got {interval_s}")
    sessions = []
    for w in range(waves):
        t = at + w * interval_s
        for i in range(n):
            rid = f"x{i}" if waves == 1 else f"w{w}.x{i}"
            sessions.append(Session(rid, (Turn(rid, None, 0, t, 0.0, 0, prompt_tokens, output_tokens),)))
    return Workload(name, tuple(sessions))


# ---- traces ------------------------------------------------------------------------------------------------


class TraceRecord(BaseModel):
    """One line of a JSONL trace (see the module docstring for the table of fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    t: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    prompt_tokens: Annotated[int, Field(ge=1, le=10_000_000)]
    output_tokens: Annotated[int, Field(ge=1, le=10_000_000)]
    session: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    cached_tokens: Annotated[int, Field(ge=0)] = 0
    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/@\-]+$")] | None = None


def parse_trace(lines: Iterable[str], name: str = "trace") -> Workload:
    """Turn JSONL trace lines into a workload; errors name the line number and the field."""
    records: list[tuple[int, TraceRecord]] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        try:
            rec = TraceRecord.model_validate(obj)
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
            raise WorkloadError(f"{name}:{lineno}: {msgs}") from None
        if rec.cached_tokens > rec.prompt_tokens:
            raise WorkloadError(f"{name}:{lineno}: cached_tokens {rec.cached_tokens} > prompt_tokens "
                                f"{rec.prompt_tokens}")
        records.append((lineno, rec))
    if not records:
        raise WorkloadError(f"{name}: the trace holds no requests")
    by_session: dict[str, list[tuple[int, TraceRecord]]] = {}
    sessions: list[tuple[float, Session]] = []
    seen_ids: set[str] = set()
    for lineno, rec in records:
        rid = rec.id or f"r{lineno}"
        if rid in seen_ids:
            raise WorkloadError(f"{name}:{lineno}: duplicate request id {rid!r}")
        seen_ids.add(rid)
        if rec.session is None:
            turn = Turn(rid, None, 0, rec.t, 0.0, 0, rec.prompt_tokens, rec.output_tokens, rec.cached_tokens)
            sessions.append((rec.t, Session(rid, (turn,))))
        else:
            by_session.setdefault(rec.session, []).append((lineno, rec))
    for sid, recs in by_session.items():
        recs.sort(key=lambda x: (x[1].t, x[0]))
        turns = []
        context = 0
        for i, (lineno, rec) in enumerate(recs):
            rid = rec.id or f"r{lineno}"
            new = rec.prompt_tokens - context if i else rec.prompt_tokens
            ctx = context if i and new >= 1 else 0
            new = rec.prompt_tokens - ctx
            turns.append(Turn(rid, sid, i, rec.t, 0.0, ctx, new, rec.output_tokens, min(rec.cached_tokens, new)))
            context = rec.prompt_tokens + rec.output_tokens
        sessions.append((recs[0][1].t, Session(sid, tuple(turns))))
    sessions.sort(key=lambda x: x[0])
    return Workload(name, tuple(s for _, s in sessions))


def load_trace(path: str | Path) -> Workload:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {p}: {exc.strerror}") from None
    return parse_trace(text.splitlines(), name=p.name)


def dump_trace(workload: Workload) -> list[str]:
    """The JSONL lines of a workload (synthetic follow-up turns get `t` = their session's start: replay waits
    for the previous turn anyway)."""
    lines = []
    for s in workload.sessions:
        start = s.turns[0].arrival or 0.0
        for turn in s.turns:
            rec = {"id": turn.request_id, "t": round(turn.arrival if turn.arrival is not None else start, 6),
                   "prompt_tokens": turn.prompt_tokens, "output_tokens": turn.output_tokens}
            if turn.session_id is not None:
                rec["session"] = turn.session_id
            if turn.cached_tokens:
                rec["cached_tokens"] = turn.cached_tokens
            lines.append(json.dumps(rec))
    return lines
