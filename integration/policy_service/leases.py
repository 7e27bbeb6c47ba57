"""Keeping the credit leases of transfers still in flight alive: the holder side of lease renewal.

A lease expires `lease_ttl_s` (plus a per-byte term) after its grant unless its holder renews it
(`renew_lease`, docs/policy-service.md). A prefill engine holds a lease from the grant to the release that
reports the transfer's outcome; in between come the handshakes with a decode engine it never pushed to (a
timed-out one is tried again after `connect_timeout_s`), the push, and, on SGLang, the other TP ranks'
outcomes. `LeaseKeeper` renews each lease it holds once a third of its ttl has passed, on one daemon thread,
so only a holder that died or hung loses its credits (and D hears at once that the KV will not come).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvlane.policy.types import LeaseGrant

log = logging.getLogger("kvlane.leases")


@dataclass
class _Held:
    grant: LeaseGrant
    until: float  # monotonic: never renewed past this (the transfer's own deadline plus slack)
    renewed: float  # monotonic time of the grant or the last renewal


class LeaseKeeper:
    """Renews held leases. `client` is a `SyncPolicyClient` (anything with `renew_lease(lease_id)` returning
    the new expiry or None). `on_gone(grant)` runs on the keeper's thread when the service says a held lease
    is no longer live (it expired or was revoked): the transfer lost its credits and D stops waiting."""

    def __init__(self, client: Any, on_gone: Callable[[LeaseGrant], None] | None = None,
                 name: str = "kvlane-leases") -> None:
        self._client = client
        self._on_gone = on_gone
        self._name = name
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def hold(self, grant: LeaseGrant, until: float) -> None:
        """Keep `grant` alive until `drop` or the monotonic time `until`, whichever comes first."""
        with self._lock:
            if self._closed:
                return
            self._held[grant.lease_id] = _Held(grant, until, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake.set()

    def drop(self, lease_id: str) -> None:
        """Stop renewing (the transfer ended; its release follows)."""
        with self._lock:
            self._held.pop(lease_id, None)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._held.clear()
        self._wake.set()

    def _due(self) -> tuple[list[_Held], float]:
        """The leases to renew now, and how long to sleep before looking again."""
        now, wait, due = time.monotonic(), 0.5, []
        with self._lock:
            for lid, h in list(self._held.items()):
                if now >= h.until:
                    del self._held[lid]
                    continue
                third = (h.grant.expires_at - h.grant.granted_at) / 3
                wait = min(wait, max(0.02, third / 2))  # a short ttl (tests, tiny transfers) is looked at sooner
                if now - h.renewed >= third:
                    due.append(h)
        return due, wait

    def _run(self) -> None:
        wait = 0.0
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            if self._closed:
                return
            due, wait = self._due()
            for h in due:
                lid = h.grant.lease_id
                try:
                    expires_at = self._client.renew_lease(lid)
                except Exception as exc:  # the service may be restarting: try again on the next round
                    log.warning("kvlane: renewing lease %s failed (%s)", lid, exc)
                    continue
                with self._lock:
                    if self._held.get(lid) is not h:
                        continue  # dropped meanwhile
                    if expires_at is None:
                        del self._held[lid]
                    else:
                        h.renewed = time.monotonic()
                if expires_at is None and self._on_gone is not None:
                    self._on_gone(h.grant)
