"""Preview grids of multi-task samples: image and every label side by side (PIL only)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from .labels import colourise

# a perceptual dark-blue -> yellow ramp (viridis-like anchors) for depth
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


def _ramp(x: np.ndarray) -> np.ndarray:
    pos = np.clip(x, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def render_label(task: str, value: torch.Tensor) -> np.ndarray:
    """One map of a sample -> RGB uint8 [H,W,3] for display."""
    v = value.detach().cpu().numpy()
    if task == "image":
        return (np.clip(v.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    if task in ("semseg", "human_parts"):
        return colourise(v)
    if task == "normals":
        valid = np.any(v != 0, axis=0)[..., None]
        return np.where(valid, (v.transpose(1, 2, 0) + 1) * 127.5, 0).astype(np.uint8)
    if task == "depth":
        d = v[0]
        valid = d > 0
        lo, hi = (d[valid].min(), d[valid].max()) if valid.any() else (0, 1)
        rgb = _ramp(1 - (d - lo) / max(hi - lo, 1e-6))  # near = bright
        return np.where(valid[..., None], rgb, 0).astype(np.uint8)
    grey = np.where(v[0] == 255, 128, np.clip(v[0], 0, 1) * 255).astype(np.uint8)  # sal, edge
    return np.repeat(grey[..., None], 3, -1)


def save_sample_grid(path: Union[str, Path], samples: Sequence[Dict[str, object]], *, cell: int = 128,
                     title: str = "") -> Path:
    """Save rows of (image, each task map) for ``samples`` (dicts as returned by the multi-task
    datasets, untransformed). Rows may have different task sets; each cell is ``cell`` px high."""
    rows = []
    for sample in samples:
        keys = ["image"] + [k for k in sample if k not in ("image", "meta") and isinstance(sample[k], torch.Tensor)]
        rows.append([(key, render_label(key, sample[key])) for key in keys])
    return save_tile_rows(path, rows, cell=cell, title=title)


def save_tile_rows(path: Union[str, Path], rows: Sequence[Sequence[Tuple[str, np.ndarray]]], *, cell: int = 128,
                   title: str = "") -> Path:
    """Save rows of captioned RGB uint8 tiles ``(caption, [H,W,3])``, each scaled to ``cell`` px high."""
    rendered: List[Image.Image] = []
    for row_tiles in rows:
        tiles = []
        for caption, array in row_tiles:
            tile = Image.fromarray(array)
            tile = tile.resize((max(1, round(tile.width * cell / tile.height)), cell), Image.NEAREST)
            if caption:
                ImageDraw.Draw(tile).text((2, 1), caption, fill=(255, 255, 255))
            tiles.append(tile)
        row = Image.new("RGB", (sum(t.width for t in tiles) + 2 * len(tiles), cell + 2))
        x = 0
        for tile in tiles:
            row.paste(tile, (x, 1))
            x += tile.width + 2
        rendered.append(row)
    header = 14 if title else 0
    grid = Image.new("RGB", (max(r.width for r in rendered), sum(r.height for r in rendered) + header), (32, 32, 32))
    if title:
        ImageDraw.Draw(grid).text((2, 1), title, fill=(255, 255, 255))
    y = header
    for row in rendered:
        grid.paste(row, (0, y))
        y += row.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
