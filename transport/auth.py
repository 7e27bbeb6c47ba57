"""Peer authentication of kvlane.transport: the shared secret, the handshake MACs (challenge-response with a
fresh nonce from each side) and the per-session MAC on offers. Pure functions, run in the worker process by
`KVTransport`; no I/O, and it never compares MACs with ``==`` (always `hmac.compare_digest`).

Handshake with a secret (both backends), sender S connecting to receiver R on one path::

    S → R  HELLO     descriptor_S, nonce_S
    R → S  CHALLENGE key_R, nonce_R                                   (fresh per hello, single use)
    S → R  AUTH      key_S, nonce_R, mac = H(secret, [DOMAIN, "sender", nonce_R, nonce_S, sha256(descriptor_S), key_R, path])
    R → S  HELLO_OK  key_R, mac = H(secret, [DOMAIN, "receiver", nonce_S, nonce_R, sha256(descriptor_S), key_R, path])

Both then derive ``session = H(secret, [DOMAIN, "session", nonce_R, nonce_S, sha256(descriptor_S), key_R, path])``;
every OFFER carries a sequence number and ``H(session, [DOMAIN, "offer", offer-without-mac])``, and every
READY/REJECT/DONE/FAIL answering it ``H(session, [DOMAIN, "reply", reply-without-mac, offer seq, offer tag_base])``.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import msgpack

DOMAIN = "kvlane-transport-auth/1"
NONCE_BYTES = 32
MAC_BYTES = 32


def env_secret(env: dict[str, str] | None = None) -> bytes | None:
    """$KVLANE_SECRET as bytes, or None when unset or empty (the policy clients' convention)."""
    value = (env if env is not None else os.environ).get("KVLANE_SECRET", "")
    return value.encode() if value else None


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _mac(key: bytes, parts: list[object]) -> bytes:
    return hmac.new(key, msgpack.packb([DOMAIN, *parts], use_bin_type=True), hashlib.sha256).digest()


def _bind(descriptor: bytes, receiver_key: str, path: str) -> list[object]:
    return [hashlib.sha256(descriptor).digest(), receiver_key, path]


def sender_mac(secret: bytes, receiver_nonce: bytes, sender_nonce: bytes, descriptor: bytes, receiver_key: str,
               path: str) -> bytes:
    """The sender's answer to the receiver's challenge (binds both nonces, its descriptor and the receiver)."""
    return _mac(secret, ["sender", receiver_nonce, sender_nonce, *_bind(descriptor, receiver_key, path)])


def receiver_mac(secret: bytes, sender_nonce: bytes, receiver_nonce: bytes, descriptor: bytes, receiver_key: str,
                 path: str) -> bytes:
    """The receiver's proof in HELLO_OK (mutual authentication; another role label, so not a sender answer)."""
    return _mac(secret, ["receiver", sender_nonce, receiver_nonce, *_bind(descriptor, receiver_key, path)])


def session_key(secret: bytes, receiver_nonce: bytes, sender_nonce: bytes, descriptor: bytes, receiver_key: str,
                path: str) -> bytes:
    return _mac(secret, ["session", receiver_nonce, sender_nonce, *_bind(descriptor, receiver_key, path)])


def offer_mac(session: bytes, offer_without_mac: bytes) -> bytes:
    """MAC of an encoded OFFER (its ``mac`` field unset) under the session key."""
    return _mac(session, ["offer", offer_without_mac])


def reply_mac(session: bytes, reply_without_mac: bytes, offer_seq: int, offer_tag_base: int) -> bytes:
    """MAC of the receiver's READY/REJECT/DONE/FAIL, bound to the offer it answers (so it cannot be replayed
    onto another transfer, even one re-using the id)."""
    return _mac(session, ["reply", reply_without_mac, offer_seq, offer_tag_base])


def check(expected: bytes, got: bytes | None) -> bool:
    return got is not None and len(got) == MAC_BYTES and hmac.compare_digest(expected, got)


class SeqWindow:
    """Offer sequence numbers already used in one session: each is accepted once; numbers more than
    ``span`` below the highest seen are refused outright (bounded memory)."""

    def __init__(self, span: int = 4096) -> None:
        self.span = span
        self.top = -1
        self.seen: set[int] = set()

    def accept(self, seq: int) -> bool:
        if seq <= self.top - self.span or seq in self.seen:
            return False
        self.seen.add(seq)
        if seq > self.top:
            self.top = seq
            floor = self.top - self.span
            if len(self.seen) > 2 * self.span:
                self.seen = {s for s in self.seen if s > floor}
        return True
