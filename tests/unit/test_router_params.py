"""The router's request parsing refuses hostile bodies with a 400-class error, never an exception."""

import pytest
from kvlane.integration.router.params import BadRequest, parse_body


def test_deeply_nested_json_is_a_bad_request() -> None:
    raw = b'{"prompt": ' + b"[" * 3000 + b"1" + b"]" * 3000 + b"}"
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_body(raw, "completions", 8 << 20)
