"""Session table: homes, LRU bound, idle expiry, orphaning when a home leaves."""

from __future__ import annotations

from kvlane.policy.config import SessionConfig
from kvlane.policy.sessions import SessionTable


def test_home_is_remembered_and_turns_counted():
    t = SessionTable(SessionConfig())
    t.set_home("s1", "D1", now=0.0)
    s = t.set_home("s1", "D1", now=1.0)
    assert (s.home, s.turns, s.last_used) == ("D1", 2, 1.0)
    assert t.get("s1", 2.0).home == "D1"
    assert t.sessions_of("D1") == {"s1"}


def test_moving_home_reindexes():
    t = SessionTable(SessionConfig())
    t.set_home("s1", "D1", 0.0)
    t.set_home("s1", "D2", 1.0)
    assert t.sessions_of("D1") == set() and t.sessions_of("D2") == {"s1"}


def test_lru_bound_evicts_least_recently_used():
    t = SessionTable(SessionConfig(max_sessions=2))
    t.set_home("a", "D", 0.0)
    t.set_home("b", "D", 1.0)
    t.set_home("a", "D", 2.0)  # a is now the most recent
    t.set_home("c", "D", 3.0)
    assert len(t) == 2 and t.get("b", 3.0) is None and t.get("a", 3.0) is not None
    assert t.sessions_of("D") == {"a", "c"}


def test_idle_sessions_expire():
    t = SessionTable(SessionConfig(idle_ttl_s=10.0))
    t.set_home("a", "D", 0.0)
    t.set_home("b", "D", 5.0)
    assert t.get("a", 10.0) is not None  # exactly at the ttl: still alive
    assert t.sweep(14.0) == 1 and len(t) == 1
    assert t.get("b", 16.0) is None and len(t) == 0 and t.sessions_of("D") == set()


def test_orphan_home_keeps_session_and_records_lost_home():
    t = SessionTable(SessionConfig())
    t.set_home("a", "D1", 0.0)
    t.set_home("b", "D2", 0.0)
    assert t.orphan_home("D1") == 1
    s = t.get("a", 1.0)
    assert s.home is None and s.lost_home == "D1"
    s = t.set_home("a", "D3", 2.0)
    assert s.home == "D3" and s.lost_home is None and t.sessions_of("D3") == {"a"}
