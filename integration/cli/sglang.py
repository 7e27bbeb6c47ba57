"""`kvlane sglang prefill|decode -- <sglang args>`: start an SGLang server with kvlane as its PD transfer
backend. Runs in the user's shell process and replaces itself with `python -m sglang.launch_server`
(exec); it only builds the command line and the KVLANE_* environment, it never talks to the engine.
"""

from __future__ import annotations

import os
import shlex
import sys

import typer

app = typer.Typer(no_args_is_help=True)

def build_command(role: str, sglang_args: list[str], *, policy: str | None, engine_id: str | None,
                  gpus: str | None, transport: str, kv_host: str, python: str,
                  environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for one SGLang engine; ValueError naming the bad option."""
    from kvlane.connector.sglang.config import SGLangBackendConfig

    if role not in ("prefill", "decode"):
        raise ValueError(f"role must be prefill or decode, not {role!r}")
    want = {"--disaggregation-mode": role, "--disaggregation-transfer-backend": "kvlane"}
    for flag in want:
        given = _flag_value(sglang_args, (flag,))
        if given is not None and given != want[flag]:
            raise ValueError(f"{flag} {given!r} conflicts with `kvlane sglang {role}` (which sets {want[flag]!r})")
    raw = {k: v for k, v in {"KVLANE_POLICY": policy or environ.get("KVLANE_POLICY"), "KVLANE_ENGINE_ID": engine_id,
                             "KVLANE_GPUS": gpus, "KVLANE_TRANSPORT": transport, "KVLANE_KV_HOST": kv_host}.items()
           if v}
    tp = _flag_value(sglang_args, ("--tp-size", "--tp", "--tensor-parallel-size"))
    if gpus and tp is not None:
        if not tp.isdigit():
            raise ValueError(f"--tp-size {tp!r} is not a number")
        n = len([g for g in gpus.split(",") if g.strip()])
        if n != int(tp):
            raise ValueError(f"--gpus names {n} GPUs but the SGLang args say --tp-size {tp}")
    cfg = SGLangBackendConfig.from_env({**{k: v for k, v in environ.items() if k.startswith("KVLANE_")}, **raw})
    env = {**environ, **cfg.to_env()}
    plugins = env.get("SGLANG_PLUGINS")
    if plugins and "kvlane" not in {p.strip() for p in plugins.split(",")}:
        env["SGLANG_PLUGINS"] = f"{plugins},kvlane"  # SGLang loads only the listed plugins when this is set
    argv = [python, "-m", "sglang.launch_server"]
    for flag, value in want.items():
        if flag not in {a.partition("=")[0] for a in sglang_args}:
            argv += [flag, value]
    return argv + list(sglang_args), env


def _flag_value(args: list[str], flags: tuple[str, ...]) -> str | None:
    for i, a in enumerate(args):
        flag, eq, val = a.partition("=")
        if flag in flags:
            return val if eq else (args[i + 1] if i + 1 < len(args) else "")
    return None


def _launch(ctx: typer.Context, role: str, policy: str | None, engine_id: str | None, gpus: str | None,
            transport: str, kv_host: str, python: str, dry_run: bool) -> None:
    try:
        argv, env = build_command(role, list(ctx.args), policy=policy, engine_id=engine_id, gpus=gpus,
                                  transport=transport, kv_host=kv_host, python=python, environ=dict(os.environ))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    kv = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())
                  if k.startswith("KVLANE_") or k == "SGLANG_PLUGINS")
    if dry_run:
        typer.echo(f"{kv} {shlex.join(argv)}")
        return
    typer.echo(f"kvlane: exec {shlex.join(argv)} ({kv})", err=True)
    os.execvpe(argv[0], argv, env)


_CTX = {"allow_extra_args": True, "ignore_unknown_options": True}
_POLICY = typer.Option(None, "--policy", help="Policy service address tcp://HOST:PORT (default $KVLANE_POLICY).")
_ENGINE = typer.Option(None, "--engine-id", help="This engine's name in the policy (default sglang-<role>-<host>-<port>).")
_GPUS = typer.Option(None, "--gpus", help="Topology GPU names, one per TP rank, comma-separated (default n0.g<rank>).")
_TRANSPORT = typer.Option("auto", "--transport", help="kvlane transport backend: auto, ucx or tcp.")
_KV_HOST = typer.Option("127.0.0.1", "--kv-host", help="Address the decode side's KV listeners bind to.")
_PYTHON = typer.Option(sys.executable, "--python", help="Python interpreter that has SGLang installed.")
_DRY = typer.Option(False, "--dry-run", help="Print the environment and command instead of running them.")


@app.command(context_settings=_CTX)
def prefill(ctx: typer.Context, policy: str | None = _POLICY, engine_id: str | None = _ENGINE,
            gpus: str | None = _GPUS, transport: str = _TRANSPORT, kv_host: str = _KV_HOST,
            python: str = _PYTHON, dry_run: bool = _DRY) -> None:
    """Start an SGLang prefill server (`-- <sglang.launch_server args>` follow)."""
    _launch(ctx, "prefill", policy, engine_id, gpus, transport, kv_host, python, dry_run)


@app.command(context_settings=_CTX)
def decode(ctx: typer.Context, policy: str | None = _POLICY, engine_id: str | None = _ENGINE,
           gpus: str | None = _GPUS, transport: str = _TRANSPORT, kv_host: str = _KV_HOST,
           python: str = _PYTHON, dry_run: bool = _DRY) -> None:
    """Start an SGLang decode server (`-- <sglang.launch_server args>` follow)."""
    _launch(ctx, "decode", policy, engine_id, gpus, transport, kv_host, python, dry_run)
