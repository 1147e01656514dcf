"""Starting from weights you have (`model.pretrained`): files in arcface_torch's (ViT, iresnet) and AdaFace's
layouts, written here with those projects' tensor names, loaded and checked against forwards written here
from the raw tensors with functional ops; unitsface checkpoints; bad files."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from unitsface import models
from unitsface.errors import UnitsfaceError
from unitsface.training.checkpoint import atomic_save

STAGES = (64, 128, 256, 512)


class Tensors:
    """Random tensors of given shapes from one seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * std

    def weight(self, *shape: int) -> torch.Tensor:
        """Std 1/sqrt(fan-in): activations keep their scale through the layers."""
        return self.normal(*shape, std=math.prod(shape[1:]) ** -0.5)

    def norm(self, prefix: str, n: int, affine: bool = True, running: bool = True) -> dict[str, torch.Tensor]:
        out = {}
        if affine:
            out.update({f"{prefix}.weight": 1 + self.normal(n, std=0.1), f"{prefix}.bias": self.normal(n, std=0.1)})
        if running:
            out.update({f"{prefix}.running_mean": self.normal(n, std=0.1),
                        f"{prefix}.running_var": 0.5 + torch.rand(n, generator=self.g),
                        f"{prefix}.num_batches_tracked": torch.tensor(1000)})
        return out


def bn(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, eps: float = 1e-5, affine: bool = True
       ) -> torch.Tensor:
    """Eval-mode BatchNorm over dim 1 from running statistics."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - w[f"{prefix}.running_mean"].view(shape)) / torch.sqrt(w[f"{prefix}.running_var"].view(shape) + eps)
    return y * w[f"{prefix}.weight"].view(shape) + w[f"{prefix}.bias"].view(shape) if affine else y


def prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, x * slope.view(1, -1, 1, 1))


def layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


# --------------------------------------------------------------------------- arcface_torch ViT


def arcface_vit_state(dim: int = 256, depth: int = 12, embedding: int = 512) -> dict[str, torch.Tensor]:
    """A state dict with arcface_torch's backbones/vit.py names and shapes."""
    t = Tensors(1)
    state = {"patch_embed.proj.weight": t.weight(dim, 3, 9, 9), "patch_embed.proj.bias": t.normal(dim, std=0.1),
             "pos_embed": t.normal(1, 144, dim, std=0.5), "mask_token": t.normal(1, 1, dim, std=0.02)}
    for i in range(depth):
        p = f"blocks.{i}"
        state.update({
            **t.norm(f"{p}.norm1", dim, running=False), f"{p}.attn.qkv.weight": t.weight(3 * dim, dim),
            f"{p}.attn.proj.weight": t.weight(dim, dim), f"{p}.attn.proj.bias": t.normal(dim, std=0.1),
            **t.norm(f"{p}.norm2", dim, running=False), f"{p}.mlp.fc1.weight": t.weight(4 * dim, dim),
            f"{p}.mlp.fc1.bias": t.normal(4 * dim, std=0.1), f"{p}.mlp.fc2.weight": t.weight(dim, 4 * dim),
            f"{p}.mlp.fc2.bias": t.normal(dim, std=0.1)})
    state.update({**t.norm("norm", dim, running=False), "feature.0.weight": t.weight(dim, 144 * dim),
                  **t.norm("feature.1", dim), "feature.2.weight": t.weight(embedding, dim),
                  **t.norm("feature.3", embedding)})
    return state


def vit_reference(w: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 8) -> torch.Tensor:
    """arcface_torch's ViT in eval mode, from the raw tensors: patches, pre-norm blocks, LN, feature head."""
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=9)
    t = t.flatten(2).transpose(1, 2) + w["pos_embed"]
    n, length, dim = t.shape
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        h = layer_norm(t, w, f"{p}.norm1")
        q, k, v = (h @ w[f"{p}.attn.qkv.weight"].T).reshape(n, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1) @ v
        t = t + a.transpose(1, 2).reshape(n, length, dim) @ w[f"{p}.attn.proj.weight"].T + w[f"{p}.attn.proj.bias"]
        h = layer_norm(t, w, f"{p}.norm2")
        h = torch.clamp(h @ w[f"{p}.mlp.fc1.weight"].T + w[f"{p}.mlp.fc1.bias"], 0, 6)  # ReLU6
        t = t + h @ w[f"{p}.mlp.fc2.weight"].T + w[f"{p}.mlp.fc2.bias"]
    f = layer_norm(t, w, "norm").reshape(n, length * dim) @ w["feature.0.weight"].T
    f = bn(f, w, "feature.1", eps=2e-5) @ w["feature.2.weight"].T
    return bn(f, w, "feature.3", eps=2e-5)


def empty(name: str, embedding_size: int = 512) -> torch.nn.Module:
    """A model with uninitialised weights (skips the slow truncated-normal init): every tensor gets loaded."""
    with torch.device("meta"):
        model = models.build(name, embedding_size)
    return model.to_empty(device="cpu")


def test_arcface_torch_vit_t_weights_give_the_reference_embeddings(tmp_path) -> None:
    state = arcface_vit_state()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "model.pt")  # as saved from DDP
    model = empty("vit_t")
    report = models.load_pretrained(model, tmp_path / "model.pt")
    assert report.layout == "arcface_torch" and report.missing == [] and report.unexpected == []
    assert sorted(report.matched) == sorted(state)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model.eval()(x), vit_reference(state, x)
    assert want.abs().max() > 0.5 and not torch.allclose(want[0], want[1], rtol=0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# --------------------------------------------------------------------------- arcface_torch / insightface iresnet


def insightface_iresnet_state(layers: tuple[int, ...] = (2, 2, 2, 2), embedding: int = 512) -> dict[str, torch.Tensor]:
    """A state dict with insightface's backbones/iresnet.py names and shapes."""
    t = Tensors(2)
    state = {"conv1.weight": t.weight(64, 3, 3, 3), **t.norm("bn1", 64), "prelu.weight": 0.25 + t.normal(64, std=0.05)}
    inplanes = 64
    for s, (planes, blocks) in enumerate(zip(STAGES, layers), 1):
        for i in range(blocks):
            p = f"layer{s}.{i}"
            state.update({**t.norm(f"{p}.bn1", inplanes), f"{p}.conv1.weight": t.weight(planes, inplanes, 3, 3),
                          **t.norm(f"{p}.bn2", planes), f"{p}.prelu.weight": 0.25 + t.normal(planes, std=0.05),
                          f"{p}.conv2.weight": t.weight(planes, planes, 3, 3), **t.norm(f"{p}.bn3", planes)})
            if i == 0:
                state.update({f"{p}.downsample.0.weight": t.weight(planes, inplanes, 1, 1),
                              **t.norm(f"{p}.downsample.1", planes)})
            inplanes = planes
    state.update({**t.norm("bn2", 512), "fc.weight": t.weight(embedding, 512 * 49),
                  "fc.bias": t.normal(embedding, std=0.1), **t.norm("features", embedding)})
    return state


def iresnet_reference(w: dict[str, torch.Tensor], x: torch.Tensor, layers: tuple[int, ...] = (2, 2, 2, 2)
                      ) -> torch.Tensor:
    """insightface iresnet in eval mode: BN-conv-BN-PReLU-conv(stride)-BN blocks + 1×1 conv shortcuts."""
    x = prelu(bn(F.conv2d(x, w["conv1.weight"], padding=1), w, "bn1"), w["prelu.weight"])
    for s, blocks in enumerate(layers, 1):
        for i in range(blocks):
            p, stride = f"layer{s}.{i}", 2 if i == 0 else 1
            out = F.conv2d(bn(x, w, f"{p}.bn1"), w[f"{p}.conv1.weight"], padding=1)
            out = prelu(bn(out, w, f"{p}.bn2"), w[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, w[f"{p}.conv2.weight"], stride=stride, padding=1), w, f"{p}.bn3")
            shortcut = bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=2), w, f"{p}.downsample.1") if i == 0 else x
            x = out + shortcut
    x = bn(x, w, "bn2").flatten(1) @ w["fc.weight"].T + w["fc.bias"]
    return bn(x, w, "features")


def test_insightface_iresnet18_weights_give_the_reference_embeddings(tmp_path) -> None:
    state = insightface_iresnet_state()
    torch.save(state, tmp_path / "backbone.pth")
    model = empty("iresnet18")
    report = models.load_pretrained(model, tmp_path / "backbone.pth")
    assert (report.layout, report.missing, report.unexpected, len(report.matched)) == (
        "arcface_torch", [], [], len(state))
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, want = model.eval()(x), iresnet_reference(state, x)
    assert want.abs().max() > 0.5 and not torch.allclose(want[0], want[1], rtol=0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# --------------------------------------------------------------------------- AdaFace


def adaface_ir18_state(embedding: int = 512, classes: int = 7) -> dict[str, torch.Tensor]:
    """The `state_dict` of an AdaFace checkpoint of net.py's IR_18 (`model.` = backbone, `head.` = AdaFace head)."""
    t = Tensors(3)
    state = {"input_layer.0.weight": t.weight(64, 3, 3, 3), **t.norm("input_layer.1", 64),
             "input_layer.2.weight": 0.25 + t.normal(64, std=0.05)}
    k, inplanes = 0, 64
    for depth in STAGES:
        for _ in range(2):
            p = f"body.{k}"
            state.update({**t.norm(f"{p}.res_layer.0", inplanes),
                          f"{p}.res_layer.1.weight": t.weight(depth, inplanes, 3, 3),
                          **t.norm(f"{p}.res_layer.2", depth),
                          f"{p}.res_layer.3.weight": 0.25 + t.normal(depth, std=0.05),
                          f"{p}.res_layer.4.weight": t.weight(depth, depth, 3, 3),
                          **t.norm(f"{p}.res_layer.5", depth)})
            if inplanes != depth:  # otherwise MaxPool2d(1, stride): no parameters
                state.update({f"{p}.shortcut_layer.0.weight": t.weight(depth, inplanes, 1, 1),
                              **t.norm(f"{p}.shortcut_layer.1", depth)})
            k, inplanes = k + 1, depth
    state.update({**t.norm("output_layer.0", 512), "output_layer.3.weight": t.weight(embedding, 512 * 49),
                  "output_layer.3.bias": t.normal(embedding, std=0.1),
                  **t.norm("output_layer.4", embedding, affine=False)})
    return {**{f"model.{k}": v for k, v in state.items()}, "head.kernel": t.normal(embedding, classes, std=0.1)}


def adaface_reference(w: dict[str, torch.Tensor], rgb: torch.Tensor) -> torch.Tensor:
    """AdaFace's IR_18 in eval mode on BGR input; returns the embedding before its L2 normalisation."""
    w = {k.removeprefix("model."): v for k, v in w.items()}
    x = rgb.flip(1)  # AdaFace is trained on BGR images
    x = prelu(bn(F.conv2d(x, w["input_layer.0.weight"], padding=1), w, "input_layer.1"), w["input_layer.2.weight"])
    k, inplanes = 0, 64
    for depth in STAGES:
        for unit in range(2):
            p, stride = f"body.{k}", 2 if unit == 0 else 1
            out = F.conv2d(bn(x, w, f"{p}.res_layer.0"), w[f"{p}.res_layer.1.weight"], padding=1)
            out = prelu(bn(out, w, f"{p}.res_layer.2"), w[f"{p}.res_layer.3.weight"])
            out = bn(F.conv2d(out, w[f"{p}.res_layer.4.weight"], stride=stride, padding=1), w, f"{p}.res_layer.5")
            if inplanes == depth:
                shortcut = x[:, :, ::stride, ::stride]  # MaxPool2d(kernel 1, stride)
            else:
                shortcut = bn(F.conv2d(x, w[f"{p}.shortcut_layer.0.weight"], stride=stride), w, f"{p}.shortcut_layer.1")
            x, k, inplanes = out + shortcut, k + 1, depth
    x = bn(x, w, "output_layer.0").flatten(1) @ w["output_layer.3.weight"].T + w["output_layer.3.bias"]
    return bn(x, w, "output_layer.4", affine=False)


class LightningHyperParameters(dict):
    """Stands for a class only the training code had: the loader must not need (or run) it."""

    def __setstate__(self, state):  # pragma: no cover - must never run
        raise AssertionError("the loader ran code from the checkpoint")


def test_adaface_checkpoint_gives_the_reference_embeddings(tmp_path, monkeypatch) -> None:
    state = adaface_ir18_state()
    foreign = types.ModuleType("lightning_only_module")
    LightningHyperParameters.__module__ = foreign.__name__
    foreign.LightningHyperParameters = LightningHyperParameters
    with monkeypatch.context() as patch:  # the class is importable only while the file is written
        patch.setitem(sys.modules, foreign.__name__, foreign)
        hyper = LightningHyperParameters(arch="ir_18")
        hyper.extra = "an attribute, so the pickle carries state"
        torch.save({"state_dict": state, "hyper_parameters": hyper, "epoch": 3}, tmp_path / "adaface_ir18.ckpt")
    model = empty("iresnet18")
    report = models.load_pretrained(model, tmp_path / "adaface_ir18.ckpt")
    assert report.layout == "adaface" and report.missing == [] and report.unexpected == ["head.kernel"]
    assert len(report.notes) == 3 and "layer1.0" in report.notes[2]  # BGR, BN affine, the subsampling shortcut
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, want = model.eval()(x), adaface_reference(state, x)
    assert want.abs().max() > 0.5 and not torch.allclose(want[0], want[1], rtol=0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert "unexpected, ignored: head.kernel" in report.summary()


# --------------------------------------------------------------------------- unitsface checkpoints, bad input


def checkpoint(path, backbone: str, state: dict[str, torch.Tensor]) -> None:
    meta = {"backbone": backbone, "embedding_size": 32, "head": "cosface", "num_classes": 4, "threshold": None,
            "input": dict(models.INPUT_CONTRACT)}
    atomic_save({"format": "unitsface-checkpoint", "version": 1, "config": {}, "meta": meta, "model": state,
                 "head": {}, "epoch": 1, "step": 7}, path)


def test_unitsface_checkpoint_loads_within_its_family_only(tmp_path) -> None:
    source = models.build("tinyfacenet", 32)
    checkpoint(tmp_path / "last.pt", "tinyfacenet", source.state_dict())
    target = models.build("tinyfacenet", 32)
    report = models.load_pretrained(target, tmp_path / "last.pt")
    assert report.layout == "unitsface" and report.missing == report.unexpected == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(UnitsfaceError, match="'tinyfacenet' .*cannot be loaded into a mobilefacenet backbone"):
        models.load_pretrained(models.build("mobilefacenet", 32), tmp_path / "last.pt")


def test_bad_files_are_one_line_errors(tmp_path) -> None:
    torch.save(arcface_vit_state(dim=32, depth=12, embedding=16), tmp_path / "narrow.pt")
    with torch.device("meta"):
        vit = models.build("vit_t", 16)
    with pytest.raises(UnitsfaceError, match=r"narrow.pt: tensor 'pos_embed' has shape \[1, 144, 32\] in the file "
                                             r"but \[1, 144, 256\] in the model$"):
        models.load_pretrained(vit, tmp_path / "narrow.pt")
    torch.save(arcface_vit_state(dim=32, depth=1, embedding=16), tmp_path / "vit.pt")
    with pytest.raises(UnitsfaceError, match=r"fit no known layout for a vit backbone \(closest: arcface_torch, "
                                             r"29 of 150 tensors\)"):
        models.load_pretrained(vit, tmp_path / "vit.pt")  # one block of twelve
    resnet = empty("iresnet18")
    with pytest.raises(UnitsfaceError, match=rf"closest: arcface_torch, 0 of {len(resnet.state_dict())} tensors"):
        models.load_pretrained(resnet, tmp_path / "vit.pt")
    torch.save({"state_dict": {"model.conv.weight": torch.ones(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(UnitsfaceError, match=r"closest: adaface, 0 of"):
        models.load_pretrained(empty("iresnet18"), tmp_path / "other.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UnitsfaceError, match="not a state dict or checkpoint of any known layout"):
        models.load_pretrained(vit, tmp_path / "list.pt")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UnitsfaceError, match="unreadable weights file"):
        models.load_pretrained(vit, tmp_path / "junk.pth")
    with pytest.raises(UnitsfaceError, match="weights file not found"):
        models.load_pretrained(vit, tmp_path / "absent.pth")
