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


def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path):
    """YAML 1.1 would leave `1e-3` a string (and the run would fail on `train.lr must be float`)."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {weight_decay: 5e-4}\n")
    config = load_config(str(path), ["train.lr=1e-3", "train.ema=+9.99E-1", "output=runs/1e-3x"])
    assert (config["train"]["lr"], config["train"]["weight_decay"], config["train"]["ema"]) == (0.001, 0.0005, 0.999)
    assert config["output"] == "runs/1e-3x"


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
        ("head.m_sampl=0.3", "head 'unitsface' has no parameter 'm_sampl' (did you mean 'head.m_sample'?)"),
        ("head.m_class=large", "config key 'head.m_class' must be a number, got 'large'"),
        ("head.warmup_epochs=2", "head 'unitsface': parameter 'head.warmup_epochs' is now 'head.s2s_start_epoch'"),
        ("model.backbone=resnet9000", "unknown model.backbone 'resnet9000'"),
        ("train.tensorboard=3", "config key 'train.tensorboard' must be bool, got 3"),
        ("model.sync_batchnorm=1", "config key 'model.sync_batchnorm' must be bool, got 1"),
        ("train.lr", "override 'train.lr' must look like key=value"),
        ("train.optimizer=adam", "unknown train.optimizer 'adam'; known: adamw, sgd"),
        ("train.head_lr_scale=-1", "config key 'train.head_lr_scale' must be >= 0, got -1"),
        ("train.bias_weight_decay=-1e-4", "config key 'train.bias_weight_decay' must be >= 0, got -0.0001"),
        ("train.bias_weight_decay=none",
         "config key 'train.bias_weight_decay' must be float or int or null, got 'none'"),
        ("train.no_decay_norm_bias=1", "config key 'train.no_decay_norm_bias' must be bool, got 1"),
        ("model.mask_ratio=0.1", "backbone 'tinyfacenet' has no parameter 'mask_ratio'; it accepts: input_size"),
        ("model.pretrianed=r50.pth", "backbone 'tinyfacenet' has no parameter 'pretrianed' (did you mean "
                                     "'model.pretrained'?)"),
        ("model.input_size=big", "config key 'model.input_size' must be a number, got 'big'"),
        ("data.max_bad_fraction=1", "data.max_bad_fraction must be in [0, 1), got 1"),
        ("data.max_bad_fraction=-0.1", "data.max_bad_fraction must be in [0, 1), got -0.1"),
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
    assert base["head"] == {"name": "unitsface", "s": 32.0, "m_class": 0.35, "m_sample": 0.1}
    config = load_config("demo", ["head.name=cosface"])
    assert config["head"] == {"name": "cosface", "s": 32.0}  # UniTSFace's margins dropped, s kept
    with pytest.raises(UnitsfaceError, match="head 'cosface' has no parameter 'm_class'"):
        load_config("demo", ["head.name=cosface", "head.m_class=0.3"])


def test_the_arcface_torch_vit_recipe_is_a_config(tmp_path):
    """configs/wf42m_pfc03_40epoch_8gpu_vit_t.py: AdamW lr 1e-3, wd 0.1, warm-up num_epoch // 10 = 4 epochs then
    PolynomialLRWarmup (power 1: linear), clip 5 (there: backbone only), fp16; vit_t_dp005_mask0: drop path
    0.05, no masking; Partial FC 0.3, CosFace m = 0.4."""
    path = tmp_path / "vit.yaml"
    path.write_text("""
model: {backbone: vit_t, embedding_size: 512, mask_ratio: 0.0, drop_path: 0.05}
head: {name: cosface, s: 64.0, m: 0.4, sample_rate: 0.3}
train: {optimizer: adamw, lr: 1.0e-3, weight_decay: 0.1, epochs: 40, warmup_epochs: 4, schedule: poly, power: 1.0,
        grad_clip: 5.0, amp: fp16, batch_size: 512}
""")
    config = load_config(str(path))
    assert config["model"]["mask_ratio"] == 0.0 and config["train"]["optimizer"] == "adamw"
    switched = load_config(str(path), ["model.backbone=iresnet50"])  # the ViT's parameters go with it
    assert switched["model"] == {"backbone": "iresnet50", "embedding_size": 512, "sync_batchnorm": False,
                                 "pretrained": None}
    with pytest.raises(UnitsfaceError, match="no parameter 'drop_path'"):
        load_config(str(path), ["model.backbone=iresnet50", "model.drop_path=0.1"])  # unless given again


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=adamw", "train.sparse_update=true"], "train.sparse_update needs train.optimizer=sgd"),
    (["model.pretrained=a.pth", "train.init_from=b.pt"], "model.pretrained and train.init_from both set"),
])
def test_incompatible_keys(overrides, message):
    with pytest.raises(UnitsfaceError, match=message):
        load_config("demo", overrides)
