"""Sticky sessions: which decode engine is each multi-turn session's home (bounded LRU, idle expiry).

Owned by `kvlane.policy`, run inside the policy service (through `Policy.select_pair`). It only remembers
homes; deciding whether a home must move is `Policy`'s job, and every move is reported in the decision.
Pure: time is an argument; never reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .config import SessionConfig


@dataclass
class Session:
    session_id: str
    home: str | None  # None: the home was removed; the next turn picks a new one and reports the move
    last_used: float
    turns: int = 0
    #: The home that was lost (set by `orphan_home`), reported as `home_moved_from` on the next turn.
    lost_home: str | None = None


class SessionTable:
    def __init__(self, config: SessionConfig):
        self.config = config
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._by_home: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str, now: float) -> Session | None:
        """The live session (None if unknown or idle past its ttl, in which case it is forgotten)."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        if now - s.last_used > self.config.idle_ttl_s:
            self._forget(session_id)
            return None
        return s

    def set_home(self, session_id: str, home: str, now: float) -> Session:
        """Record a turn: the session's home is `home` (creating the session, or moving it)."""
        s = self._sessions.get(session_id)
        if s is None:
            s = Session(session_id=session_id, home=home, last_used=now)
            self._sessions[session_id] = s
            while len(self._sessions) > self.config.max_sessions:
                oldest = next(iter(self._sessions))
                self._forget(oldest)
        else:
            self._sessions.move_to_end(session_id)
            if s.home != home:
                self._unindex(s)
                s.home = home
        s.lost_home = None
        s.last_used = max(s.last_used, now)
        s.turns += 1
        self._by_home.setdefault(home, set()).add(session_id)
        return s

    def sessions_of(self, home: str) -> set[str]:
        return set(self._by_home.get(home, ()))

    def orphan_home(self, home: str) -> int:
        """`home` is gone: its sessions keep their id but lose their home (next turn re-homes, reported)."""
        ids = self._by_home.pop(home, set())
        for sid in ids:
            s = self._sessions[sid]
            s.home = None
            s.lost_home = home
        return len(ids)

    def sweep(self, now: float) -> int:
        """Forget sessions idle past the ttl (oldest first, stops at the first live one)."""
        n = 0
        ttl = self.config.idle_ttl_s
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if now - s.last_used <= ttl:
                break
            self._forget(sid)
            n += 1
        return n

    def _unindex(self, s: Session) -> None:
        if s.home is not None:
            ids = self._by_home.get(s.home)
            if ids is not None:
                ids.discard(s.session_id)
                if not ids:
                    del self._by_home[s.home]

    def _forget(self, session_id: str) -> None:
        s = self._sessions.pop(session_id)
        self._unindex(s)
