"""Planner formulas against the seed's tables (§3–4) and the `kvlane plan` CLI."""

from __future__ import annotations

import json

import pytest
from kvlane.integration.cli import app
from kvlane.policy import planner
from typer.testing import CliRunner

GLM_51_CONFIG = {  # the fields of GLM-5.1's public config that size its KV latent cache
    "num_hidden_layers": 78, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "torch_dtype": "bfloat16",
    "num_attention_heads": 64, "hidden_size": 6144,
}


@pytest.mark.parametrize(
    ("inp", "out", "hit", "expected"),
    [
        (16_000, 8_000, 0.0, 0.64),  # 16/(3.14·8) = 0.6369
        (24_000, 6_000, 0.0, 1.27),  # 24/(3.14·6) = 1.2739
        (32_000, 4_000, 0.0, 2.55),  # 32/(3.14·4) = 2.5478
        (32_000, 6_000, 0.4, 1.15),  # Ī_eff = 32000·(0.6 + 0.4·0.26/1.4) = 21,577.1; /(3.14·6000) = 1.1453
    ],
)
def test_pd_ratio_matches_seed_table(inp, out, hit, expected):
    assert round(planner.pd_ratio(inp, out, cache_hit=hit).ratio, 2) == expected


def test_effective_input_with_cache_hit():
    # The seed says "≈21.6K"; exactly it is 21,577.14 (21.58K), which the seed rounds up: no disagreement
    # beyond rounding, and the ratio 1.1453 rounds to the seed's 1.15.
    eff = planner.effective_input_tokens(32_000, 0.4)
    assert eff == pytest.approx(32_000 * (0.6 + 0.4 * 0.26 / 1.4))
    assert round(eff, 2) == 21_577.14
    assert round(eff / 1000, 1) == 21.6


def test_headroom_scales_linearly():
    base = planner.pd_ratio(24_000, 6_000).ratio
    assert planner.pd_ratio(24_000, 6_000, headroom=1.2).ratio == pytest.approx(base * 1.2)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input_tokens": 1000, "output_tokens": 0}, "output_tokens"),
        ({"input_tokens": 1000, "output_tokens": 10, "cache_hit": 1.5}, "cache_hit"),
        ({"input_tokens": -1, "output_tokens": 10}, "input_tokens"),
        ({"input_tokens": 1000, "output_tokens": 10, "headroom": 0}, "headroom"),
    ],
)
def test_pd_ratio_bad_input_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        planner.pd_ratio(**kwargs)


def test_kv_bytes_mla_glm51():
    r = planner.kv_bytes_per_token(GLM_51_CONFIG)
    assert (r.kind, r.bytes_per_token) == ("mla", 89_856)  # 78 × (512 + 64) × 2
    # Seed §3 table: a 32K prompt is ~2.94 GB, ~370 MB per card at TP=8.
    assert round(r.bytes_per_token * 32_768 / 1e9, 2) == 2.94
    assert round(r.bytes_per_token * 32_768 / 8 / 1e6) == 368
    assert planner.kv_bytes_per_token(GLM_51_CONFIG, dtype="fp8").bytes_per_token == 44_928


def test_kv_bytes_standard_attention_from_file(tmp_path):
    # Llama-3-8B: 32 layers, 8 KV heads, head_dim 4096/32 = 128, bf16 → 32·2·8·128·2 = 131,072 B/token.
    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
           "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = planner.kv_bytes_per_token(str(path))
    assert (r.kind, r.bytes_per_token) == ("attention", 131_072)
    # No num_key_value_heads: multi-head attention, kv_heads = heads; fp32.
    mha = planner.kv_bytes_per_token({**cfg, "num_key_value_heads": None, "torch_dtype": "float32"})
    assert mha.bytes_per_token == 32 * 2 * 32 * 128 * 4


def test_kv_bytes_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        planner.kv_bytes_per_token({"kv_lora_rank": 512})
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        planner.kv_bytes_per_token({"num_hidden_layers": 2, "kv_lora_rank": 512})
    with pytest.raises(ValueError, match="unknown KV dtype 'int3'"):
        planner.kv_bytes_per_token(GLM_51_CONFIG, dtype="int3")
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        planner.kv_bytes_per_token(bad)
    with pytest.raises(ValueError, match="cannot read model config"):
        planner.kv_bytes_per_token(tmp_path / "missing.json")


def test_decode_pool_is_the_max_of_three():
    pool = planner.decode_pool_size(
        output_tokens_per_s=100_000, decode_tokens_per_s_per_engine=5_000,  # compute: 20
        active_sessions=1_000, context_tokens=64_000, kv_bytes_per_token=89_856,  # 5.75 TB of KV
        kv_capacity_bytes_per_engine=8 * 60e9,  # 480 GB per 8-GPU engine → memory: 12
        kv_ingress_bytes_per_s=400e9, ingress_bytes_per_s_per_engine=8 * 25e9)  # ingress: 2
    assert (pool.compute, pool.memory, pool.ingress) == (20, 12, 2)
    assert (pool.engines, pool.bound_by) == (20, "compute")


runner = CliRunner()


def test_cli_pd_ratio_json():
    res = runner.invoke(app, ["plan", "pd-ratio", "--input-tokens", "32000", "--output-tokens", "6000",
                              "--cache-hit", "0.4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["effective_input_tokens"] == pytest.approx(21_577.143, abs=1e-3)
    assert round(out["p_per_d"], 2) == 1.15


def test_cli_pd_ratio_table_and_error():
    res = runner.invoke(app, ["plan", "pd-ratio", "--input-tokens", "24000", "--output-tokens", "6000"])
    assert res.exit_code == 0 and "1.27:1" in res.stdout
    res = runner.invoke(app, ["plan", "pd-ratio", "--input-tokens", "24000", "--output-tokens", "0"])
    assert res.exit_code == 2 and "output_tokens must be > 0" in res.output


def test_cli_kv_bytes(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GLM_51_CONFIG))
    res = runner.invoke(app, ["plan", "kv-bytes", "--config", str(path), "--tokens", "32768", "--tp", "8",
                              "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["bytes_per_token"], out["bytes"], out["bytes_per_rank"]) == (89_856, 2_944_401_408, 368_050_176)
    res = runner.invoke(app, ["plan", "kv-bytes", "--layers", "78", "--kv-lora-rank", "512",
                              "--qk-rope-head-dim", "64", "--json"])
    assert json.loads(res.stdout)["bytes_per_token"] == 89_856
    res = runner.invoke(app, ["plan", "kv-bytes"])
    assert res.exit_code == 2 and "give --config" in res.output


def test_cli_decode_pool():
    # 1,000 sessions × 64K tokens × 89,856 B = 5.75 TB over 480 GB engines → 12; 100K tok/s over 5K → 20;
    # 3.2 Tbps of KV over 1.6 Tbps engines → 2.
    res = runner.invoke(app, ["plan", "decode-pool", "--output-tokens-per-s", "100000", "--decode-tokens-per-s",
                              "5000", "--sessions", "1000", "--context-tokens", "64000", "--kv-bytes-per-token",
                              "89856", "--kv-capacity-gb", "480", "--ingress-gbps", "3200",
                              "--engine-ingress-gbps", "1600", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"compute": 20, "memory": 12, "ingress": 2, "engines": 20,
                                      "bound_by": "compute"}
    res = runner.invoke(app, ["plan", "decode-pool", "--output-tokens-per-s", "1", "--decode-tokens-per-s", "0",
                              "--sessions", "1", "--context-tokens", "1", "--kv-bytes-per-token", "1",
                              "--kv-capacity-gb", "1", "--ingress-gbps", "1", "--engine-ingress-gbps", "1"])
    assert res.exit_code == 2 and "decode_tokens_per_s_per_engine must be > 0" in res.output
