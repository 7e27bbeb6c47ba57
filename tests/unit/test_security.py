"""Security of the control plane: with a shared secret the policy service authenticates every request (HMAC over
the connection's nonce, the id, the op and the body; ids strictly increase), refuses and logs everything else
(replays within and across connections, wrong secret, missing MAC, a MAC over another body), and keeps serving
good clients; kvlane's own code never unpickles anything; the service binds loopback by default and warns
loudly when exposed without a secret."""

from __future__ import annotations

import ast
import asyncio
import logging
import pathlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvlane.integration.policy_service import AuthFailed, PolicyClient, PolicyServer, PolicyService
from kvlane.integration.policy_service import protocol as P
from kvlane.integration.policy_service.server import exposure_warning, is_loopback
from policy_raw import ENGINES, FakeClock, Raw, Sock, ThreadedServer, authed, make_policy

SECRET = b"s3cret-for-tests"
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
async def secure():
    svc = PolicyService(make_policy(), clock=FakeClock())
    for info in ENGINES:
        svc.policy.register_engine(info, 0.0)
    async with PolicyServer(svc, "127.0.0.1", 0, secret=SECRET) as srv:
        yield srv


async def good_client_works(srv: PolicyServer) -> None:
    async with PolicyClient(srv.address, secret=SECRET) as c:
        assert await c.ping() == 1000.0
        assert len(await c.engines()) == 2


async def refused(raw: Raw, frame: dict, why: str) -> None:
    await raw.send(frame)
    reply = await raw.recv()
    assert reply["ok"] is False and reply["error"]["code"] == "auth_failed", reply
    assert why in reply["error"]["message"]
    assert await raw.closed()
    await raw.aclose()


# ---------------------------------------------------------------------------------------------- HMAC


async def test_replay_within_a_connection_same_or_lower_id(secure, caplog):
    raw = await Raw.open(secure.address)
    assert raw.hello["auth"] is True and len(raw.hello["nonce"]) == P.NONCE_BYTES
    first = authed(SECRET, raw.hello["nonce"], 7, "list_engines", {})
    await raw.send(first)
    assert (await raw.recv())["ok"] is True
    with caplog.at_level(logging.WARNING, logger="kvlane.policy_service"):
        await refused(raw, first, "not above 7")
    assert "replay" in caplog.text and "refused" in caplog.text

    raw = await Raw.open(secure.address)  # a correctly MACed but lower id after a higher one
    await raw.send(authed(SECRET, raw.hello["nonce"], 10, "ping", {}))
    assert (await raw.recv())["ok"] is True
    await refused(raw, authed(SECRET, raw.hello["nonce"], 9, "ping", {}), "not above 10")
    await good_client_works(secure)


async def test_replay_across_connections(secure):
    raw = await Raw.open(secure.address)
    captured = authed(SECRET, raw.hello["nonce"], 1, "acquire_lease",
                      {"transfer_id": "t1", "prefill": "p0", "decode": "d0", "bytes": 4096,
                       "best_effort_ok": True})
    await raw.send(captured)
    assert (await raw.recv())["ok"] is True
    await raw.aclose()
    for _ in range(3):  # every new connection has a new nonce: the captured MAC is worthless there
        again = await Raw.open(secure.address)
        assert again.hello["nonce"] != raw.hello["nonce"]
        await refused(again, captured, "wrong request MAC")
    assert len(secure.service.policy.ledger.active()) == 1  # the replays granted nothing
    await good_client_works(secure)


async def test_wrong_secret_missing_mac_and_short_mac(secure, caplog):
    with pytest.raises(AuthFailed, match="wrong request MAC"):
        async with PolicyClient(secure.address, secret=b"not-the-secret") as c:
            await c.ping()
    with pytest.raises(AuthFailed, match="requires a shared secret"):
        async with PolicyClient(secure.address, secret=None) as c:
            await c.ping()
    raw = await Raw.open(secure.address)
    with caplog.at_level(logging.WARNING, logger="kvlane.policy_service"):
        await refused(raw, {"v": 1, "id": 1, "op": "ping", "body": {}}, "missing request MAC")
    assert "missing MAC" in caplog.text
    raw = await Raw.open(secure.address)
    mac = P.compute_mac(SECRET, raw.hello["nonce"], 1, "ping", {})
    await refused(raw, {"v": 1, "id": 1, "op": "ping", "body": {}, "auth": mac[:16]}, "wrong request MAC")
    await good_client_works(secure)


async def test_mac_over_another_body_op_or_id_is_refused(secure):
    body = {"transfer_id": "t1", "prefill": "p0", "decode": "d0", "bytes": 4096, "best_effort_ok": True}
    for change in ({"body": {**body, "bytes": 1 << 40}}, {"body": {**body, "extra": 1}}, {"op": "select_pair"},
                   {"id": 2}, {"body": {}}):
        raw = await Raw.open(secure.address)
        frame = {**authed(SECRET, raw.hello["nonce"], 1, "acquire_lease", body), **change}
        await refused(raw, frame, "wrong request MAC")
    assert secure.service.policy.ledger.active() == []
    await good_client_works(secure)


async def test_junk_from_an_unauthenticated_peer_is_logged_and_closed(secure, caplog):
    raw = await Raw.open(secure.address)
    with caplog.at_level(logging.WARNING, logger="kvlane.policy_service"):
        await raw.send_bytes(b"\xc1garbage")
        assert (await raw.recv())["error"]["code"] == "bad_request"
        assert await raw.closed()
    assert "unauthenticated malformed frame" in caplog.text
    await raw.aclose()


async def test_pipelined_authenticated_calls_keep_their_order(secure):
    async with PolicyClient(secure.address, secret=SECRET) as c:
        times = await asyncio.gather(*(c.ping() for _ in range(64)))
        assert times == [1000.0] * 64


@pytest.fixture(scope="module")
def threaded_secure():
    srv = ThreadedServer(secret=SECRET)
    yield srv
    srv.close()
    assert srv.unhandled == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["id", "op", "body", "auth", "nonce"]), flip=st.integers(0, 255),
       pos=st.integers(0, 1000))
def test_any_tampering_is_refused(threaded_secure, field, flip, pos):
    """Property: change any one part of a correctly MACed request (the id, the op, a byte of the body or of
    the MAC, or MAC it over another nonce) and the server refuses it and closes the connection."""
    c = Sock(threaded_secure.port)
    nonce = c.hello["nonce"]
    body = {"engine_id": "p0"}
    req_id, op = 5, "get_ranks"
    if field == "nonce":
        nonce = bytes([nonce[0] ^ (flip or 1)]) + nonce[1:]
    frame = authed(SECRET, nonce, req_id, op, body)
    if field == "id":
        frame["id"] = req_id + 1 + pos
    elif field == "op":
        frame["op"] = ["ping", "list_engines", "snapshot", "remove_engine"][pos % 4]
    elif field == "body":
        frame["body"] = {"engine_id": "p0" + chr(ord("a") + pos % 26)}
    elif field == "auth":
        mac = bytearray(frame["auth"])
        mac[pos % len(mac)] ^= flip or 1
        frame["auth"] = bytes(mac)
    c.send(frame)
    reply = c.reply_or_eof()
    assert reply is not None and reply["error"]["code"] == "auth_failed", reply
    assert c.eof()
    c.close()
    ok = Sock(threaded_secure.port)
    ok.send(authed(SECRET, ok.hello["nonce"], 1, "ping", {}))
    assert ok.recv()["ok"] is True
    ok.close()


# ---------------------------------------------------------------------------------------------- no pickle

#: Modules that turn bytes into arbitrary objects (code execution on load).
_UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}


def unsafe_deserialization(source: str, filename: str = "<src>") -> list[str]:
    """Places in `source` that can unpickle: imports of pickle-like modules, `yaml.load` without SafeLoader /
    `yaml.unsafe_load`, `torch.load` without `weights_only=True`, `numpy.load(..., allow_pickle=True)`."""
    hits: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            hits += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
            hits.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            name = node.func.attr
            kw = {k.arg: k.value for k in node.keywords}
            if base in _UNSAFE_MODULES and name in ("load", "loads", "Unpickler"):
                hits.append(f"{where}: {base}.{name}(")
            elif base == "yaml" and name in ("unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                hits.append(f"{where}: yaml.{name}(")
            elif base == "yaml" and name == "load" and "SafeLoader" not in ast.dump(kw.get("Loader", ast.Constant())):
                hits.append(f"{where}: yaml.load( without SafeLoader")
            elif base == "torch" and name == "load" and not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                hits.append(f"{where}: torch.load( without weights_only=True")
            elif base in ("np", "numpy") and name == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value is True:
                hits.append(f"{where}: numpy.load(allow_pickle=True)")
    return hits


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import pickle\nfrom cloudpickle import loads\nimport marshal\nx = pickle.loads(b'')\n"
           "y = marshal.loads(b'')\nimport yaml\nyaml.load(s)\nyaml.unsafe_load(s)\nimport torch\ntorch.load(f)\n"
           "import numpy as np\nnp.load(f, allow_pickle=True)\n")
    hits = unsafe_deserialization(bad)
    assert len(hits) == 9, hits
    ok = ("import msgpack\nimport yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
          "torch.load(f, weights_only=True)\nnp.load(f)\n# pickle.loads in a comment\ns = 'pickle.loads'\n")
    assert unsafe_deserialization(ok) == []


def test_kvlane_never_unpickles():
    files = [p for part in ("policy", "transport", "connector", "integration", "benchmarks", "examples", "scripts",
                            "tests")
             for p in (ROOT / part).rglob("*.py") if ".venv" not in p.parts]
    assert len(files) > 30
    hits = [h for p in files for h in unsafe_deserialization(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert hits == [], "kvlane must never unpickle (msgpack with schemas only):\n" + "\n".join(hits)


# ---------------------------------------------------------------------------------------------- binding


def test_loopback_detection():
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.0.0.5", "192.168.1.2", "example.com", "fe80::1"):
        assert not is_loopback(host), host
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", b"s") is None  # with a secret: authenticated, no warning
    assert "ALL interfaces" in (exposure_warning("0.0.0.0", None) or "")
    assert "'10.0.0.5'" in (exposure_warning("10.0.0.5", None) or "")


async def test_default_bind_is_loopback_and_quiet(caplog):
    svc = PolicyService(make_policy())
    with caplog.at_level(logging.WARNING, logger="kvlane.policy_service"):
        async with PolicyServer(svc) as srv:
            assert srv.host == "127.0.0.1" and srv.address.startswith("tcp://127.0.0.1:")
    assert "WITHOUT a shared secret" not in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
async def test_exposed_bind_without_secret_warns_loudly(host, caplog, monkeypatch):
    """Tests never bind a routable address: the bind itself is replaced; the warning comes before it."""
    bound: list[str] = []

    async def no_bind(_cb, h, _port, **_kw):
        bound.append(h)
        raise OSError("test: not binding a routable address")

    monkeypatch.setattr(asyncio, "start_server", no_bind)
    for secret, loud in ((None, True), (b"k", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvlane.policy_service"), pytest.raises(OSError, match="test:"):
            await PolicyServer(PolicyService(make_policy()), host, 0, secret=secret).start()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "WITHOUT" in r.getMessage()]
        assert bool(warnings) == loud, caplog.text
    assert bound == [host, host]


def test_cli_defaults_bind_loopback():
    """`kvlane policy serve` and `kvlane router serve` default to --host 127.0.0.1."""
    for mod in ("policy", "router"):
        tree = ast.parse((ROOT / "integration" / "cli" / f"{mod}.py").read_text(encoding="utf-8"))
        defaults = []
        for f in ast.walk(tree):
            if isinstance(f, ast.FunctionDef) and f.args.defaults:
                args = f.args.args[-len(f.args.defaults):]
                defaults += [d for a, d in zip(args, f.args.defaults, strict=True) if a.arg == "host"]
        assert defaults, f"no --host option found in integration/cli/{mod}.py"
        for d in defaults:  # typer.Option("127.0.0.1", ...)
            assert isinstance(d, ast.Call) and isinstance(d.args[0], ast.Constant) and d.args[0].value == "127.0.0.1"


def test_msgpack_is_the_only_codec_on_the_policy_wire():
    """The service's decoder is msgpack with str keys and no ext types: a pickle stream is garbage to it."""
    pickled = b"\x80\x04\x95\x17\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01v\x94K\x01\x8c\x02op\x94\x8c\x04ping\x94u."
    with pytest.raises(P.BadRequest):  # pickle.dumps({"v": 1, "op": "ping"}, protocol=4), as bytes
        P.decode_body(pickled, 1 << 20)
    with pytest.raises(P.BadRequest, match="ext type"):
        P.decode_body(msgpack.packb(msgpack.ExtType(1, b"x")), 1 << 20)
