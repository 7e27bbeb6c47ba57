"""`kvlane plan ...`: capacity planning from the seed's formulas (P:D ratio, KV bytes per token).

Runs in the user's shell process only; all arithmetic lives in `kvlane.policy.planner`. Prints a table, or
JSON with `--json`; bad input exits with status 2 and a message naming what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from kvlane.policy import planner
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command("pd-ratio")
def pd_ratio_cmd(
    input_tokens: float = typer.Option(..., "--input-tokens", help="Average prompt tokens (Ī)."),
    output_tokens: float = typer.Option(..., "--output-tokens", help="Average generated tokens (Ō)."),
    cache_hit: float = typer.Option(0.0, "--cache-hit", help="Prompt cache hit ratio H, 0..1."),
    headroom: float = typer.Option(1.0, "--headroom", help="TTFT/SLO headroom h (1.1–1.2 on ZCube)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """P/D ≈ Ī_eff / (3.14·Ō) · h, with Ī_eff = Ī·[(1−H) + H·0.26/1.4] (seed §4)."""
    try:
        r = planner.pd_ratio(input_tokens, output_tokens, cache_hit, headroom)
    except ValueError as exc:
        _fail(str(exc))
        return
    out = {"input_tokens": r.input_tokens, "output_tokens": r.output_tokens, "cache_hit": r.cache_hit,
           "headroom": r.headroom, "effective_input_tokens": round(r.effective_input_tokens, 3),
           "p_per_d": round(r.ratio, 4)}
    if as_json:
        typer.echo(json.dumps(out))
        return
    table = Table(title="P:D ratio (seed §4)")
    for col in ("input", "output", "cache hit", "headroom", "effective input", "P:D"):
        table.add_column(col, justify="right")
    table.add_row(f"{r.input_tokens:g}", f"{r.output_tokens:g}", f"{r.cache_hit:g}", f"{r.headroom:g}",
                  f"{r.effective_input_tokens:,.1f}", f"{r.ratio:.2f}:1")
    Console().print(table)


@app.command("kv-bytes")
def kv_bytes_cmd(
    config: Annotated[Path | None, typer.Option("--config", help="HF-style config.json of the model.")] = None,
    layers: int | None = typer.Option(None, "--layers", help="num_hidden_layers (instead of --config)."),
    kv_lora_rank: int | None = typer.Option(None, "--kv-lora-rank", help="MLA latent rank."),
    qk_rope_head_dim: int | None = typer.Option(None, "--qk-rope-head-dim", help="MLA rope dim."),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="num_key_value_heads (attention)."),
    head_dim: int | None = typer.Option(None, "--head-dim", help="head_dim (attention)."),
    dtype: str | None = typer.Option(None, "--dtype", help="KV dtype: bf16, fp16, fp8, fp32."),
    tokens: int | None = typer.Option(None, "--tokens", help="Also print the KV bytes of this many tokens."),
    tp: int = typer.Option(1, "--tp", min=1, help="TP size, for the per-rank share."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """KV bytes per token: MLA layers×(kv_lora_rank+qk_rope_head_dim)×B, else layers×2×kv_heads×head_dim×B."""
    cfg: dict | Path
    if config is not None:
        cfg = config
    else:
        if layers is None:
            _fail("give --config config.json, or --layers with --kv-lora-rank/--qk-rope-head-dim "
                  "(MLA) or --kv-heads/--head-dim (attention)")
            return
        cfg = {"num_hidden_layers": layers}
        if kv_lora_rank is not None:
            cfg.update(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
        else:
            cfg.update(num_attention_heads=kv_heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    try:
        r = planner.kv_bytes_per_token(cfg, dtype=dtype)
    except ValueError as exc:
        _fail(str(exc))
        return
    out: dict = {"bytes_per_token": r.bytes_per_token, "kind": r.kind, "formula": r.formula}
    if tokens is not None:
        out["tokens"] = tokens
        out["bytes"] = r.bytes_per_token * tokens
        out["bytes_per_rank"] = r.bytes_per_token * tokens // tp
    if as_json:
        typer.echo(json.dumps(out))
        return
    table = Table(title="KV bytes per token")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("kind", r.kind)
    table.add_row("formula", r.formula)
    table.add_row("bytes/token", f"{r.bytes_per_token:,}")
    if tokens is not None:
        table.add_row(f"{tokens:,} tokens", f"{out['bytes']:,} B ({out['bytes'] / 1e9:.2f} GB)")
        table.add_row(f"per rank (TP={tp})", f"{out['bytes_per_rank']:,} B ({out['bytes_per_rank'] / 1e6:.0f} MB)")
    Console().print(table)


@app.command("decode-pool")
def decode_pool_cmd(
    output_tokens_per_s: float = typer.Option(..., "--output-tokens-per-s", help="Generated tokens/s, whole pool."),
    decode_tokens_per_s: float = typer.Option(..., "--decode-tokens-per-s", help="Tokens/s one D engine generates."),
    sessions: int = typer.Option(..., "--sessions", help="Active sessions whose KV D must hold."),
    context_tokens: float = typer.Option(..., "--context-tokens", help="Average context per session."),
    kv_bytes_per_token: int = typer.Option(..., "--kv-bytes-per-token", help="From `kvlane plan kv-bytes`."),
    kv_capacity_gb: float = typer.Option(..., "--kv-capacity-gb", help="KV memory of one D engine, GB."),
    ingress_gbps: float = typer.Option(..., "--ingress-gbps", help="KV arriving from the P pool, Gbps."),
    engine_ingress_gbps: float = typer.Option(..., "--engine-ingress-gbps", help="NIC Gbps of one D engine."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """N_D = max(decode compute, KV memory, KV ingress) (seed §4)."""
    try:
        pool = planner.decode_pool_size(
            output_tokens_per_s=output_tokens_per_s, decode_tokens_per_s_per_engine=decode_tokens_per_s,
            active_sessions=sessions, context_tokens=context_tokens, kv_bytes_per_token=kv_bytes_per_token,
            kv_capacity_bytes_per_engine=kv_capacity_gb * 1e9, kv_ingress_bytes_per_s=ingress_gbps * 1e9 / 8,
            ingress_bytes_per_s_per_engine=engine_ingress_gbps * 1e9 / 8)
    except ValueError as exc:
        _fail(str(exc))
        return
    out = {"compute": pool.compute, "memory": pool.memory, "ingress": pool.ingress, "engines": pool.engines,
           "bound_by": pool.bound_by}
    if as_json:
        typer.echo(json.dumps(out))
        return
    table = Table(title="Decode pool size N_D (seed §4)")
    for col in ("compute", "memory", "ingress", "N_D", "bound by"):
        table.add_column(col, justify="right")
    table.add_row(str(pool.compute), str(pool.memory), str(pool.ingress), str(pool.engines), pool.bound_by)
    Console().print(table)
