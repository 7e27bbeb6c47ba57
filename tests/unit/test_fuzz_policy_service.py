"""Fuzzing the policy service's frame and envelope decoding over real TCP (hypothesis): garbage bytes, random
msgpack objects, mutated envelopes and bodies for every op, truncated frames, huge length prefixes, deep
nesting, non-UTF-8 strings, ext types. Property: every bad frame gets an error reply naming a client error (or
closes that one connection), never an `internal` error, never an unhandled exception in the server, and the
server keeps serving a good client afterwards. Also: released lease ids released again answer False."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvlane.integration.policy_service import OPS, EmbeddedPolicy
from kvlane.policy.invariants import drained_violations, ledger_violations
from kvlane.policy.types import LeaseGrant
from policy_raw import ENGINES, FakeClock, Sock, ThreadedServer, lease_req, make_policy

#: Error codes a bad request may get. `internal` (a server bug) is not among them.
CLIENT_ERRORS = {"bad_request", "unknown_op", "unknown_engine", "no_pair", "invalid_request", "payload_too_large",
                 "announce_timeout", "busy", "policy_error", "auth_failed", "frame_too_large", "frame_timeout"}
MAX_FRAME = 64 * 1024
FUZZ = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


class _Problems(logging.Handler):
    """Collects ERROR records of the service and asyncio (an unhandled exception, an `internal` reply)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def srv():
    server = ThreadedServer(max_frame=MAX_FRAME)
    problems = _Problems()
    for name in ("kvlane.policy_service", "asyncio"):
        logging.getLogger(name).addHandler(problems)
    yield server
    for name in ("kvlane.policy_service", "asyncio"):
        logging.getLogger(name).removeHandler(problems)
    server.close()
    assert server.unhandled == [], server.unhandled
    assert [r.getMessage() for r in problems.records] == []


def assert_serves(port: int, sock: Sock | None = None) -> None:
    """A good client gets a good answer (on `sock` if given: that connection must have survived)."""
    c = sock or Sock(port)
    c.send({"v": 1, "id": 1 << 40, "op": "ping", "body": {}})
    reply = c.recv()
    assert reply["ok"] is True and reply["id"] == 1 << 40, reply
    if sock is None:
        c.close()


def assert_client_error(reply: dict[str, Any] | None) -> None:
    assert reply is not None
    if reply.get("ok") is True:
        return
    assert reply["ok"] is False and reply["error"]["code"] in CLIENT_ERRORS, reply


# ------------------------------------------------------------------------------------------ strategies

scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
           | st.floats() | st.text(max_size=40) | st.binary(max_size=40)
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20)


def _valid_bodies() -> dict[str, dict[str, Any]]:
    return {
        "ping": {},
        "register_engine": ENGINES[0].to_wire(),
        "remove_engine": {"engine_id": "nobody"},
        "list_engines": {},
        "report_load": {"engine_id": "p0", "queue_depth": 1, "running": 0, "memory_pressure": 0.5},
        "select_pair": {"request_id": "r1", "prompt_tokens": 10},
        "acquire_lease": lease_req("t-fuzz").to_wire(),
        "release_lease": {"lease_id": "L-unknown"},
        "renew_lease": {"lease_id": "L-unknown"},
        "snapshot": {"max_paths": 1, "hottest": 1},
        "announce": {"transfer_id": "t-fuzz", "payload": {"rank0": [1, 2, 3]}},
        "await_announce": {"transfer_id": "t-never", "timeout_s": 0.0},
        "register_rank": {"engine_id": "p0", "rank": 0, "descriptor": b"desc"},
        "get_ranks": {"engine_id": "p0"},
        "abort_transfer": {"transfer_id": "t-fuzz", "reason": "fuzz"},
        "transfer_status": {"transfer_ids": ["t-fuzz", "t-other"]},
    }


VALID = _valid_bodies()
assert set(VALID) == set(OPS)


@st.composite
def mutated_request(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(sorted(VALID)))
    body = dict(VALID[op])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "extra", "replace", "retype_body"]))
        if kind == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif kind == "extra":
            body[draw(st.text(min_size=1, max_size=10))] = draw(values)
        elif kind == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(values)
        elif kind == "retype_body":
            return {"v": 1, "id": draw(st.integers(1, 1 << 40)), "op": op, "body": draw(values)}
    if op == "await_announce" and isinstance(body.get("timeout_s"), (int, float)) and body["timeout_s"] > 0.2:
        body["timeout_s"] = 0.0  # a valid long poll would legitimately wait; bad input must not
    return {"v": 1, "id": draw(st.integers(1, 1 << 40)), "op": op, "body": body}


envelope_keys = st.sampled_from(["v", "id", "op", "body", "auth", "hello", "x"])


# ------------------------------------------------------------------------------------------ properties


@FUZZ
@given(data=st.binary(max_size=300))
def test_garbage_bytes_get_an_error_and_the_connection_survives(srv, data):
    c = Sock(srv.port)
    c.send_body(data)
    reply = c.reply_or_eof()
    assert_client_error(reply)
    assert reply is not None and reply["ok"] is False
    assert_serves(srv.port, c)  # no secret: the same connection keeps working
    c.close()


@FUZZ
@given(obj=values)
def test_any_msgpack_object_as_a_frame_gets_an_error(srv, obj):
    c = Sock(srv.port)
    c.send(obj)
    reply = c.reply_or_eof()
    assert reply is not None and reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert_serves(srv.port, c)
    c.close()


@FUZZ
@given(env=st.dictionaries(envelope_keys, values, max_size=6))
def test_random_envelopes_name_what_is_wrong(srv, env):
    c = Sock(srv.port)
    c.send(env)
    reply = c.reply_or_eof()
    assert_client_error(reply)
    if reply is not None and reply["ok"] is False and reply["error"]["code"] == "bad_request":
        assert reply["error"]["message"].startswith(("request envelope", "invalid body", "frame is not valid")), reply
    assert_serves(srv.port, c)
    c.close()


@FUZZ
@given(req=mutated_request())
def test_mutated_bodies_of_every_op_are_refused_or_served_never_internal(srv, req):
    c = Sock(srv.port)
    c.send(req)
    reply = c.reply_or_eof()
    assert_client_error(reply)
    assert reply is not None and reply["id"] in (req["id"], 0)
    assert_serves(srv.port, c)
    c.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(MAX_FRAME + 1, (1 << 32) - 1))
def test_huge_length_prefix_is_refused_without_reading(srv, length):
    c = Sock(srv.port)
    c.s.sendall(struct.pack(">I", length) + b"\x80")
    reply = c.reply_or_eof()
    assert reply is not None and reply["id"] == 0 and reply["error"]["code"] == "frame_too_large"
    assert c.eof()
    c.close()
    assert_serves(srv.port)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=2, max_size=200), cut=st.integers(0, 199), stall=st.integers(0, 3))
def test_truncated_frames_cost_only_their_connection(srv, body, cut, stall):
    c = Sock(srv.port)
    cut = min(cut, len(body) - 1)
    c.s.sendall(struct.pack(">I", len(body)) + body[:cut])
    if stall == 0:  # the sender stalls mid-frame: frame_timeout (0.5 s here) answers and closes
        reply = c.reply_or_eof()
        assert reply is not None and reply["id"] == 0 and reply["error"]["code"] == "frame_timeout"
        assert c.eof()
    else:  # the sender hangs up mid-frame
        c.s.shutdown(socket.SHUT_WR)
        assert c.eof()
    c.close()
    assert_serves(srv.port)


def test_deep_nesting_non_utf8_and_ext_types(srv):
    c = Sock(srv.port)
    cases = [
        b"\x91" * 5000 + b"\xc0",  # nested far past msgpack's stack
        b"\x81\xa2op\xa3\xff\xfe\xfd",  # a str that is not UTF-8
        msgpack.packb({"v": 1, "id": 1, "op": b"ping", "body": {}}),  # op as bin
        msgpack.packb({b"v": 1, b"id": 1, b"op": "ping"}),  # bin keys
        msgpack.packb({1: 2}),  # int keys (refused by strict_map_key)
        msgpack.packb({"v": 1, "id": 1, "op": "ping", "body": msgpack.ExtType(5, b"x")}),
        msgpack.packb({"v": 1, "id": 1, "op": "ping", "body": {}, "auth": msgpack.Timestamp(0, 0)}),
        b"\xd6\xff\x00\x00\x00\x00",  # a msgpack timestamp as the whole frame
        b"\xc7\x03\xff\x00\x00\x00",  # a malformed timestamp ext
    ]
    for data in cases:
        c.send_body(data)
        reply = c.recv()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (data[:20], reply)
    assert_serves(srv.port, c)
    # Decodable but deep nesting inside an announce payload is refused (receivers walk payloads recursively);
    # 32 levels, msgpack timestamps and raw bytes are stored and handed back unchanged; other ext types are
    # refused (pydantic would silently turn them into lists).
    deep: Any = "leaf"
    for _ in range(1000):
        deep = [deep]
    c.send({"v": 1, "id": 10, "op": "announce", "body": {"transfer_id": "t-deep", "payload": {"deep": deep}}})
    reply = c.recv()
    assert reply["error"]["code"] == "bad_request" and "nested deeper than 32" in reply["error"]["message"]
    ok_deep: Any = 1
    for _ in range(31):
        ok_deep = [ok_deep]
    for i, payload in enumerate(({"deep": ok_deep}, {"ts": msgpack.Timestamp(1, 2), "bad": b"\xff\xfe"})):
        c.send({"v": 1, "id": 20 + 2 * i, "op": "announce", "body": {"transfer_id": f"t-ok{i}", "payload": payload}})
        assert c.recv()["ok"] is True
        c.send({"v": 1, "id": 21 + 2 * i, "op": "await_announce",
                "body": {"transfer_id": f"t-ok{i}", "timeout_s": 0.0}})
        reply = c.recv()
        assert reply["ok"] is True and reply["body"]["payload"] == payload
    c.send({"v": 1, "id": 30, "op": "announce", "body": {"transfer_id": "t-x", "payload": {
        "ext": msgpack.ExtType(7, b"\x01")}}})
    reply = c.recv()
    assert reply["error"]["code"] == "bad_request" and "ext type 7" in reply["error"]["message"]
    assert_serves(srv.port, c)
    c.close()


def test_unframed_junk_stream(srv):
    """Bytes that are not even frames (an HTTP request, a TLS hello): one error or a close, nothing else."""
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64):
        c = Sock(srv.port)
        c.s.sendall(junk)
        reply = c.reply_or_eof()
        assert reply is None or reply["error"]["code"] in CLIENT_ERRORS
        c.close()
    assert_serves(srv.port)


# ------------------------------------------------------------------------------------------ replayed lease ids


@settings(max_examples=40, deadline=None)
@given(plan=st.lists(st.tuples(st.sampled_from(["acquire", "release", "release_again", "expire"]),
                               st.integers(0, 7)), min_size=1, max_size=30))
def test_released_lease_ids_never_free_twice(plan):
    """Any sequence of acquire / release / re-release / expiry: each lease id is freed exactly once (True once,
    False ever after), the ledger never goes negative, and releasing everything returns every credit."""

    async def run() -> None:
        clock = FakeClock(1000.0)
        async with EmbeddedPolicy(make_policy(lease_ttl_s=5.0), clock=clock) as c:
            for info in ENGINES:
                await c.register_engine(info)
            granted: list[str] = []
            freed: set[str] = set()
            for step, (action, k) in enumerate(plan):
                if action == "acquire":
                    g = await c.acquire_lease(lease_req(f"t{step}", nbytes=(k + 1) << 20))
                    if isinstance(g, LeaseGrant):
                        granted.append(g.lease_id)
                elif action in ("release", "release_again") and granted:
                    lid = granted[k % len(granted)]
                    ok = await c.release_lease(lid)
                    assert ok == (lid not in freed), (lid, ok)
                    freed.add(lid)
                elif action == "expire":
                    clock.now += 3.0
                    freed.update(c.service.sweep_once())
                ledger = c.service.policy.ledger
                assert {x.lease_id for x in ledger.active()} == set(granted) - freed
                assert ledger_violations(c.service.policy) == []
            for lid in granted:
                assert await c.release_lease(lid) == (lid not in freed)
                assert await c.release_lease(lid) is False
            assert drained_violations(c.service.policy) == []

    asyncio.run(run())
