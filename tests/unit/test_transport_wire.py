"""kvlane.transport pieces without a peer: wire limits and schemas, coalescing, memory regions from
numpy and torch (no .numpy()), config validation."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from kvlane.transport import BlockCopy, PathConfig, TransportConfig, coalesce
from kvlane.transport.memory import as_region, span
from kvlane.transport.types import dst_intervals
from kvlane.transport.wire import (
    MAX_CONTROL_BYTES,
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    Offer,
    PathAddress,
    RegionInfo,
    WireError,
    decode_control,
)
from pydantic import ValidationError


def desc(**kw: object) -> Descriptor:
    base = dict(engine_id="P-1", rank=0, tp_size=1, backend="tcp", paths={"tcp": PathAddress(host="127.0.0.1", port=9)},
                regions=[RegionInfo(dtype="float16", block_shape=[2, 4, 16], block_bytes=256, num_blocks=4, nbytes=1024)])
    base.update(kw)
    return Descriptor(**base)


def test_descriptor_round_trip_and_key() -> None:
    d = desc()
    assert Descriptor.from_msgpack(d.to_msgpack()) == d
    assert d.key == "P-1/rank0"


def test_descriptor_limits_and_schema_errors_name_the_field() -> None:
    with pytest.raises(WireError, match="exceeds the 65536-byte limit"):
        Descriptor.from_msgpack(b"\x00" * (MAX_DESCRIPTOR_BYTES + 1))
    with pytest.raises(WireError, match="not valid msgpack"):
        Descriptor.from_msgpack(b"\xc1")
    bad = desc().model_dump()
    bad["rank"] = -1
    with pytest.raises(WireError, match="rank"):
        Descriptor.from_msgpack(msgpack.packb(bad))
    bad = desc().model_dump()
    bad["extra"] = 1
    with pytest.raises(WireError, match="extra"):
        Descriptor.from_msgpack(msgpack.packb(bad))


def test_control_messages_validate() -> None:
    o = Offer(tid="req-1", sender="P-1/rank0", runs=[(0, 0, 256)], tag_base=1 << 20, wait_s=2.0)
    assert decode_control(o.to_msgpack()) == o
    with pytest.raises(WireError, match="runs"):
        decode_control(msgpack.packb({"t": "offer", "tid": "x", "sender": "s", "runs": [], "wait_s": 1.0}))
    with pytest.raises(WireError, match="nbytes"):
        decode_control(msgpack.packb({"t": "done", "tid": "x", "nbytes": -5}))
    with pytest.raises(WireError, match="does not match any of the expected tags"):
        decode_control(msgpack.packb({"t": "put"}))
    with pytest.raises(WireError, match="limit"):
        decode_control(b"\x00" * (MAX_CONTROL_BYTES + 1))


def test_coalesce_merges_only_runs_contiguous_on_both_sides() -> None:
    copies = [BlockCopy(0, 0, 100, 10), BlockCopy(0, 10, 110, 10), BlockCopy(0, 20, 200, 10),
              BlockCopy(1, 30, 210, 10), BlockCopy(1, 40, 220, 5)]
    assert coalesce(copies) == [BlockCopy(0, 0, 100, 20), BlockCopy(0, 20, 200, 10), BlockCopy(1, 30, 210, 15)]


def test_dst_intervals_normalise_and_refuse_overlap() -> None:
    assert dst_intervals([(0, 10, 5), (0, 0, 10), (1, 0, 3)]) == [(0, 0, 15), (1, 0, 3)]
    with pytest.raises(ValueError, match="overlap"):
        dst_intervals([(0, 0, 10), (0, 5, 10)])
    with pytest.raises(ValueError, match="nbytes > 0"):
        BlockCopy(0, 0, 0, 0)


def test_region_from_numpy_and_span_is_zero_copy() -> None:
    a = np.zeros((4, 2, 8), np.float32)
    r = as_region(a)
    assert (r.num_blocks, r.block_bytes, r.dtype, r.device) == (4, 64, "float32", "cpu")
    assert r.fingerprint() == {"dtype": "float32", "block_shape": [2, 8], "block_bytes": 64}
    v = span(r, 64, 64)
    v[:] = 0xFF
    assert a.view(np.uint8)[1].all() and not a.view(np.uint8)[0].any() and not a.view(np.uint8)[2:].any()
    with pytest.raises(ValueError, match="outside the region"):
        span(r, 200, 64)
    with pytest.raises(ValueError, match="C-contiguous"):
        as_region(np.zeros((4, 8), np.float32)[:, ::2])
    ro = np.zeros((2, 2))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        as_region(ro)
    with pytest.raises(TypeError, match="cannot register"):
        as_region([1, 2, 3])


def test_region_from_torch_tensor_without_numpy_conversion() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros((3, 4), dtype=torch.bfloat16)
    r = as_region(t)
    assert (r.dtype, r.nbytes, r.block_bytes, r.device) == ("bfloat16", 24, 8, "cpu")
    span(r, 8, 8)[:] = 0x3F  # bytes 0x3F3F = bf16 0.7461 in block 1
    assert float(t[1, 0]) == pytest.approx(0.74609375)
    assert float(t[0].abs().sum()) == 0.0 and float(t[2].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="contiguous"):
        as_region(torch.zeros((4, 4)).t())


def test_config_validation() -> None:
    assert set(TransportConfig().paths) == {"shm", "tcp"}
    with pytest.raises(ValidationError, match="without the UCX_ prefix"):
        PathConfig(ucx={"UCX_TLS": "tcp"})
    with pytest.raises(ValidationError, match="path name"):
        TransportConfig(paths={"bad name": PathConfig()})
    with pytest.raises(ValidationError):
        TransportConfig(backend="rdma")


def test_auto_backend_and_bad_deadlines() -> None:
    import importlib.util

    import numpy as np
    from kvlane.transport import KVTransport

    want = "ucx" if importlib.util.find_spec("ucxx") else "tcp"
    with KVTransport("E", 0, TransportConfig(paths={"tcp": PathConfig()})) as t:
        assert t.backend == want
        t.register_regions([np.zeros((2, 8), np.uint8)])
        assert Descriptor.from_msgpack(t.descriptor()).backend == want
        with pytest.raises(ValueError, match="deadline_s must be a positive"):
            t.expect("x", [BlockCopy(0, 0, 0, 8)], 0)
        with pytest.raises(ValueError, match="outside|past our region"):
            t.expect("x", [BlockCopy(0, 0, 8, 16)], 1.0)
    with pytest.raises(Exception, match="closed"):
        t.expect("x", [BlockCopy(0, 0, 0, 8)], 1.0)


def test_oversized_offer_refused_by_the_sender() -> None:
    from kvlane.transport.wire import MAX_RUNS, encode_control

    big = 1 << 40  # offsets past 4 GiB take 9 bytes each in msgpack
    runs = [(300, big + 2 * i * big, big) for i in range(MAX_RUNS)]
    with pytest.raises(WireError, match="over the 1048576-byte control limit"):
        encode_control(Offer(tid="t", sender="s", runs=runs, wait_s=1.0))
    assert len(encode_control(Offer(tid="t", sender="s", runs=runs[:10], wait_s=1.0))) < 400
