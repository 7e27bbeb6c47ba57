"""The `kvlane` command line: one typer app; each command group lives in its own module of this package
(`topo`, `plan`, `policy`, `router`, `demo`) and is mounted here. Runs in the user's shell process only."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, help="kvlane: topology- and credit-aware P/D KV transfer.")

# (module, command group name, help). Each module defines `app = typer.Typer(...)`.
_GROUPS = [
    ("topo", "Inspect and draw fabrics (YAML files or generators)."),
    ("plan", "Capacity planning: P:D ratio, affinity tiles, KV bytes per token."),
    ("policy", "Run or query the policy service."),
    ("router", "The OpenAI-compatible P/D router."),
    ("demo", "Self-contained demos."),
    ("simulate", "Flow-level simulator of the policy on a fabric."),
    ("softroce", "Soft-RoCE (rdma_rxe) VM harness."),
    ("sglang", "Launch SGLang with the kvlane transfer backend."),
]

for _name, _help in _GROUPS:
    _mod = importlib.import_module(f"{__name__}.{_name}")
    app.add_typer(_mod.app, name=_name, help=_help)
importlib.import_module(f"{__name__}.plan_tiles")  # adds `kvlane plan tiles` to the plan group


def main() -> None:
    app()
