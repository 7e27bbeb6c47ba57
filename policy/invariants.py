"""Invariants of the policy's credit accounting, checked after every fault test and chaos run: the ledger's
running totals equal what its live leases add up to, never exceed capacity, and drain to zero once every
transfer has ended. Pure: reads a `Policy`'s ledger (time is an argument), never changes it.
"""

from __future__ import annotations

from typing import Any

_EPS = 1e-6


def ledger_violations(policy: Any) -> list[str]:
    """What is wrong with the ledger right now (empty when consistent): per-decode streams / bytes /
    best-effort counts and per-link reservations must equal the sums over the live leases, stay non-negative
    and within the configured capacities."""
    led = policy.ledger
    cc = led.config
    out: list[str] = []
    want_decode: dict[str, dict[str, int]] = {}
    want_link: dict[str, float] = {}
    for lease in led.active():
        use = want_decode.setdefault(lease.decode, {"streams": 0, "bytes": 0, "best_effort": 0,
                                                    "best_effort_bytes": 0})
        if lease.klass == "reserved":
            use["streams"] += 1
            use["bytes"] += lease.bytes
        else:
            use["best_effort"] += 1
            use["best_effort_bytes"] += lease.bytes
        for link, rate in lease.link_rates.items():
            want_link[link] = want_link.get(link, 0.0) + rate
    have_decode = led.decodes_in_use()
    for d in sorted(set(want_decode) | set(have_decode)):
        want, have = want_decode.get(d), have_decode.get(d)
        if want != have:
            out.append(f"decode {d}: ledger says {have}, its live leases add up to {want}")
        use = have or {}
        if any(v < 0 for v in use.values()):
            out.append(f"decode {d}: negative credits {use}")
        if use.get("streams", 0) > cc.max_streams:
            out.append(f"decode {d}: {use['streams']} reserved streams > max_streams {cc.max_streams}")
        if use.get("streams", 0) > 1 and use.get("bytes", 0) > cc.ingress_bytes:
            out.append(f"decode {d}: {use['bytes']} reserved bytes in flight > ingress_bytes {cc.ingress_bytes}")
        if use.get("best_effort", 0) > cc.best_effort_max_streams:
            out.append(f"decode {d}: {use['best_effort']} best-effort transfers > best_effort_max_streams "
                       f"{cc.best_effort_max_streams}")
    have_link = led.links_in_use()
    for link in sorted(set(want_link) | set(have_link)):
        want_r, have_r = want_link.get(link, 0.0), have_link.get(link, 0.0)
        if abs(want_r - have_r) > _EPS * max(1.0, want_r):
            out.append(f"link {link}: {have_r:.6g} Gbps reserved, its live leases add up to {want_r:.6g}")
        if have_r < -_EPS:
            out.append(f"link {link}: negative reservation {have_r:.6g}")
        cap = led.link_capacity(link)
        if have_r > cap + _EPS * max(1.0, cap):
            out.append(f"link {link}: {have_r:.6g} Gbps reserved > reservable {cap:.6g}")
    return out


def overdue_leases(policy: Any, now: float) -> list[str]:
    """Live leases whose expiry is at or before `now` (the sweep has not ended them yet)."""
    return sorted(lease.lease_id for lease in policy.ledger.active() if lease.expires_at <= now)


def drained_violations(policy: Any) -> list[str]:
    """After every transfer ended (released or expired): no lease outstanding, every decode's ingress credits
    back to capacity, no link reservation left, and the ledger consistent."""
    led = policy.ledger
    out = ledger_violations(policy)
    active = led.active()
    if active:
        ids = ", ".join(sorted(lease.lease_id for lease in active)[:10])
        out.append(f"{len(active)} lease(s) still outstanding: {ids}")
    if led.decodes_in_use():
        out.append(f"decode credits still held: {led.decodes_in_use()}")
    if led.links_in_use():
        out.append(f"link reservations still held: {led.links_in_use()}")
    return out
