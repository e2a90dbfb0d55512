"""Pictures of DARTS cells and of their architecture weights α, drawn without pyplot or graphviz.

Everything here builds a ``matplotlib.figure.Figure`` with its own Agg canvas and never touches pyplot's global
state, so it is safe in worker processes and threads. The ``save_*`` functions write the PNG atomically (a temp
file in the same directory, then ``os.replace``) so a tracker or a person looking at the file never sees half of it.

Genotypes are duck-typed: anything with ``normal``/``reduce`` (flat ``(op, input)`` pairs, two per intermediate
node, where inputs 0 and 1 are ``c_{k-2}``, ``c_{k-1}`` and ``2 + i`` is intermediate node ``i``) and
``normal_concat``/``reduce_concat`` (node indices, from 2, concatenated into ``c_{k}``) will do.
"""

from __future__ import annotations

import io
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyArrowPatch
from PIL import Image

__all__ = [
    "alpha_figure",
    "alpha_row_labels",
    "cell_figure",
    "cells_figure",
    "figure_image",
    "save_alpha_heatmap",
    "save_cell",
    "save_cells",
    "save_cells_animation",
]

CellKind = Literal["normal", "reduce"]

_CELL_TITLES = {"normal": "normal cell", "reduce": "reduction cell"}
_INPUT_NAMES = ("c_{k-2}", "c_{k-1}")

# Colours per node kind, and the look of edges and their labels.
_INPUT_COLOUR = "#a1d99b"
_NODE_COLOUR = "#9ecae1"
_UNUSED_COLOUR = "#e0e0e0"
_OUTPUT_COLOUR = "#fdd0a2"
_EDGE_COLOUR = "#404040"
_CONCAT_COLOUR = "#8c8c8c"

# Geometry in data units; the cell axes use one inch per data unit, so text sizes below can be compared with it.
_NODE_RADIUS = 0.3
_X0 = 2.1  # horizontal position of intermediate node 0 (inputs are at x = 0)
_DX = 1.75  # horizontal gap between consecutive intermediate nodes
_DY = 0.8  # vertical drop between consecutive intermediate nodes
_MARGIN = 0.15
_TITLE_SPACE = 0.35
_LEGEND_SPACE = 0.35
_LABEL_FONTSIZE = 8.0
_NODE_FONTSIZE = 11.0
_RADS = (0.0, 0.12, -0.12, 0.25, -0.25, 0.38, -0.38, 0.5, -0.5)  # arc3 curvatures to choose from
_LABEL_TS = (0.5, 0.43, 0.57, 0.36, 0.64, 0.3, 0.7, 0.25, 0.75)


# --------------------------------------------------------------------------------------------------- cell pictures


def _cell_spec(genotype: Any, cell: str) -> tuple[list[tuple[str, int, int]], list[int], int]:
    """Check one cell of a genotype and return its edges as (op, source node, target node), concat and node count."""
    if cell not in _CELL_TITLES:
        raise ValueError(f"cell must be 'normal' or 'reduce', got {cell!r}")
    pairs = list(getattr(genotype, cell))
    concat = [int(c) for c in getattr(genotype, f"{cell}_concat")]
    if not pairs or len(pairs) % 2:
        raise ValueError(f"{cell} cell needs two (op, input) edges per intermediate node, got {len(pairs)} edges")
    n = len(pairs) // 2
    edges = []
    for k, (op, src) in enumerate(pairs):
        node = k // 2
        if not 0 <= int(src) < 2 + node:
            raise ValueError(f"{cell} cell: intermediate node {node} cannot take input {src} (valid: 0..{1 + node})")
        edges.append((str(op), int(src), 2 + node))
    for c in concat:
        if not 2 <= c < 2 + n:
            raise ValueError(f"{cell} cell: concat index {c} is not an intermediate node (valid: 2..{1 + n})")
    return edges, concat, n


def _layout(n: int) -> dict[int, tuple[float, float]]:
    """Node centres: inputs left, intermediate nodes on a falling diagonal (no three in line), output right.

    Node ids: 0 and 1 are the cell inputs, 2 + i is intermediate node i, n + 2 is the output.
    """
    top = (n - 1) * _DY / 2
    pos = {2 + i: (_X0 + i * _DX, top - i * _DY) for i in range(n)}
    spread = max(top, 0.9)
    pos[0] = (0.0, spread)
    pos[1] = (0.0, -spread)
    pos[n + 2] = (_X0 + (n - 1) * _DX + 1.6, 0.0)
    return pos


def _bezier(p0: np.ndarray, p2: np.ndarray, rad: float, ts: np.ndarray) -> np.ndarray:
    """Points of the quadratic curve matplotlib's ``arc3,rad=...`` draws between two centres (equal-aspect axes)."""
    d = p2 - p0
    ctrl = (p0 + p2) / 2 + rad * np.array([d[1], -d[0]])
    ts = ts[:, None]
    return (1 - ts) ** 2 * p0 + 2 * (1 - ts) * ts * ctrl + ts**2 * p2


def _route(centres: dict[int, np.ndarray], links: list[tuple[int, int]]) -> list[float]:
    """Pick an arc3 curvature per link so curves keep clear of other nodes and do not run along each other."""
    ts = np.linspace(0.1, 0.9, 41)
    middle = (ts >= 0.3) & (ts <= 0.7)
    drawn: list[tuple[tuple[int, int], float, np.ndarray]] = []
    rads = [0.0] * len(links)
    # Long links first: they have the fewest good routes.
    order = sorted(range(len(links)), key=lambda k: -np.linalg.norm(centres[links[k][1]] - centres[links[k][0]]))
    for k in order:
        src, dst = links[k]
        taken = [r for link, r, _ in drawn if link == (src, dst)]  # a repeated (src, dst) pair gets its own curve
        best, best_cost = 0.0, math.inf
        for rad in (r for r in _RADS if r not in taken):
            pts = _bezier(centres[src], centres[dst], rad, ts)
            cost = 0.4 * abs(rad)
            for node, c in centres.items():
                if node not in (src, dst):
                    gap = float(np.min(np.linalg.norm(pts - c, axis=1)))
                    cost += 20.0 * max(0.0, _NODE_RADIUS + 0.3 - gap)
            for (s, d), _, other in drawn:
                # Links sharing an end must meet there; only their middles should stay apart.
                mine = pts[middle] if {s, d} & {src, dst} else pts
                dist = np.min(np.linalg.norm(mine[:, None, :] - other[None, :, :], axis=2), axis=1)
                cost += 2.0 * float(np.mean(dist < 0.15))
            if cost < best_cost:
                best, best_cost = rad, cost
        rads[k] = best
        drawn.append(((src, dst), best, _bezier(centres[src], centres[dst], best, ts)))
    return rads


def _label_size(text: str) -> tuple[float, float]:
    """Rough width and height (data units = inches) of an edge label with its box."""
    return (0.6 * _LABEL_FONTSIZE * len(text) + 8) / 72, (1.35 * _LABEL_FONTSIZE + 6) / 72


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Overlap area of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _place_labels(
    centres: dict[int, np.ndarray], edges: list[tuple[str, int, int]], curves: list[np.ndarray], rads: list[float]
) -> list[tuple[float, float, float, float]]:
    """Slide each label along its curve to where it covers the fewest nodes, other labels and other curves.

    Returns the label boxes as (x0, y0, x1, y1); the label goes at the box centre.
    """
    r = _NODE_RADIUS + 0.05
    obstacles = [(x - r, y - r, x + r, y + r) for x, y in centres.values()]
    boxes: list[tuple[float, float, float, float]] = []
    for k, (op, src, dst) in enumerate(edges):
        w, h = _label_size(op)
        others = np.concatenate([c for j, c in enumerate(curves) if j != k])
        best: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        best_cost = math.inf
        for t, (x, y) in zip(_LABEL_TS, _bezier(centres[src], centres[dst], rads[k], np.asarray(_LABEL_TS))):
            box = (float(x) - w / 2, float(y) - h / 2, float(x) + w / 2, float(y) + h / 2)
            inside = (
                (others[:, 0] > box[0]) & (others[:, 0] < box[2]) & (others[:, 1] > box[1]) & (others[:, 1] < box[3])
            )
            cost = 0.3 * abs(t - 0.5) + 0.05 * float(np.sum(inside))
            cost += 20.0 * sum(_overlap(box, o) for o in obstacles)
            cost += 20.0 * sum(_overlap(box, o) for o in boxes)
            if cost < best_cost:
                best, best_cost = box, cost
        boxes.append(best)
    return boxes


@dataclass(frozen=True)
class _CellDrawing:
    """Everything needed to draw a cell, computed before any figure exists so figures can be sized to fit."""

    cell: str
    n: int
    centres: dict[int, np.ndarray]
    concat: list[int]
    edges: list[tuple[str, int, int]]
    links: list[tuple[int, int]]
    rads: list[float]
    label_boxes: list[tuple[float, float, float, float]]
    extent: tuple[float, float, float, float]  # x0, x1, y0, y1

    @property
    def size(self) -> tuple[float, float]:
        return self.extent[1] - self.extent[0], self.extent[3] - self.extent[2]


def _plan_cell(genotype: Any, cell: str) -> _CellDrawing:
    """Lay out one cell: node positions, edge curvatures, label positions and the extent they cover."""
    edges, concat, n = _cell_spec(genotype, cell)
    centres = {k: np.asarray(v, dtype=float) for k, v in _layout(n).items()}
    links = [(src, dst) for _, src, dst in edges] + [(c, n + 2) for c in concat]
    rads = _route(centres, links)
    curves = [_bezier(centres[s], centres[d], r, np.linspace(0.0, 1.0, 121)) for (s, d), r in zip(links, rads)]
    boxes = _place_labels(centres, edges, curves, rads)
    pts = np.concatenate([*curves, np.stack(list(centres.values()))])
    r = _NODE_RADIUS + _MARGIN
    x0 = min(float(pts[:, 0].min()) - r, *(b[0] - _MARGIN for b in boxes))
    x1 = max(float(pts[:, 0].max()) + r, *(b[2] + _MARGIN for b in boxes))
    y0 = min(float(pts[:, 1].min()) - r, *(b[1] - _MARGIN for b in boxes))
    y1 = max(float(pts[:, 1].max()) + r, *(b[3] + _MARGIN for b in boxes))
    return _CellDrawing(cell, n, centres, concat, edges, links, rads, boxes, (x0, x1, y0, y1))


def _draw_cell(ax: Axes, plan: _CellDrawing, title: str | None, height: float | None = None) -> None:
    """Draw a planned cell onto ``ax``, whose box must be the plan's size in inches (or ``height`` tall)."""
    out = plan.n + 2
    patches: dict[int, Circle] = {}
    for node, (x, y) in plan.centres.items():
        if node < 2:
            colour, label, gid = _INPUT_COLOUR, f"${_INPUT_NAMES[node]}$", "node-input"
        elif node == out:
            colour, label, gid = _OUTPUT_COLOUR, "$c_{k}$", "node-output"
        else:
            colour = _NODE_COLOUR if node in plan.concat else _UNUSED_COLOUR
            label, gid = str(node - 2), "node-intermediate"
        patch = Circle((x, y), _NODE_RADIUS, facecolor=colour, edgecolor="#303030", linewidth=1.2, zorder=3)
        ax.add_patch(patch)
        patches[node] = patch
        ax.text(x, y, label, ha="center", va="center", fontsize=_NODE_FONTSIZE, zorder=4, gid=gid)

    for k, ((src, dst), rad) in enumerate(zip(plan.links, plan.rads)):
        is_concat = k >= len(plan.edges)
        ax.add_patch(
            FancyArrowPatch(
                tuple(plan.centres[src]),
                tuple(plan.centres[dst]),
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>,head_length=6,head_width=3",
                patchA=patches[src],
                patchB=patches[dst],
                shrinkA=1,
                shrinkB=1,
                color=_CONCAT_COLOUR if is_concat else _EDGE_COLOUR,
                linestyle="--" if is_concat else "-",
                linewidth=1.0 if is_concat else 1.3,
                zorder=2 if is_concat else 2.5,
            )
        )
    for (op, _, _), (bx0, by0, bx1, by1) in zip(plan.edges, plan.label_boxes):
        ax.text(
            (bx0 + bx1) / 2,
            (by0 + by1) / 2,
            op,
            ha="center",
            va="center",
            fontsize=_LABEL_FONTSIZE,
            zorder=5,
            gid="edge-label",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "#b0b0b0", "linewidth": 0.6},
        )
    x0, x1, y0, y1 = plan.extent
    pad = 0.0 if height is None else (height - (y1 - y0)) / 2
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(title if title is not None else _CELL_TITLES[plan.cell], fontsize=12)


def _new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas, so nothing goes through pyplot."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _panels_figure(
    plans: list[_CellDrawing], titles: list[str | None], suptitle: str | None, stacked: bool = False
) -> Figure:
    """Cells side by side (or stacked, one above the other) at one inch per data unit, with a legend of node colours
    underneath. Stacked halves the width, so a preview scaled to a browser column keeps its labels readable."""
    gap = 0.3
    if stacked:
        width = max(p.size[0] for p in plans)
        heights = [p.size[1] + _TITLE_SPACE for p in plans]
        height = sum(heights) + gap * (len(plans) - 1)
    else:
        width = sum(p.size[0] for p in plans) + gap * (len(plans) - 1)
        height = max(p.size[1] for p in plans)
    top = (0.0 if stacked else _TITLE_SPACE) + (0.4 if suptitle else 0.0)
    total = _LEGEND_SPACE + height + top
    fig = _new_figure(width, total)
    left, bottom = 0.0, _LEGEND_SPACE + height
    for plan, title in zip(plans, titles):
        w, h = plan.size
        if stacked:  # from the top down, each cell centred horizontally under its own title
            bottom -= h + _TITLE_SPACE
            box = ((width - w) / 2 / width, bottom / total, w / width, h / total)
            bottom -= gap
        else:  # the shorter cell is centred vertically in a full-height panel so both titles line up
            box = (left / width, _LEGEND_SPACE / total, w / width, height / total)
            left += w + gap
        _draw_cell(fig.add_axes(box), plan, title, None if stacked else height)
    kinds = [("input", _INPUT_COLOUR), ("intermediate", _NODE_COLOUR), ("output", _OUTPUT_COLOUR)]
    if any(set(range(2, p.n + 2)) - set(p.concat) for p in plans):
        kinds.insert(2, ("intermediate, not in output", _UNUSED_COLOUR))
    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=10, markerfacecolor=c, markeredgecolor="#303030")
        for _, c in kinds
    ]
    fig.legend(
        handles,
        [name for name, _ in kinds],
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(kinds),
        frameon=False,
        fontsize=9,
    )
    if suptitle:
        fig.suptitle(suptitle, fontsize=13, y=1 - 0.1 / total, va="top")
    return fig


def cell_figure(genotype: Any, cell: CellKind, title: str | None = None) -> Figure:
    """Draw one cell of a genotype as a DAG, so a searched architecture can be read at a glance."""
    return _panels_figure([_plan_cell(genotype, cell)], [title], None)


def cells_figure(genotype: Any, title: str | None = None, stacked: bool = True) -> Figure:
    """Draw the normal cell above the reduction cell (``stacked=False``: side by side): one picture per searched
    architecture, about 10 inches wide, so it reads without zooming wherever it is previewed."""
    plans = [_plan_cell(genotype, "normal"), _plan_cell(genotype, "reduce")]
    return _panels_figure(plans, [None, None], title, stacked)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically: a temp file next to the target, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename and hide the PNG from other users (e.g. a tracking server).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            fig.savefig(f, format="png", bbox_inches="tight", pad_inches=0.1, facecolor="white")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_cell(genotype: Any, cell: CellKind, path: str | Path, title: str | None = None) -> Path:
    """Save one cell of a genotype as a PNG (parent directories are created); returns the path."""
    return _save(cell_figure(genotype, cell, title), path)


def save_cells(genotype: Any, path: str | Path, title: str | None = None, stacked: bool = True) -> Path:
    """Save normal and reduction cells as one PNG, e.g. once per search epoch; returns the path."""
    return _save(cells_figure(genotype, title, stacked), path)


def figure_image(fig: Figure) -> Image.Image:
    """A figure as an RGB PIL image, cropped as the saved PNG is (for MLflow's ``log_image`` and animations)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.1, facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def save_cells_animation(
    genotypes: Sequence[Any], path: str | Path, titles: Sequence[str] | None = None, seconds_per_frame: float = 0.8
) -> Path:
    """An animated GIF of cells over a search's epochs (one frame per genotype, the last one held longer), so how
    the cell settled can be watched. Frames of different sizes are centred on one white canvas."""
    if not genotypes:
        raise ValueError("an animation needs at least one genotype")
    titles = list(titles) if titles is not None else [None] * len(genotypes)
    frames = [figure_image(cells_figure(g, t)) for g, t in zip(genotypes, titles, strict=True)]
    width, height = max(f.width for f in frames), max(f.height for f in frames)
    canvas = []
    for frame in frames:
        page = Image.new("RGB", (width, height), "white")
        page.paste(frame, ((width - frame.width) // 2, (height - frame.height) // 2))
        canvas.append(page.quantize(colors=64))
    durations = [int(seconds_per_frame * 1000)] * (len(canvas) - 1) + [int(seconds_per_frame * 3000)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        canvas[0].save(tmp, format="GIF", save_all=True, append_images=canvas[1:], duration=durations, loop=0)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------- α heatmaps


def _node_name(index: int) -> str:
    return _INPUT_NAMES[index] if index < 2 else f"n{index - 2}"


def alpha_row_labels(n_nodes: int) -> list[str]:
    """Row labels of an α matrix with ``n_nodes`` intermediate nodes: ``n0←c_{k-2}``, ``n0←c_{k-1}``, ``n1←n0``..."""
    return [f"n{i}←{_node_name(j)}" for i in range(n_nodes) for j in range(2 + i)]


def _as_matrix(alpha: Any, primitives: Sequence[str], name: str) -> tuple[np.ndarray, int]:
    """α as a float64 numpy matrix plus its node count; ValueError when its shape fits no cell."""
    if hasattr(alpha, "detach"):
        alpha = alpha.detach().cpu().double().numpy()
    a = np.asarray(alpha, dtype=np.float64)
    if not primitives:
        raise ValueError("primitives is empty; the heatmap needs one column per operation")
    if a.ndim != 2 or a.shape[1] != len(primitives):
        raise ValueError(f"{name} must have shape (edges, {len(primitives)} primitives), got {tuple(a.shape)}")
    n = round((math.sqrt(9 + 8 * a.shape[0]) - 3) / 2)
    if n < 1 or n * (n + 3) // 2 != a.shape[0]:
        raise ValueError(f"{name} has {a.shape[0]} rows; a cell with n nodes has n(n+3)/2 rows (2, 5, 9, 14, 20, ...)")
    return a, n


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def alpha_figure(alpha_normal: Any, alpha_reduce: Any, primitives: Sequence[str], title: str | None = None) -> Figure:
    """Heatmaps of softmax(α) per edge for both cell types, to watch which operation each edge is settling on."""
    primitives = [str(p) for p in primitives]
    cells = [
        ("normal cell", *_as_matrix(alpha_normal, primitives, "alpha_normal")),
        ("reduction cell", *_as_matrix(alpha_reduce, primitives, "alpha_reduce")),
    ]
    probs = [_softmax_rows(a) for _, a, _ in cells]
    # Colour shows each weight relative to uniform (1/|ops|): early in a search every weight is close to uniform,
    # and a scale from 0 would paint the whole map one colour. A diverged search can give NaN: drawn, not fatal.
    uniform = 1.0 / len(primitives)
    ratios = [p / uniform for p in probs]
    finite = np.concatenate([r[np.isfinite(r)] for r in ratios])
    spread = float(np.abs(np.log(finite)).max()) if finite.size and (finite > 0).all() else 1.0
    spread = max(spread, math.log(1.05))  # a perfectly uniform α still gets a readable scale
    norm = LogNorm(vmin=math.exp(-spread), vmax=math.exp(spread), clip=True)
    rows = max(a.shape[0] for _, a, _ in cells)
    width = 2 * (0.62 * len(primitives) + 1.2) + 1.2
    height = 0.32 * rows + 1.9 + (0.35 if title else 0.0)
    fig = _new_figure(width, height)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 2)
    image = None
    for ax, (name, _, n), p, ratio in zip(axes, cells, probs, ratios):
        image = ax.imshow(ratio, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(primitives)), primitives, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(p.shape[0]), alpha_row_labels(n), fontsize=8)
        ax.set_title(name, fontsize=11)
        for i in range(p.shape[0]):
            for j in range(p.shape[1]):
                strong = np.isfinite(ratio[i, j]) and abs(math.log(max(ratio[i, j], 1e-12))) > 0.6 * spread
                ax.text(
                    j, i, f"{p[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if strong else "black"
                )
        # Thin lines between nodes' groups of rows make the per-node structure visible.
        start = 0
        for i in range(n - 1):
            start += 2 + i
            ax.axhline(start - 0.5, color="white", linewidth=1.5)
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9, label=f"softmax(α) ÷ uniform (1/{len(primitives)})")
    ticks = [math.exp(spread * t) for t in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    bar.set_ticks(ticks, labels=[f"{t:.3g}x" for t in ticks])
    bar.minorticks_off()
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def save_alpha_heatmap(
    alpha_normal: Any, alpha_reduce: Any, primitives: Sequence[str], path: str | Path, title: str | None = None
) -> Path:
    """Save the softmax(α) heatmaps as a PNG (parent directories are created); returns the path."""
    return _save(alpha_figure(alpha_normal, alpha_reduce, primitives, title), path)
