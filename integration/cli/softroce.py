"""`kvlane softroce ...`: prepare the soft-RoCE VM and run commands in it (real RDMA verbs over rdma_rxe).
Runs in the user's shell; starts one QEMU at a time and returns the guest command's exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run in the guest (after --).")],
    memory: Annotated[str, typer.Option(help="Guest memory (qemu -m).")] = "2G",
    cpus: Annotated[int, typer.Option(min=1, help="Guest vCPUs (each is a host thread under emulation).")] = 2,
    timeout: Annotated[float, typer.Option(min=1.0, help="Kill the VM after this many seconds (exit 124).")] = 900.0,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the guest (repeatable).")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Where to keep the logs (default .work/softroce/runs/).")] = None,
) -> None:
    """Boot the guest, create rxe0/rxe1, run COMMAND in the repo, exit with its exit code."""
    from kvlane.integration.softroce import SoftRoceSetupError, prepare, run_in_guest

    try:
        prep = prepare(log=lambda m: typer.echo(m, err=True))
    except SoftRoceSetupError as exc:
        typer.echo(f"softroce: {exc}", err=True)
        raise typer.Exit(2) from exc
    res = run_in_guest(command, prep=prep, env=_parse_env(env or []), memory=memory, cpus=cpus, timeout=timeout,
                       log_dir=log_dir)
    boot = f"{res.boot_seconds:.1f}s" if res.boot_seconds is not None else "n/a"
    typer.echo(f"softroce: exit {res.exit_code}, boot {boot}, total {res.total_seconds:.1f}s, logs {res.log_dir}",
               err=True)
    raise typer.Exit(res.exit_code)


@app.command("prepare")
def prepare_cmd() -> None:
    """Install/download everything the VM needs (idempotent) and print what will be booted."""
    from kvlane.integration.softroce import SoftRoceSetupError, prepare

    try:
        prep = prepare(log=lambda m: typer.echo(m, err=True))
    except SoftRoceSetupError as exc:
        typer.echo(f"softroce: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"kernel {prep.kernel.version}: {prep.kernel.vmlinuz}")
    typer.echo(f"vng: {prep.vng}")
    typer.echo(f"verbs UCX for ucxx: {prep.verbs_ucx or 'MISSING (pip install --no-deps nixl-cu12==1.5.1)'}")
