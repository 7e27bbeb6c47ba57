"""The router's request parsing refuses hostile bodies with a 400-class error, never an exception."""

import json

import pytest
from kvlane.integration.router.params import BadRequest, estimate_prompt_tokens, parse_body


def test_deeply_nested_json_is_a_bad_request() -> None:
    raw = b'{"prompt": ' + b"[" * 3000 + b"1" + b"]" * 3000 + b"}"
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_body(raw, "completions", 8 << 20)


def test_one_prompt_per_request_batches_are_refused() -> None:
    for one in (["one prompt"], [1, 2, 3], [[1, 2, 3]]):
        assert parse_body(json.dumps({"prompt": one}).encode(), "completions", 1 << 20)["prompt"] == one
    with pytest.raises(BadRequest, match="a batch of 3 prompts"):
        parse_body(b'{"prompt": ["a", [1], "c"]}', "completions", 1 << 20)


def test_generate_prompt_tokens_are_exact_for_ids_and_chars_over_4_for_text() -> None:
    assert estimate_prompt_tokens({"input_ids": [5] * 37}, "generate") == 37
    assert estimate_prompt_tokens({"text": "x" * 9}, "generate") == 3
