"""Wire types: msgpack round trip, and clear refusals that name the field."""

import msgpack
import pytest
from kvlane.policy.types import LeaseRequest, PairRequest, SchemaError, TransferOutcome


def test_round_trip() -> None:
    req = LeaseRequest(transfer_id="t1", prefill="p0", decode="d0", bytes=4096)
    assert LeaseRequest.from_msgpack(req.to_msgpack()) == req


def test_wrong_type_names_field() -> None:
    data = msgpack.packb({"transfer_id": "t1", "prefill": "p0", "decode": "d0", "bytes": "many"})
    with pytest.raises(SchemaError, match="bytes"):
        LeaseRequest.from_msgpack(data)


def test_unknown_field_refused() -> None:
    data = msgpack.packb({"request_id": "r", "evil": 1})
    with pytest.raises(SchemaError, match="evil"):
        PairRequest.from_msgpack(data)


def test_garbage_and_oversize_refused() -> None:
    with pytest.raises(SchemaError, match="not valid msgpack"):
        PairRequest.from_msgpack(b"\xc1\xc1\xc1")
    with pytest.raises(SchemaError, match="exceeds"):
        PairRequest.from_msgpack(b"\x80" * 100, max_bytes=10)
    with pytest.raises(SchemaError, match="expected a map"):
        PairRequest.from_msgpack(msgpack.packb([1, 2]))


def test_negative_and_nan_refused() -> None:
    with pytest.raises(SchemaError, match="seconds"):
        TransferOutcome.from_wire({"lease_id": "l", "ok": True, "bytes": 1, "seconds": float("nan")})
    with pytest.raises(SchemaError, match="bytes"):
        TransferOutcome.from_wire({"lease_id": "l", "ok": True, "bytes": -1, "seconds": 0.1})
