"""PNG figures of the branched networks (PIL only): affinity heat-maps and task trees."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tree_search import Tree

# a viridis-like ramp: dark blue (low) -> green -> yellow (high)
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def _colour(value: float, low: float, high: float) -> Tuple[int, int, int]:
    x = 0.0 if high <= low else float(np.clip((value - low) / (high - low), 0, 1)) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    c = _RAMP[i] + (x - i) * (_RAMP[i + 1] - _RAMP[i])
    return tuple(int(round(v)) for v in c)  # type: ignore[return-value]


def affinity_heatmap(matrix: np.ndarray, tasks: Sequence[str], path: Union[str, Path], *, title: str,
                     cell: int = 56) -> Path:
    """N x N heat-map with the value in every cell; colours span the off-diagonal range."""
    n = len(tasks)
    font = ImageFont.load_default()
    margin_left, margin_top = 90, 40
    img = Image.new("RGB", (margin_left + n * cell + 10, margin_top + n * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    off = matrix[~np.eye(n, dtype=bool)] if n > 1 else matrix.ravel()
    low, high = float(off.min()), float(off.max())
    draw.text((10, 8), title, fill="black", font=font)
    for a in range(n):
        draw.text((8, margin_top + a * cell + cell // 2 - 5), tasks[a], fill="black", font=font)
        draw.text((margin_left + a * cell + 4, margin_top + n * cell + 8), tasks[a][:9], fill="black", font=font)
        for b in range(n):
            x0, y0 = margin_left + b * cell, margin_top + a * cell
            colour = (200, 200, 200) if a == b else _colour(float(matrix[a, b]), low, high)
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=colour)
            text = "white" if sum(colour) < 380 else "black"
            draw.text((x0 + 8, y0 + cell // 2 - 5), f"{matrix[a, b]:.2f}", fill=text, font=font)
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


def draw_tree(tree: Tree, path: Union[str, Path], *, level_names: Sequence[str], title: str = "") -> Path:
    """The tree top-down: input, one row per branch point (a box per branch listing its tasks), heads at the bottom."""
    font = ImageFont.load_default()
    leaves = _leaf_order(tree)
    slot, row = 150, 70
    width, height = max(1, len(leaves)) * slot + 200, (len(tree) + 2) * row + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)

    def x_of(cluster: Tuple[str, ...]) -> float:
        xs = [120 + i * slot + slot / 2 for i, leaf in enumerate(leaves) if set(leaf) <= set(cluster)]
        return float(np.mean(xs))

    root = tuple(t for c in tree[0] for t in c)
    levels = [[root], *[list(p) for p in tree]]
    positions = {}
    for depth, clusters in enumerate(levels):
        y = 40 + depth * row
        draw.text((8, y + 8), "input" if depth == 0 else level_names[depth - 1], fill="black", font=font)
        for c in clusters:
            positions[(depth, c)] = (x_of(c), y)
    for (depth, c), (x, y) in positions.items():
        if depth > 0:
            parent = next(p for p in levels[depth - 1] if set(c) <= set(p))
            px, py = positions[(depth - 1, parent)]
            draw.line([px, py + 24, x, y], fill=(90, 90, 90), width=2)
    for (depth, c), (x, y) in positions.items():
        label = "input" if depth == 0 else ",".join(t[:6] for t in c)
        w = max(40, 7 * len(label) + 10)
        draw.rectangle([x - w / 2, y, x + w / 2, y + 24], outline="black", fill=(220, 232, 250) if depth else (235, 235, 235))
        draw.text((x - w / 2 + 5, y + 7), label, fill="black", font=font)
    y = 40 + len(levels) * row
    for i, leaf in enumerate(leaves):
        x = 120 + i * slot + slot / 2
        draw.line([x, y - row + 24, x, y], fill=(90, 90, 90), width=2)
        draw.text((x - 30, y + 4), "heads: " + ",".join(t[:6] for t in leaf), fill="black", font=font)
    path = Path(path)
    img.save(path)
    return path
