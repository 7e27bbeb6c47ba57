"""Capacity-planning formulas from the seed (§3–4): P:D ratio, KV bytes per token, decode pool size.

Owned by `kvlane.policy`; used by the `kvlane plan` CLI and by anyone sizing a deployment. Pure arithmetic on
its arguments (plus reading a model's config.json when given a path); never touches the network.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Output/input price ratio used as the decode-vs-prefill cost proxy (GLM-5.1: $4.4 / $1.4 per MTok).
OUTPUT_INPUT_COST_RATIO = 3.14
#: Cached-input / input price ratio (GLM-5.1: $0.26 / $1.4): what a cache hit still costs the P pool.
CACHED_INPUT_COST_RATIO = 0.26 / 1.4

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "float8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
}


@dataclass(frozen=True)
class PDRatio:
    input_tokens: float
    output_tokens: float
    cache_hit: float
    headroom: float
    effective_input_tokens: float
    ratio: float  # P engines per D engine


def effective_input_tokens(input_tokens: float, cache_hit: float = 0.0) -> float:
    """Ī_eff = Ī·[(1−H) + H·0.26/1.4]: cache hits still cost the prefill pool their cached-input share."""
    if input_tokens < 0:
        raise ValueError(f"input_tokens must be >= 0, got {input_tokens}")
    if not 0.0 <= cache_hit <= 1.0:
        raise ValueError(f"cache_hit must be in 0..1, got {cache_hit}")
    return input_tokens * ((1 - cache_hit) + cache_hit * CACHED_INPUT_COST_RATIO)


def pd_ratio(input_tokens: float, output_tokens: float, cache_hit: float = 0.0,
             headroom: float = 1.0) -> PDRatio:
    """P/D ≈ Ī_eff / (3.14·Ō) · h (seed §4)."""
    if output_tokens <= 0:
        raise ValueError(f"output_tokens must be > 0, got {output_tokens}")
    if headroom <= 0:
        raise ValueError(f"headroom must be > 0, got {headroom}")
    eff = effective_input_tokens(input_tokens, cache_hit)
    return PDRatio(input_tokens=input_tokens, output_tokens=output_tokens, cache_hit=cache_hit,
                   headroom=headroom, effective_input_tokens=eff,
                   ratio=eff / (OUTPUT_INPUT_COST_RATIO * output_tokens) * headroom)


@dataclass(frozen=True)
class KVBytes:
    bytes_per_token: int
    kind: str  # "mla" | "attention"
    formula: str


def _dtype_bytes(cfg: Mapping[str, Any], override: str | int | None) -> tuple[int, str]:
    name: Any = override if override is not None else (
        cfg.get("kv_cache_dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if isinstance(name, int) and not isinstance(name, bool):
        if name not in (1, 2, 4):
            raise ValueError(f"dtype bytes must be 1, 2 or 4, got {name}")
        return name, f"{name}B"
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {name!r} (known: {', '.join(sorted(_DTYPE_BYTES))})")
    return _DTYPE_BYTES[key], key


def _positive_int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"model config: {key!r} must be a positive integer, got {value!r}")
    return value


def kv_bytes_per_token(config: Mapping[str, Any] | str | os.PathLike[str],
                       dtype: str | int | None = None) -> KVBytes:
    """KV bytes one token occupies across all layers (whole model, all TP ranks together).

    MLA (config has `kv_lora_rank`): layers × (kv_lora_rank + qk_rope_head_dim) × dtype bytes (one latent per
    layer). Standard/GQA attention: layers × 2 (K and V) × num_key_value_heads × head_dim × dtype bytes,
    head_dim defaulting to hidden_size / num_attention_heads. `config` is a HF-style config dict or a path to
    config.json; a nested `text_config` is used when present. `dtype` overrides the config's dtype."""
    if isinstance(config, (str, os.PathLike)):
        where = os.fspath(config)
        try:
            with open(where, encoding="utf-8") as f:
                config = json.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read model config {where!r}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config {where!r} is not JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"model config must be a JSON object, got {type(config).__name__}")
    cfg: Mapping[str, Any] = config
    if isinstance(cfg.get("text_config"), Mapping) and "num_hidden_layers" not in cfg:
        cfg = cfg["text_config"]
    layers = _positive_int(cfg, "num_hidden_layers")
    nbytes, dname = _dtype_bytes(cfg, dtype)
    if cfg.get("kv_lora_rank"):
        rank = _positive_int(cfg, "kv_lora_rank")
        rope = _positive_int(cfg, "qk_rope_head_dim")
        return KVBytes(layers * (rank + rope) * nbytes, "mla",
                       f"{layers} layers × ({rank} kv_lora_rank + {rope} qk_rope_head_dim) × {nbytes} B ({dname})")
    heads = _positive_int(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0:
        raise ValueError(f"model config: 'num_key_value_heads' must be a positive integer, got {kv_heads!r}")
    if cfg.get("head_dim"):
        head_dim = _positive_int(cfg, "head_dim")
    else:
        hidden = _positive_int(cfg, "hidden_size")
        if hidden % heads:
            raise ValueError(f"model config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    return KVBytes(layers * 2 * kv_heads * head_dim * nbytes, "attention",
                   f"{layers} layers × 2 (K,V) × {kv_heads} kv_heads × {head_dim} head_dim × {nbytes} B ({dname})")


@dataclass(frozen=True)
class DecodePool:
    compute: int
    memory: int
    ingress: int

    @property
    def engines(self) -> int:
        return max(self.compute, self.memory, self.ingress)

    @property
    def bound_by(self) -> str:
        return max(("compute", self.compute), ("memory", self.memory), ("ingress", self.ingress),
                   key=lambda t: t[1])[0]


def decode_pool_size(*, output_tokens_per_s: float, decode_tokens_per_s_per_engine: float,
                     active_sessions: int, context_tokens: float, kv_bytes_per_token: int,
                     kv_capacity_bytes_per_engine: float, kv_ingress_bytes_per_s: float,
                     ingress_bytes_per_s_per_engine: float) -> DecodePool:
    """N_D = max(N_compute, N_memory, N_ingress) (seed §4): enough D engines to generate the output tokens,
    to hold every active session's KV, and to absorb the KV arriving from the P pool."""
    for name, value in (("decode_tokens_per_s_per_engine", decode_tokens_per_s_per_engine),
                        ("kv_capacity_bytes_per_engine", kv_capacity_bytes_per_engine),
                        ("ingress_bytes_per_s_per_engine", ingress_bytes_per_s_per_engine)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return DecodePool(
        compute=math.ceil(output_tokens_per_s / decode_tokens_per_s_per_engine),
        memory=math.ceil(active_sessions * context_tokens * kv_bytes_per_token / kv_capacity_bytes_per_engine),
        ingress=math.ceil(kv_ingress_bytes_per_s / ingress_bytes_per_s_per_engine),
    )
