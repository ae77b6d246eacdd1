"""Same-budget ablation of the improved recipe, in the paper's order (Table 7.4), on every demo row.

Arms (each adds to the one before; same images, epochs, batch and optimiser for all):

1. ``moco_v2``: the demo's MoCo-v2 (configs/pretrain/demo_objects.yaml: 2 x 64 px views);
2. ``multicrop``: + constrained multi-crop (4 small crops of ``small_size`` px that overlap the key crop, m 0.995);
3. ``autoaugment``: + the Standard-or-AutoAugment mix on the query and the small crops;
4. ``knn``: + kNN positives (k 20, lambda 0.4, the SPEC's warm-up) = the improved recipe.

Each arm is pretrained once per seed (``train.seed``), exported, and evaluated like ``make demo`` does
(downstream/demo_chain.py: MTL baseline on NYUD-format data, kNN and linear probes, DAVIS-2017 propagation, VOC
segment retrieval) with the downstream seed equal to the pretraining seed; a random-init backbone of each seed is
the reference. So the spread of an arm (max - min over its seeds) covers the pretraining seed and the
downstream seed together.

``vary_data_seed: true`` also makes seed s the data seed of its runs (every embedded format is generated with it,
the pretraining images included): the spread then covers the data too, and ``arms=[moco_v2]`` measures the
spread ``make demo`` prints (``demo_spread`` in the JSON, a YAML block for configs/demo.yaml in the table).

``dataset: objects`` pretrains on the embedded object-centric images (the demo's set), ``scenes`` on the
embedded COCO-format scenes (``scene_images`` of them); the kNN monitor and the probes read the object set.

Everything lands in ``output_dir``: ``<dataset>/<arm>/s<seed>/`` (the demo chain's folders: pretraining run with
its TensorBoard events, exported backbone, one JSON per step), ``<dataset>/random/s<seed>/``, and
``<dataset>/config.yaml`` and ``<dataset>/ablation.{json,md,png}`` (the table and the kNN-monitor curves of all arms). A rerun resumes:
pretraining from its checkpoint, finished steps read back. A finished run needs none of its checkpoints: with
every step's JSON and ``pretrain/pretrain.json`` in its folder it is read back as it is, so the folders of a
sweep can be kept (or copied between machines) without the ``*.pth`` files.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from selfsup.cli import write_config
from selfsup.config import ConfigError, check_counts, load_config, save_config, to_dict
from downstream.demo_chain import ROWS, Chain, DemoConfig, repo_path

# what each arm adds to the one before (overrides of configs/pretrain/demo_objects.yaml; a later value wins)
_INGREDIENTS = [
    ("moco_v2", ["augment.num_small=0", "augment.auto_augment=false"]),
    ("multicrop", ["augment.num_small=4", "augment.constraint=overlap", "moco.momentum=0.995"]),
    ("autoaugment", ["augment.auto_augment=true"]),
    ("knn", ["moco.knn_k=20", "moco.knn_weight=0.4"]),
]
ARMS: Dict[str, List[str]] = {name: [o for _, added in _INGREDIENTS[:i + 1] for o in added]
                              for i, (name, _) in enumerate(_INGREDIENTS)}
ARM_LABELS = {"moco_v2": "MoCo-v2", "multicrop": "+ constrained multi-crop", "autoaugment": "+ Standard-or-AutoAugment",
              "knn": "+ kNN positives (full recipe)", "random": "random init"}
DATASETS = ("objects", "scenes")
DOWNSTREAM = ("finetune", "probes", "davis", "retrieval")


@dataclass
class RecipeAblationConfig:
    output_dir: str = "runs/bench_recipe"
    dataset: str = "objects"  # objects | scenes: the pretraining images
    arms: List[str] = field(default_factory=lambda: list(ARMS))
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # pretraining seed = downstream seed
    # true: seed s also generates the embedded data (data_seed=s, every format, the pretraining images too), so
    # an arm's spread covers the pretraining, downstream and data seeds together (the demo's spread)
    vary_data_seed: bool = False
    demo_config: str = "configs/demo.yaml"  # the chain's settings (fine-tuning, probes, data seed and size)
    demo_overrides: List[str] = field(default_factory=list)  # DemoConfig keys, e.g. [data_seed=7, data_num=240]
    pretrain_overrides: List[str] = field(default_factory=list)  # for every arm, e.g. [train.epochs=20]
    steps: List[str] = field(default_factory=lambda: list(DOWNSTREAM))  # downstream rows; [] = pretraining only
    small_size: int = 32  # small crops at 64 px views (the published 96 at 160, scaled down)
    scene_images: int = 2000  # dataset scenes: embedded COCO-format scenes to pretrain on

    def __post_init__(self) -> None:
        check_counts(self, "", positive=("small_size", "scene_images"))
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset={self.dataset!r}: expected one of {', '.join(DATASETS)}")
        for key, values, known in (("arms", self.arms, ARMS), ("steps", self.steps, DOWNSTREAM)):
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ConfigError(f"{key}: unknown {', '.join(map(str, unknown))}; known: {', '.join(known)}")
        if not self.arms or not self.seeds:
            raise ConfigError("arms and seeds: expected at least one of each")


class _ScenesChain(Chain):
    """The demo chain, pretraining on the embedded COCO-format scenes instead of the object images."""

    def __init__(self, cfg: DemoConfig, scene_images: int) -> None:
        super().__init__(cfg)
        self.scene_images = scene_images

    def pretrain_overrides(self) -> List[str]:
        from selfsup.data import ensure_embedded_data

        scenes = ensure_embedded_data(size=self.cfg.data_size, num=self.scene_images, seed=self.cfg.data_seed,
                                      formats=("coco",))
        return [f"data.name=coco", f"data.root={scenes / 'coco'}", f"data.knn_monitor_root={self.data('classification')}"
                ] + list(self.cfg.pretrain_overrides)


def demo_config(cfg: RecipeAblationConfig, run_dir: Path, seed: int, pretrain_overrides: List[str]) -> DemoConfig:
    return load_config(DemoConfig, yaml_path=repo_path(cfg.demo_config),
                       overrides=list(cfg.demo_overrides) + [f"output_dir={run_dir}", f"seed={seed}"]
                       + ([f"data_seed={seed}"] if cfg.vary_data_seed else []),
                       updates={"pretrain_overrides": pretrain_overrides, "checkpoint": "",
                                "steps": ["pretrain", "export", *cfg.steps]})


def arm_overrides(cfg: RecipeAblationConfig, arm: str, seed: int) -> List[str]:
    small = [f"augment.small_size={cfg.small_size}"] if arm != "moco_v2" else []
    return ARMS[arm] + small + [f"train.seed={seed}"] + list(cfg.pretrain_overrides)


def _chain(cfg: RecipeAblationConfig, run_dir: Path, seed: int, pretrain_overrides: List[str]) -> Chain:
    """The demo chain of one run folder (its resolved config saved there as demo_config.yaml)."""
    dcfg = demo_config(cfg, run_dir, seed, pretrain_overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(dcfg, run_dir / "demo_config.yaml")
    return _ScenesChain(dcfg, cfg.scene_images) if cfg.dataset == "scenes" else Chain(dcfg)


def finished(chain: Chain, steps: List[str]) -> bool:
    """Whether an arm's run folder holds its pretraining record and every step's result, so that it is read back
    without its checkpoints (``checkpoint.pth`` and the exported backbone are the only large files of a run)."""
    return chain.pretrain_record().is_file() and all(chain.result_path(s, "pretrained").is_file() for s in steps)


def run_arm(cfg: RecipeAblationConfig, arm: str, seed: int) -> Dict[str, Any]:
    """Pretrain (or resume) one arm at one seed, export, evaluate; the arm's results and timings."""
    run_dir = Path(cfg.output_dir) / cfg.dataset / arm / f"s{seed}"
    chain = _chain(cfg, run_dir, seed, arm_overrides(cfg, arm, seed))
    timing = run_dir / "pretrain_seconds.json"
    if finished(chain, cfg.steps):  # results only: its checkpoints may be gone (deleted, or archived elsewhere)
        weights = "none"
    else:
        chain.pretrain_overrides()  # generates the embedded data on first use: not part of the arm's time
        start = time.perf_counter()
        checkpoint = chain.pretrain()
        if "pretrain" in chain.timings:  # pretrained in this call (a resumed run adds to what the last call measured)
            before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
            timing.write_text(json.dumps({"seconds": before + time.perf_counter() - start}))
        weights = str(chain.export(checkpoint))
    results = {step: getattr(chain, step)("pretrained", weights) for step in cfg.steps}
    return {"results": results, "monitor": chain.pretrain_monitor(),
            "pretrain_seconds": json.loads(timing.read_text())["seconds"] if timing.is_file() else None}


def run_random(cfg: RecipeAblationConfig, seed: int) -> Dict[str, Any]:
    """The random-init backbone of ``seed`` on the same downstream steps (no pretraining)."""
    run_dir = Path(cfg.output_dir) / cfg.dataset / "random" / f"s{seed}"
    chain = _chain(cfg, run_dir, seed, [])
    return {"results": {step: getattr(chain, step)("random", "none") for step in cfg.steps}}


def _stats(values: List[float]) -> Dict[str, Any]:
    return {"values": values, "mean": statistics.fmean(values), "spread": max(values) - min(values)}


def summarise(cfg: RecipeAblationConfig, runs: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Any]:
    """Per arm: each demo row's values over the seeds (mean, max - min), the kNN monitor's end and the
    pretraining wall time; each arm's gain over random init of the same seed, paired by seed."""
    arms: Dict[str, Any] = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        rows = {}
        for row in ROWS:
            values = [row.get(by_seed[s]["results"]) for s in seeds]
            if all(v is not None for v in values):
                rows[row.name] = _stats([float(v) for v in values])
        entry: Dict[str, Any] = {"seeds": seeds, "rows": rows}
        if arm != "random":
            curves = [[h for h in by_seed[s]["monitor"] if "knn_acc" in h] for s in seeds]
            entry["knn_monitor"] = [[(h.get("epoch", i), h["knn_acc"]) for i, h in enumerate(c)] for c in curves]
            if all(curves):
                entry["knn_monitor_end"] = _stats([c[-1]["knn_acc"] for c in curves])
            secs = [by_seed[s]["pretrain_seconds"] for s in seeds]
            if all(v is not None for v in secs):
                entry["pretrain_seconds"] = _stats([float(v) for v in secs])
        arms[arm] = entry
    gains = paired_gains(runs)
    return {"dataset": cfg.dataset, "arms": arms, "higher_is_better": {r.name: r.higher_is_better for r in ROWS},
            "gains": gains, "demo_spread": demo_spread(gains), "value_spread": value_spread(arms),
            "config": to_dict(cfg)}


def paired_gains(runs: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per arm and row: the gain over random init of the same seed (same data, downstream seed and random
    backbone seed; positive = better, also for a lower-is-better row), over the seeds both ran."""
    if "random" not in runs:
        return {}
    gains: Dict[str, Dict[str, Any]] = {}
    for arm, by_seed in runs.items():
        seeds = [s for s in sorted(by_seed) if s in runs["random"]] if arm != "random" else []
        for row in ROWS:
            pairs = [(row.get(by_seed[s]["results"]), row.get(runs["random"][s]["results"])) for s in seeds]
            if pairs and all(p is not None and r is not None for p, r in pairs):
                sign = 1.0 if row.higher_is_better else -1.0
                gains.setdefault(arm, {})[row.name] = _stats([sign * (p - r) for p, r in pairs])
    return gains


def demo_spread(gains: Dict[str, Dict[str, Any]], arm: str = "moco_v2") -> Dict[str, float]:
    """``spread`` of configs/demo.yaml: per row, max - min over the seeds of ``arm``'s gain over random init (with
    ``vary_data_seed`` the seeds differ in pretraining, downstream and data seed). Empty under 2 seeds."""
    rows = gains.get(arm, {})
    return {name: stat["spread"] for name, stat in rows.items() if len(stat["values"]) >= 2}


def value_spread(arms: Dict[str, Any], arm: str = "moco_v2") -> Dict[str, float]:
    """Per row, max - min over the seeds of the values, the larger of ``arm`` and random init (unpaired: with
    ``vary_data_seed`` it also holds how the data seed moves both arms together)."""
    if arm not in arms or "random" not in arms or len(arms[arm]["seeds"]) < 2:
        return {}
    return {name: max(stat["spread"], arms["random"]["rows"][name]["spread"])
            for name, stat in arms[arm]["rows"].items() if name in arms["random"]["rows"]}


def _gain_cell(stat: Optional[Dict[str, Any]], digits: int) -> str:
    if stat is None:
        return "–"
    values = stat["values"]
    return f"{stat['mean']:+.{digits}f}" + (f" ({min(values):+.{digits}f} … {max(values):+.{digits}f})" if len(values) > 1 else "")


def _cell(stat: Optional[Dict[str, Any]], digits: int = 2) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['spread'] / 2:.{digits}f}" if len(stat["values"]) > 1 \
        else f"{stat['mean']:.{digits}f}"


def summary_markdown(summary: Dict[str, Any]) -> str:
    """One table: arms in the paper's order, then random init; mean ± half the max - min over seeds."""
    names = [r.name for r in ROWS if any(r.name in a["rows"] for a in summary["arms"].values())]
    arrows = {n: "↑" if summary["higher_is_better"][n] else "↓" for n in names}
    head = ["arm", "seeds", "kNN monitor end %"] + [f"{n} {arrows[n]}" for n in names] + ["pretraining s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [a for a in list(ARMS) + ["random"] if a in summary["arms"]]
    for arm in order:
        a = summary["arms"][arm]
        digits = {n: 3 if "depth" in n else 2 for n in names}
        cells = [ARM_LABELS[arm], ",".join(map(str, a["seeds"])), _cell(a.get("knn_monitor_end"), 1)]
        cells += [_cell(a["rows"].get(n), digits[n]) for n in names] + [_cell(a.get("pretrain_seconds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    varied = summary["config"].get("vary_data_seed")
    lines.append("\nmean ± half of (max − min) over the pretraining seeds (each arm's downstream seed"
                 f"{' and data seed' if varied else ''} = its pretraining seed); dataset: {summary['dataset']}.")
    gains = summary.get("gains", {})
    if gains:
        lines += ["\nGain over random init of the same seed (paired; positive = better, also for ↓ rows): mean (min … max)"
                  "\n", "| arm | " + " | ".join(f"{n} {arrows[n]}" for n in names) + " |", "|" + "---|" * (len(names) + 1)]
        for arm in [a for a in ARMS if a in gains]:
            cells = [_gain_cell(gains[arm].get(n), 3 if "depth" in n else 2) for n in names]
            lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    if summary.get("demo_spread"):
        lines.append("\nThe spread of `make demo` (max − min over the seeds of MoCo-v2's paired gain; `spread:` of"
                     " configs/demo.yaml):\n\n```yaml\nspread:")
        lines += [f"  {name}: {value:.3g}" for name, value in summary["demo_spread"].items()] + ["```"]
    return "\n".join(lines)


COLOURS = {"moco_v2": (31, 119, 180), "multicrop": (255, 127, 14), "autoaugment": (44, 160, 44),
           "knn": (214, 39, 40)}


def curves_chart(summary: Dict[str, Any], path: Path) -> None:
    """The kNN monitor (top-1 %) against the epoch: one colour per arm, one line per seed."""
    from PIL import Image, ImageDraw

    curves = {arm: a["knn_monitor"] for arm, a in summary["arms"].items() if a.get("knn_monitor")}
    points = [p for cs in curves.values() for c in cs for p in c]
    w, h, left, bottom, top_pad, legend = 720, 380, 50, 40, 20, 220
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    if points:
        x_max = max(p[0] for p in points) or 1
        y_lo, y_hi = min(p[1] for p in points) - 1, max(p[1] for p in points) + 1

        def xy(p):
            return (left + (w - left - legend) * p[0] / x_max,
                    h - bottom - (h - bottom - top_pad) * (p[1] - y_lo) / (y_hi - y_lo))
        draw.line([left, top_pad, left, h - bottom, w - legend, h - bottom], fill="black")
        for i in range(5):
            y = y_lo + (y_hi - y_lo) * i / 4
            draw.text((4, xy((0, y))[1] - 6), f"{y:.1f}", fill="black")
            ep = round(x_max * i / 4, 1)
            draw.text((xy((ep, y_lo))[0] - 6, h - bottom + 6), f"{ep:g}", fill="black")
        draw.text((left, h - 16), "epoch", fill="black")
        draw.text((left, 4), f"kNN monitor top-1 % ({summary['dataset']})", fill="black")
        for j, (arm, cs) in enumerate(curves.items()):
            colour = COLOURS.get(arm, (90, 90, 90))
            for c in cs:
                if len(c) > 1:
                    draw.line([xy(p) for p in c], fill=colour, width=2)
            draw.rectangle([w - legend + 10, 30 + 18 * j, w - legend + 22, 42 + 18 * j], fill=colour)
            draw.text((w - legend + 28, 30 + 18 * j), ARM_LABELS[arm], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run_ablation(cfg: RecipeAblationConfig) -> Dict[str, Any]:
    """Every arm x seed (resuming what a previous call finished), the random-init reference; the summary."""
    out = Path(cfg.output_dir) / cfg.dataset
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, cfg.output_dir, entry="launch/bench_recipe.py")  # the last call's; per dataset below
    save_config(cfg, out / "config.yaml")
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for seed in cfg.seeds:  # seeds outermost: an interrupted ablation has every arm at the first seeds
        for arm in cfg.arms:
            print(f"\n===== {cfg.dataset}: {ARM_LABELS[arm]}, seed {seed}", flush=True)
            runs.setdefault(arm, {})[seed] = run_arm(cfg, arm, seed)
        if cfg.steps:
            runs.setdefault("random", {})[seed] = run_random(cfg, seed)
    summary = summarise(cfg, runs)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(summary_markdown(summary) + "\n")
    curves_chart(summary, out / "ablation.png")
    print("\n" + summary_markdown(summary), flush=True)
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}", flush=True)
    return summary


def load_ablation_config(yaml_path: Optional[str], overrides: List[str]) -> RecipeAblationConfig:
    return load_config(RecipeAblationConfig, yaml_path=yaml_path, overrides=overrides)
