"""Markdown table and PNG chart from the harness's result JSON."""

from __future__ import annotations

import re
from pathlib import Path

from .targets import ROOT

DOC = ROOT / "BENCHMARKS.md"
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def rows(sizes: dict) -> list[tuple[str, str, str]]:
    """(label, scenario key, metric) for each row of the table."""
    t, r, i, st = sizes["throughput"], sizes["rate"], sizes["idle"], sizes["stretch"]
    out = []
    for size in t["sizes"]:
        for depth in t["depths"]:
            out.append((f"Throughput, {t['conns']} conns x {depth} in flight, {size} B (echoes/s)",
                        f"tput_d{depth}_{size}B", "msgs_per_s"))
    out.append((f"CPU us / relayed msg, {t['conns']} conns x {t['depths'][-1]} in flight, 64 B",
                f"tput_d{t['depths'][-1]}_64B", "proxy_us_per_msg"))
    rate = f"@ {r['rate']:,.0f} msg/s, {r['conns']} conns, {r['size']} B"
    out += [
        (f"**CPU us / relayed msg** {rate}", "rate", "proxy_us_per_msg"),
        (f"of which user space (Python, uvloop) {rate}", "rate", "proxy_user_us_per_msg"),
        (f"Proxy CPU % of one core {rate}", "rate", "proxy_cpu_pct"),
        (f"**p50 latency (ms)** {rate}", "rate", "p50_ms"),
        (f"**p99 latency (ms)** {rate}", "rate", "p99_ms"),
        (f"p99.9 latency (ms) {rate}", "rate", "p999_ms"),
        (f"Achieved echoes/s {rate}", "rate", "msgs_per_s"),
        (f"Load generator CPU % {rate}", "rate", "gen_cpu_pct"),
        (f"Proxy CPU %, max throughput (d{t['depths'][-1]}, 64 B)",
         f"tput_d{t['depths'][-1]}_64B", "proxy_cpu_pct"),
        (f"Load generator CPU %, max throughput (d{t['depths'][-1]}, 64 B)",
         f"tput_d{t['depths'][-1]}_64B", "gen_cpu_pct"),
        (f"Backend CPU %, max throughput (d{t['depths'][-1]}, 64 B)",
         f"tput_d{t['depths'][-1]}_64B", "backend_cpu_pct"),
        (f"Other processes' CPU % (noise) {rate}", "rate", "other_cpu_pct"),
        (f"**KB RSS per idle session** @ {i['conns']:,} sessions", "idle", "kb_per_session"),
        (f"KB RSS per idle session @ {st['conns']:,} sessions ({st['workers']} workers, --stretch)",
         "stretch_idle", "kb_per_session"),
        ("Connections opened/s (handshake + 1 echo + close)", "connrate", "conns_per_s"),
        ("CPU us per connection (open + close)", "connrate", "proxy_us_per_conn"),
    ]
    return out


def fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def cell(report: dict, target: str, key: str, metric: str) -> str:
    info = report["targets"][target]
    if not info["available"]:
        return "not measured"
    scen = report["summary"].get(target, {}).get(key)
    if scen is None:
        return ""
    fig = scen.get(metric)
    if fig is None:
        return "error" if scen.get("errors") else "n/a"
    text = fmt(fig["median"])
    if fig["n"] > 1:
        text += f" ({fmt(fig['min'])}-{fmt(fig['max'])})"
    if scen.get("errors"):
        text += f" [{len(scen['errors'])} failed]"
    return text


def markdown_table(report: dict) -> str:
    targets = list(report["targets"])
    lines = ["| Figure | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for label, key, metric in rows(report["sizes"]):
        if any(key in report["summary"].get(t, {}) for t in targets):
            lines.append(f"| {label} | " + " | ".join(cell(report, t, key, metric) for t in targets) + " |")
    env = report["environment"]
    notes = [f"Medians of {env['reps']} repetition(s), (min-max) when more than one; {env['date']}; "
             f"{env['cpu']}, {env['cores']} cores; {env['node']} ws {env['ws']}; {env['nginx']}; "
             f"{env['haproxy']}."]
    for t, info in report["targets"].items():
        if not info["available"]:
            notes.append(f"{t}: not measured ({info['reason']}).")
        for key, scen in report["summary"].get(t, {}).items():
            for err in scen.get("errors", [])[:1]:
                notes.append(f"{t} / {key}: {err[:300]}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def chart(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t, r = report["sizes"]["throughput"], report["sizes"]["rate"]
    d = t["depths"][-1]
    panels = [
        (f"echoes/s, {t['conns']} conns x {d} in flight, 64 B", f"tput_d{d}_64B", ["msgs_per_s"]),
        (f"CPU us / relayed msg @ {r['rate']:,.0f} msg/s", "rate", ["proxy_us_per_msg"]),
        (f"latency ms @ {r['rate']:,.0f} msg/s (p50, p99)", "rate", ["p50_ms", "p99_ms"]),
        (f"KB RSS per idle session @ {report['sizes']['idle']['conns']:,}", "idle", ["kb_per_session"]),
        ("connections opened / s", "connrate", ["conns_per_s"]),
        (f"echoes/s, {t['conns']} conns x {d} in flight, {t['sizes'][-1]} B",
         f"tput_d{d}_{t['sizes'][-1]}B", ["msgs_per_s"]),
    ]
    targets = list(report["targets"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, key, metrics) in zip(axes.flat, panels, strict=True):
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            med, lo, hi = [], [], []
            for tg in targets:
                f = report["summary"].get(tg, {}).get(key, {}).get(metric)
                med.append(f["median"] if f else 0)
                lo.append(f["median"] - f["min"] if f else 0)
                hi.append(f["max"] - f["median"] if f else 0)
            xs = [i + j * width for i in range(len(targets))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=metric)
            for x, tg in zip(xs, targets, strict=True):
                if not report["targets"][tg]["available"]:
                    ax.text(x, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7)
                elif report["summary"].get(tg, {}).get(key, {}).get(metric) is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(targets))])
        ax.set_xticklabels(targets, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        if len(metrics) > 1:
            ax.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"WebSocket proxies on {env['cpu']} ({env['cores']} cores), medians of {env['reps']} "
                 f"run(s), bars = min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_reports(report: dict, out: Path, update_doc: bool = False) -> None:
    table = markdown_table(report)
    (out / "latest.md").write_text(table)
    chart(report, out / "chart.png")
    if update_doc and DOC.exists():
        text = DOC.read_text()
        block = f"{MARK_START}\n{table}{MARK_END}"
        DOC.write_text(re.sub(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), lambda _: block,
                              text, flags=re.S))
