"""The ``make demo`` chain: pretrain, export, then pretrained vs random init on every downstream protocol.

Steps (each writes its result into the run directory and is skipped when a rerun finds it there, so an
interrupted demo resumes where it stopped):

1. ``pretrain``: MoCo-v2 on the embedded object-centric images (``pretrain_config``), kNN monitor on the
   progress bar and in TensorBoard (``<out>/pretrain``); ``checkpoint=...`` skips it;
2. ``export``: the backbone in torchvision format (``<out>/backbone_torchvision.pth``);
3. ``finetune``: the MTL baseline on the embedded NYUD-format data (semseg + depth), once from the exported
   backbone and once from random init, same config and seed (``<out>/<arm>/finetune``);
4. ``probes``: kNN and linear probe on the embedded class folders (the 2000-image object set);
5. ``davis``: DAVIS-2017 label propagation (J&F) and ``retrieval``: VOC segment retrieval (mIoU, 21 classes);
6. ``summary.md``, ``summary.json`` (``{"rows": [...]}``) and ``summary.png``, with the spread of the gain measured
   offline over replicates that differ in pretraining, downstream and data seed (``spread`` in configs/demo.yaml, from
   ``launch/bench_recipe.py 'arms=[moco_v2]' vary_data_seed=true``; docs/benchmarks.md says how).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from selfsup.config import ConfigError, check_counts, load_config, save_config, to_dict, yaml_load
from selfsup.data.synthetic import DAVIS_IMAGES_PER_VIDEO, train_count

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
ARMS = ("pretrained", "random")
STEPS = ("pretrain", "export", "finetune", "probes", "davis", "retrieval")


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    seed: int = 0  # fine-tuning, probe and random-init seed (the pretraining seed is the pretraining config's)
    steps: List[str] = field(default_factory=lambda: list(STEPS))  # a subset runs only those steps
    pretrain_config: str = "configs/pretrain/demo_objects.yaml"
    pretrain_overrides: List[str] = field(default_factory=list)
    checkpoint: str = ""  # an existing pretraining checkpoint: skip the pretraining step
    finetune_config: str = "configs/nyud/mtl_baseline.yaml"
    finetune_overrides: List[str] = field(default_factory=list)
    probe_epochs: int = 100
    probe_size: int = 64
    probe_images: int = 2000  # the embedded object set the probes read (the pretraining kNN monitor's set)
    retrieval_fit_stride: int = 1
    # the embedded data: generator seed, image height and images per dense format (NYUD, VOC); the object set
    # has probe_images images. Another seed/size checks that the orderings hold.
    data_seed: int = 0
    data_size: int = 96
    data_num: int = 200
    # DAVIS-2017 videos of 24 frames (2/3 train, the rest val: 12 val sequences with 1-3 objects each): with
    # the generator's default (8 videos, 3 val sequences, 7 objects) one random-init backbone swung J&F by 6.6
    davis_videos: int = 36
    # NYUD-format val images (NYUD-v2 has 654): the set is generated with enough images for them, and the
    # fine-tuning still trains on the first train_count(data_num) (110 at 200). With the 90 val images of
    # data_num 200 the val sample alone moved the depth gain by +-0.03 m (docs/benchmarks.md). 0 = data_num's split
    nyud_val_images: int = 654
    # fine-tuning runs per arm (seeds seed, seed + 100, ...; each also draws its own random-init backbone): the
    # NYUD rows are their mean. One run moves the depth gain by about +-0.04 m (docs/benchmarks.md)
    finetune_runs: int = 1
    threads: int = 0  # torch threads (0: leave as is)
    # spread per row: max - min of the paired gain over >= 3 replicates (pretraining, downstream, data seed), offline
    spread: Dict[str, float] = field(default_factory=dict)
    spread_command: str = ""

    def __post_init__(self) -> None:
        check_counts(self, "", positive=("probe_epochs", "probe_size", "probe_images", "retrieval_fit_stride",
                                         "data_size", "data_num", "davis_videos", "finetune_runs"), non_negative=("threads", "nyud_val_images"))
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ValueError(f"steps: unknown {', '.join(unknown)}; known: {', '.join(STEPS)}")


@dataclass
class Row:
    name: str
    metric: str
    higher_is_better: bool
    get: Callable[[Dict[str, Any]], Optional[float]]


def _get(*keys: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    def read(results: Dict[str, Any]) -> Optional[float]:
        value: Any = results
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return float(value)
    return read


ROWS = [
    Row("NYUD semseg (MTL baseline)", "mIoU %", True, _get("finetune", "metrics", "semseg", "miou")),
    Row("NYUD depth (MTL baseline)", "RMSE m", False, _get("finetune", "metrics", "depth", "rmse")),
    Row("kNN probe", "top-1 %", True, _get("probes", "knn_top1")),
    Row("linear probe", "top-1 %", True, _get("probes", "val_top1")),
    Row("DAVIS-2017 propagation", "J&F %", True, _get("davis", "J&F-Mean")),
    Row("VOC segment retrieval", "mIoU %", True, _get("retrieval", "miou_21")),
]


def nyud_split(cfg: DemoConfig) -> Tuple[int, int, int]:
    """(images written, train images, val images) of the demo's NYUD-format set: the train split of ``data_num``
    images, and ``nyud_val_images`` val images from a set written large enough for them (0: data_num's split)."""
    n_train = train_count("nyud", cfg.data_num)
    n = cfg.data_num
    while n - train_count("nyud", n) < cfg.nyud_val_images:
        n += 1
    return n, n_train, (cfg.nyud_val_images or n - n_train)


def load_demo_config(yaml_path: Optional[str], overrides: List[str]) -> DemoConfig:
    return load_config(DemoConfig, yaml_path=yaml_path, overrides=overrides)


def repo_path(p: str) -> Path:
    """``p`` as given when absolute or present from here, else relative to the repository (configs/...)."""
    path = Path(p)
    return path if path.is_absolute() or path.exists() else REPO / path


FINETUNE_SEED_STEP = 100  # fine-tuning run k of an arm uses seed + 100 k (finetune_runs)


def mean_metrics(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The element-wise mean of nested metric dicts (numbers averaged, other values from the first run)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: mean_metrics([r[k] for r in runs]) if all(k in r for r in runs) else first[k] for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sum(runs) / len(runs)
    return first


class Chain:
    """The steps of one demo run; each result is cached as ``<out>/<arm>/<step>.json``."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.timings: Dict[str, float] = {}

    def result_path(self, name: str, arm: str) -> Path:
        return self.out / arm / f"{name}.json"

    def pretrain_record(self) -> Path:
        """Written when the pretraining finished: its kNN-monitor history (``pretrain_monitor``)."""
        return self.out / "pretrain" / "pretrain.json"

    def cached(self, name: str, arm: str, compute: Callable[[], Dict[str, Any]], step: str = "") -> Dict[str, Any]:
        """``compute()``'s result for ``name`` (a result of ``step``, default ``name``), read back if done before."""
        path = self.result_path(name, arm)
        if path.is_file():
            print(f"== {name} ({arm}): done before, read {path}", flush=True)
            return json.loads(path.read_text())
        if (step or name) not in self.cfg.steps:
            return {}
        print(f"\n== {name} ({arm})", flush=True)
        start = time.perf_counter()
        result = compute()
        self.timings[f"{name}/{arm}"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return result

    def data(self, fmt: str) -> str:
        """The embedded ``fmt`` folder at this demo's data seed and size (generated on first use)."""
        from selfsup.data import ensure_embedded_data

        num = {"classification": self.cfg.probe_images, "davis2017": DAVIS_IMAGES_PER_VIDEO * self.cfg.davis_videos,
               "nyud": nyud_split(self.cfg)[0]}.get(fmt, self.cfg.data_num)
        root = ensure_embedded_data(size=self.cfg.data_size, num=num, seed=self.cfg.data_seed, formats=(fmt,))
        return str(root / fmt)

    def pretrain_overrides(self) -> List[str]:
        objects = self.data("classification")  # pretraining images (labels unused) and the kNN monitor's set
        return [f"data.root={objects}", f"data.knn_monitor_root={objects}"] + list(self.cfg.pretrain_overrides)

    # --- steps -------------------------------------------------------------------------------------------
    def pretrain(self) -> Path:
        from selfsup.moco.config import PretrainConfig
        from frozen.pretrain_monitors import pretrain  # run_pretraining with the kNN monitor registered

        if self.cfg.checkpoint:
            path = Path(self.cfg.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint={self.cfg.checkpoint}: no such file")
            return path
        run_dir = self.out / "pretrain"
        pcfg = load_config(PretrainConfig, yaml_path=repo_path(self.cfg.pretrain_config),
                           overrides=self.pretrain_overrides() + [f"output_dir={run_dir}"])
        done = self.pretrain_record()
        if not done.is_file() and "pretrain" in self.cfg.steps:
            print(f"\n== pretrain: python launch/pretrain.py --config {self.cfg.pretrain_config} --output-dir {run_dir}"
                  f"{''.join(' ' + o for o in self.cfg.pretrain_overrides)}", flush=True)
            start = time.perf_counter()
            result = pretrain(pcfg)
            self.timings["pretrain"] = time.perf_counter() - start
            done.write_text(json.dumps({"knn": result["knn"], "epoch": result["epoch"]}, indent=2))
        return run_dir / "checkpoint.pth"

    def pretrain_monitor(self) -> List[Dict[str, float]]:
        done = self.pretrain_record()
        return json.loads(done.read_text())["knn"] if done.is_file() else []

    def export(self, checkpoint: Path) -> Path:
        from selfsup.exporters import export_backbone

        out = self.out / "backbone_torchvision.pth"
        if not out.is_file() and "export" in self.cfg.steps:
            print(f"\n== export: python launch/export.py {checkpoint} --format torchvision --out {out}", flush=True)
            export_backbone(checkpoint, fmt="torchvision", out=out)
        return out

    def arch(self) -> str:
        from selfsup.moco.config import PretrainConfig

        return load_config(PretrainConfig, yaml_path=repo_path(self.cfg.pretrain_config),
                           overrides=list(self.cfg.pretrain_overrides)).model.backbone

    def finetune(self, arm: str, weights: str) -> Dict[str, Any]:
        from downstream.mtl.config import MTLConfig
        from downstream.mtl.train import run_finetune

        def compute(seed: int, name: str) -> Dict[str, Any]:
            run_dir = self.out / arm / name
            overrides = [f"model.backbone={self.arch()}", f"seed={seed}", f"output_dir={run_dir}",
                         f"model.weights={weights}", f"data.root={self.data('nyud')}"]
            _, n_train, n_val = nyud_split(self.cfg)
            overrides += [f"data.max_train_images={n_train}", f"data.max_val_images={n_val}"] + list(self.cfg.finetune_overrides)
            print(f"python downstream/finetune_mtl.py --config {self.cfg.finetune_config} {' '.join(overrides)}",
                  flush=True)
            mcfg = load_config(MTLConfig, yaml_path=repo_path(self.cfg.finetune_config), overrides=overrides)
            result = run_finetune(mcfg)
            return {"metrics": result["metrics"], "train_time_s": result["train_time_s"], "seed": seed}

        runs = []
        for k in range(self.cfg.finetune_runs):  # run k: seed + 100 k, in <arm>/finetune (k = 0) or finetune_s<seed>
            seed = self.cfg.seed + FINETUNE_SEED_STEP * k
            name = "finetune" if k == 0 else f"finetune_s{seed}"
            runs.append(self.cached(name, arm, lambda seed=seed, name=name: compute(seed, name), step="finetune"))
        if len(runs) == 1 or not all(runs):
            return runs[0]
        return {"metrics": mean_metrics([r["metrics"] for r in runs]), "runs": runs,
                "train_time_s": sum(r["train_time_s"] for r in runs)}

    def _seeded(self, arm: str) -> None:
        torch.manual_seed(self.cfg.seed)  # the random-init backbone of this seed

    def probes(self, arm: str, weights: str) -> Dict[str, Any]:
        from downstream.evaluation.protocols import extract_probe_features, run_probes

        def compute() -> Dict[str, Any]:
            root = self.data("classification")
            self._seeded(arm)
            feats = extract_probe_features(["knn", "linear"], arch=self.arch(), weights=weights, root=root,
                                           size=self.cfg.probe_size, workers=1)
            return run_probes(["knn", "linear"], feats, epochs=self.cfg.probe_epochs, seed=self.cfg.seed)
        return self.cached("probes", arm, compute)

    def davis(self, arm: str, weights: str) -> Dict[str, Any]:
        from frozen.davis import DAVIS2017
        from frozen.davis_metrics import evaluate_results_dir
        from frozen.features import dense_extractor
        from frozen.propagation import run_propagation

        def compute() -> Dict[str, Any]:
            dataset = DAVIS2017(self.data("davis2017"), split="val")
            out = self.out / arm / "davis"
            self._seeded(arm)
            speed = run_propagation(dense_extractor(self.arch(), weights), dataset, out)
            global_results, _ = evaluate_results_dir(out, dataset)
            return {**global_results, **speed}
        return self.cached("davis", arm, compute)

    def retrieval(self, arm: str, weights: str) -> Dict[str, Any]:
        from frozen.voc import VOC2012Segmentation
        from frozen.features import dense_extractor
        from frozen.retrieval import run_retrieval

        def compute() -> Dict[str, Any]:
            out, voc = self.out / arm / "retrieval", self.data("voc2012")
            out.mkdir(parents=True, exist_ok=True)
            self._seeded(arm)
            result = run_retrieval(dense_extractor(self.arch(), weights), VOC2012Segmentation(voc, split="train"),
                                   VOC2012Segmentation(voc, split="val"), seed=self.cfg.seed,
                                   fit_stride=self.cfg.retrieval_fit_stride, figure=str(out / "retrieval.png"))
            return {k: v for k, v in result.items() if k != "iou_per_class"}
        return self.cached("retrieval", arm, compute)


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run the chain (skipping what a previous run of the same output dir finished); write and return the summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    chain = Chain(cfg)
    check_same_run(cfg, chain.out / "config.yaml")
    chain.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, chain.out / "config.yaml")
    checkpoint = chain.pretrain()
    weights = {"pretrained": str(chain.export(checkpoint)), "random": "none"}
    results: Dict[str, Dict[str, Any]] = {arm: {} for arm in ARMS}
    for step in ("finetune", "probes", "davis", "retrieval"):
        for arm in ARMS:
            if arm == "pretrained" and not Path(weights[arm]).is_file():
                continue  # pretraining/export not run in this invocation (steps=...)
            results[arm][step] = getattr(chain, step)(arm, weights[arm])
    summary = summarise(results, cfg, monitor=chain.pretrain_monitor(), timings=chain.timings)
    write_summary(summary, chain.out)
    print("\n" + summary_markdown(summary), flush=True)
    return summary


# keys that do not change a step's result: a rerun may change them and still read the finished steps back
RERUN_KEYS = ("output_dir", "steps", "threads", "spread", "spread_command", "finetune_runs")  # (runs are added or read back)


def check_same_run(cfg: DemoConfig, saved: Path) -> None:
    """Refuse to resume a run directory whose finished steps were computed with another configuration."""
    if not saved.is_file():
        return
    from selfsup.rundir import config_changes, is_harmless

    before = yaml_load(saved.read_text(), source=str(saved)) or {}
    changed = [c for c in config_changes(to_dict(cfg), before) if not is_harmless(c[0], RERUN_KEYS)]
    if changed:
        diff = ", ".join(f"{k} {old} -> {new}" for k, old, new in changed[:4])
        raise ConfigError(f"{cfg.output_dir} holds a demo run of another config ({diff}{' ...' if len(changed) > 4 else ''}):"
                          " its finished steps would be reused; pass another --output-dir or remove that folder")


def summarise(results: Dict[str, Dict[str, Any]], cfg: DemoConfig, *, monitor: List[Dict[str, float]],
              timings: Dict[str, float]) -> Dict[str, Any]:
    rows = []
    for row in ROWS:
        pre, rnd = row.get(results["pretrained"]), row.get(results["random"])
        if pre is None or rnd is None:
            continue
        spread = cfg.spread.get(row.name)
        gain = (pre - rnd) if row.higher_is_better else (rnd - pre)
        rows.append({"name": row.name, "metric": row.metric, "higher_is_better": row.higher_is_better,
                     "pretrained": pre, "random": rnd, "gain": gain, "spread": spread,
                     "pretrained_wins": bool(gain > (spread or 0.0))})
    knn = [h["knn_acc"] for h in monitor if "knn_acc" in h]
    return {"rows": rows, "pretrain_knn_monitor": {"init": knn[0], "final": knn[-1], "best": max(knn)} if knn else None,
            "spread_command": cfg.spread_command, "seconds": {k: round(v, 1) for k, v in timings.items()},
            "config": to_dict(cfg)}


def summary_markdown(summary: Dict[str, Any]) -> str:
    lines = ["| | metric | pretrained | random init | gain | spread of the gain | pretrained wins |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        arrow = "↑" if r["higher_is_better"] else "↓"
        spread = "?" if r["spread"] is None else f"{r['spread']:.3g}"
        lines.append(f"| {r['name']} | {r['metric']} {arrow} | {r['pretrained']:.4g} | {r['random']:.4g} | {r['gain']:+.3g} | {spread} "
                     f"| {'yes' if r['pretrained_wins'] else 'NO'} |")
    knn = summary.get("pretrain_knn_monitor")
    if knn:
        lines.append(f"\nPretraining kNN monitor: {knn['init']:.1f}% at initialisation -> {knn['final']:.1f}% "
                     f"(best {knn['best']:.1f}%).")
    lines.append("spread = max - min of the gain (pretrained vs random init, paired) over replicates that differ in "
                 "pretraining, downstream and data seed; a row wins when its gain exceeds it"
                 + (f" (measured with: `{summary['spread_command']}`)." if summary.get("spread_command") else "."))
    return "\n".join(lines)


def write_summary(summary: Dict[str, Any], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    summary_chart(summary["rows"], out / "summary.png")


def summary_chart(rows: List[Dict[str, Any]], path: Path) -> None:
    """One panel per row: pretrained vs random-init bars, the spread as a whisker on the pretrained bar."""
    from PIL import Image, ImageDraw

    w, h, pad = 190, 210, 28
    img = Image.new("RGB", (max(1, len(rows)) * w, h), "white")
    draw = ImageDraw.Draw(img)
    colours = {"pretrained": (31, 119, 180), "random": (170, 170, 170)}
    for i, r in enumerate(rows):
        x0 = i * w
        top = max(r["pretrained"], r["random"]) * 1.15 or 1.0
        base = h - pad
        scale = (h - 2.5 * pad) / top
        draw.text((x0 + 6, 4), r["name"][:30], fill="black")
        draw.text((x0 + 6, 16), f"{r['metric']} ({'higher' if r['higher_is_better'] else 'lower'} is better)",
                  fill=(90, 90, 90))
        for j, arm in enumerate(ARMS):
            bx = x0 + 40 + j * 65
            top_y = base - r[arm] * scale
            draw.rectangle([bx, top_y, bx + 45, base], fill=colours[arm])
            draw.text((bx, top_y - 12), f"{r[arm]:.3g}", fill="black")
            draw.text((bx, base + 4), "pretrained" if arm == "pretrained" else "random", fill="black")
            if arm == "pretrained" and r["spread"]:
                half = r["spread"] * scale / 2
                cx = bx + 22
                draw.line([cx, top_y - half, cx, top_y + half], fill="black", width=2)
        if not r["pretrained_wins"]:
            draw.text((x0 + 6, 28), "pretraining does NOT win", fill=(200, 0, 0))
        draw.line([x0 + w - 1, 0, x0 + w - 1, h], fill=(220, 220, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
