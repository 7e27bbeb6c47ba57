"""`Policy`: the one object the policy service wraps — engines, pair selection, leases, feedback, snapshot.

Owned by `kvlane.policy`; run by the policy service (integration/policy_service), the simulator and tests.
It composes the credit ledger, the pair scorer, the session table and the path feedback over a topology.
Pure and single-threaded: time is a `now` argument, no sockets, no clock reads, no vLLM/torch imports.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import PolicyConfig
from .credits import CreditLedger, Denial, Klass
from .feedback import PathFeedback
from .scoring import EngineState, PairScorer, PathInfo, Terms
from .sessions import SessionTable
from .topology import Topology
from .types import (
    EngineInfo,
    InvalidRequest,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    LoadReport,
    NoPairAvailable,
    PairDecision,
    PairRequest,
    PathGrant,
    TransferOutcome,
    UnknownEngine,
)

#: Candidate tiers in the seed's §7 order; a tier's name is the decision's `locality`.
TIERS = ("same_tile", "adjacent_tile", "same_cell", "cross_cell")
# Topology locality values (kvlane.policy.topology.Locality is a str enum with these values).
_SAME_NODE, _SAME_TILE, _ADJACENT, _CROSS_CELL = "same-node", "same-tile", "adjacent-tile", "cross-cell"


@dataclass(eq=False)
class _Cell:
    idx: int
    rep: str  # a GPU of the first engine placed here: locality to it decides membership
    tiles: list[_Tile] = field(default_factory=list)
    prefill: dict[str, None] = field(default_factory=dict)  # ordered sets of engine ids
    decode: dict[str, None] = field(default_factory=dict)


@dataclass(eq=False)
class _Tile:
    idx: int
    rep: str
    cell: _Cell
    adjacent: list[_Tile] = field(default_factory=list)
    prefill: dict[str, None] = field(default_factory=dict)
    decode: dict[str, None] = field(default_factory=dict)


def rank_map(tp_prefill: int, tp_decode: int) -> list[tuple[int, int]]:
    """Streams of a transfer as (prefill rank, decode rank), indexed by stream = rank on the larger side.

    Same TP: rank i → rank i. D_TP = k·P_TP: D rank j receives from P rank j // k (P rank i's heads are split
    over D ranks i·k … i·k+k−1). P_TP = k·D_TP: P rank i sends to D rank i // k. Anything else is refused."""
    if tp_prefill == tp_decode:
        return [(i, i) for i in range(tp_prefill)]
    if tp_decode % tp_prefill == 0:
        k = tp_decode // tp_prefill
        return [(j // k, j) for j in range(tp_decode)]
    if tp_prefill % tp_decode == 0:
        k = tp_prefill // tp_decode
        return [(i, i // k) for i in range(tp_prefill)]
    raise InvalidRequest(f"TP sizes {tp_prefill} and {tp_decode}: neither is a multiple of the other")


class Policy:
    """Decides pairs, paths and credits. See docs/leases.md and docs/sessions-and-feedback.md."""

    def __init__(self, topology: Topology, config: PolicyConfig | None = None):
        self.topology = topology
        self.config = config or PolicyConfig()
        cfg = self.config
        self.ledger = CreditLedger(cfg.credits, lambda link: topology.link(link).gbps)
        self.feedback = PathFeedback(cfg.feedback)
        self.scorer = PairScorer(topology, self.ledger, self.feedback, cfg.weights)
        self.sessions = SessionTable(cfg.sessions)
        self._gpus = set(topology.gpus)
        self._engines: dict[str, EngineState] = {}
        self._gpu_owner: dict[str, str] = {}
        self._cells: list[_Cell] = []
        self._n_tiles = 0
        self._p_order: list[tuple[int, int, str]] = []  # (load, last pick, id) of prefill-capable engines
        self._p_key: dict[str, tuple[int, int, str]] = {}
        self._p_groups: dict[tuple[str, int], int] = {}  # (engine kind, TP size) -> prefill-capable engines
        self._wide_cache: dict[tuple[int, int, str], list[str]] = {}  # (cell, tier, role) -> engine ids
        # Switch index -> decode-capable engines with a NIC port of their first GPU on it ("leaf mates").
        self._leaf_decode: dict[int, dict[str, None]] = {}
        self._leaf_switches: dict[str, tuple[int, ...]] = {}  # engine id -> switches of its first GPU
        self._mate_cap: dict[str, float] = {}  # P id -> best bottleneck Gbps to any of its leaf mates (lazy)
        self._rot = 0
        self._picks = 0
        self._pending_since: float | None = None  # when the oldest unforgotten assignment was made
        self._lease_seq = 0
        self.counters: dict[str, int] = {
            "decisions": 0, "sticky": 0, "home_moves": 0, "no_pair": 0, "grants_reserved": 0,
            "grants_best_effort": 0, "denials": 0, "releases": 0, "renewals": 0, "expired": 0, "dropped": 0,
        }

    # ---- engines -------------------------------------------------------------------------------------------

    def register_engine(self, info: EngineInfo, now: float) -> None:
        """Add an engine (or replace its description; its load and leases stay)."""
        for g in info.gpus:
            if g not in self._gpus:
                raise InvalidRequest(f"engine {info.engine_id}: GPU {g!r} is not in the topology "
                                     f"({getattr(self.topology, 'name', 'topology')})")
            owner = self._gpu_owner.get(g)
            if owner is not None and owner != info.engine_id:
                raise InvalidRequest(f"engine {info.engine_id}: GPU {g!r} already belongs to engine {owner}")
        if len(set(info.gpus)) != len(info.gpus):
            raise InvalidRequest(f"engine {info.engine_id}: a GPU is listed twice in {info.gpus}")
        old = self._engines.get(info.engine_id)
        if old is not None:
            if old.info == info:
                return
            self._unplace(old)
        e = EngineState(info=info, engine_id=info.engine_id, tp=info.tp_size, gpu0=info.gpus[0],
                        can_prefill=info.role.can_prefill(), can_decode=info.role.can_decode())
        if old is not None:
            e.queue, e.running, e.memory, e.pending, e.reported_at = (
                old.queue, old.running, old.memory, old.pending, old.reported_at)
        self._engines[e.engine_id] = e
        for g in info.gpus:
            self._gpu_owner[g] = e.engine_id
        self._place(e)

    def remove_engine(self, engine_id: str, now: float) -> None:
        """The engine left or died: its leases end (as holder and as decode), its sessions lose their home
        (their next turn picks a new one and reports the move)."""
        e = self._require(engine_id)
        self._unplace(e)
        del self._engines[engine_id]
        dropped = self.ledger.drop_holder(engine_id, now) + self.ledger.drop_decode(engine_id, now)
        self.counters["dropped"] += len(dropped)
        self.sessions.orphan_home(engine_id)

    def report_load(self, report: LoadReport, now: float) -> None:
        e = self._require(report.engine_id)
        e.queue, e.running, e.memory = report.queue_depth, report.running, report.memory_pressure
        e.pending = 0
        e.reported_at = now
        self._reorder(e)

    def engine(self, engine_id: str) -> EngineInfo:
        return self._require(engine_id).info

    def engines(self) -> list[EngineInfo]:
        return [e.info for e in self._engines.values()]

    def engine_states(self) -> list[EngineState]:
        return list(self._engines.values())

    def _require(self, engine_id: str) -> EngineState:
        e = self._engines.get(engine_id)
        if e is None:
            raise UnknownEngine(f"unknown engine {engine_id!r}")
        return e

    # ---- tier index ----------------------------------------------------------------------------------------

    def _place(self, e: EngineState) -> None:
        loc = self.topology.locality
        g = e.gpu0
        cell = next((c for c in self._cells if loc(g, c.rep) != _CROSS_CELL), None)
        if cell is None:
            cell = _Cell(len(self._cells), g)
            self._cells.append(cell)
        tile = next((t for t in cell.tiles if loc(g, t.rep) in (_SAME_NODE, _SAME_TILE)), None)
        if tile is None:
            tile = _Tile(self._n_tiles, g, cell)
            self._n_tiles += 1
            for other in cell.tiles:
                if loc(g, other.rep) == _ADJACENT:
                    tile.adjacent.append(other)
                    other.adjacent.append(tile)
            cell.tiles.append(tile)
        e.tile, e.cell = tile, cell
        self._wide_cache.clear()
        self._mate_cap.clear()
        if e.can_prefill:
            tile.prefill[e.engine_id] = None
            cell.prefill[e.engine_id] = None
            key = (e.p_load, e.last_pick, e.engine_id)
            bisect.insort(self._p_order, key)
            self._p_key[e.engine_id] = key
            self._p_groups[e.group] = self._p_groups.get(e.group, 0) + 1
        switches = tuple(sorted({rec[2] for rec in self.topology.port_records(g)}))
        self._leaf_switches[e.engine_id] = switches
        if e.can_decode:
            tile.decode[e.engine_id] = None
            cell.decode[e.engine_id] = None
            for sw in switches:
                self._leaf_decode.setdefault(sw, {})[e.engine_id] = None

    def _unplace(self, e: EngineState) -> None:
        self._wide_cache.clear()
        self._mate_cap.clear()
        for group in (e.tile, e.cell):
            group.prefill.pop(e.engine_id, None)
            group.decode.pop(e.engine_id, None)
        for sw in self._leaf_switches.pop(e.engine_id, ()):
            mates = self._leaf_decode.get(sw)
            if mates is not None:
                mates.pop(e.engine_id, None)
                if not mates:
                    del self._leaf_decode[sw]
        key = self._p_key.pop(e.engine_id, None)
        if key is not None:
            del self._p_order[bisect.bisect_left(self._p_order, key)]
            self._p_groups[e.group] -= 1
            if not self._p_groups[e.group]:
                del self._p_groups[e.group]
        for g in e.info.gpus:
            if self._gpu_owner.get(g) == e.engine_id:
                del self._gpu_owner[g]

    def _reorder(self, e: EngineState) -> None:
        key = self._p_key.get(e.engine_id)
        if key is None:
            return
        new = (e.p_load, e.last_pick, e.engine_id)
        if new != key:
            del self._p_order[bisect.bisect_left(self._p_order, key)]
            bisect.insort(self._p_order, new)
            self._p_key[e.engine_id] = new

    def _tier_members(self, tile: _Tile, tier: int, role: str) -> Iterator[str]:
        """Engine ids with `role` ("prefill"/"decode") in tier `tier` around `tile`. The wide tiers (same cell,
        cross cell) start at a rotating offset, so a caller that stops after enough candidates samples them
        fairly instead of always favouring the first-registered engines."""
        if tier == 0:
            yield from getattr(tile, role)
            return
        if tier == 1:
            for t in tile.adjacent:
                yield from getattr(t, role)
            return
        key = (tile.cell.idx, tier, role)
        members = self._wide_cache.get(key)
        if members is None:
            if tier == 2:
                members = list(getattr(tile.cell, role))
            else:
                members = [i for c in self._cells if c is not tile.cell for i in getattr(c, role)]
            self._wide_cache[key] = members
        n = len(members)
        if not n:
            return
        self._rot += 1
        start = (self._rot * 97) % n
        engines = self._engines
        near = (tile, *tile.adjacent) if tier == 2 else ()
        for j in range(n):
            i = members[(start + j) % n]
            if tier == 2 and engines[i].tile in near:
                continue
            yield i

    # ---- admissibility -------------------------------------------------------------------------------------

    def _compatible(self, p: EngineState, d: EngineState) -> bool:
        """P's KV can go to D at all: the same engine kind, and the same TP size (or a multiple, when
        heterogeneous TP is on)."""
        a, b = p.tp, d.tp
        return p.info.kind == d.info.kind and (
            a == b or (self.config.selection.heterogeneous_tp and (a % b == 0 or b % a == 0)))

    def _decode_ok(self, d: EngineState, p: EngineState, exclude: str | None) -> bool:
        """D may take this request at all (credit aside): not P itself, below the queue and memory limits,
        compatible with P."""
        sel = self.config.selection
        return (d is not p and d.engine_id != exclude and d.load < sel.max_decode_queue
                and d.memory < sel.decode_memory_limit and self._compatible(p, d))

    def _prefill_ok(self, p: EngineState, d: EngineState) -> bool:
        return p is not d and p.p_load < self.config.selection.max_prefill_queue and self._compatible(p, d)

    def _shortlist(self) -> list[EngineState]:
        """The `prefill_shortlist` least-loaded prefill engines of each (engine kind, TP size) group present
        (one group: just the least-loaded ones), below the queue limit."""
        sel = self.config.selection
        k = sel.prefill_shortlist
        want = len(self._p_groups) * k
        taken: dict[tuple[str, int], int] = {}
        out: list[EngineState] = []
        for load, _, eid in self._p_order:
            if load >= sel.max_prefill_queue or len(out) >= want:
                break
            e = self._engines[eid]
            n = taken.get(e.group, 0)
            if n < k:
                taken[e.group] = n + 1
                out.append(e)
        return out

    # ---- pair selection ------------------------------------------------------------------------------------

    def select_pair(self, req: PairRequest, now: float) -> PairDecision:
        """New session (or none): joint (p, d) choice. Known session: D = its home, P reverse-selected; the
        home moves only when it is gone or overloaded, and the move is reported in `home_moved_from`."""
        try:
            return self._select(req, now)
        except NoPairAvailable:
            self.counters["no_pair"] += 1
            raise

    def _forget_pending(self, now: float) -> None:
        """Assignments older than `pending_ttl_s` no longer count (see SelectionConfig.pending_ttl_s)."""
        since = self._pending_since
        if since is not None and now - since >= self.config.selection.pending_ttl_s:
            for e in self._engines.values():
                if e.pending:
                    e.pending = 0
                    self._reorder(e)
            self._pending_since = None

    def _unpend(self, engine_id: str) -> None:
        e = self._engines.get(engine_id)
        if e is not None and e.pending > 0:
            e.pending -= 1
            self._reorder(e)

    def _select(self, req: PairRequest, now: float) -> PairDecision:
        self._forget_pending(now)
        moved_from: str | None = None
        sess = self.sessions.get(req.session_id, now) if req.session_id else None
        if sess is not None:
            home = self._engines.get(sess.home) if sess.home is not None else None
            if home is not None and home.can_decode:
                sc = self.config.sessions
                if home.memory >= sc.move_memory_pressure or home.load >= sc.move_queue:
                    try:
                        best = self._joint(req, exclude=home.engine_id)
                    except NoPairAvailable:  # nowhere better to go: stay home
                        best = self._reverse(home, req)
                    else:
                        moved_from = home.engine_id
                else:
                    best = self._reverse(home, req)
            else:
                moved_from = sess.home if sess.home is not None else sess.lost_home
                best = self._joint(req, exclude=None)
        else:
            best = self._joint(req, exclude=None)
        score, terms, p, d, locality, n = best
        sticky = locality == "sticky"
        if moved_from is not None:
            self.counters["home_moves"] += 1
        self.counters["decisions"] += 1
        self.counters["sticky"] += sticky
        self._picks += 1
        if self._pending_since is None:
            self._pending_since = now
        for e in (p, d):
            e.pending += 1
            e.last_pick = self._picks
            self._reorder(e)
        if req.session_id:
            self.sessions.set_home(req.session_id, d.engine_id, now)
        return PairDecision(
            request_id=req.request_id, prefill=p.engine_id, decode=d.engine_id, score=score,
            breakdown=self.scorer.breakdown(terms), locality=locality, sticky=sticky,
            home_moved_from=moved_from, candidates_scored=n)

    def _kv_bytes(self, req: PairRequest, p: EngineState, d: EngineState) -> int:
        return req.kv_bytes or req.prompt_tokens * (p.info.kv_bytes_per_token or d.info.kv_bytes_per_token)

    def _best(self, pairs: list[tuple[EngineState, EngineState]], req: PairRequest, acache: float
              ) -> tuple[float, Terms, EngineState, EngineState]:
        scorer = self.scorer
        best: tuple[float, Terms, EngineState, EngineState] | None = None
        for p, d in pairs:
            score, terms = scorer.score(p, d, self._kv_bytes(req, p, d), acache)
            if best is None or score < best[0]:
                best = (score, terms, p, d)
        assert best is not None
        return best

    def _joint(self, req: PairRequest, exclude: str | None
               ) -> tuple[float, Terms, EngineState, EngineState, str, int]:
        shortlist = self._shortlist()
        if not shortlist:
            n_p = len(self._p_key)
            raise NoPairAvailable("no prefill engine registered" if n_p == 0 else
                                  f"all {n_p} prefill engines have >= {self.config.selection.max_prefill_queue} "
                                  "queued requests")
        engines = self._engines
        wide_m = self.config.selection.wide_tier_shortlist
        decode_cost = self.scorer.decode_cost
        has_credit = self.ledger.has_stream_credit
        enough = 2 * wide_m  # wide tiers: stop scanning once this many candidates are found
        # Nearest tier with an admissible D that has a stream credit wins. If no D anywhere has a credit, the
        # nearest tier with an admissible D is used anyway (the lease will wait for a credit, not the pair).
        fallback: tuple[int, list[tuple[EngineState, EngineState]]] | None = None
        for tier in range(4):
            pairs: list[tuple[EngineState, EngineState]] = []
            busy: list[tuple[EngineState, EngineState]] = []
            for p in shortlist:
                ok: list[EngineState] = []
                waiting: list[EngineState] = []
                for i in self._tier_members(p.tile, tier, "decode"):
                    d = engines[i]
                    if self._decode_ok(d, p, exclude):
                        if has_credit(i):
                            ok.append(d)
                            if tier >= 2 and len(ok) >= enough:
                                break
                        elif fallback is None and len(waiting) < enough:
                            waiting.append(d)
                if tier >= 2:
                    if len(ok) > wide_m:
                        ok = heapq.nsmallest(wide_m, ok, key=decode_cost)
                    if len(waiting) > wide_m:
                        waiting = heapq.nsmallest(wide_m, waiting, key=decode_cost)
                if ok:
                    ok.extend(self._better_mates(p, ok, exclude))
                pairs.extend((p, d) for d in ok)
                busy.extend((p, d) for d in waiting)
            if pairs:
                score, terms, p, d = self._best(pairs, req, 0.0)
                return score, terms, p, d, self._tier_name(p, d), len(pairs)
            if fallback is None and busy:
                fallback = (tier, busy)
        if fallback is not None:
            tier, busy = fallback
            score, terms, p, d = self._best(busy, req, 0.0)
            return score, terms, p, d, TIERS[tier], len(busy)
        n_d = sum(1 for e in engines.values() if e.can_decode and e.engine_id != exclude)
        raise NoPairAvailable(
            "no decode engine registered" if n_d == 0 else
            f"none of {n_d} decode engines is admissible for the {len(shortlist)} least-loaded prefill engines "
            f"(queue < {self.config.selection.max_decode_queue}, memory pressure < "
            f"{self.config.selection.decode_memory_limit}, same engine kind and matching TP size)")

    def _path_gbps(self, p: EngineState, d: EngineState) -> float:
        """Bottleneck Gbps of the pair's best static path."""
        return float(max(x.static_gbps for x in self.scorer.path_infos(p.gpu0, d.gpu0)))

    def _mates(self, p: EngineState) -> dict[str, None]:
        """Decode-capable engines with a NIC port of their first GPU on a switch of P's first GPU."""
        leaf = self._leaf_decode
        mates: dict[str, None] = {}
        for sw in self._leaf_switches.get(p.engine_id, ()):
            m = leaf.get(sw)
            if m:
                mates.update(m)
        mates.pop(p.engine_id, None)
        return mates

    def _better_mates(self, p: EngineState, found: list[EngineState], exclude: str | None) -> list[EngineState]:
        """Decode engines behind one of P's own switches ("leaf mates", whatever their tile) whose best path
        has strictly more bottleneck bandwidth than the best path of every candidate
        `found` in the current tier, admissible and with a stream credit. An affinity tile can straddle
        switches (seed §6), so on an oversubscribed fabric the D behind P's own leaf may be a neighbour
        tile's while the same-tile D sits behind the 4:1 uplinks. Fewer hops alone do not qualify: on a
        non-blocking fabric every path has the same bottleneck, so nothing is added and the tier order stands."""
        cap = self._mate_cap.get(p.engine_id)
        if cap is None:
            mates = self._mates(p)
            cap = self._mate_cap[p.engine_id] = max((self._path_gbps(p, self._engines[i]) for i in mates),
                                                    default=0.0)
        best = 0.0
        for d in found:
            g = self._path_gbps(p, d)
            if g > best:
                best = g
                if best >= cap:  # no leaf mate can beat it (always so on a non-blocking fabric): nothing to add
                    return []
        mates = self._mates(p)
        have = {d.engine_id for d in found}
        engines, has_credit = self._engines, self.ledger.has_stream_credit
        out = []
        for i in mates:
            if i in have:
                continue
            d = engines[i]
            if self._decode_ok(d, p, exclude) and has_credit(i) and self._path_gbps(p, d) > best:
                out.append(d)
        return out

    def _tier_name(self, p: EngineState, d: EngineState) -> str:
        """The decision's locality: how D's tile relates to P's (a leaf mate can sit in a neighbour tile)."""
        if d.tile is p.tile:
            return TIERS[0]
        if d.tile in p.tile.adjacent:
            return TIERS[1]
        return TIERS[2] if d.cell is p.cell else TIERS[3]

    def _reverse(self, d: EngineState, req: PairRequest
                 ) -> tuple[float, Terms, EngineState, EngineState, str, int]:
        """Sticky turn: the best-scoring P for home D, nearest tier first."""
        engines = self._engines
        wide_m = self.config.selection.wide_tier_shortlist
        for tier in range(4):
            ps: list[EngineState] = []
            for i in self._tier_members(d.tile, tier, "prefill"):
                p = engines[i]
                if self._prefill_ok(p, d):
                    ps.append(p)
                    if tier >= 2 and len(ps) >= 2 * wide_m:
                        break
            if tier >= 2 and len(ps) > wide_m:
                ps = heapq.nsmallest(wide_m, ps, key=self.scorer.prefill_cost)
            if ps:
                score, terms, p, _ = self._best([(p, d) for p in ps], req, req.expected_cache_hit)
                return score, terms, p, d, "sticky", len(ps)
        raise NoPairAvailable(f"no admissible prefill engine for session home {d.engine_id} "
                              f"(queue < {self.config.selection.max_prefill_queue}, same engine kind and matching TP size)")

    # ---- leases --------------------------------------------------------------------------------------------

    def acquire_lease(self, req: LeaseRequest, now: float) -> LeaseGrant | LeaseDenied:
        """Grant credits and one path per TP rank stream, or deny with a reason and `retry_after`.

        Small transfers (< best_effort_max_bytes, when the request allows) go best-effort: no stream credit,
        no link reservation, bounded separately. Retrying a transfer that holds a live lease returns it."""
        p, d = self._require(req.prefill), self._require(req.decode)
        if not p.can_prefill:
            raise InvalidRequest(f"engine {p.engine_id} is registered as {p.info.role.value}: it cannot send KV")
        if not d.can_decode:
            raise InvalidRequest(f"engine {d.engine_id} is registered as {d.info.role.value}: it cannot receive KV")
        if p is d:
            raise InvalidRequest(f"transfer {req.transfer_id}: prefill and decode are the same engine")
        if p.info.kind != d.info.kind:
            raise InvalidRequest(f"prefill {p.engine_id} is a {p.info.kind or 'unnamed'!r} engine, decode "
                                 f"{d.engine_id} a {d.info.kind or 'unnamed'!r} one: KV moves only within one kind")
        if p.tp != d.tp and not self.config.selection.heterogeneous_tp:
            raise InvalidRequest(
                f"TP size mismatch: prefill {p.engine_id} has TP={p.tp}, decode {d.engine_id} has TP={d.tp}; "
                "KV moves rank i -> rank i only (enable selection.heterogeneous_tp for a D_TP = k·P_TP or "
                "P_TP = k·D_TP mapping)")
        streams = rank_map(p.tp, d.tp)
        existing = self.ledger.find_transfer(req.transfer_id)
        if existing is not None:
            if (existing.holder, existing.decode, existing.bytes) == (p.engine_id, d.engine_id, req.bytes):
                grant: LeaseGrant = existing.payload[0]
                return grant
            raise InvalidRequest(f"transfer {req.transfer_id} already holds lease {existing.lease_id} "
                                 f"({existing.holder} -> {existing.decode}, {existing.bytes} bytes)")
        cc = self.config.credits
        klass: Klass = ("best_effort" if req.best_effort_ok and req.bytes < cc.best_effort_max_bytes
                        else "reserved")
        chosen, rates, expected = self._assign_paths(p, d, streams, req.bytes, klass)
        self._lease_seq += 1
        lease_id = f"{self.config.lease_id_prefix}-{self._lease_seq:x}"
        out = self.ledger.acquire(lease_id=lease_id, transfer_id=req.transfer_id, holder=p.engine_id,
                                  decode=d.engine_id, nbytes=req.bytes, klass=klass, link_rates=rates, now=now,
                                  expected_seconds=expected)
        if isinstance(out, Denial):
            self.counters["denials"] += 1
            return LeaseDenied(transfer_id=req.transfer_id, reason=out.reason, retry_after=out.retry_after)
        self.counters["grants_reserved" if klass == "reserved" else "grants_best_effort"] += 1
        self._unpend(p.engine_id)  # P finished this prefill
        grant = LeaseGrant(
            lease_id=lease_id, transfer_id=req.transfer_id, prefill=p.engine_id, decode=d.engine_id,
            bytes=req.bytes, klass=klass, granted_at=now, expires_at=out.expires_at,
            paths=[PathGrant(rank=s, path=info.name, links=list(info.links), src_nic=info.path.src_nic,
                             dst_nic=info.path.dst_nic) for s, info in enumerate(chosen)])
        out.payload = (grant, chosen, streams)
        return grant

    def _assign_paths(self, p: EngineState, d: EngineState, streams: list[tuple[int, int]], nbytes: int,
                      klass: Klass) -> tuple[list[PathInfo], dict[str, float], float]:
        """One path per stream: with two or more candidates, even streams take the currently better (less
        loaded / faster) path and odd streams the other (seed §7); a stream whose preferred path has no quota
        left falls back to another candidate. Returns (paths, Gbps per link, expected seconds)."""
        scorer, led, cc = self.scorer, self.ledger, self.config.credits
        rank_bits = nbytes * 8.0 / len(streams)
        first = scorer.order(scorer.path_infos(p.info.gpus[streams[0][0]], d.info.gpus[streams[0][1]]))
        names = [x.name for x in first[:2]]
        chosen: list[PathInfo] = []
        rates: dict[str, float] = {}
        expected = 0.0
        for s, (a, b) in enumerate(streams):
            ordered = first if s == 0 else scorer.order(scorer.path_infos(p.info.gpus[a], d.info.gpus[b]))
            want = names[s % len(names)]
            pick = next((x for x in ordered if x.name == want), ordered[s % len(ordered)])
            est = self.feedback.gbps(pick.key, pick.static_gbps)
            if klass == "reserved":
                rate = min(max(rank_bits / cc.target_transfer_s / 1e9, cc.min_stream_gbps),
                           pick.static_gbps * cc.reservable_fraction)

                def fits(x: PathInfo, rate: float = rate) -> bool:
                    return all(led.link_reserved(lk) + rates.get(lk, 0.0) + rate <= led.link_capacity(lk) + 1e-6
                               for lk in x.links)

                if not fits(pick):
                    pick = next((x for x in [pick, *ordered] if fits(x)), pick)
                    est = self.feedback.gbps(pick.key, pick.static_gbps)
                for lk in pick.links:
                    rates[lk] = rates.get(lk, 0.0) + rate
                est = min(est, rate)
            chosen.append(pick)
            if est > 0:
                expected = max(expected, rank_bits / (est * 1e9))
        return chosen, rates, expected

    def release_lease(self, lease_id: str, outcome: TransferOutcome | None, now: float) -> bool:
        """End a lease. True only for the release that actually freed it; a second release, an unknown id or
        an expired lease answer False. The outcome (if any) feeds the path estimates once."""
        if outcome is not None and outcome.lease_id != lease_id:
            raise InvalidRequest(f"outcome is for lease {outcome.lease_id!r}, not {lease_id!r}")
        lease = self.ledger.get(lease_id)
        res = self.ledger.release(lease_id, now)
        if lease is not None:
            self._unpend(lease.decode)  # the KV has arrived (or never will): D's next report says the rest
            self.counters["releases" if res == "released" else "expired"] += 1
            if outcome is not None:
                self._feed(lease.payload, outcome, now)
        return res == "released"

    def renew_lease(self, lease_id: str, now: float) -> float | None:
        """The holder is still moving this lease's KV: extend its expiry (`CreditLedger.renew`). Returns the new
        `expires_at`, or None when the lease is no longer live (its credits are gone; stop the transfer)."""
        lease = self.ledger.renew(lease_id, now)
        if lease is None:
            return None
        self.counters["renewals"] += 1
        return lease.expires_at

    def _feed(self, payload: tuple[LeaseGrant, list[PathInfo], list[tuple[int, int]]], outcome: TransferOutcome,
              now: float) -> None:
        grant, chosen, streams = payload
        fb = self.feedback
        if not outcome.ranks:
            per = outcome.bytes // len(chosen)
            for info in chosen:
                fb.observe(info.key, info.static_gbps, per, outcome.seconds, outcome.ok, now)
            return
        for r in outcome.ranks:
            if r.rank >= len(chosen):
                continue
            used: PathInfo | None = chosen[r.rank]
            if used is not None and used.name != r.path:  # the transport used another candidate
                a, b = streams[r.rank]
                cands = self.scorer.path_infos(self._gpu_of(grant.prefill, a), self._gpu_of(grant.decode, b))
                used = next((x for x in cands if x.name == r.path), None)
            if used is not None:
                fb.observe(used.key, used.static_gbps, r.bytes, r.seconds, r.ok, now)

    def _gpu_of(self, engine_id: str, rank: int) -> str:
        e = self._engines.get(engine_id)
        if e is None:
            raise UnknownEngine(f"unknown engine {engine_id!r}")
        return e.info.gpus[rank]

    def expire(self, now: float) -> list[str]:
        """End leases past their expiry (their holder never released) and forget idle sessions."""
        ended = self.ledger.expire(now)
        for lease in ended:
            self._unpend(lease.decode)
        out = [lease.lease_id for lease in ended]
        self.counters["expired"] += len(out)
        self.sessions.sweep(now)
        return out

    def expire_lease(self, lease_id: str, now: float) -> bool:
        """End one live lease as expired now, before its `expires_at` (fault injection, operator revoke). Its
        holder's later release answers False. True only if the lease was live."""
        lease = self.ledger.expire_one(lease_id)
        if lease is None:
            return False
        self._unpend(lease.decode)
        self.counters["expired"] += 1
        return True

    # ---- introspection -------------------------------------------------------------------------------------

    def snapshot(self, now: float, max_paths: int = 1000, hottest: int = 10) -> dict[str, Any]:
        """Everything an operator wants to see, as plain JSON/msgpack-safe data."""
        led = self.ledger
        link_frac = {link: led.link_fraction(link) for link in led.links_in_use()}
        all_estimates = self.feedback.estimates()
        estimates = all_estimates[len(all_estimates) - max(0, max_paths):]
        return {
            "now": now,
            "topology": self.topology.summary(),
            "engines": [
                {"engine_id": e.engine_id, "role": e.info.role.value, "gpus": list(e.info.gpus), "tp": e.tp,
                 "queue_depth": e.queue, "running": e.running, "memory_pressure": e.memory,
                 "pending": e.pending, "reported_at": e.reported_at, "tile": e.tile.idx, "cell": e.cell.idx,
                 "streams_in": led.streams_in_use(e.engine_id), "bytes_in": led.bytes_in_flight(e.engine_id)}
                for e in self._engines.values()
            ],
            "leases": [
                {"lease_id": x.lease_id, "transfer_id": x.transfer_id, "prefill": x.holder, "decode": x.decode,
                 "bytes": x.bytes, "klass": x.klass, "granted_at": x.granted_at, "expires_at": x.expires_at,
                 "paths": [g.path for g in x.payload[0].paths] if x.payload else []}
                for x in led.active()
            ],
            "credits": {
                "decode": led.decodes_in_use(),
                "links": {link: {"reserved_gbps": round(led.link_reserved(link), 6),
                                 "fraction": round(frac, 6)} for link, frac in link_frac.items()},
            },
            "paths": [
                {"path": key[0], "links": list(key[1]), "gbps": est.gbps, "static_gbps": est.static_gbps,
                 "measured": est.bw_gbps is not None, "latency_s": est.latency_s, "samples": est.samples,
                 "failures": est.failures, "updated_at": est.updated_at}
                for key, est in estimates
            ],
            "hottest": self.feedback.hottest(hottest, link_frac),
            "sessions": len(self.sessions),
            "counters": dict(self.counters),
        }
