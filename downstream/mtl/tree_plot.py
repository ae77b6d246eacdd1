"""PNG figures of the branched networks (PIL only): affinity heat-maps and task trees."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tree_search import Tree

# a viridis-like ramp: dark blue (low) -> green -> yellow (high)
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_PAD, _LINE = 6, 12  # text padding and line height (px) of PIL's default font


def _colour(value: float, low: float, high: float) -> Tuple[int, int, int]:
    x = 0.0 if high <= low else float(np.clip((value - low) / (high - low), 0, 1)) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    c = _RAMP[i] + (x - i) * (_RAMP[i + 1] - _RAMP[i])
    return tuple(int(round(v)) for v in c)  # type: ignore[return-value]


def text_width(text: str, font=None) -> float:
    return float((font or ImageFont.load_default()).getlength(text))


def heatmap_cell(tasks: Sequence[str], font=None, minimum: int = 56) -> int:
    """Cell side (px) of the heat-map: wide enough for the longest task name under its column."""
    return int(max([minimum] + [text_width(t, font) + 2 * _PAD for t in tasks]))


def affinity_heatmap(matrix: np.ndarray, tasks: Sequence[str], path: Union[str, Path], *, title: str) -> Path:
    """N x N heat-map with the value in every cell; colours span the off-diagonal range."""
    n = len(tasks)
    font = ImageFont.load_default()
    cell = heatmap_cell(tasks, font)
    margin_left, margin_top = int(max(text_width(t, font) for t in tasks)) + 2 * _PAD + 4, 40
    width = max(margin_left + n * cell + 10, int(text_width(title, font)) + 20)
    img = Image.new("RGB", (width, margin_top + n * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    off = matrix[~np.eye(n, dtype=bool)] if n > 1 else matrix.ravel()
    low, high = float(off.min()), float(off.max())
    draw.text((10, 8), title, fill="black", font=font)
    for a in range(n):
        draw.text((_PAD, margin_top + a * cell + cell // 2 - 5), tasks[a], fill="black", font=font)
        draw.text((margin_left + a * cell + _PAD, margin_top + n * cell + 8), tasks[a], fill="black", font=font)
        for b in range(n):
            x0, y0 = margin_left + b * cell, margin_top + a * cell
            colour = (200, 200, 200) if a == b else _colour(float(matrix[a, b]), low, high)
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=colour)
            text = "white" if sum(colour) < 380 else "black"
            draw.text((x0 + _PAD, y0 + cell // 2 - 5), f"{matrix[a, b]:.2f}", fill=text, font=font)
    path = Path(path)
    img.save(path)
    return path


def _leaf_order(tree: Tree) -> List[Tuple[str, ...]]:
    """Leaves (clusters of the last partition) in depth-first order, so no edges cross."""
    def children(depth: int, cluster: Tuple[str, ...]) -> List[Tuple[str, ...]]:
        return [c for c in tree[depth] if set(c) <= set(cluster)]

    def walk(depth: int, cluster: Tuple[str, ...]) -> List[Tuple[str, ...]]:
        if depth == len(tree):
            return [cluster]
        return [leaf for c in children(depth, cluster) for leaf in walk(depth + 1, c)]

    root = tuple(t for c in tree[0] for t in c)
    return walk(0, root)


@dataclass(frozen=True)
class Box:
    depth: int  # 0 = input, d = branch point d
    cluster: Tuple[str, ...]
    lines: Tuple[str, ...]  # the label, one task per line
    x0: float
    y0: float
    x1: float
    y1: float


def tree_layout(tree: Tree, font=None) -> Tuple[List[Box], Tuple[int, int]]:
    """Boxes of :func:`draw_tree` and the image size. Each leaf gets a column as wide as its longest task name; a
    box spans the columns of its leaves (depth-first order keeps them adjacent), so boxes of one row never overlap
    and every label (full task names, one per line) fits its box."""
    leaves = _leaf_order(tree)
    left, gap = 80, 10
    widths = [max(90.0, max(text_width(t, font) for t in leaf) + 2 * _PAD) + gap for leaf in leaves]
    starts = np.concatenate([[left], left + np.cumsum(widths)])
    root = tuple(t for c in tree[0] for t in c)
    levels = [[root], *[list(p) for p in tree]]
    row = max(len(c) for c in tree[0]) * _LINE + 2 * _PAD + 36
    boxes = []
    for depth, clusters in enumerate(levels):
        y0 = 36 + depth * row
        for c in clusters:
            ids = [i for i, leaf in enumerate(leaves) if set(leaf) <= set(c)]
            lines = ("input",) if depth == 0 else tuple(c)
            x0, x1 = starts[ids[0]] + gap / 2, starts[ids[-1] + 1] - gap / 2
            if depth == 0:  # a small box in the middle
                mid = (x0 + x1) / 2
                x0, x1 = mid - 30, mid + 30
            boxes.append(Box(depth, c, lines, float(x0), float(y0), float(x1), float(y0 + len(lines) * _LINE + 2 * _PAD)))
    size = (int(starts[-1]) + 10, 36 + len(levels) * row + 30)
    return boxes, size


def draw_tree(tree: Tree, path: Union[str, Path], *, level_names: Sequence[str], title: str = "") -> Path:
    """The tree top-down: input, one row per branch point (a box per branch listing its tasks), heads at the bottom."""
    font = ImageFont.load_default()
    boxes, size = tree_layout(tree, font)
    img = Image.new("RGB", (max(size[0], int(text_width(title, font)) + 20), size[1]), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)
    by_depth = {}
    for b in boxes:
        by_depth.setdefault(b.depth, []).append(b)
    for depth, row in sorted(by_depth.items()):
        draw.text((8, row[0].y0 + _PAD), "input" if depth == 0 else level_names[depth - 1], fill="black", font=font)
        for b in row:
            if depth:
                parent = next(p for p in by_depth[depth - 1] if set(b.cluster) <= set(p.cluster))
                draw.line([(parent.x0 + parent.x1) / 2, parent.y1, (b.x0 + b.x1) / 2, b.y0], fill=(90, 90, 90), width=2)
    last = max(by_depth)
    for b in boxes:
        fill = (220, 232, 250) if b.depth else (235, 235, 235)
        draw.rectangle([b.x0, b.y0, b.x1, b.y1], outline="black", fill=fill)
        for i, line in enumerate(b.lines):
            draw.text((b.x0 + _PAD, b.y0 + _PAD + i * _LINE), line, fill="black", font=font)
        if b.depth == last:  # each leaf carries the heads of its tasks
            x = (b.x0 + b.x1) / 2
            draw.line([x, b.y1, x, b.y1 + 14], fill=(90, 90, 90), width=2)
            draw.text((x - text_width("heads", font) / 2, b.y1 + 16), "heads", fill="black", font=font)
    path = Path(path)
    img.save(path)
    return path
