"""A picture of a search, drawn from its history alone, as SVG written by hand (no plotting library).

Every history entry has ``step`` (a step or trial number), ``objective`` (floats, larger is better) and
``exact`` (each task's exact-match rate on the lines it was scored on, in task order); an entry with
``pareto: true`` is on the Pareto front. Panels, top to bottom: each objective component over steps; each
task's accuracy over steps; and, when entries are marked ``pareto`` and there are two tasks or more, task 1
against task 2 with every entry as a dot and the front joined. Each series is a ``<g class="series">`` whose
``data-name`` names it, so the picture can be read back.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

WIDTH, PANEL_HEIGHT, GAP = 760, 170, 34
LEFT, RIGHT, TOP, BOTTOM = 56, 270, 26, 30  # plot margins inside a panel; the legend sits in the right one
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
FRONT_COLOR, CLOUD_COLOR = "#d62728", "#b0b0b0"


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str
    joined: bool = True  # a line through the points (in x order), else dots only


@dataclass(frozen=True)
class Panel:
    title: str
    x_label: str
    series: list[Series]
    y_range: tuple[float, float] | None = None  # fixed (accuracies), else fitted to the points
    x_range: tuple[float, float] | None = None


def search_svg(history: Sequence[dict], tasks: Sequence[str], *, objective_names: Sequence[str] = (), title: str = "search") -> str:
    """The picture of ``history`` (see the module docstring); ``tasks`` and ``objective_names`` only label it."""
    if not history:
        raise ValueError("a search with no history has nothing to draw")
    steps = [float(entry["step"]) for entry in history]
    width = max(len(entry["objective"]) for entry in history)
    names = [objective_names[i] if i < len(objective_names) else f"objective {i + 1}" for i in range(width)]
    panels = [Panel(name, "step", [Series(name, _points(steps, [e["objective"][i] if i < len(e["objective"]) else None for e in history]),
                                          COLORS[0])]) for i, name in enumerate(names)]
    panels.append(Panel("exact match per task", "step", [
        Series(task, _points(steps, [e["exact"][t] for e in history]), COLORS[t % len(COLORS)]) for t, task in enumerate(tasks)], (0.0, 1.0)))
    front = [e for e in history if e.get("pareto")]
    if front and len(tasks) >= 2:
        def pair(entries):
            return _points([e["exact"][0] for e in entries], [e["exact"][1] for e in entries])
        panels.append(Panel(f"Pareto front: {tasks[1]} against {tasks[0]}", tasks[0], [
            Series("all", pair(history), CLOUD_COLOR, joined=False), Series("Pareto front", pair(front), FRONT_COLOR)],
            (0.0, 1.0), (0.0, 1.0)))
    height = TOP + len(panels) * (PANEL_HEIGHT + GAP)
    body = [_panel(panel, TOP + i * (PANEL_HEIGHT + GAP)) for i, panel in enumerate(panels)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="sans-serif" font-size="11">\n<title>{escape(title)}</title>\n'
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>\n'
            f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>\n' + "\n".join(body) + "\n</svg>\n")


def _points(xs: Sequence[float], ys: Sequence[float | None]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y) and math.isfinite(x)]


def _panel(panel: Panel, top: float) -> str:
    points = [p for s in panel.series for p in s.points]
    x0, x1 = panel.x_range or _span([x for x, _ in points])
    y0, y1 = panel.y_range or _span([y for _, y in points])
    left, right, bottom = LEFT, WIDTH - RIGHT, top + PANEL_HEIGHT - BOTTOM
    plot_top = top + 18

    def sx(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * (right - left), 2)

    def sy(y: float) -> float:
        return round(bottom - (y - y0) / (y1 - y0) * (bottom - plot_top), 2)

    out = [f'<g class="panel" data-title={quoteattr(panel.title)}>',
           f'<text x="{left}" y="{top + 10}" font-size="12">{escape(panel.title)}</text>',
           f'<rect x="{left}" y="{plot_top}" width="{right - left}" height="{bottom - plot_top}" fill="none" stroke="#444"/>']
    for value in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{right}" y1="{sy(value)}" y2="{sy(value)}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 4}" y="{sy(value) + 4}" text-anchor="end">{_number(value)}</text>')
    for value in _ticks(x0, x1):
        out.append(f'<text x="{sx(value)}" y="{bottom + 13}" text-anchor="middle">{_number(value)}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 26}" text-anchor="middle" fill="#555">{escape(panel.x_label)}</text>')
    for k, series in enumerate(panel.series):
        out.append(f'<g class="series" data-name={quoteattr(series.name)} fill="{series.color}" stroke="{series.color}">')
        if series.joined and len(series.points) > 1:
            line = " ".join(f"{sx(x)},{sy(y)}" for x, y in sorted(series.points))
            out.append(f'<polyline points="{line}" fill="none" stroke-width="1.5"/>')
        out.extend(f'<circle cx="{sx(x)}" cy="{sy(y)}" r="2.5" data-x="{x:.6g}" data-y="{y:.6g}"/>' for x, y in series.points)
        legend_y = plot_top + 12 + 16 * k
        out.append(f'<rect x="{right + 12}" y="{legend_y - 8}" width="10" height="10"/>'
                   f'<text x="{right + 27}" y="{legend_y + 1}" stroke="none" fill="#222">{escape(series.name)}</text></g>')
    out.append("</g>")
    return "\n".join(out)


def _span(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or max(abs(high) * 0.05, 0.5)
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values between ``low`` and ``high``, about ``count`` of them."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-9 else "0"



def record_svg(record: dict, title: str) -> str:
    """The picture of a search record (a model's ``origin["search"]``), its tasks labelled by file name."""
    tasks = [task.rsplit("/", 1)[-1] for task in record["tasks"]]
    return search_svg(record["history"], tasks, objective_names=record.get("objective_names", ()), title=title)
