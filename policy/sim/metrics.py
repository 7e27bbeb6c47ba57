"""What a simulation measured: TTFT, KV-transfer times, D ingress concurrency (incast), link utilisation and
bytes moved, as a plain dict (JSON), a rich table, and PNG plots (matplotlib, imported only when plotting).

Owned by `kvlane.policy.sim`; runs in the process that ran the simulation. Pure post-processing of the
simulator's records; never reads a clock, never opens a socket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .simulator import Simulator
    from .workload import Workload


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of finite values; NaN when there are none."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def link_label(key: Any) -> str:
    """A directed link as text: "<cable id>>" in the cable's a→b direction, "<cable id><" for b→a."""
    if isinstance(key, tuple) and len(key) == 2:
        return f"{key[0]}{'>' if key[1] == 0 else '<'}"
    return str(key)


@dataclass
class SimResult:
    policy: str
    workload: str
    summary: dict[str, Any]
    #: Per-request samples (seconds) for CDFs.
    ttft: list[float] = field(default_factory=list)
    kv_transfer: list[float] = field(default_factory=list)
    kv_wait: list[float] = field(default_factory=list)
    ingress: list[int] = field(default_factory=list)
    #: Per used directed link: utilisation over the run (carried bytes / capacity·makespan).
    link_util: dict[str, float] = field(default_factory=dict)
    timeline: list[tuple[float, float, str, float]] = field(default_factory=list)

    @classmethod
    def build(cls, sim: Simulator, workload: Workload) -> SimResult:
        reqs = sim.requests
        done = [r for r in reqs if not math.isnan(r.done)]
        moved = [r for r in reqs if not math.isnan(r.transfer_end)]
        bpt = sim.config.cost.kv_bytes_per_token
        ttft = [r.ttft for r in reqs if not math.isnan(r.first_token)]
        kv_t = [r.kv_transfer_s for r in moved]
        kv_w = [r.kv_wait_s for r in moved]
        lease_w = [r.lease_granted - r.lease_asked for r in moved]
        bytes_moved = sum(r.kv_bytes for r in moved)
        bytes_full = sum(r.turn.prompt_tokens * bpt for r in moved)
        net = sim.network
        # Utilisation while KV is on the wire (the network is idle most of a run: decode dominates time).
        span = max(net.busy_time, 1e-12)
        util: dict[str, float] = {}
        for key, st in net.links.items():
            util[link_label(key)] = st.carried / (st.capacity * span)
        utils = list(util.values())
        prefill_busy = [sim.engines[e].busy_s for e in sim.prefills]
        last = max((r.done for r in done), default=0.0)
        localities: dict[str, int] = {}
        for r in reqs:
            if r.locality:
                localities[r.locality] = localities.get(r.locality, 0) + 1
        ing = list(sim.ingress_samples)
        summary = {
            "policy": sim.policy_name,
            "workload": workload.name,
            "requests": workload.requests,
            "arrived": len(reqs),
            "completed": len(done),
            "prefill_engines": len(sim.prefills),
            "decode_engines": len(sim.decodes),
            "engines_down": len(getattr(sim, "down_engines", ())),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "kv_transfer_p50_s": percentile(kv_t, 50),
            "kv_transfer_p99_s": percentile(kv_t, 99),
            "kv_wait_p50_s": percentile(kv_w, 50),
            "kv_wait_p99_s": percentile(kv_w, 99),
            "lease_wait_p99_s": percentile(lease_w, 99),
            "lease_denials": sum(r.denials for r in reqs),
            "late_releases": sum(r.late_release for r in reqs),
            "d_ingress_max": max(ing, default=0),
            "d_ingress_p99": percentile(ing, 99) if ing else 0.0,
            "link_util_mean": sum(utils) / len(utils) if utils else 0.0,
            "link_util_max": max(utils, default=0.0),
            "links_used": len(utils),
            "bytes_moved": bytes_moved,
            "bytes_full_context": bytes_full,
            "delta_savings": 1.0 - bytes_moved / bytes_full if bytes_full else 0.0,
            "sticky_hits": sum(1 for r in reqs if r.resident_tokens > 0),
            "prefill_util": (sum(prefill_busy) / (len(prefill_busy) * last)) if last > 0 and prefill_busy else 0.0,
            "makespan_s": last,
            "locality": localities,
        }
        timeline = [(a, b, link_label(k), u) for a, b, k, u in sim.timeline]
        return cls(sim.policy_name, workload.name, summary, ttft, kv_t, kv_w, ing, util, timeline)

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        hottest = sorted(self.link_util.items(), key=lambda kv: -kv[1])[:10]
        return {"summary": clean(self.summary), "hottest_links": [{"link": k, "util": u} for k, u in hottest]}


#: Columns of the comparison table: (summary key, header, format).
COLUMNS: list[tuple[str, str, str]] = [
    ("policy", "policy", "{}"),
    ("completed", "done", "{}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("kv_transfer_p50_s", "KV xfer p50 s", "{:.4f}"),
    ("kv_transfer_p99_s", "KV xfer p99 s", "{:.4f}"),
    ("kv_wait_p99_s", "KV wait p99 s", "{:.4f}"),
    ("d_ingress_max", "D in max", "{}"),
    ("d_ingress_p99", "D in p99", "{:.1f}"),
    ("link_util_max", "link util max", "{:.2f}"),
    ("bytes_moved", "GB moved", "{:.1f}"),
    ("delta_savings", "delta saved", "{:.0%}"),
]


def _fmt(key: str, fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "bytes_moved":
        value = value / 1e9
    return fmt.format(value)


def table_rows(results: Sequence[SimResult]) -> list[list[str]]:
    return [[_fmt(k, f, r.summary.get(k)) for k, _, f in COLUMNS] for r in results]


def render_table(results: Sequence[SimResult], title: str = "", extra: dict[str, list[str]] | None = None) -> Any:
    """A rich Table of the results (one row per run); `extra` adds columns (header → one cell per result)."""
    from rich.table import Table

    table = Table(title=title or None)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right" if header != "policy" else "left")
    for header in extra or {}:
        table.add_column(header, justify="right")
    for i, row in enumerate(table_rows(results)):
        table.add_row(*row, *[cells[i] for cells in (extra or {}).values()])
    return table


def markdown_rows(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table of string cells (what the benchmarks print with --markdown)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: Sequence[SimResult], extra: dict[str, list[str]] | None = None) -> str:
    headers = [h for _, h, _ in COLUMNS] + list(extra or {})
    return markdown_rows(headers, [row + [cells[i] for cells in (extra or {}).values()]
                                   for i, row in enumerate(table_rows(results))])


def busiest_window(timeline: Sequence[tuple[float, float, str, float]], window_s: float,
                   steps: int = 20) -> tuple[float, float]:
    """The `window_s`-long interval (aligned to `window_s / steps`) holding the most link-seconds of use."""
    if not timeline or window_s <= 0:
        return 0.0, max(window_s, 1.0)
    w = window_s / steps
    t_end = max(b for _, b, _, _ in timeline)
    mass = [0.0] * (int(t_end / w) + 2)
    for a, b, _, u in timeline:
        for j in range(int(a / w), int(b / w) + 1):
            lo, hi = max(a, j * w), min(b, (j + 1) * w)
            if hi > lo:
                mass[j] += u * (hi - lo)
    best, best_j, run = -1.0, 0, 0.0
    for j, m in enumerate(mass):
        run += m
        if j >= steps:
            run -= mass[j - steps]
        if run > best:
            best, best_j = run, max(0, j - steps + 1)
    return best_j * w, best_j * w + window_s


def plot(results: Sequence[SimResult], path: str, heatmap_links: int = 30, bins: int = 60,
         window_s: float = 20.0) -> None:
    """PNG: CDFs of TTFT and KV-transfer time for every result, and a link-utilisation heat map (hottest
    links × time, over the busiest `window_s` seconds) of the first result that recorded a timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_tl = next((r for r in results if r.timeline), None)
    ncols = 3 if with_tl else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    for ax, attr, label in ((axes[0], "ttft", "TTFT (s)"), (axes[1], "kv_transfer", "KV transfer time (s)")):
        for r in results:
            xs = sorted(getattr(r, attr))
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=r.policy)
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if with_tl:
        ax = axes[2]
        hot = [k for k, _ in sorted(with_tl.link_util.items(), key=lambda kv: -kv[1])[:heatmap_links]]
        t0, t_end = busiest_window(with_tl.timeline, window_s)
        width = (t_end - t0) / bins if t_end > t0 else 1.0
        grid = [[0.0] * bins for _ in hot]
        row = {k: i for i, k in enumerate(hot)}
        for a, b, k, u in with_tl.timeline:
            i = row.get(k)
            if i is None or b <= t0 or a >= t_end:
                continue
            j0, j1 = max(0, int((a - t0) / width)), min(bins - 1, int((b - t0) / width))
            for j in range(j0, j1 + 1):
                lo, hi = max(a, t0 + j * width), min(b, t0 + (j + 1) * width)
                if hi > lo:
                    grid[i][j] += u * (hi - lo) / width
        im = ax.imshow(grid, aspect="auto", cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest",
                       extent=(t0, t_end, len(hot), 0))
        ax.set_yticks([i + 0.5 for i in range(len(hot))])
        ax.set_yticklabels(hot, fontsize=5)
        ax.set_xlabel("simulated time (s)")
        ax.set_title(f"link utilisation ({with_tl.policy}, hottest {len(hot)} links, busiest {window_s:g} s)",
                     fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.12, top=0.92, wspace=0.45 if with_tl else 0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)
