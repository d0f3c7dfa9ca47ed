"""The figures of bench.py's results, for its tables and as SVG bar charts (standard library only):
the latency each proxy adds and its CPU time per request, at each rate.

bench.py draws the charts beside the tables of docs/benchmarks.md on every run;
`python3 bench/plots.py RESULTS.json DIR` draws them again from a run's `--json`.
"""

import json
import math
import os
import statistics
import sys
from xml.sax.saxutils import escape

PROXIES = ["sidecar", "nginx"]
PERCENTILES = ["p50", "p90", "p99", "p99.9"]
COLOURS = {"sidecar": "#3b6fb6", "nginx": "#7f8c8d"}


def med(values):
    return statistics.median(values) if values else float("nan")


def quantile(runs, pct, key="latency"):
    """The median over runs of one percentile, in seconds."""
    return med([r[key].get(pct, float("nan")) for r in runs])


def figures(results):
    """For each rate and proxy: the added latency at each of PERCENTILES (ms, the proxy's
    percentile minus the direct one at the same rate), the CPU µs per request, and the errors."""
    rows = []
    for rate, runs in results["rates"].items():
        direct = runs["direct"]
        for proxy in PROXIES:
            r = runs[proxy]
            added = [(quantile(r, p) - quantile(direct, p)) * 1000 for p in PERCENTILES]
            cpu = med([x["cpu_us_per_request"] for x in r])
            errors = sum(x["total"] - x["ok"] + x["errors"] for x in r)
            rows.append({"rate": int(rate), "proxy": proxy, "added_ms": added, "cpu_us": cpu, "errors": errors})
    return rows


def nice_ceiling(value):
    """The smallest of 1, 2, 2.5 and 5 times a power of ten that is at least `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def bar_chart(title, unit, groups, series, values, label="{:.3f}"):
    """Grouped bars: one group per entry of `groups`, one bar per (name, colour) of `series`;
    `values[g][s]` the bar's value (negative bars go below the axis), written above it with
    `label`."""
    width, height = 720, 360
    left, right, top, bottom = 64, 16, 40, 72
    plot_w, plot_h = width - left - right, height - top - bottom
    flat = [v for row in values for v in row if not math.isnan(v)]
    high = nice_ceiling(max(flat + [0]))
    low = -nice_ceiling(-min(flat)) if min(flat + [0]) < 0 else 0.0
    y = lambda v: top + plot_h * (high - v) / (high - low)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    step = nice_ceiling((high - low) / 5)
    for i in range(round((high - low) / step) + 1):
        v = round(low + i * step, 9)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text transform="translate(16,{top + plot_h / 2}) rotate(-90)" text-anchor="middle">{escape(unit)}</text>')
    group_w = plot_w / len(groups)
    bar_w = group_w * 0.8 / len(series)
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, (name, colour) in enumerate(series):
            v = values[g][s]
            if math.isnan(v):
                continue
            x = x0 + s * bar_w
            top_y, bottom_y = sorted((y(v), y(0)))
            out.append(f'<rect class="bar" data-series="{escape(name)}" data-value="{v:.6g}" x="{x:.1f}" y="{top_y:.1f}" '
                       f'width="{bar_w * 0.92:.1f}" height="{bottom_y - top_y:.1f}" fill="{colour}"/>')
            label_y = top_y - 4 if v >= 0 else bottom_y + 12
            out.append(f'<text x="{x + bar_w * 0.46:.1f}" y="{label_y:.1f}" text-anchor="middle" font-size="10">{label.format(v)}</text>')
        out.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{escape(group)}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#333"/>')
    for s, (name, colour) in enumerate(series):
        lx = left + s * (plot_w / len(series))
        out.append(f'<rect x="{lx:.1f}" y="{height - 26}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16:.1f}" y="{height - 16}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def shade(colour, percentile):
    """The proxy's colour, lighter for p50 than for p99."""
    if percentile == "p99":
        return colour
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{(c + 255) // 2:02x}" for c in rgb)


def charts(results):
    """The SVG charts of a run's results, by file name."""
    rows = figures(results)
    rates = sorted({r["rate"] for r in rows})
    row = {(r["rate"], r["proxy"]): r for r in rows}
    groups = [f"{rate:,}/s" for rate in rates]
    latency_series = [(f"{p} {proxy}", shade(COLOURS[proxy], p)) for p in ("p50", "p99") for proxy in PROXIES]
    latency = [[row[(rate, proxy)]["added_ms"][PERCENTILES.index(p)] for p in ("p50", "p99") for proxy in PROXIES]
               for rate in rates]
    cpu = [[row[(rate, proxy)]["cpu_us"] for proxy in PROXIES] for rate in rates]
    return {
        "benchmarks-latency.svg": bar_chart("Added latency, JSON (proxy minus direct)", "milliseconds", groups,
                                            latency_series, latency),
        "benchmarks-cpu.svg": bar_chart("CPU time per request", "microseconds", groups,
                                        [(p, COLOURS[p]) for p in PROXIES], cpu, label="{:.0f}"),
    }


def write(results, directory):
    """Writes the charts into `directory`: their file names."""
    os.makedirs(directory, exist_ok=True)
    drawn = charts(results)
    for name, svg in drawn.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(svg)
    return sorted(drawn)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RESULTS.json DIR")
    with open(sys.argv[1]) as f:
        print("\n".join(write(json.load(f), sys.argv[2])))
