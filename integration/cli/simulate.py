"""`kvlane simulate ...`: run the flow-level simulator (`kvlane.policy.sim`) — one policy, or every policy side by
side — on a fabric and a workload, and print a table (rich), JSON, and optionally PNG plots.

Runs in the user's shell process only; all simulation lives in `kvlane.policy.sim`. Bad input exits with
status 2 and a message naming what is wrong.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.sim import (
    POLICIES,
    PROFILES,
    CostModel,
    SimConfig,
    SimError,
    WorkloadError,
    load_trace,
    plot,
    render_table,
    simulate,
)
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Flow-level simulator of the policy on a fabric.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _pd(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"expected P:D such as 3:2, got {text!r}") from None
    if p < 1 or d < 1:
        raise typer.BadParameter(f"both sides of P:D must be >= 1, got {text!r}")
    return p, d


def _run(policies: list[str], *, topology: str, workload: str, trace: str | None, load: float, requests: int,
         seed: int, arrivals: str, burst: float, credits: bool | None, max_streams: int | None,
         link_scale: float, pd_ratio: str, sticky: bool, kv_bytes_per_token: int | None,
         prefill_tps: float | None, want_timeline: bool, decode_tps: float | None = None,
         decode_kv_gib: float | None = None, fail: list[str] | None = None, relay: str = "nvlink",
         lease_retry: str = "wakeup", ecmp: str = "per-hop") -> list[Any]:
    from kvlane.policy.sim.failure import RELAYS, degrade, parse_failures
    from kvlane.policy.topology import TopologyError, load_topology

    for p in policies:
        if p not in POLICIES:
            _fail(f"unknown policy {p!r}; choose one of {', '.join(POLICIES)}")
    try:
        topo = load_topology(topology)
    except (TopologyError, ValueError, OSError) as exc:
        _fail(f"--topology {topology!r}: {exc}")
    if relay not in RELAYS:
        _fail(f"--relay must be one of {', '.join(RELAYS)}, got {relay!r}")
    if lease_retry not in ("wakeup", "poll"):
        _fail(f"--lease-retry must be wakeup or poll, got {lease_retry!r}")
    if ecmp not in ("per-hop", "listed"):
        _fail(f"--ecmp must be per-hop or listed, got {ecmp!r}")
    if fail:
        try:
            switches, links = parse_failures(fail)
            topo = degrade(topo, switches, links, relay=relay)  # type: ignore[arg-type]
        except TopologyError as exc:
            _fail(f"--fail: {exc}")
    cost_kw: dict[str, Any] = {}
    if kv_bytes_per_token is not None:
        cost_kw["kv_bytes_per_token"] = kv_bytes_per_token
    if prefill_tps is not None:
        cost_kw["prefill_tokens_per_s"] = prefill_tps
    if decode_tps is not None:
        cost_kw["decode_tokens_per_s"] = decode_tps
    if decode_kv_gib is not None:
        cost_kw["decode_kv_bytes"] = int(decode_kv_gib * (1 << 30))
    try:
        cfg = SimConfig(cost=CostModel(**cost_kw), pd_ratio=_pd(pd_ratio), link_scale=link_scale,
                        sticky_sessions=sticky, record_timeline=want_timeline,
                        lease_retry=lease_retry)  # type: ignore[arg-type]
        pcfg = PolicyConfig(credits=CreditConfig(max_streams=max_streams)) if max_streams else None
        wl: Any = load_trace(trace) if trace else workload
        if not trace and workload not in PROFILES:
            _fail(f"unknown --workload {workload!r}; choose one of {', '.join(PROFILES)} (or give --trace FILE)")
        return [simulate(topo, p, workload=wl, load=load, requests=requests, seed=seed, arrivals=arrivals,
                         burst_size=burst, credits=credits, config=cfg, policy_config=pcfg, ecmp=ecmp)
                for p in policies]
    except (SimError, WorkloadError, ValueError) as exc:
        _fail(str(exc))
    return []


_TOPO = typer.Option("fattree:k=8,oversub=4,gpus_per_node=2,tiles=3:2", "--topology", "-t",
                     help="Generator spec (zcube:n=..,k=.., fattree:k=..,oversub=.., roft:..., railfly:..., "
                          "railfabric:..., loopback:gpus=N) or a YAML file.")
_WL = typer.Option("coding-agent", "--workload", "-w", help=f"Profile: {', '.join(PROFILES)}.")
_TRACE = typer.Option(None, "--trace", help="JSONL trace file (fields: docs/simulator.md) instead of a profile.")
_LOAD = typer.Option(0.7, "--load", help="Offered load, fraction of the prefill pool's first-turn capacity.")
_REQ = typer.Option(300, "--requests", "-n", min=1, help="Requests (turns) to simulate.")
_SEED = typer.Option(0, "--seed", help="Random seed (workload and random baselines).")
_ARR = typer.Option("poisson", "--arrivals", help="poisson | bursty (clumps of sessions at one instant).")
_BURST = typer.Option(8.0, "--burst", help="Mean sessions per clump with --arrivals bursty.")
_CRED = typer.Option(None, "--credits/--no-credits",
                     help="Force credits on/off (default: kvlane on, baselines off).")
_MS = typer.Option(None, "--max-streams", min=1, max=64, help="D ingress streams per decode engine (credits).")
_LS = typer.Option(1.0, "--link-scale", help="Multiply every link's bandwidth (e.g. 0.25).")
_PD = typer.Option("3:2", "--pd-ratio", help="Prefill:decode engines when the topology has no role hints.")
_STICKY = typer.Option(True, "--sticky/--no-sticky", help="Give the policy session ids (sticky sessions).")
_BPT = typer.Option(None, "--kv-bytes-per-token", help="KV bytes per token per engine (default GLM-5.1 89,856).")
_PTPS = typer.Option(None, "--prefill-tps", help="Prefill tokens/s per engine (default 20,000).")
_DTPS = typer.Option(None, "--decode-tps", help="Decode tokens/s per sequence (default 50).")
_DKV = typer.Option(None, "--decode-kv-gib", help="KV memory per decode engine, GiB (default 400).")
_PLOT = typer.Option(None, "--plot", help="Write PNG plots (CDFs, link-utilisation heat map) here.")
_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
_FAIL = typer.Option(None, "--fail", help="Fail a switch or link for the whole run: switch:<id>, link:<id> or a "
                     "bare switch id; repeatable (docs/simulator.md, 'Single switch failure').")
_RELAY = typer.Option("nvlink", "--relay", help="A GPU whose every NIC failed: nvlink (use a sibling GPU's NIC) "
                      "or none (its engine is drained).")
_ECMP = typer.Option("per-hop", "--ecmp", help="Baselines' routing: per-hop (every switch hashes each rank stream "
                     "over all shortest next hops) or listed (one of the topology's listed routes).")
_RETRY = typer.Option("wakeup", "--lease-retry", help="Denied lease: wakeup (FIFO queue per D, woken on release) "
                      "or poll (ask again after retry_after).")


@app.command("run")
def run_cmd(
    topology: str = _TOPO, workload: str = _WL, trace: str | None = _TRACE, load: float = _LOAD,
    policy: str = typer.Option("kvlane", "--policy", "-p", help=f"One of: {', '.join(POLICIES)}."),
    requests: int = _REQ, seed: int = _SEED, arrivals: str = _ARR, burst: float = _BURST,
    credits: bool | None = _CRED, max_streams: int | None = _MS, link_scale: float = _LS, pd_ratio: str = _PD,
    sticky: bool = _STICKY, kv_bytes_per_token: int | None = _BPT, prefill_tps: float | None = _PTPS,
    decode_tps: float | None = _DTPS, decode_kv_gib: float | None = _DKV,
    plot_path: str | None = _PLOT, as_json: bool = _JSON, fail: list[str] | None = _FAIL, relay: str = _RELAY,
    lease_retry: str = _RETRY, ecmp: str = _ECMP,
) -> None:
    """Simulate one policy: TTFT, KV-transfer time, D ingress concurrency, link utilisation, bytes moved."""
    results = _run([policy], topology=topology, workload=workload, trace=trace, load=load, requests=requests,
                   seed=seed, arrivals=arrivals, burst=burst, credits=credits, max_streams=max_streams,
                   link_scale=link_scale, pd_ratio=pd_ratio, sticky=sticky, kv_bytes_per_token=kv_bytes_per_token,
                   prefill_tps=prefill_tps, want_timeline=plot_path is not None, decode_tps=decode_tps,
                   decode_kv_gib=decode_kv_gib, fail=fail, relay=relay, lease_retry=lease_retry, ecmp=ecmp)
    _emit(results, as_json, plot_path, f"{policy} on {topology}, {trace or workload} at load {load}")


@app.command("compare")
def compare_cmd(
    topology: str = _TOPO, workload: str = _WL, trace: str | None = _TRACE, load: float = _LOAD,
    policies: str = typer.Option(",".join(POLICIES), "--policies", help="Comma-separated policies."),
    requests: int = _REQ, seed: int = _SEED, arrivals: str = _ARR, burst: float = _BURST,
    credits: bool | None = _CRED, max_streams: int | None = _MS, link_scale: float = _LS, pd_ratio: str = _PD,
    sticky: bool = _STICKY, kv_bytes_per_token: int | None = _BPT, prefill_tps: float | None = _PTPS,
    decode_tps: float | None = _DTPS, decode_kv_gib: float | None = _DKV,
    plot_path: str | None = _PLOT, as_json: bool = _JSON, fail: list[str] | None = _FAIL, relay: str = _RELAY,
    lease_retry: str = _RETRY, ecmp: str = _ECMP,
) -> None:
    """Simulate several policies on the same workload, side by side."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    results = _run(names, topology=topology, workload=workload, trace=trace, load=load, requests=requests,
                   seed=seed, arrivals=arrivals, burst=burst, credits=credits, max_streams=max_streams,
                   link_scale=link_scale, pd_ratio=pd_ratio, sticky=sticky, kv_bytes_per_token=kv_bytes_per_token,
                   prefill_tps=prefill_tps, want_timeline=plot_path is not None, decode_tps=decode_tps,
                   decode_kv_gib=decode_kv_gib, fail=fail, relay=relay, lease_retry=lease_retry, ecmp=ecmp)
    _emit(results, as_json, plot_path, f"{topology}, {trace or workload} at load {load}")


@app.command("export-trace")
def export_trace_cmd(
    workload: str = _WL,
    session_rate: float = typer.Option(2.0, "--session-rate", help="Sessions per second."),
    requests: int = _REQ, seed: int = _SEED, arrivals: str = _ARR, burst: float = _BURST,
    out: str | None = typer.Option(None, "--out", "-o", help="Write here instead of stdout."),
) -> None:
    """Write a synthetic workload as a JSONL trace (the format `--trace` reads; fields in docs/simulator.md)."""
    from kvlane.policy.sim import generate, get_profile
    from kvlane.policy.sim.workload import dump_trace

    try:
        wl = generate(get_profile(workload), requests=requests, session_rate=session_rate, seed=seed,
                      arrivals=arrivals, burst_size=burst)  # type: ignore[arg-type]
    except WorkloadError as exc:
        _fail(str(exc))
        return
    text = "\n".join(dump_trace(wl)) + "\n"
    if out:
        with open(out, "w") as fh:
            fh.write(text)
        typer.echo(f"{wl.requests} requests in {len(wl.sessions)} sessions written to {out}")
    else:
        typer.echo(text, nl=False)


@app.command("profiles")
def profiles_cmd(as_json: bool = _JSON) -> None:
    """The built-in workload profiles (seed §4)."""
    rows = [{"name": p.name, "prompt_tokens": p.prompt_tokens, "output_tokens": p.output_tokens,
             "cache_hit": p.cache_hit, "mean_turns": p.mean_turns, "think_s": p.think_s,
             "turn_new_tokens": p.turn_new_tokens} for p in PROFILES.values()]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(title="workload profiles")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    Console().print(table)


def _emit(results: list[Any], as_json: bool, plot_path: str | None, title: str) -> None:
    if plot_path:
        try:
            plot(results, plot_path)
        except ImportError:
            _fail("--plot needs matplotlib (pip install 'kvlane[plot]')")
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in results]))
        return
    Console(width=max(160, Console().width)).print(render_table(results, title=title))
    if plot_path:
        typer.echo(f"plots written to {plot_path}")
