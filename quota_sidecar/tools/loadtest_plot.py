"""Plots of a load-test report: a self-contained HTML page with inline SVG, or a PNG via matplotlib.

The HTML file needs nothing else (no scripts, stylesheets, fonts or links), so it can be
mailed or attached to a ticket and opened anywhere. It shows

- latency by percentile, HDR style: x = -log10(1 - p/100), so 90%, 99%, 99.9% and
  99.99% are evenly spaced and the tail is visible;
- decisions completed per second and the reserve p99 of each second (the run's last, partial
  second drawn over its real length, its count scaled to a rate; see bucket_spans).

matplotlib is optional (not a dependency): only a FILE ending in .png needs it.
"""

from __future__ import annotations

import html
import math
import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram

    from quota_sidecar.tools.loadtest import LoadReport

Point = tuple[float, float]
# Colour-blind-safe pair (Okabe-Ito blue and vermillion).
_COLORS = ("#0072B2", "#D55E00")
_NINES_TICKS = ((0, "0%"), (1, "90%"), (2, "99%"), (3, "99.9%"), (4, "99.99%"))
_W, _H = 760, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 36, 36, 48


def percentile_curve(hist: HdrHistogram, *, max_nines: float = 4.0, step: float = 0.05) -> list[tuple[float, float]]:
    """(percentile, ms) along an HDR-style axis x = -log10(1 - p/100): x = 1 is p90, 2 p99, ... 4 p99.99."""
    if hist.get_total_count() == 0:
        return []
    points = []
    for i in range(int(round(max_nines / step)) + 1):
        p = 100.0 * (1.0 - 10.0 ** -(i * step))
        points.append((p, round(hist.get_value_at_percentile(p) / 1000.0, 3)))
    return points


def check_plot_path(path: str) -> None:
    """Raises ValueError when the plot could not be written, before a long run is wasted."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path}: folder {folder} does not exist")
    if _is_png(path):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(f"--plot {path}: a PNG needs matplotlib, which is not installed (pip install "
                             "matplotlib); or give a .html file (self-contained, no dependency)") from None


def write_plot(report: LoadReport, path: str) -> None:
    if _is_png(path):
        _write_png(report, path)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))


def _is_png(path: str) -> bool:
    return path.lower().endswith(".png")


def nines(percentile: float) -> float:
    """The HDR x coordinate of a percentile: 90 -> 1, 99 -> 2, 99.9 -> 3 (100 is clipped to 6)."""
    return min(6.0, -math.log10(max(1.0 - percentile / 100.0, 1e-6)))


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2 or 5 x 10^k) up to at least high."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _polyline(points: Sequence[Point], sx: float, sy: float, x0: float, color: str) -> str:
    coords = " ".join(f"{_LEFT + (x - x0) * sx:.1f},{_H - _BOTTOM - y * sy:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'


def _axes(x_ticks: Sequence[tuple[float, str]], y_ticks: Sequence[float], sx: float, sy: float, x0: float,
          x_label: str, y_label: str) -> list[str]:
    bottom, right = _H - _BOTTOM, _W - _RIGHT
    out = [f'<line x1="{_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
           f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#333"/>']
    for x, label in x_ticks:
        px = _LEFT + (x - x0) * sx
        out.append(f'<line x1="{px:.1f}" y1="{_TOP}" x2="{px:.1f}" y2="{bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">{html.escape(label)}</text>')
    for y in y_ticks:
        py = bottom - y * sy
        out.append(f'<line x1="{_LEFT}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    out.append(f'<text x="{(_LEFT + right) / 2}" y="{_H - 8}" text-anchor="middle">{html.escape(x_label)}</text>')
    out.append(f'<text x="16" y="{(_TOP + bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(_TOP + bottom) / 2})">{html.escape(y_label)}</text>')
    return out


def svg_chart(title: str, series: Sequence[tuple[str, Sequence[Point]]], x_ticks: Sequence[tuple[float, str]],
              x_label: str, y_label: str) -> str:
    """A line chart as an inline <svg> element (no xmlns: inline SVG in HTML needs none)."""
    xs = [x for x, _ in x_ticks] or [0.0, 1.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1e-9)
    y_ticks = nice_ticks(max((y for _, pts in series for _, y in pts), default=0.0))
    sx = (_W - _LEFT - _RIGHT) / (x1 - x0)
    sy = (_H - _TOP - _BOTTOM) / (y_ticks[-1] or 1.0)
    parts = [f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" '
             f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="12">',
             f'<text x="{_LEFT}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    parts += _axes(x_ticks, y_ticks, sx, sy, x0, x_label, y_label)
    for i, (label, points) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        if points:
            parts.append(_polyline(points, sx, sy, x0, color))
        lx = _W - _RIGHT - 260
        parts.append(f'<rect x="{lx}" y="{10 + 16 * i}" width="12" height="3" fill="{color}"/>')
        parts.append(f'<text x="{lx + 18}" y="{16 + 16 * i}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def percentile_svg(report: LoadReport) -> str:
    series = [("reserve latency" + (" (from intended send)" if report.service_latency_ms else ""),
               [(nines(p), ms) for p, ms in percentile_curve(report.histogram)])]
    if report.service_latency_ms:
        series.append(("service time (from actual send)",
                       [(nines(p), ms) for p, ms in percentile_curve(report.service_histogram)]))
    return svg_chart("Latency by percentile", series, [(float(x), t) for x, t in _NINES_TICKS], "percentile",
                     "latency (ms)")


def _second_ticks(last: int) -> list[tuple[float, str]]:
    step = nice_ticks(max(last, 1), 8)
    return [(t, f"{t:g}") for t in step]


# A last partial second shorter than this is left out when there are other seconds to draw: its rate
# (a handful of completions over a few milliseconds) is noise, and a spike would set the y axis.
MIN_PARTIAL_SECONDS = 0.1


def bucket_spans(report: LoadReport) -> list[tuple[Any, float]]:
    """(bucket, length in seconds) of the buckets to draw. Every bucket is a whole second except the
    run's last, which ends at elapsed_seconds: drawn at its count per second it would show the end of
    every run as a throughput collapse."""
    buckets = list(report.timeline)
    spans = [(b, 1.0) for b in buckets[:-1]]
    if buckets:
        last = buckets[-1]
        length = min(1.0, report.elapsed_seconds - last.second)
        if length >= MIN_PARTIAL_SECONDS:
            spans.append((last, length))
        elif not spans:  # the whole run is this fragment: its own rate is all there is to show
            spans.append((last, max(length, 1e-3)))
    return spans


def steps(report: LoadReport) -> tuple[list[Point], list[Point]]:
    """(decisions per second, p99 per second) as steps, each bucket drawn over the time it covers
    (bucket_spans): whole seconds, and the last, partial one over its real length with its count
    scaled to a rate; so even a one-second run shows a line. Seconds without calls have no p99."""
    rate: list[Point] = []
    p99: list[Point] = []
    for b, length in bucket_spans(report):
        start, end = float(b.second), b.second + length
        rate += [(start, b.decisions / length), (end, b.decisions / length)]
        if b.rpcs:
            p99 += [(start, b.p99_ms), (end, b.p99_ms)]
    return rate, p99


def timeline_svgs(report: LoadReport) -> list[str]:
    last = report.timeline[-1].second + 1 if report.timeline else 1
    ticks = _second_ticks(last)
    rate, p99 = steps(report)
    return [svg_chart("Throughput", [("decisions completed per second", rate)], ticks, "seconds after warm-up",
                      "decisions/s"),
            svg_chart("p99 latency per second", [("reserve p99 of the calls completed that second", p99)], ticks,
                      "seconds after warm-up", "p99 (ms)")]


def render_html(report: LoadReport) -> str:
    charts = "\n".join([percentile_svg(report), *timeline_svgs(report)])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>quota-sidecar loadtest {html.escape(report.run_id)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
pre {{ background: #f6f6f6; padding: 12px; overflow-x: auto; }}
svg {{ display: block; margin: 16px 0; }}
</style>
</head>
<body>
<h1>quota-sidecar loadtest</h1>
<pre>{html.escape(report.text())}</pre>
{charts}
</body>
</html>
"""


def _write_png(report: LoadReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 11))
    curves = [("reserve latency", report.histogram)]
    if report.service_latency_ms:
        curves = [("from intended send", report.histogram), ("service time", report.service_histogram)]
    for label, hist in curves:
        points = percentile_curve(hist)
        ax1.plot([nines(p) for p, _ in points], [ms for _, ms in points], label=label)
    ax1.set_xticks([x for x, _ in _NINES_TICKS], [t for _, t in _NINES_TICKS])
    ax1.set(title="Latency by percentile", xlabel="percentile", ylabel="latency (ms)")
    ax1.legend()
    rate, p99 = steps(report)
    ax2.plot([x for x, _ in rate], [y for _, y in rate])
    ax2.set(title="Throughput", xlabel="seconds after warm-up", ylabel="decisions/s")
    ax3.plot([x for x, _ in p99], [y for _, y in p99], color=_COLORS[1])
    ax3.set(title="p99 latency per second", xlabel="seconds after warm-up", ylabel="p99 (ms)")
    for ax in (ax1, ax2, ax3):
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
