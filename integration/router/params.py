"""What the router does to one OpenAI request body, as pure functions: validate it, find its session,
estimate its prompt tokens, build the one `kv_transfer_params` object both engines get, and derive the
prefill engine's copy (`max_tokens=1`, not streamed). Runs in the router process; no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Literal

#: completions = /v1/completions, chat = /v1/chat/completions, generate = SGLang's native /generate.
Endpoint = Literal["completions", "chat", "generate"]

#: The fields of `kv_transfer_params` that kvlane owns; a client may not set any of them.
KVLANE_FIELDS = ("kvlane", "transfer_id", "session_id", "prefill", "decode", "policy", "role")
#: Body fields a prefill copy must not carry (it returns one token, not streamed, one choice).
_PREFILL_DROP = ("stream_options", "max_completion_tokens", "min_tokens", "best_of")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/@\-]{1,200}$")
#: Characters per token for the estimate given to the policy (English text with BPE tokenizers: ~4).
CHARS_PER_TOKEN = 4


class BadRequest(ValueError):
    """A client error; `str()` is the message returned with HTTP 400."""


def parse_body(raw: bytes, endpoint: Endpoint, max_bytes: int) -> dict[str, Any]:
    """Decode and check the client's JSON body: an object with a non-empty `prompt` (completions),
    `messages` (chat) or `text` / `input_ids` (generate)."""
    if len(raw) > max_bytes:
        raise BadRequest(f"request body of {len(raw)} bytes exceeds the router's {max_bytes}-byte limit")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    if endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise BadRequest("missing field 'prompt'")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, (str, list)) and len(prompt) == 0):
            raise BadRequest("field 'prompt' must be a non-empty string or list")
        if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(t, int) for t in prompt):
            # A batch would make the engine run several requests under one transfer id (one bootstrap room).
            raise BadRequest(f"field 'prompt' holds a batch of {len(prompt)} prompts: the P/D router serves one "
                             "prompt per request (send them as separate requests)")
    elif endpoint == "generate":
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise BadRequest("exactly one of the fields 'text' and 'input_ids' is required")
        if text is not None and (not isinstance(text, str) or not text):
            raise BadRequest("field 'text' must be a non-empty string (the P/D router serves one prompt per "
                             "request, no batches)")
        if ids is not None and (not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids)):
            raise BadRequest("field 'input_ids' must be a non-empty list of integers (the P/D router serves one "
                             "prompt per request, no batches)")
        sampling = body.get("sampling_params", {})
        if not isinstance(sampling, dict):
            raise BadRequest("field 'sampling_params' must be an object")
        if sampling.get("n", 1) != 1:
            raise BadRequest(f"field 'sampling_params.n'={sampling['n']!r}: the P/D router serves one choice per "
                             "request (n=1)")
    else:
        messages = body.get("messages")
        if messages is None:
            raise BadRequest("missing field 'messages'")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise BadRequest(f"messages[{i}] must be an object with a 'role'")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("field 'stream' must be true or false")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest(f"field 'n'={n!r}: the P/D router serves one choice per request (n=1)")
    if "max_tokens" in body and (not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1):
        raise BadRequest("field 'max_tokens' must be an integer >= 1")
    client_kv_params(body)  # validate early
    return body


def client_kv_params(body: dict[str, Any]) -> dict[str, Any]:
    """The client's own `kv_transfer_params` (passed through), refusing any field kvlane owns."""
    params = body.get("kv_transfer_params")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"field 'kv_transfer_params' must be an object, got {type(params).__name__}")
    owned = [k for k in KVLANE_FIELDS if k in params]
    if owned:
        raise BadRequest(
            f"kv_transfer_params.{owned[0]} is set by the router and may not come from the client "
            f"(kvlane's fields: {', '.join(KVLANE_FIELDS)})"
        )
    return dict(params)


def request_id(header: str | None) -> str | None:
    """The client's `x-request-id` (passed to both engines and echoed back), or None when absent; it must be
    1..256 visible ASCII characters."""
    if header is None:
        return None
    if not 0 < len(header) <= 256 or not all("!" <= c <= "~" for c in header):
        raise BadRequest("header 'x-request-id' must be 1 to 256 visible ASCII characters (no spaces)")
    return header


def session_id(header: str | None, body: dict[str, Any]) -> str | None:
    """The session a request belongs to: header `x-session-id`, else the body's `user`, else None.
    Values that are not policy names (spaces, >200 chars, ...) are mapped to a stable `s-<sha256 prefix>`,
    so any client string works and the same string always lands on the same session."""
    raw = header if header else body.get("user")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise BadRequest(f"field 'user' must be a string, got {type(raw).__name__}")
    if _NAME_RE.match(raw):
        return raw
    return "s-" + hashlib.sha256(raw.encode()).hexdigest()[:24]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def estimate_prompt_tokens(body: dict[str, Any], endpoint: Endpoint) -> int:
    """Tokens the prompt will take, for the policy's Tkv estimate: a list of token ids counts exactly,
    text counts ceil(chars / 4) (no round trip to an engine's /tokenize on the request path)."""
    if endpoint == "generate":
        if body.get("input_ids") is not None:
            return len(body["input_ids"])
        chars = len(body["text"])
    elif endpoint == "completions":
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if isinstance(prompt, list):
            if all(isinstance(p, list) for p in prompt):
                return sum(len(p) for p in prompt)
            chars = sum(len(p) for p in prompt if isinstance(p, str))
        else:
            chars = len(prompt)
    else:
        chars = sum(len(_text_of(m.get("content"))) + 8 for m in body["messages"])  # + role/template tokens
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def kvlane_params(
    *, transfer_id: str, session: str | None, prefill: str, decode: str, policy: str
) -> dict[str, Any]:
    """The one object both engines receive (each with its `role` added)."""
    return {
        "kvlane": 1,
        "transfer_id": transfer_id,
        "session_id": session,
        "prefill": prefill,
        "decode": decode,
        "policy": policy,
    }


def decode_body(body: dict[str, Any], params: dict[str, Any], client_params: dict[str, Any]) -> dict[str, Any]:
    """The decode engine's request: the client's, with kvlane's params (role "decode")."""
    out = dict(body)
    out["kv_transfer_params"] = {**client_params, **params, "role": "decode"}
    return out


def prefill_body(body: dict[str, Any], params: dict[str, Any], client_params: dict[str, Any]) -> dict[str, Any]:
    """The prefill engine's request: same prompt, one token, not streamed, kvlane's params (role "prefill")."""
    out = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    out["max_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = {**client_params, **params, "role": "prefill"}
    return out


def pair_header(prefill: str, decode: str, score: float, sticky: bool, locality: str) -> str:
    """The `x-kvlane-pair` response header: which pair served the request and its score."""
    return f"p={prefill}; d={decode}; score={score:.6g}; sticky={'1' if sticky else '0'}; locality={locality}"
