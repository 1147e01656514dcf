"""Start from weights you have: insightface / arcface_torch, AdaFace and unitsface files (`model.pretrained`).

A file is read without running any code it might hold (`torch.load(weights_only=True)`; objects of
classes outside torch's safe list, such as a Lightning checkpoint's hyper-parameters, become inert
placeholders instead of being imported). Each known *layout* turns the file into a state dict with
unitsface's names; the layout whose names cover most of the model is used, and the load reports the
tensors it matched, those the model has but the file lacks (left as initialised) and those the file
has but the model lacks (ignored). A tensor whose shape differs is an error naming it.

Layouts:
- `unitsface`: a unitsface checkpoint (`last.pt`): its `model` entry; the backbone family must match.
- `arcface_torch`: a plain state dict in insightface arcface_torch's names (iresnet `backbone.pth`, ViT
  `model.pt`), also under `state_dict_backbone` (its `checkpoint_gpu_N.pt`) or with DDP's `module.`
  prefix. unitsface's iresnet*, lresnet*, vit_* use those names, so any plain state dict of a unitsface
  backbone loads this way too.
- `adaface`: an AdaFace checkpoint (`{"state_dict": {"model.…": …}}`, its `net.py` IR-18/34/50/101) into
  iresnet18/34/50/100. AdaFace's names differ (`input_layer`, `body.K.res_layer.J`, `output_layer`) and
  three things are converted: its input is BGR (the first conv's input channels are reversed to read
  RGB), its embedding BatchNorm has no affine parameters (gamma 1, beta 0 are filled in), and its
  first block's shortcut is a parameter-free 2× subsampling (`MaxPool2d(1, 2)`), which iresnet's
  1×1 conv + BN shortcut reproduces with an identity conv and a BN whose running variance is 1 − eps
  (exact in eval mode; training then adapts it like any other layer).
"""

from __future__ import annotations

import collections
import pickle
import re
import types
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from unitsface.errors import UnitsfaceError, one_line
from unitsface.models._base import FAMILIES
from unitsface.training.checkpoint import FORMAT, VERSION

MIN_FIT = 0.5  # a layout "fits" when its names cover at least this fraction of the model's tensors

# A layout: (loaded file, target model) -> (state dict in unitsface names, notes), or None if the file
# does not have that layout's form at all.
Converted = tuple[dict[str, torch.Tensor], list[str]]
Layout = Callable[[Any, nn.Module], Optional[Converted]]


@dataclass
class LoadReport:
    """What a load took from a file: unitsface tensor names matched, missing and unexpected."""

    source: str
    layout: str
    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.source}: {len(self.matched)} tensors loaded (layout {self.layout}): {_listing(self.matched)}",
                 f"  missing, left as initialised: {_listing(self.missing)}",
                 f"  unexpected, ignored: {_listing(self.unexpected)}"]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _listing(names: list[str], limit: int = 8) -> str:
    """Names in full when few, else counted per top-level module ("blocks ×144, feature ×9")."""
    if not names:
        return "none"
    if len(names) <= limit:
        return ", ".join(names)
    groups = collections.Counter(name.split(".")[0] for name in names)
    return ", ".join(f"{group} ×{count}" for group, count in groups.items())


# --------------------------------------------------------------------------- reading a file


class _Inert:
    """Stands in for an object of a class the file names but no one imports (never runs its code)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    """torch's own safe list of globals; any other global becomes an `_Inert` subclass of that name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = torch._weights_only_unpickler._get_allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get(f"{module}.{name}")
        return found if found is not None else type(name, (_Inert,), {"__module__": "unitsface.inert"})


_INERT_PICKLE = types.SimpleNamespace(Unpickler=_InertUnpickler, load=pickle.load, __name__="unitsface_inert_pickle")


def read_weights(path: str | Path) -> Any:
    """The object stored in a torch file, read without importing or running any class it names."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnitsfaceError(f"weights file not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # classes outside torch's safe list: read them as inert placeholders
            if not hasattr(torch._weights_only_unpickler, "_get_allowed_globals"):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_INERT_PICKLE)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, AttributeError, TypeError,
            KeyError) as exc:
        first = one_line(exc)
        raise UnitsfaceError(f"unreadable weights file {path}: {first}") from None


# --------------------------------------------------------------------------- layouts


def _tensors(obj: Any) -> dict[str, torch.Tensor] | None:
    """`obj` if it is a non-empty mapping of names to tensors, else None."""
    if not isinstance(obj, dict) or not obj:
        return None
    return obj if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()) else None


def _unitsface(obj: Any, model: nn.Module) -> Converted | None:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    if obj.get("version", 0) > VERSION:
        raise UnitsfaceError(f"checkpoint version {obj['version']}; this unitsface reads {VERSION}")
    backbone = obj["meta"]["backbone"]
    if backbone not in FAMILIES:
        raise UnitsfaceError(f"the checkpoint's backbone {backbone!r} is not one this unitsface knows")
    if FAMILIES[backbone] != getattr(model, "family", None):
        raise UnitsfaceError(f"the checkpoint's backbone {backbone!r} ({FAMILIES[backbone]} family) cannot be loaded "
                             f"into a {getattr(model, 'family', type(model).__name__)} backbone")
    return obj["model"], [f"from a unitsface {backbone} checkpoint at step {obj.get('step', '?')}"]


def _arcface_torch(obj: Any, model: nn.Module) -> Converted | None:
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    state = _tensors(obj)
    if state is None:
        return None
    return {k.removeprefix("module."): v for k, v in state.items()}, []


_ADAFACE_OUTER = {"input_layer.0": "conv1", "input_layer.1": "bn1", "input_layer.2": "prelu",
                  "output_layer.0": "bn2", "output_layer.3": "fc", "output_layer.4": "features"}
_ADAFACE_BLOCK = {"res_layer.0": "bn1", "res_layer.1": "conv1", "res_layer.2": "bn2", "res_layer.3": "prelu",
                  "res_layer.4": "conv2", "res_layer.5": "bn3", "shortcut_layer.0": "downsample.0",
                  "shortcut_layer.1": "downsample.1"}


def _adaface(obj: Any, model: nn.Module) -> Converted | None:
    state = _tensors(obj.get("state_dict")) if isinstance(obj, dict) else None
    if state is None or not any(k.startswith("model.") for k in state):
        return None
    state = {k.removeprefix("model."): v for k, v in state.items()}  # others (its head's kernel) stay unexpected
    stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if isinstance(getattr(model, name, None),
                                                                                       nn.Sequential)]
    blocks = [f"{stage}.{i}" for stage in stages for i in range(len(getattr(model, stage)))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        match = re.fullmatch(r"body\.(\d+)\.(\w+\.\d+)", module)
        if module in _ADAFACE_OUTER:
            key = f"{_ADAFACE_OUTER[module]}.{param}"
        elif match and int(match[1]) < len(blocks) and match[2] in _ADAFACE_BLOCK:
            key = f"{blocks[int(match[1])]}.{_ADAFACE_BLOCK[match[2]]}.{param}"
        out[key] = value
    if "conv1.weight" not in out or not blocks:
        return out, []
    notes = ["AdaFace reads BGR: the first conv's input channels are reversed to read RGB"]
    out["conv1.weight"] = out["conv1.weight"].flip(1)
    features = getattr(model, "features", None)
    if isinstance(features, nn.BatchNorm1d) and "features.running_mean" in out and "features.weight" not in out:
        out["features.weight"] = torch.ones_like(out["features.running_mean"])
        out["features.bias"] = torch.zeros_like(out["features.running_mean"])
        notes.append("AdaFace's embedding BatchNorm has no affine parameters: gamma 1, beta 0")
    for name in blocks:
        block = model.get_submodule(name)
        down = getattr(block, "downsample", None)
        if down is None or f"{name}.downsample.0.weight" in out or f"{name}.conv1.weight" not in out:
            continue
        conv, bn = down[0], down[1]
        if conv.in_channels != conv.out_channels:
            continue
        out[f"{name}.downsample.0.weight"] = torch.eye(conv.out_channels).reshape(conv.weight.shape)
        out[f"{name}.downsample.1.weight"] = torch.ones(bn.num_features)
        out[f"{name}.downsample.1.bias"] = torch.zeros(bn.num_features)
        out[f"{name}.downsample.1.running_mean"] = torch.zeros(bn.num_features)
        out[f"{name}.downsample.1.running_var"] = torch.full((bn.num_features,), 1.0 - bn.eps)
        out[f"{name}.downsample.1.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        notes.append(f"AdaFace's {name} shortcut is a parameter-free subsampling: set as an identity 1x1 conv + BN")
    return out, notes


LAYOUTS: dict[str, Layout] = {"unitsface": _unitsface, "arcface_torch": _arcface_torch, "adaface": _adaface}


# --------------------------------------------------------------------------- loading


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str, layout: str = "unitsface",
                  notes: Iterable[str] = ()) -> LoadReport:
    """Copy the tensors of `state` whose names `module` has; a shape difference is an error naming the tensor."""
    own = module.state_dict()
    matched = [k for k in own if k in state]
    for key in matched:
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise UnitsfaceError(f"{source}: tensor {key!r} has shape {list(state[key].shape)} in the file but "
                                 f"{list(own[key].shape)} in the model")
    module.load_state_dict({k: state[k] for k in matched}, strict=False)
    return LoadReport(source, layout, matched, [k for k in own if k not in state],
                      [k for k in state if k not in own], list(notes))


def load_pretrained(model: nn.Module, path: str | Path, source: str | None = None, weights: Any = None) -> LoadReport:
    """Load the backbone weights of `path` (any layout above) into `model`, in place.

    `weights` is the file's content when the caller has already read it (a unitsface checkpoint).
    The layout whose names cover most of the model's tensors is used; if none covers `MIN_FIT` of
    them, the error names the closest.
    """
    source = source or str(path)
    obj = read_weights(path) if weights is None else weights
    own = set(model.state_dict())
    scored = []
    for name, layout in LAYOUTS.items():
        converted = layout(obj, model)
        if converted is not None:
            scored.append((len(own & set(converted[0])), name, converted))
    if not scored:
        raise UnitsfaceError(f"{source}: not a state dict or checkpoint of any known layout "
                             f"({', '.join(LAYOUTS)})")
    hits, name, (state, notes) = max(scored, key=lambda item: item[0])
    if hits < MIN_FIT * len(own):
        raise UnitsfaceError(f"{source}: its tensor names fit no known layout for a {getattr(model, 'family', '')} "
                             f"backbone (closest: {name}, {hits} of {len(own)} tensors)")
    return load_matching(model, state, source, name, notes)
