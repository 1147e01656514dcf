"""Training configuration: defaults, presets, YAML files, dotted overrides, validation.

A config is a nested dict with the sections below. `load_config(source, overrides)` takes
a preset name (a YAML file shipped in `unitsface/configs/`) or a path, applies
`key=value` overrides (values parsed as YAML), and validates everything up front so that
a typo fails in the first second with a message naming the key, not after an hour.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from unitsface.errors import UnitsfaceError

# Every key, with its default. `None` marks "optional, any of the listed types".
DEFAULTS: dict[str, Any] = {
    "data": {
        "train": "synthetic",  # a folder with train.rec/train.idx, or "synthetic"
        "val": [],  # .bin files; with data.train=synthetic the generated val.bin is added
        "synthetic": {"identities": 500, "images_per_identity": 20, "seed": 0, "val_pairs": 1000},
        "cache": None,  # where the synthetic set is generated; default ~/.cache/unitsface
        "max_bad_fraction": 0.001,
        # Training-time augmentation in the loader workers: mask_prob = chance that a face gets a
        # rendered mask (data.masks); insightface's MFR recipes use 0.1.
        "augment": {"mask_prob": 0.0},
    },
    "model": {
        "backbone": "iresnet50",
        "embedding_size": 512,
        "sync_batchnorm": False,  # several ranks: BatchNorm statistics over the global batch, not per rank
    },
    "head": {"name": "cosface"},
    "train": {
        "batch_size": 128,
        "epochs": 20,
        "max_steps": None,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "schedule": "step",
        "milestones": [16, 24],
        "gamma": 0.1,
        "warmup_epochs": 0.0,
        "power": 2.0,
        "grad_accumulation": 1,
        "grad_clip": 10.0,
        "amp": "none",
        "seed": 1,
        "workers": 2,
        "device": "auto",
        "log_every": 10,
        "checkpoint_every": 0,
        "tensorboard": False,
        "clamp_prelu": 0.01,
        "flip": True,
        "sparse_update": False,  # Partial FC: optimiser touches only sampled class rows (lazy momentum/decay)
    },
    "output": "runs/unitsface",
}

TYPES: dict[str, tuple[type, ...]] = {
    "data.train": (str,),
    "data.val": (list,),
    "data.synthetic.identities": (int,),
    "data.synthetic.images_per_identity": (int,),
    "data.synthetic.seed": (int,),
    "data.synthetic.val_pairs": (int,),
    "data.cache": (str, type(None)),
    "data.max_bad_fraction": (float, int),
    "data.augment.mask_prob": (float, int),
    "model.backbone": (str,),
    "model.embedding_size": (int,),
    "model.sync_batchnorm": (bool,),
    "head.name": (str,),
    "train.batch_size": (int,),
    "train.epochs": (int,),
    "train.max_steps": (int, type(None)),
    "train.lr": (float, int),
    "train.weight_decay": (float, int),
    "train.momentum": (float, int),
    "train.schedule": (str,),
    "train.milestones": (list,),
    "train.gamma": (float, int),
    "train.warmup_epochs": (float, int),
    "train.power": (float, int),
    "train.grad_accumulation": (int,),
    "train.grad_clip": (float, int),
    "train.amp": (str,),
    "train.seed": (int,),
    "train.workers": (int,),
    "train.device": (str,),
    "train.log_every": (int,),
    "train.checkpoint_every": (int,),
    "train.tensorboard": (bool,),
    "train.clamp_prelu": (float, int, type(None)),
    "train.flip": (bool,),
    "train.sparse_update": (bool,),
    "output": (str,),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "train.schedule": ("step", "poly", "cosine"),
    "train.amp": ("none", "bf16", "fp16"),
}

POSITIVE = ("train.batch_size", "train.epochs", "train.grad_accumulation", "train.log_every",
            "model.embedding_size", "data.synthetic.identities", "data.synthetic.images_per_identity",
            "train.lr")


def presets() -> list[str]:
    """Names of the shipped presets (`unitsface/configs/<name>.yaml`)."""
    folder = resources.files("unitsface") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UnitsfaceError(f"config file not found: {source}")
        text = path.read_text()
    else:
        preset = resources.files("unitsface") / "configs" / f"{source}.yaml"
        if not preset.is_file():
            raise UnitsfaceError(f"no config file or preset named {source!r}; presets: {', '.join(presets())}")
        text = preset.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UnitsfaceError(f"config {source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UnitsfaceError(f"config {source}: top level must be a mapping")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if prefix == "head." or dotted == "head":
            pass  # head parameters are checked against the chosen head's signature
        elif key not in base:
            known = [k for k in base]
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise UnitsfaceError(
                f"unknown config key {dotted!r}" + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
            )
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = value


def set_dotted(config: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML: numbers, lists, null...)."""
    if "=" not in assignment:
        raise UnitsfaceError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    update: Any = value
    for part in reversed(key.strip().split(".")):
        update = {part: update}
    _merge(config, update)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check types, choices and ranges of every key; check head parameters against the head."""
    from unitsface import heads, models

    flat = _flatten({k: v for k, v in config.items() if k != "head"})
    for key, value in flat.items():
        allowed = TYPES.get(key)
        if allowed is None:
            raise UnitsfaceError(f"unknown config key {key!r}")
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UnitsfaceError(f"config key {key!r} must be {names}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UnitsfaceError(f"config key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key in POSITIVE and value <= 0:
            raise UnitsfaceError(f"config key {key!r} must be positive, got {value!r}")
    if flat["train.max_steps"] is not None and flat["train.max_steps"] <= 0:
        raise UnitsfaceError(f"config key 'train.max_steps' must be positive, got {flat['train.max_steps']}")
    if not 0 <= flat["data.augment.mask_prob"] <= 1:
        raise UnitsfaceError(f"config key 'data.augment.mask_prob' must be in [0, 1], got "
                             f"{flat['data.augment.mask_prob']}")
    if not all(isinstance(m, int) and m >= 0 for m in flat["train.milestones"]):
        raise UnitsfaceError(f"train.milestones must be a list of epoch numbers, got {flat['train.milestones']}")
    if not all(isinstance(v, str) for v in flat["data.val"]):
        raise UnitsfaceError(f"data.val must be a list of .bin paths, got {flat['data.val']}")
    if flat["model.backbone"] not in models.names():
        raise UnitsfaceError(f"unknown model.backbone {flat['model.backbone']!r}; known: {', '.join(models.names())}")
    head = dict(config["head"])
    name = head.pop("name", None)
    if not isinstance(name, str) or name not in heads.names():
        raise UnitsfaceError(f"unknown head.name {name!r}; known: {', '.join(heads.names())}")
    accepted = heads.head_parameters(name)
    for key, value in head.items():
        if key not in accepted:
            hint = difflib.get_close_matches(key, list(accepted), n=1)
            raise UnitsfaceError(
                f"head {name!r} has no parameter {key!r}"
                + (f" (did you mean 'head.{hint[0]}'?)" if hint else f"; it accepts: {', '.join(sorted(accepted))}")
            )
        default = accepted[key]
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UnitsfaceError(f"config key 'head.{key}' must be a number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise UnitsfaceError(f"config key 'head.{key}' must be a string, got {value!r}")
    return config


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """DEFAULTS <- preset or YAML file <- `key=value` overrides, validated."""
    config = copy.deepcopy(DEFAULTS)
    if source:
        _merge(config, _read_yaml(source))
    base_head = dict(config["head"])
    for assignment in overrides:
        set_dotted(config, assignment)
    if config["head"].get("name") != base_head.get("name"):
        _drop_foreign_head_params(config["head"], base_head)
    return validate(config)


def _drop_foreign_head_params(head: dict[str, Any], base_head: dict[str, Any]) -> None:
    """`head.name=X` on top of a preset: keep the preset's head parameters that X accepts (say `s`),
    drop the ones it has no use for (CosFace's `m` for `unitsface`). Parameters given as overrides
    are never dropped, so a typo there still fails validation."""
    from unitsface import heads

    name = head.get("name")
    if not isinstance(name, str) or name not in heads.names():
        return
    accepted = heads.head_parameters(name)
    for key, value in base_head.items():
        if key != "name" and key not in accepted and head.get(key) == value:
            del head[key]
