"""Training configuration: defaults, presets, YAML files, dotted overrides, validation.

A config is a nested dict with the sections below. `load_config(source, overrides)` takes
a preset name (a YAML file shipped in `unitsface/configs/`) or a path, applies
`key=value` overrides (values parsed as YAML), and validates everything up front so that
a typo fails in the first second with a message naming the key, not after an hour.
"""

from __future__ import annotations

import copy
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from unitsface import heads, models, optim
from unitsface.errors import UnitsfaceError
from unitsface.training.selection import ValidationMetric

# Every key, with its default. `None` marks "optional, any of the listed types".
DEFAULTS: dict[str, Any] = {
    "data": {
        "train": "synthetic",  # a folder with train.rec/train.idx, or "synthetic"
        # .bin pair lists, .rec sets or folders of identities (scored all-pairs); empty with
        # data.train=synthetic: the set's own val.bin and held-out identities (heldout/)
        "val": [],
        "synthetic": {"identities": 500, "images_per_identity": 20, "seed": 0, "val_pairs": 1000,
                      "heldout_identities": 100, "heldout_images": 8},
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
        "pretrained": None,  # backbone weights to start from: insightface/arcface_torch .pth, AdaFace, unitsface
        # any other model.<key> is a keyword of the backbone's constructor (models.parameters), e.g. mask_ratio
    },
    "head": {"name": "cosface"},
    "train": {
        "batch_size": 128,
        "epochs": 20,
        "max_steps": None,
        "optimizer": "sgd",  # sgd | adamw (optim.names())
        "lr": 0.1,
        "weight_decay": 5e-4,
        "momentum": 0.9,  # sgd only
        "no_decay_norm_bias": False,  # no weight decay for norm weights, biases, PReLU slopes
        "bias_weight_decay": None,  # a head's learned threshold bias; None: as above (the references' global decay)
        "head_lr_scale": 1.0,  # the head's lr = lr × head_lr_scale
        "init_from": None,  # a unitsface checkpoint to fine-tune from (backbone; head too when the classes match)
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
        "prefetch_factor": 2,  # batches each loader worker keeps in flight (workers persist across epochs)
        "device": "auto",
        "log_every": 10,
        "val_every": 0,  # validate every N optimizer steps; 0: at the end of every epoch (and always at the end)
        "max_skipped_steps": 50,  # stop after this many steps in a row with inf/NaN gradients
        "channels_last": False,  # NHWC images and backbone memory layout (faster convolutions on recent GPUs)
        "compile": False,  # torch.compile the backbone (eager again, with a message, where the platform cannot)
        "keep_best": None,  # [SET:]accuracy|auc|eer|rank1|tar@FAR: write best.pt whenever it improves
        "ema": None,  # decay of an exponential moving average of the weights, validated and deployed when set
        "checkpoint_every": 0,
        "tensorboard": False,
        "wandb": False,  # Weights & Biases (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE from the environment)
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
    "data.synthetic.heldout_identities": (int,),
    "data.synthetic.heldout_images": (int,),
    "data.cache": (str, type(None)),
    "data.max_bad_fraction": (float, int),
    "data.augment.mask_prob": (float, int),
    "model.backbone": (str,),
    "model.embedding_size": (int,),
    "model.sync_batchnorm": (bool,),
    "model.pretrained": (str, type(None)),
    "head.name": (str,),
    "train.batch_size": (int,),
    "train.epochs": (int,),
    "train.max_steps": (int, type(None)),
    "train.optimizer": (str,),
    "train.lr": (float, int),
    "train.weight_decay": (float, int),
    "train.momentum": (float, int),
    "train.no_decay_norm_bias": (bool,),
    "train.bias_weight_decay": (float, int, type(None)),
    "train.head_lr_scale": (float, int),
    "train.init_from": (str, type(None)),
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
    "train.prefetch_factor": (int,),
    "train.device": (str,),
    "train.log_every": (int,),
    "train.checkpoint_every": (int,),
    "train.val_every": (int,),
    "train.keep_best": (str, type(None)),
    "train.max_skipped_steps": (int,),
    "train.channels_last": (bool,),
    "train.compile": (bool,),
    "train.ema": (float, type(None)),
    "train.tensorboard": (bool,),
    "train.wandb": (bool,),
    "train.clamp_prelu": (float, int, type(None)),
    "train.flip": (bool,),
    "train.sparse_update": (bool,),
    "output": (str,),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "train.schedule": ("step", "poly", "cosine"),
    "train.amp": ("none", "bf16", "fp16"),
}

POSITIVE = ("train.max_skipped_steps", "train.batch_size", "train.epochs", "train.grad_accumulation", "train.log_every",
            "model.embedding_size", "data.synthetic.identities", "data.synthetic.images_per_identity",
            "data.synthetic.heldout_identities", "data.synthetic.heldout_images",
            "train.lr", "train.prefetch_factor")


def presets() -> list[str]:
    """Names of the shipped presets (`unitsface/configs/<name>.yaml`)."""
    folder = resources.files("unitsface") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_summary(name: str) -> str:
    """The first comment line of preset `name`: what it trains and which published result it reproduces."""
    text = (resources.files("unitsface") / "configs" / f"{name}.yaml").read_text()
    first = text.splitlines()[0] if text else ""
    return first[1:].strip() if first.startswith("#") else ""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); here such numbers are floats, as in YAML 1.2."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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
        data = _load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise UnitsfaceError(f"config {source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UnitsfaceError(f"config {source}: top level must be a mapping")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if prefix in ("head.", "model.") or dotted == "head":
            pass  # head and backbone parameters are checked against the chosen constructor's signature
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
        value = _load_yaml(raw) if raw.strip() else ""
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


def backbone_params(config: dict[str, Any]) -> dict[str, Any]:
    """The `model.<key>` entries that are keywords of the backbone's constructor (not trainer keys)."""
    return {k: v for k, v in config["model"].items() if k not in DEFAULTS["model"]}


def _check_types(section: str, given: dict[str, Any], accepted: dict[str, Any]) -> None:
    """Each value of `given` must have the type of its keyword's default in `accepted` (a constructor's)."""
    for key, value in given.items():
        default = accepted[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UnitsfaceError(f"config key '{section}.{key}' must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UnitsfaceError(f"config key '{section}.{key}' must be a number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise UnitsfaceError(f"config key '{section}.{key}' must be a string, got {value!r}")


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check types, choices and ranges of every key; check head and backbone parameters against their
    constructors."""
    extra = backbone_params(config)
    flat = _flatten({k: v for k, v in config.items() if k != "head"})
    for key, value in flat.items():
        if key.startswith("model.") and key[len("model."):].split(".")[0] in extra:
            continue  # checked against the backbone below
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
    for key in ("train.val_every", "train.checkpoint_every"):
        if flat[key] < 0:
            raise UnitsfaceError(f"config key {key!r} must be 0 or a number of steps, got {flat[key]}")
    if flat["train.max_steps"] is not None and flat["train.max_steps"] <= 0:
        raise UnitsfaceError(f"config key 'train.max_steps' must be positive, got {flat['train.max_steps']}")
    if not 0 <= flat["data.max_bad_fraction"] < 1:
        raise UnitsfaceError(f"data.max_bad_fraction must be in [0, 1), got {flat['data.max_bad_fraction']}")
    if not 0 <= flat["data.augment.mask_prob"] <= 1:
        raise UnitsfaceError(f"config key 'data.augment.mask_prob' must be in [0, 1], got "
                             f"{flat['data.augment.mask_prob']}")
    if not all(isinstance(m, int) and m >= 0 for m in flat["train.milestones"]):
        raise UnitsfaceError(f"train.milestones must be a list of epoch numbers, got {flat['train.milestones']}")
    if not all(isinstance(v, str) for v in flat["data.val"]):
        raise UnitsfaceError(f"data.val must be a list of paths (.bin files, .rec sets, identity folders), "
                             f"got {flat['data.val']}")
    if flat["train.optimizer"] not in optim.names():
        raise UnitsfaceError(f"unknown train.optimizer {flat['train.optimizer']!r}; known: {', '.join(optim.names())}")
    if flat["train.sparse_update"] and flat["train.optimizer"] != "sgd":
        raise UnitsfaceError(f"train.sparse_update needs train.optimizer=sgd (got {flat['train.optimizer']}): the lazy "
                             "row update reproduces SGD's momentum and weight decay, not another optimiser's state")
    for key in ("train.head_lr_scale", "train.weight_decay", "train.bias_weight_decay"):
        if flat[key] is not None and flat[key] < 0:
            raise UnitsfaceError(f"config key '{key}' must be >= 0, got {flat[key]}")
    if flat["train.keep_best"] is not None:
        ValidationMetric.parse(flat["train.keep_best"])
    if flat["train.ema"] is not None and not 0.0 < flat["train.ema"] < 1.0:
        raise UnitsfaceError(f"config key 'train.ema' must be a decay in (0, 1) such as 0.999, got {flat['train.ema']}")
    if flat["model.pretrained"] is not None and flat["train.init_from"] is not None:
        raise UnitsfaceError("model.pretrained and train.init_from both set: init_from already brings the backbone")
    backbone = flat["model.backbone"]
    if backbone not in models.names():
        raise UnitsfaceError(f"unknown model.backbone {backbone!r}; known: {', '.join(models.names())}")
    accepted = models.parameters(backbone)
    for key in extra:
        if key not in accepted:
            hint = difflib.get_close_matches(key, [*accepted, *DEFAULTS["model"]], n=1)
            raise UnitsfaceError(f"backbone {backbone!r} has no parameter {key!r}"
                                 + (f" (did you mean 'model.{hint[0]}'?)" if hint
                                    else f"; it accepts: {', '.join(sorted(accepted)) or 'none'}"))
    _check_types("model", extra, accepted)
    head = dict(config["head"])
    name = head.pop("name", None)
    if not isinstance(name, str) or name not in heads.names():
        raise UnitsfaceError(f"unknown head.name {name!r}; known: {', '.join(heads.names())}")
    heads.check_parameters(name, head, prefix="head.")
    _check_types("head", head, heads.head_parameters(name))
    return config


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """DEFAULTS <- preset or YAML file <- `key=value` overrides, validated."""
    config = copy.deepcopy(DEFAULTS)
    if source:
        _merge(config, _read_yaml(source))
    base_head, base_model = dict(config["head"]), dict(config["model"])
    for assignment in overrides:
        set_dotted(config, assignment)
    if config["head"].get("name") != base_head.get("name"):
        _drop_foreign_params(config["head"], base_head, "name", _head_parameters)
    if config["model"].get("backbone") != base_model.get("backbone"):
        _drop_foreign_params(config["model"], base_model, "backbone", _backbone_parameters)
    return validate(config)


def for_head(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A validated copy of `config` that trains head `name` with the head parameters `config` was given: a
    bench's `head.*` overrides reach every head it trains, and one that a head does not accept is an error
    naming it (not silently dropped)."""
    out = copy.deepcopy(config)
    out["head"] = {**config["head"], "name": name}
    return validate(out)


def _head_parameters(name: str) -> dict[str, Any] | None:
    return heads.head_parameters(name) if name in heads.names() else None


def _backbone_parameters(name: str) -> dict[str, Any] | None:
    if name not in models.names():
        return None
    return {**models.parameters(name), **{k: None for k in DEFAULTS["model"]}}


def _drop_foreign_params(section: dict[str, Any], base: dict[str, Any], name_key: str,
                         accepted_by: Callable[[str], dict[str, Any] | None]) -> None:
    """`head.name=X` (or `model.backbone=X`) on top of a preset: keep the preset's parameters that X
    accepts (say `s`), drop the ones it has no use for (CosFace's `m` for `unitsface`, a ViT's
    `mask_ratio` for an iresnet). Parameters given as overrides are never dropped, so a typo there
    still fails validation."""
    name = section.get(name_key)
    accepted = accepted_by(name) if isinstance(name, str) else None
    if accepted is None:
        return
    for key, value in base.items():
        if key != name_key and key not in accepted and section.get(key) == value:
            del section[key]
