"""Procedural scenes: a pinhole camera over a ground plane with a back wall, and textured objects.

A scene is sampled once (``sample_scene``) and rendered at any time ``t`` (``render_scene``), so the
same description gives a still image or the frames of a short video. Every dense label comes from
the same geometry: the z-buffer that decides occlusion also gives depth, the objects' height fields
give surface normals, and the winning object at each pixel gives class, instance and human part.

Camera frame used for normals: x right, y up, z towards the camera (a wall facing the camera has
normal (0, 0, 1), the floor (0, 1, 0)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .classes import PERSON

# PASCAL-Part person parts grouped as in the multi-task benchmarks (7 classes incl. background).
PART_NAMES: Tuple[str, ...] = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")

# Per class: shape, width/height aspect, height in metres, colour mean (RGB 0..1), pattern, frequency.
_CLASS_STYLE: Dict[int, Tuple[str, float, float, Tuple[float, float, float], str, float]] = {
    1: ("cross", 1.6, 0.9, (0.75, 0.78, 0.85), "stripes", 2.0),
    2: ("ring", 1.0, 0.8, (0.15, 0.35, 0.80), "plain", 0.0),
    3: ("triangle", 1.1, 0.4, (0.85, 0.70, 0.15), "dots", 5.0),
    4: ("trapezoid", 1.8, 0.7, (0.90, 0.95, 0.95), "stripes", 4.0),
    5: ("rect", 0.4, 0.5, (0.20, 0.65, 0.30), "plain", 0.0),
    6: ("rect", 1.5, 1.4, (0.95, 0.80, 0.05), "checker", 3.0),
    7: ("semicircle", 1.7, 0.8, (0.80, 0.10, 0.10), "plain", 0.0),
    8: ("ellipse", 1.3, 0.45, (0.55, 0.40, 0.30), "stripes", 7.0),
    9: ("hexagon", 0.9, 0.9, (0.50, 0.30, 0.15), "checker", 6.0),
    10: ("ellipse", 1.6, 1.2, (0.30, 0.25, 0.22), "checker", 2.5),
    11: ("rect", 2.0, 0.8, (0.60, 0.45, 0.25), "stripes", 9.0),
    12: ("pentagon", 1.2, 0.55, (0.70, 0.55, 0.40), "noise", 6.0),
    13: ("diamond", 1.3, 1.5, (0.40, 0.22, 0.10), "noise", 3.0),
    14: ("star4", 1.3, 1.0, (0.10, 0.10, 0.12), "dots", 4.0),
    16: ("star5", 0.9, 0.9, (0.15, 0.55, 0.10), "noise", 8.0),
    17: ("ellipse", 1.4, 0.8, (0.92, 0.92, 0.85), "noise", 12.0),
    18: ("octagon", 1.8, 0.85, (0.55, 0.20, 0.45), "stripes", 3.0),
    19: ("rect", 2.8, 1.1, (0.20, 0.30, 0.35), "checker", 5.0),
    20: ("crescent", 1.2, 0.7, (0.12, 0.12, 0.35), "stripes", 10.0),
}
PERSON_HEIGHT_M = 1.7
CLASS_COLOUR_PROB = 0.3
NUM_ROOM_STYLES = 8
ROOM_SEED = 1234
MAX_WALL_DEPTH_M = 9.0
BACKGROUND_LABELS = {"wall": 22, "floor": 23}  # extra context labels written into LabelMap


@dataclass
class SceneObject:
    cls: int
    x: float  # centre column, fraction of the width
    base: float  # row where the object touches the floor, fraction of the height
    vx: float = 0.0  # per-frame motion (fractions of width / height)
    vbase: float = 0.0
    angle: float = 0.0
    spin: float = 0.0
    aspect: float = 1.0
    height_m: float = 1.0
    colour: np.ndarray = field(default_factory=lambda: np.ones(3))
    colour2: np.ndarray = field(default_factory=lambda: np.zeros(3))
    pattern: str = "plain"
    freq: float = 0.0
    pattern_angle: float = 0.0
    bulge: float = 0.3  # height field amplitude, fraction of the object's half size
    pose: Optional[np.ndarray] = None  # person: 8 joint angles (radians)
    instance: int = 0  # 0 = not annotated as a video instance


@dataclass
class Scene:
    height: int
    width: int
    focal: float  # pixels
    cam_height: float  # metres
    horizon: float  # row of the horizon, pixels
    wall_depth: float  # metres
    wall_colour: np.ndarray
    floor_colours: np.ndarray  # [2, 3] checker colours
    tile: float  # floor tile size, metres
    light: np.ndarray  # unit vector (camera frame)
    ambient: float
    exposure: np.ndarray  # [3] colour-tinted gain
    noise_seed: int
    objects: List[SceneObject]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _make_object(rng: np.random.Generator, cls: int, x: float, base: float) -> SceneObject:
    if cls == PERSON:
        shirt, trousers = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.6, 3)
        return SceneObject(
            cls=cls, x=x, base=base, aspect=0.55, height_m=PERSON_HEIGHT_M * rng.uniform(0.9, 1.1),
            colour=shirt, colour2=trousers, pattern="person",
            pose=rng.uniform([-0.2, -0.2, 0.0, 0.0, -0.35, -0.35, 0.0, 0.0], [1.3, 1.3, 1.6, 1.6, 0.35, 0.35, 0.6, 0.6]),
            bulge=0.5,
        )
    shape, aspect, height_m, colour, pattern, freq = _CLASS_STYLE[cls]
    # a class is recognised by shape, proportions and texture, not by colour: each instance takes its
    # class colour only 30% of the time, else a random one (as real object colours vary within a class)
    if rng.random() < CLASS_COLOUR_PROB:
        colour = np.clip(np.array(colour) + rng.normal(0, 0.05, 3), 0, 1)
    else:
        colour = rng.uniform(0.05, 0.95, 3)
    return SceneObject(
        cls=cls, x=x, base=base, angle=rng.normal(0, 0.15), aspect=aspect * rng.uniform(0.85, 1.15),
        height_m=height_m * rng.uniform(0.8, 1.25), colour=colour,
        colour2=np.clip(colour * 0.35 + rng.uniform(0, 0.3, 3), 0, 1), pattern=pattern,
        freq=freq, pattern_angle=rng.uniform(0, np.pi), bulge=rng.uniform(0.25, 0.5),
    )


def sample_scene(
    rng: np.random.Generator, height: int, width: int, *, num_objects: Tuple[int, int] = (3, 7),
    main_class: Optional[int] = None, person_prob: float = 0.45, moving: int = 0, main_objects: int = 0,
    wall_depth_m: Optional[Tuple[float, float]] = None,
) -> Scene:
    """Sample a scene description.

    ``main_class``: one dominant, centred object of that class (classification images).
    ``main_objects``: that many dominant objects of random object classes side by side, each about as tall as
    the object of a classification image (the scene-centric premise: several objects per image, so two crops
    of one scene often show different objects), plus 0-2 small distractors far away.
    ``moving``: number of objects given a velocity and an instance id (video sequences).
    """
    focal = width * rng.uniform(0.8, 1.0)
    horizon = height * rng.uniform(0.2, 0.4)
    cam_height = rng.uniform(1.2, 1.8)
    # the back wall stands at most MAX_WALL_DEPTH_M away (indoor range, as NYUD's Kinect depth): lower its
    # foot where the sampled row would put it further
    wall_row = max(rng.uniform(0.35, 0.55) * height, horizon + focal * cam_height / MAX_WALL_DEPTH_M)
    wall_depth = focal * cam_height / (wall_row - horizon)
    if wall_depth_m is not None:  # a room of that depth range: the wall's foot follows from its distance, and
        # stays in the top 80% of the image (a visible floor for the objects to stand on)
        wall_depth = max(rng.uniform(*wall_depth_m), focal * cam_height / (0.8 * height - horizon))
        wall_row = horizon + focal * cam_height / wall_depth
    light = _unit(np.array([rng.uniform(-0.7, 0.7), rng.uniform(0.3, 1.0), rng.uniform(0.4, 1.0)]))
    # rooms come from a few shared styles (as real scenes share floors and walls), so the background
    # does not identify an image: telling images apart needs the objects
    room = np.random.default_rng([ROOM_SEED, int(rng.integers(NUM_ROOM_STYLES))])
    scene = Scene(
        height=height, width=width, focal=focal, cam_height=cam_height, horizon=horizon,
        wall_depth=wall_depth, wall_colour=room.uniform(0.3, 0.9, 3),
        floor_colours=np.stack([room.uniform(0.2, 0.8, 3)] * 2) * np.array([[1.0], [room.uniform(0.55, 0.85)]]),
        tile=room.uniform(0.4, 1.2), light=light, ambient=rng.uniform(0.35, 0.6),
        exposure=rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, 3), noise_seed=int(room.integers(2**31)),
        objects=[],
    )
    floor_top = wall_row / height
    objects: List[SceneObject] = []
    def dominant(cls: int, x: float, tall: Tuple[float, float]) -> SceneObject:
        # standing near the bottom, a fraction ``tall`` of the image high: place its base first, then scale it
        # to that apparent height at the base's depth (so it is never cut off below)
        obj = _make_object(rng, cls, x, rng.uniform(0.82, 0.92))
        depth = focal * cam_height / max(obj.base * height - horizon, 1.0)
        obj.height_m = rng.uniform(*tall) * height * depth / focal
        return obj

    if main_class is not None:
        objects.append(dominant(main_class, rng.uniform(0.4, 0.6), (0.45, 0.75)))
        num = int(rng.integers(0, 3))
    elif main_objects:
        for k in range(main_objects):  # one slot of the image width each, in a random class order
            cls = PERSON if rng.random() < person_prob / main_objects else int(rng.choice([c for c in _CLASS_STYLE]))
            objects.append(dominant(cls, (k + rng.uniform(0.3, 0.7)) / main_objects, (0.4, 0.65)))
        num = int(rng.integers(0, 3))
    else:
        num = int(rng.integers(num_objects[0], num_objects[1] + 1))
    for i in range(num):
        cls = PERSON if rng.random() < person_prob / max(num, 1) * 2 else int(rng.choice([c for c in _CLASS_STYLE]))
        far = main_class is not None or main_objects > 0  # distractors of dominant objects stay far
        lo = floor_top + 0.02 if far else floor_top + 0.05
        hi = floor_top + 0.12 if far else 1.1
        obj = _make_object(rng, cls, rng.uniform(0.05, 0.95), rng.uniform(lo, hi))
        # cap the apparent size: an object may not exceed 0.8 of the image height
        max_base = (horizon + 0.8 * height * cam_height / obj.height_m) / height
        obj.base = min(obj.base, max_base)
        objects.append(obj)
    for k, obj in enumerate(objects[:moving]):
        obj.instance = k + 1
        obj.vx = rng.uniform(-0.012, 0.012)
        obj.vbase = rng.uniform(-0.004, 0.004)
        obj.spin = rng.normal(0, 0.02)
    scene.objects = objects
    return scene


# ---------------------------------------------------------------------------------------------
# Shapes: inside test + normalised radius t (0 at the centre, 1 on the outline) in local coords.
# ---------------------------------------------------------------------------------------------
def _polar_outline(theta: np.ndarray, shape: str) -> np.ndarray:
    n = {"triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}.get(shape)
    if n is not None:
        phase = -np.pi / 2 if shape != "diamond" else 0.0
        sector = np.mod(theta - phase, 2 * np.pi / n) - np.pi / n
        return np.cos(np.pi / n) / np.cos(sector)
    points = {"star4": 4, "star5": 5}[shape]
    return 0.45 + 0.55 * np.abs(np.cos(points * (theta + np.pi / 2) / 2)) ** 3


def _shape_t(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normalised radius; the shape is ``t <= 1``."""
    r = np.hypot(u, v)
    if shape == "ellipse":
        return r
    if shape == "rect":
        return np.maximum(np.abs(u), np.abs(v)) * 1.02
    if shape == "ring":
        return np.abs(r - 0.72) / 0.28
    if shape == "semicircle":
        return np.where(v <= 0.6, np.hypot(u, (v - 0.6) / 1.6), 2.0)
    if shape == "trapezoid":
        half_width = 0.55 + 0.45 * (v + 1) / 2
        return np.maximum(np.abs(u) / half_width, np.abs(v))
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(u), np.abs(v) / 0.3), np.maximum(np.abs(u) / 0.3, np.abs(v)))
    if shape == "crescent":
        bite = np.hypot(u - 0.45, v + 0.2) / 0.75
        return np.where(bite > 1, r, 2.0)
    return r / _polar_outline(np.arctan2(v, u), shape)


def _capsule_distance(px, py, p0, p1) -> np.ndarray:
    d = np.subtract(p1, p0)
    s = np.clip(((px - p0[0]) * d[0] + (py - p0[1]) * d[1]) / max(d @ d, 1e-9), 0.0, 1.0)
    return np.hypot(px - (p0[0] + s * d[0]), py - (p0[1] + s * d[1]))


def _person(px: np.ndarray, py: np.ndarray, pose: np.ndarray):
    """Articulated person in units of its height; feet at y=0, head top at y=-1 (rows grow downwards).

    Returns (part label map, height field, inside mask).
    """
    ua_l, ua_r, la_l, la_r, ul_l, ul_r, ll_l, ll_r = pose
    segments = [(2, (0.0, -0.76), (0.0, -0.50), 0.085, 0.0)]  # (part, p0, p1, radius, depth offset)
    for side, ua, la in ((-1, ua_l, la_l), (1, ua_r, la_r)):
        shoulder = np.array([0.1 * side, -0.75])
        elbow = shoulder + 0.17 * np.array([side * np.sin(ua), np.cos(ua)])
        hand = elbow + 0.16 * np.array([side * np.sin(ua + la), np.cos(ua + la)])
        segments += [(3, shoulder, elbow, 0.035, 0.05), (4, elbow, hand, 0.03, 0.06)]
    for side, ul, ll in ((-1, ul_l, ll_l), (1, ul_r, ll_r)):
        hip = np.array([0.045 * side, -0.49])
        knee = hip + 0.245 * np.array([np.sin(ul), np.cos(ul)])
        foot = knee + 0.235 * np.array([np.sin(ul - ll), np.cos(ul - ll)])
        segments += [(5, hip, knee, 0.045, 0.0), (6, knee, foot, 0.04, 0.0)]
    best = np.full(px.shape, -np.inf)
    parts = np.zeros(px.shape, np.uint8)
    head = np.hypot(px, py + 0.885) / 0.075
    for part, p0, p1, radius, offset in [(1, (0, -0.885), (0, -0.885), 0.075, 0.0)] + segments:
        dist = head * radius if part == 1 else _capsule_distance(px, py, np.asarray(p0), np.asarray(p1))
        h = radius * np.sqrt(np.clip(1 - (dist / radius) ** 2, 0, None))
        score = np.where(dist < radius, h + offset, -np.inf)
        win = score > best
        best = np.where(win, score, best)
        parts[win] = part
    inside = np.isfinite(best)
    return parts, np.where(inside, best, 0.0), inside


def _pattern(obj: SceneObject, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture in [0, 1] in object-local coordinates (it moves with the object)."""
    a = obj.pattern_angle
    s = u * np.cos(a) + v * np.sin(a)
    if obj.pattern == "stripes":
        return (np.sin(np.pi * obj.freq * s) > 0).astype(np.float32)
    if obj.pattern == "checker":
        return ((np.floor(obj.freq * (u + 2)) + np.floor(obj.freq * (v + 2))) % 2).astype(np.float32)
    if obj.pattern == "dots":
        return ((np.sin(np.pi * obj.freq * u) * np.sin(np.pi * obj.freq * v)) > 0.5).astype(np.float32)
    if obj.pattern == "noise":
        f = obj.freq
        n = np.sin(f * u + 1.3) * np.sin(0.7 * f * v + 0.4) + 0.5 * np.sin(1.9 * f * s + 2.1)
        return np.clip(0.5 + 0.4 * n, 0, 1)
    return np.zeros_like(u)


def _value_noise(seed: int, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random grid of ``cells`` x ``cells`` bilinearly upsampled."""
    grid = np.random.default_rng(seed).random((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, height), np.linspace(0, cells, width)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def render_scene(scene: Scene, t: float = 0.0) -> Dict[str, np.ndarray]:
    """Rasterise a scene at time ``t`` (frames).

    Returns ``image`` uint8 [H,W,3]; ``semseg`` uint8 (0..20); ``context`` uint16 (semseg with wall /
    floor split, PASCAL-Context style); ``instance`` uint8 (video instance ids, 0 = none);
    ``object_id`` uint8 (1 + index of the visible object, 0 = background); ``parts`` uint8 (0..6,
    255 when the scene has no person); ``depth`` float32 metres; ``normals`` float32 [H,W,3] unit;
    ``saliency`` uint8 {0,1}.
    """
    H, W, f = scene.height, scene.width, scene.focal
    rows = np.arange(H, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(W, dtype=np.float64)[None, :] + 0.5
    # background: floor depth f*h/(row - horizon), capped by the fronto-parallel wall
    below = np.maximum(rows - scene.horizon, 1e-6)
    floor_depth = f * scene.cam_height / below
    is_wall = np.broadcast_to(floor_depth >= scene.wall_depth, (H, W))
    depth = np.where(is_wall, scene.wall_depth, np.broadcast_to(floor_depth, (H, W))).astype(np.float64)
    normals = np.zeros((H, W, 3))
    normals[is_wall, 2] = 1.0
    normals[~is_wall, 1] = 1.0
    ground_x = (cols - W / 2) * depth / f
    checker = ((np.floor(ground_x / scene.tile) + np.floor(depth / scene.tile)) % 2).astype(int)
    albedo = scene.floor_colours[checker]
    noise = _value_noise(scene.noise_seed, H, W, 6)
    wall_tex = scene.wall_colour * (0.85 + 0.3 * noise[..., None])
    wall_tex *= 1 - 0.12 * (np.sin(2 * np.pi * cols / W * 5) > 0.9)[..., None]  # vertical panels
    albedo = np.where(is_wall[..., None], wall_tex, albedo * (0.9 + 0.2 * noise[..., None]))
    semseg = np.zeros((H, W), np.uint8)
    context = np.where(is_wall, BACKGROUND_LABELS["wall"], BACKGROUND_LABELS["floor"]).astype(np.uint16)
    instance = np.zeros((H, W), np.uint8)
    object_id = np.zeros((H, W), np.uint8)
    has_person = any(o.cls == PERSON for o in scene.objects)
    parts = np.full((H, W), 0 if has_person else 255, np.uint8)

    for index, obj in enumerate(scene.objects):
        base = (obj.base + obj.vbase * t) * H
        obj_depth = f * scene.cam_height / max(base - scene.horizon, 1e-3)
        if obj_depth <= 0.3:
            continue
        pix_h = obj.height_m * f / obj_depth
        pix_w = pix_h * obj.aspect
        cx = (obj.x + obj.vx * t) * W
        cy = base - pix_h / 2
        radius = 0.6 * max(pix_h, pix_w) + 2
        r0, r1 = int(max(0, np.floor(cy - radius))), int(min(H, np.ceil(cy + radius)))
        c0, c1 = int(max(0, np.floor(cx - radius))), int(min(W, np.ceil(cx + radius)))
        if r0 >= r1 or c0 >= c1:
            continue
        dx, dy = np.broadcast_arrays(cols[:, c0:c1] - cx, rows[r0:r1] - cy)
        metres_per_pixel = obj_depth / f
        obj_parts = None
        if obj.cls == PERSON:
            phase = 0.25 * t
            pose = obj.pose + (0.5 * np.sin(phase) * np.array([1, -1, 0.5, -0.5, 1, -1, 0.5, -0.5]) if t else 0)
            obj_parts, h, inside = _person(dx / pix_h, (dy - pix_h / 2) / pix_h, pose)
            u, v = dx / pix_h, dy / pix_h
            height_m = h * pix_h * metres_per_pixel
        else:
            ang = obj.angle + obj.spin * t
            ca, sa = np.cos(ang), np.sin(ang)
            u = (ca * dx + sa * dy) / (pix_w / 2)
            v = (-sa * dx + ca * dy) / (pix_h / 2)
            shape = _CLASS_STYLE[obj.cls][0]
            tt = _shape_t(shape, u, v)
            inside = tt <= 1
            height_m = obj.bulge * obj.height_m / 2 * np.sqrt(np.clip(1 - tt**2, 0, None))
        surface = obj_depth - height_m
        win = inside & (surface < depth[r0:r1, c0:c1])
        if not win.any():
            continue
        gy, gx = np.gradient(height_m / metres_per_pixel) if min(height_m.shape) > 1 else (0 * u, 0 * u)
        n = np.stack([-gx, gy, np.ones_like(gx)], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        if obj.cls == PERSON:
            skin = np.array([0.85, 0.65, 0.5])
            colour = np.select(
                [obj_parts[..., None] == 1, obj_parts[..., None] == 4, obj_parts[..., None] >= 5],
                [skin, skin, obj.colour2], obj.colour)
        else:
            tex = _pattern(obj, u, v)[..., None]
            colour = obj.colour * (1 - tex) + obj.colour2 * tex
        region = (slice(r0, r1), slice(c0, c1))
        depth[region][win] = surface[win]
        normals[region][win] = n[win]
        albedo[region][win] = np.broadcast_to(colour, n.shape)[win]
        semseg[region][win] = obj.cls
        context[region][win] = obj.cls
        instance[region][win] = obj.instance
        object_id[region][win] = index + 1
        if has_person:
            parts[region][win] = obj_parts[win] if obj_parts is not None else 0

    shading = scene.ambient + (1 - scene.ambient) * np.clip(normals @ scene.light, 0, None)
    image = albedo * shading[..., None] * scene.exposure
    grain = np.random.default_rng(scene.noise_seed + int(t * 7919)).normal(0, 0.015, image.shape)
    image = np.clip(image + grain, 0, 1)
    return {
        "image": (image * 255 + 0.5).astype(np.uint8),
        "semseg": semseg,
        "context": context,
        "instance": instance,
        "object_id": object_id,
        "parts": parts,
        "depth": depth.astype(np.float32),
        "normals": normals.astype(np.float32),
        "saliency": (object_id > 0).astype(np.uint8),
    }
