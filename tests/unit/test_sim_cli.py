"""`kvlane simulate` on a small fabric: JSON output, plots, and clear errors."""

import json

from kvlane.integration.cli import app
from typer.testing import CliRunner

runner = CliRunner()
SMALL = ["--topology", "fattree:k=4,oversub=4,gpus_per_node=2", "--requests", "40", "--seed", "2"]


def test_run_prints_json_summary():
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--policy", "random", "--json"])
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.output)
    s = out["summary"]
    assert s["policy"] == "random" and s["completed"] == 40
    assert s["kv_transfer_p99_s"] >= s["kv_transfer_p50_s"] > 0
    assert len(out["hottest_links"]) <= 10


def test_compare_prints_a_row_per_policy():
    res = runner.invoke(app, ["simulate", "compare", *SMALL, "--policies", "kvlane,least-loaded"])
    assert res.exit_code == 0, res.output
    assert "kvlane" in res.output and "least-loaded" in res.output


def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "sim.png"
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--requests", "20", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_file_runs(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"t": 0.0, "session": "a", "prompt_tokens": 8000, "output_tokens": 20},
        {"t": 0.1, "prompt_tokens": 4000, "output_tokens": 20},
        {"t": 1.0, "session": "a", "prompt_tokens": 9000, "output_tokens": 20},
    ]))
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--trace", str(trace), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)[0]["summary"]
    assert s["completed"] == 3 and s["sticky_hits"] == 1


def test_bad_inputs_exit_2_naming_the_problem(tmp_path):
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--policy", "magic"])
    assert res.exit_code == 2 and "unknown policy 'magic'" in res.output
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--workload", "chat"])
    assert res.exit_code == 2 and "unknown --workload 'chat'" in res.output
    res = runner.invoke(app, ["simulate", "run", "--topology", "nosuch:k=1"])
    assert res.exit_code == 2 and "--topology" in res.output
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--load", "5"])
    assert res.exit_code == 2 and "load must be in (0, 2]" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "prompt_tokens": 5}\n')
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--trace", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:1: output_tokens" in res.output


def test_export_trace_round_trips_through_run(tmp_path):
    path = tmp_path / "agent.jsonl"
    res = runner.invoke(app, ["simulate", "export-trace", "--workload", "coding-agent", "--requests", "30",
                              "--seed", "4", "--out", str(path)])
    assert res.exit_code == 0, res.output
    lines = path.read_text().splitlines()
    assert len(lines) == 30 and all(json.loads(x)["prompt_tokens"] >= 1 for x in lines)
    res = runner.invoke(app, ["simulate", "run", *SMALL, "--trace", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["summary"]["completed"] == 30


def test_fail_drains_engines_behind_a_dead_tor_and_refuses_unknown_switches():
    # roft 16 nodes x 4 rails, radix 8: leaf l0.r0 serves rank 0 of nodes n0-n3; without a relay those 4
    # engines are drained, and every request still completes on the other 12.
    topo = ["--topology", "roft:nodes=16,rails=4,radix=8", "--requests", "30", "--seed", "1"]
    res = runner.invoke(app, ["simulate", "run", *topo, "--fail", "switch:l0.r0", "--relay", "none", "--json"])
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.output)
    assert out["summary"]["engines_down"] == 4 and out["summary"]["completed"] == 30
    assert not any(h["link"].startswith(("n0.g0.p0--l0.r0", "l0.r0--")) for h in out["hottest_links"])
    res = runner.invoke(app, ["simulate", "run", *topo, "--fail", "l0.r0", "--lease-retry", "poll", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["summary"]["engines_down"] == 0
    res = runner.invoke(app, ["simulate", "run", *topo, "--fail", "zz9"])
    assert res.exit_code != 0 and "cannot fail unknown switch 'zz9'" in res.output
