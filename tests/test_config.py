"""Config loading: presets, YAML files, dotted overrides, and the errors for bad keys and values."""

from __future__ import annotations

import pytest

from unitsface.config import load_config, presets
from unitsface.errors import UnitsfaceError


def test_presets_load_and_validate():
    assert {"demo", "casia_r50_unitsface"} <= set(presets())
    for name in presets():
        config = load_config(name)
        assert config["head"]["name"]


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {backbone: tinyfacenet, embedding_size: 64}\nhead: {name: arcface}\n")
    config = load_config(str(path), ["train.lr=0.05", "train.milestones=[2, 4]", "head.m=0.3",
                                     "train.max_steps=null", "data.val=[a.bin]"])
    assert config["train"]["lr"] == 0.05
    assert config["train"]["milestones"] == [2, 4]
    assert config["head"] == {"name": "arcface", "m": 0.3}
    assert config["train"]["max_steps"] is None
    assert config["data"]["val"] == ["a.bin"]
    assert config["model"]["embedding_size"] == 64
    # untouched keys keep their defaults
    assert config["train"]["momentum"] == 0.9


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=0.1", "unknown config key 'trian'"),
        ("train.batch_size=abc", "config key 'train.batch_size' must be int, got 'abc'"),
        ("train.batch_size=0", "config key 'train.batch_size' must be positive, got 0"),
        ("train.amp=fp8", "config key 'train.amp' must be one of none, bf16, fp16, got 'fp8'"),
        ("train.schedule=linear", "config key 'train.schedule' must be one of step, poly, cosine"),
        ("head.name=nope", "unknown head.name 'nope'"),
        ("head.mm=0.3", "head 'cosface' has no parameter 'mm' (did you mean 'head.m'?)"),
        ("head.m=large", "config key 'head.m' must be a number, got 'large'"),
        ("model.backbone=resnet9000", "unknown model.backbone 'resnet9000'"),
        ("train.tensorboard=3", "config key 'train.tensorboard' must be bool, got 3"),
        ("model.sync_batchnorm=1", "config key 'model.sync_batchnorm' must be bool, got 1"),
        ("train.lr", "override 'train.lr' must look like key=value"),
        ("data.augment.mask_prob=1.5", "config key 'data.augment.mask_prob' must be in [0, 1], got 1.5"),
        ("data.augment.mask=0.1", "unknown config key 'data.augment.mask' (did you mean 'data.augment.mask_prob'?)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UnitsfaceError) as info:
        load_config("demo", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(UnitsfaceError, match="config file not found: nothere.yaml"):
        load_config("nothere.yaml")
    with pytest.raises(UnitsfaceError, match="no config file or preset named 'nothere'"):
        load_config("nothere")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(UnitsfaceError, match="invalid YAML"):
        load_config(str(path))


def test_switching_head_keeps_only_parameters_the_new_head_accepts():
    base = load_config("demo")
    assert base["head"] == {"name": "cosface", "s": 32.0, "m": 0.35}
    config = load_config("demo", ["head.name=unitsface"])
    assert config["head"] == {"name": "unitsface", "s": 32.0}  # CosFace's m dropped, s kept
    with pytest.raises(UnitsfaceError, match="head 'unitsface' has no parameter 'm'"):
        load_config("demo", ["head.name=unitsface", "head.m=0.3"])
