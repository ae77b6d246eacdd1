from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import yaml

from selfsup.config import ConfigError, load_config, parse_overrides, save_config, to_dict


@dataclass
class Optim:
    lr: float = 0.1
    steps: int = 10
    betas: Tuple[float, float] = (0.9, 0.99)


@dataclass
class Schema:
    name: str = "base"
    root: Optional[str] = None
    flag: bool = False
    optim: Optim = field(default_factory=Optim)


def test_merge_order_defaults_yaml_flags_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_yaml\noptim:\n  lr: 0.5\n  steps: 20\n")
    cfg = load_config(Schema, yaml_path=path, updates={"optim": {"steps": 30}}, overrides=["optim.steps=40", "flag=true"])
    assert cfg.name == "from_yaml"          # yaml over default
    assert cfg.optim.lr == 0.5              # yaml
    assert cfg.optim.steps == 40            # override over flag over yaml
    assert cfg.flag is True
    assert cfg.optim.betas == (0.9, 0.99)   # untouched default


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*allowed.*lr"):
        load_config(Schema, overrides=["optim.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("nmae: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*nmae"):
        load_config(Schema, yaml_path=path)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match=r"optim\.steps"):
        load_config(Schema, overrides=["optim.steps=abc"])
    with pytest.raises(ConfigError, match=r"flag"):
        load_config(Schema, overrides=["flag=3"])
    assert load_config(Schema, overrides=["optim.lr=1"]).optim.lr == 1.0  # int widens to float
    assert load_config(Schema, overrides=["root=null"]).root is None


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Schema, overrides=["optim.betas=[0.5,0.6]", "name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data == to_dict(cfg)
    assert load_config(Schema, yaml_path=tmp_path / "config.yaml") == cfg


def test_pretrain_schema_flags_and_presets(repo):
    import sys
    sys.path.insert(0, str(repo / "launch"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    args = pretrain.parse_args(["--data", "coco", "--multicrop", "--knn", "20", "optim.lr=0.1"])
    from selfsup.moco.config import PretrainConfig, flags_to_updates
    cfg = load_config(PretrainConfig, updates=flags_to_updates(args), overrides=args.overrides)
    assert cfg.data.name == "coco" and cfg.moco.knn_k == 20 and cfg.moco.momentum == 0.995
    assert cfg.augment.num_small == 4 and cfg.augment.large_size == 160 and cfg.augment.auto_augment
    assert cfg.optim.lr == 0.1
    base = load_config(PretrainConfig)
    assert base.augment.num_small == 0 and base.augment.large_size == 224 and base.moco.momentum == 0.999
    assert base.moco.queue_size == 65536 and base.moco.temperature == 0.2 and base.optim.weight_decay == 1e-4


def test_all_shipped_configs_load(repo):
    from selfsup.moco.config import PretrainConfig
    files = sorted((repo / "configs" / "pretrain").glob("*.yaml"))
    assert files, "no pretraining configs shipped"
    for path in files:
        load_config(PretrainConfig, yaml_path=path)
